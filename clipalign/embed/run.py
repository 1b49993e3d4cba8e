"""Embedding a corpus: the loop over this process's parts, and the `clipalign-embed` command.

    clipalign-embed --model runs/quickstart/export --shards '/data/cc3m/{00000..00331}.tar' --out emb/cc3m
    clipalign-embed --model runs/quickstart --folder photos/ --out emb/photos --modalities image
    clipalign-embed --model export/ --table captions.parquet --caption-column text --modalities text --out emb/text
    accelerate launch --num_processes 8 -m clipalign.embed --model export/ --shards '...' --out emb/cc3m

Every process plans the same parts; the main process locks the output directory and says which parts are still to
do (all, or those a killed run did not finish), and process r of N takes the r-th, (r + N)-th, ... of them. Each
process writes its own parts; the main process writes embed.json once all have finished (a barrier), summing their
counts from the parts' markers.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from clipalign import __version__
from clipalign.cli import DEFAULT_PART_SIZE, EMBED_DECODES, EMBED_PRECISIONS, embed_parser
from clipalign.data.transforms import DEFAULT_MAX_IMAGE_PIXELS
from clipalign.embed.corpus import (
    Corpus,
    EmbedInputError,
    PartBatches,
    count_shard_samples,
    plan_folder,
    plan_shards,
    plan_table,
    resolve_modalities,
)
from clipalign.embed.store import DTYPE, EmbedDirError, finish, prepare, release, require_pyarrow, write_part
from clipalign.hardware import cpu_native_bf16
from clipalign.model import DualEncoder, trim_padding

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_CHUNKS, MIN_TEXT_CHUNK = 4, 16  # a batch's captions go through the text tower in this many chunks of this many
# a process that finishes its parts waits at a barrier for the slowest; parts are dealt evenly, but shards differ
_BARRIER_TIMEOUT = timedelta(hours=24)


def embed_corpus(model: DualEncoder, corpus: Corpus, out_dir: str | os.PathLike, *,
                 modalities: Sequence[str] | None = None, batch_size: int = 256, workers: int = 2,
                 precision: str = "auto", decode: str = "draft", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 overwrite: bool = False, progress: bool = True, model_path: str | os.PathLike | None = None,
                 ) -> dict[str, Any]:
    """Embed `corpus` with `model` into the embedding directory `out_dir`, or finish an unfinished one there.

    Every process of a launch calls it with the same arguments (the model on its own device); alone, it runs as one.

    Args:
        model: a `DualEncoder` (`clipalign.load`), on the device to run on.
        corpus: from `plan_shards`, `plan_folder` or `plan_table`.
        out_dir: the embedding directory (see `clipalign.embed`).
        modalities: "image", "text" or both; None: every one the input has.
        batch_size: samples per forward pass.
        workers: DataLoader worker processes per process (decoding and tokenizing); 0 reads in this process.
        precision: "fp32", "bf16" or "fp16" autocast; "auto": bf16 on a GPU that has it (else fp16), fp32 on CPU.
        decode: "draft" decodes JPEGs much larger than the model's input at a reduced DCT scale, as training does
            (faster, a pixel or so apart); "full" decodes every image whole, as `model.preprocess` does.
        max_image_pixels: images with more pixels (header size) are skipped as `bad_image`, never decoded; 0: no
            limit.
        overwrite: replace an embedding directory there (finished or not, of anything).
        progress: a progress bar on the main process (on a terminal only).
        model_path: where the model came from, recorded in embed.json.

    Returns:
        embed.json's content.

    Raises:
        EmbedInputError, EmbedDirError: bad options or input, or an output directory it must not write into.
    """
    from accelerate import PartialState

    require_pyarrow()
    device = next(model.parameters()).device
    modalities = resolve_modalities(corpus, modalities)
    precision = resolve_precision(precision, device)
    if decode not in EMBED_DECODES:
        raise EmbedInputError(f"--decode {decode!r}: expected one of {', '.join(EMBED_DECODES)}")
    if max_image_pixels < 0:
        raise EmbedInputError(f"--max-image-pixels must be >= 0 (0: no limit), got {max_image_pixels}")
    state = PartialState(cpu=device.type == "cpu", timeout=_BARRIER_TIMEOUT)
    plan = _plan(model, corpus, modalities, precision, decode, max_image_pixels, model_path)
    out_dir = Path(out_dir)
    try:
        todo = _from_main(state, lambda: prepare(out_dir, plan, overwrite))
        parts = [corpus.parts[i] for i in todo[state.process_index::state.num_processes]]
        dataset = PartBatches(corpus, parts, modalities, model.tokenizer if "text" in modalities else None,
                              model.image_size, open_clip.get_model_preprocess_cfg(model.clip), batch_size,
                              draft=decode == "draft", max_image_pixels=max_image_pixels)
        bar = _Progress(parts, corpus, progress and state.is_main_process, state.process_index, state.num_processes,
                        finished_before=len(corpus.parts) - len(todo))
        _embed_parts(model, dataset, workers, precision, out_dir, bar)
        state.wait_for_everyone()
        return _from_main(state, lambda: finish(out_dir, plan))
    finally:
        release(out_dir)


def _from_main(state, work: Callable[[], Any]) -> Any:
    """`work()`'s result on the main process, handed to every process; when it raises, every process raises (the
    main one its own error, the others an `EmbedDirError` with its message), rather than the others waiting."""
    from accelerate.utils import broadcast_object_list

    answer: list[Any] = [None, None]
    error = None
    if state.is_main_process:
        try:
            answer[0] = work()
        except Exception as e:
            error, answer[1] = e, str(e)
    if state.num_processes > 1:
        broadcast_object_list(answer)
    if error is not None:
        raise error
    if answer[1] is not None:
        raise EmbedDirError(f"the main process stopped: {answer[1]}")
    return answer[0]


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast precision of `precision` on `device` ("auto": bf16 on a GPU that has it, else fp16; fp32 on CPU).

    Raises:
        EmbedInputError: an unknown precision, or bf16 on a CPU without native bf16 (AVX-512 BF16 or AMX), where
            PyTorch's fallback runs about 250x slower than fp32.
    """
    if precision not in EMBED_PRECISIONS:
        raise EmbedInputError(f"--precision {precision!r}: expected one of {', '.join(EMBED_PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "bf16" and device.type == "cpu" and cpu_native_bf16() is False:
        raise EmbedInputError("--precision bf16 on a CPU without AVX-512 BF16 or AMX: PyTorch's fallback bf16 matrix "
                              "products run about 250x slower than fp32 here; use --precision fp32")
    return precision


def model_fingerprint(model: torch.nn.Module) -> str:
    """A SHA-256 of the model's weights (names, shapes, dtypes, bytes): what a resume checks it embeds with."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _plan(model: DualEncoder, corpus: Corpus, modalities: Sequence[str], precision: str, decode: str,
          max_image_pixels: int, model_path: str | os.PathLike | None) -> dict[str, Any]:
    return {
        "clipalign_version": __version__,
        "model": {"path": str(Path(model_path).absolute()) if model_path else None, "name": model.name,
                  "embed_dim": int(model.model_cfg["embed_dim"]), "fingerprint": model_fingerprint(model),
                  # its temperature multiplier: what a run distilling from these embeddings scores them with
                  "logit_scale": round(float(model.clip.logit_scale.detach().exp()), 6)},
        "source": corpus.source,
        "modalities": list(modalities),
        "columns": list(corpus.columns),
        "settings": {"precision": precision, "decode": decode if "image" in modalities else None,
                     "max_image_pixels": max_image_pixels if "image" in modalities else None,
                     "image_size": model.image_size if "image" in modalities else None},
        "parts": [part.record() for part in corpus.parts],
    }


def _embed_parts(model: DualEncoder, dataset: PartBatches, workers: int, precision: str, out_dir: Path,
                 bar: _Progress) -> None:
    """Embed the parts of `dataset` (this process's) and write each one as soon as its last batch is embedded."""
    device = next(model.parameters()).device
    corpus, modalities = dataset.corpus, dataset.modalities
    loader = DataLoader(dataset, batch_size=None, num_workers=min(workers, len(dataset.parts)),
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers and dataset.parts else None)
    dim = int(model.model_cfg["embed_dim"])
    trims = model.trims_text
    autocast = (torch.autocast(device.type, dtype=_AUTOCAST[precision]) if precision in _AUTOCAST
                else contextlib.nullcontext())
    open_parts: dict[int, _PartRows] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for item in bar.wrap(iter(loader)):
                rows = open_parts.setdefault(item["part"], _PartRows(time.perf_counter()))
                if item.get("end"):
                    del open_parts[item["part"]]
                    _write(out_dir, corpus.parts[item["part"]], rows, item["counts"], modalities, corpus.columns, dim)
                    bar.part_done()
                    continue
                with autocast:
                    if "image" in modalities:
                        pixels = item["images"].to(device, non_blocking=True)
                        rows.add("image", _unit_rows(model.encode_image(pixels, normalize=False)))
                    if "text" in modalities:
                        text = torch.zeros((len(item["meta"]["key"]), dim), dtype=torch.float16, device=device)
                        if item["texts"] is not None:
                            features = _encode_texts(model, item["texts"].to(device, non_blocking=True), trims)
                            text[torch.tensor(item["text_rows"], device=device)] = _unit_rows(features)
                        rows.add("text", text)
                rows.add_meta(item["meta"])
    finally:
        model.train(was_training)
        bar.close()


def _encode_texts(model: DualEncoder, ids: torch.Tensor, trims: bool) -> torch.Tensor:
    """Text features of token ids (T, L), in the rows' order. Where the tower allows cutting the padding
    (`trim_padding`), the rows go in `TEXT_CHUNKS` chunks sorted by length, each cut after its own longest caption:
    one long caption then lengthens its own chunk only, as web captions (mostly short, a few long) need."""
    if not trims:
        return model.encode_text(ids, normalize=False)
    lengths = (ids != 0).sum(dim=1)
    order = lengths.argsort()
    chunk = max(MIN_TEXT_CHUNK, -(-len(order) // TEXT_CHUNKS))
    features = [model.encode_text(trim_padding(ids[rows]), normalize=False) for rows in order.split(chunk)]
    return torch.cat(features)[order.argsort()]


def _unit_rows(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows in float32, stored as float16: normalising in a 16-bit autocast type would leave norms a
    few parts in a thousand off."""
    return torch.nn.functional.normalize(features.float(), dim=-1).to(torch.float16)


class _PartRows:
    """The embedded rows of one part while its batches come in; kept on the device until the part is written, so that
    no batch waits for the one before it to come back."""

    def __init__(self, started: float):
        self.started = started
        self.arrays: dict[str, list[torch.Tensor]] = {}
        self.meta: dict[str, list] = {}

    def add(self, modality: str, rows: torch.Tensor) -> None:
        self.arrays.setdefault(modality, []).append(rows)

    def add_meta(self, meta: dict[str, list]) -> None:
        for column, values in meta.items():
            self.meta.setdefault(column, []).extend(values)


def _write(out_dir: Path, part, rows: _PartRows, counts, modalities: Sequence[str], columns: Sequence[str],
           dim: int) -> None:
    embeddings = {m: torch.cat(rows.arrays[m]).cpu().numpy() if m in rows.arrays else np.zeros((0, dim), dtype=DTYPE)
                  for m in modalities}
    n = len(rows.meta.get("key", []))
    meta = {column: rows.meta.get(column, []) for column in columns}
    marker = {"part": part.index, "source": part.source, "rows": n, "samples": counts.read,
              "skipped": dict(sorted(counts.skipped.items())), "zero_rows": dict(sorted(counts.zero_rows.items())),
              "errors": counts.errors, "seconds": round(time.perf_counter() - rows.started, 3)}
    write_part(out_dir, part.index, embeddings, meta, columns, marker)


class _Progress:
    """The main process's bar: its own samples with their rate and what remains of its share, and its parts.

    The total is known for folders and tables; for local shards it is counted from their member headers in a
    thread, and the bar shows the shards left until then (pipe: and remote shards: the shards left only)."""

    def __init__(self, parts: list, corpus: Corpus, enabled: bool, rank: int, world: int, finished_before: int):
        self.enabled = enabled and sys.stderr.isatty()
        self.parts, self.done = len(parts), 0
        self.sizes = [part.samples for part in parts]
        self.counted: int | None = sum(self.sizes) if all(s is not None for s in self.sizes) else None
        mine = f"process {rank + 1} of {world}: " if world > 1 else ""
        kept = f", {finished_before} finished before" if finished_before else ""
        self.bar = tqdm(total=self.counted, unit="sample", dynamic_ncols=True, disable=not self.enabled,
                        desc=f"embedding ({mine}{self.parts} parts{kept})", smoothing=0.1)
        self.urls = [corpus.urls[part.index] for part in parts] if corpus.kind == "shards" else []
        self.bar.set_postfix_str(self._parts_left(), refresh=False)

    def wrap(self, items):
        if self.enabled and self.counted is None and self.urls:
            # started once the DataLoader's workers exist: a fork while a thread runs is best avoided
            threading.Thread(target=self._count, daemon=True).start()
        for item in items:
            if self.counted is not None and self.bar.total is None:
                self.bar.total = self.counted
            self.bar.update(item["read"])
            yield item

    def _count(self) -> None:
        total = 0
        for url in self.urls:
            count = count_shard_samples(url)
            if count is None:
                return
            total += count
        self.counted = total

    def _parts_left(self) -> str:
        return f"parts left: {self.parts - self.done}"

    def part_done(self) -> None:
        self.done += 1
        self.bar.set_postfix_str(self._parts_left())

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------------------------------------------
# the command


def _corpus(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Corpus:
    if args.shards is not None:
        if args.part_size is not None:
            parser.error("--part-size applies to --folder and --table; with --shards each shard is one part")
        return plan_shards(args.shards)
    part_size = DEFAULT_PART_SIZE if args.part_size is None else args.part_size
    if args.folder is not None:
        return plan_folder(args.folder, part_size)
    return plan_table(args.table, args.image_column, args.caption_column, args.key_column, args.image_root,
                      args.table_format, part_size)


def _device(spec: str):
    """The PartialState of this launch and the device to load the model on."""
    from accelerate import PartialState

    cpu = spec == "cpu" or (spec == "auto" and not torch.accelerator.is_available())
    state = PartialState(cpu=cpu, timeout=_BARRIER_TIMEOUT)
    if spec in ("auto", "cpu") or state.num_processes > 1 or torch.device(spec).index is None:
        return state, state.device
    return state, torch.device(spec)


def main(argv: Sequence[str] | None = None) -> None:
    """`clipalign-embed`: embed a corpus with an export, checkpoint or run directory (`embed_corpus` from Python:
    this returns nothing, since the console script exits with what it returns)."""
    parser = embed_parser()
    args = parser.parse_args(argv)
    state = None
    try:
        require_pyarrow()
        corpus = _corpus(args, parser)
        state, device = _device(args.device)
        from clipalign.model import load

        model = load(args.model, device=device)
        config = embed_corpus(model, corpus, args.out, modalities=args.modalities, batch_size=args.batch_size,
                              workers=args.workers, precision=args.precision, decode=args.decode,
                              max_image_pixels=args.max_image_pixels, overwrite=args.overwrite,
                              progress=not args.no_progress, model_path=args.model)
    # a bad option or input, an output directory it must not write into: say what, in one line
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    finally:
        if state is not None and state.use_distributed:
            state.destroy_process_group()  # a gloo process that exits with its group open aborts the launch
    if state.is_main_process:
        skipped = ", ".join(f"{k}={v}" for k, v in config["skipped"].items()) or "none"
        embedded = ", ".join(f"{m} {n}" for m, n in config["embedded"].items())
        print(f"{config['rows']} rows ({embedded}) of {config['samples']} samples in {args.out}; skipped: {skipped}")


if __name__ == "__main__":
    main()
