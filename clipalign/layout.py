"""The directories clipalign writes and reads: every file name in them, and the helpers that read and write them.

A run directory (`train.output_dir`):

    config.yaml                   RUN_CONFIG_FILE          the resolved config
    metrics.jsonl                 METRICS_FILE             a JSON line per log step, and one per evaluation
    summary.json                  SUMMARY_FILE             the end of the run: steps, samples, skips, results
    keys/rankN.jsonl              keys_file()              with data.log_keys: each step's sample keys, per process
    curves.png                    CURVES_FILE              clipalign-plot's default output
    run.lock                      RUN_LOCK_FILE            locked by the live run's main process: one run at a time
    checkpoints/step_XXXXXXXX/    checkpoint_dir()         a checkpoint, holding
      model.safetensors           CHECKPOINT_WEIGHTS_FILE  the model's weights, as Accelerate's save_state names them
      ...                                                  the rest of Accelerate's state (optimizer, scheduler, RNG)
      sharded_state/              SHARDED_STATE_DIR        instead of the two above, from train.sharding=fsdp: model and
                                                           optimizer state as torch.distributed.checkpoint shards
      config.yaml                 RUN_CONFIG_FILE          the resolved config again
      tokenizer.model             TOKENIZER_FILE           the SentencePiece tokenizer, when the run used one
      trainer_state.json          TRAINER_STATE_FILE       written last: step, samples seen, data positions

An export directory (`clipalign-export`; open_clip loads it as `local-dir:DIR`):

    open_clip_config.json         EXPORT_CONFIG_FILE       {"model_cfg", "preprocess_cfg", "model_name"}
    open_clip_model.safetensors   EXPORT_WEIGHTS_FILE      the CLIP state dict (open_clip's key names)
    image_encoder.safetensors     IMAGE_ENCODER_WEIGHTS    the image tower alone (open_clip's vision tower keys) ...
    image_encoder_config.json     IMAGE_ENCODER_CONFIG     ... with embed_dim, vision_cfg, preprocess_cfg
    text_encoder.safetensors      TEXT_ENCODER_WEIGHTS     the text tower alone (open_clip's text tower keys) ...
    text_encoder_config.json      TEXT_ENCODER_CONFIG      ... with embed_dim, text_cfg and the tokenizer it needs
    tokenizer.model               TOKENIZER_FILE           the SentencePiece tokenizer, if the model has one
    README.md                     MODEL_CARD_FILE          the model card: config, data, steps, results
    image_encoder.onnx            IMAGE_ONNX               with --onnx: pixels (B, 3, H, W) float -> embeddings (B, D)
    text_encoder.onnx             TEXT_ONNX                with --onnx: token ids (B, L) -> embeddings (B, D)

  and with --format transformers, beside them, the files of transformers' CLIPModel and CLIPProcessor (as open_clip
  models on the Hugging Face Hub carry both; no name is shared with open_clip's):

    config.json                   TRANSFORMERS_CONFIG_FILE      CLIPConfig (+ logit_bias of a sigmoid-loss model)
    model.safetensors             TRANSFORMERS_WEIGHTS_FILE     the weights under CLIPModel's names
    tokenizer.json                TRANSFORMERS_TOKENIZER_FILE   the fast tokenizer: open_clip's ids
    tokenizer_config.json         TRANSFORMERS_TOKENIZER_CONFIG its special tokens and context length
    processor_config.json         TRANSFORMERS_PROCESSOR_CONFIG CLIPProcessor with the image processor's settings

An embedding directory (`clipalign-embed`), in clip-retrieval's layout, which autofaiss, numpy and pandas read: the
arrays of part N and its metadata hold the same rows in the same order.

    embed.json                    EMBED_CONFIG_FILE        what made it: model, source, modalities, dim, dtype, counts
    img_emb/img_emb_NNNNN.npy     embedding_part()         float16 (n, D) L2-normalised image embeddings of part N
    text_emb/text_emb_NNNNN.npy   embedding_part()         float16 (n, D) L2-normalised text embeddings of part N
                                                           (zeros in a row whose sample has no caption)
    metadata/metadata_NNNNN.parquet  metadata_part()       one row per sample: key, caption, where it came from
    parts/plan.json               embed_plan_file()        written first: the model, input, settings and parts
    parts/part_NNNNN.json         embed_part_marker()      written after part N's files: its rows and skip counts
    run.lock                      RUN_LOCK_FILE            locked by the live run's main process: one writer at a time

  embed.json is written last, once every part is: a directory without it is an unfinished embedding, which the same
  command resumes (the parts with a marker are kept, the others embedded again).

An index directory (`clipalign-index`), named as clip-retrieval's index folder names its files: the ids in an index
are the rows of the embedding directory's parts taken in order, so row i's metadata is part and row of the same i.

    index.json                    INDEX_CONFIG_FILE        what each index holds: embedding dir, model, kind, faiss
                                                           factory key, search parameters, recall@10, build time, sizes
    image.index                   index_file()             faiss index of the image embeddings (faiss.write_index)
    text.index                    index_file()             the same for the text embeddings, when built

Nothing here imports model code, so every module can take its names from here (model.py reads exports, export.py
writes them); safetensors, and torch with it, is imported only by the functions that read or write weights.

Every file clipalign writes under its final name goes through `atomic_path` / `write_atomic`: a crash leaves the old
file or the new one, never half of one, and two writers of one file never share a temporary name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# ---- run directory ----------------------------------------------------------------------------------------------
RUN_CONFIG_FILE = "config.yaml"  # in the run directory and in every checkpoint
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
KEYS_DIR = "keys"
CURVES_FILE = "curves.png"
RUN_LOCK_FILE = "run.lock"
CHECKPOINTS_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^step_(\d{8,})$")

# ---- checkpoint directory ---------------------------------------------------------------------------------------
CHECKPOINT_WEIGHTS_FILE = "model.safetensors"  # what Accelerate's save_state writes for the first prepared model
OPTIMIZER_FILE = "optimizer.bin"  # Accelerate's name for the (first) optimizer's state
SHARDED_STATE_DIR = "sharded_state"  # torch.distributed.checkpoint: {"model": ..., "optim": ...}, one file per process
TRAINER_STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
TOKENIZER_FILE = "tokenizer.model"  # a SentencePiece tokenizer travels with checkpoints and exports under this name

# ---- export directory -------------------------------------------------------------------------------------------
EXPORT_CONFIG_FILE = "open_clip_config.json"  # the name open_clip's local-dir: reads
EXPORT_WEIGHTS_FILE = "open_clip_model.safetensors"  # the first name open_clip looks for in a local-dir:
IMAGE_ENCODER_WEIGHTS = "image_encoder.safetensors"
IMAGE_ENCODER_CONFIG = "image_encoder_config.json"
TEXT_ENCODER_WEIGHTS = "text_encoder.safetensors"
TEXT_ENCODER_CONFIG = "text_encoder_config.json"
MODEL_CARD_FILE = "README.md"
IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
TRANSFORMERS_CONFIG_FILE = "config.json"  # the names transformers' save_pretrained / from_pretrained use
TRANSFORMERS_WEIGHTS_FILE = "model.safetensors"
TRANSFORMERS_TOKENIZER_FILE = "tokenizer.json"
TRANSFORMERS_TOKENIZER_CONFIG = "tokenizer_config.json"
TRANSFORMERS_PROCESSOR_CONFIG = "processor_config.json"
TRANSFORMERS_FILES = (TRANSFORMERS_CONFIG_FILE, TRANSFORMERS_WEIGHTS_FILE, TRANSFORMERS_TOKENIZER_FILE,
                      TRANSFORMERS_TOKENIZER_CONFIG, TRANSFORMERS_PROCESSOR_CONFIG)
_TOWER_FILES = {"image": (IMAGE_ENCODER_CONFIG, IMAGE_ENCODER_WEIGHTS),
                "text": (TEXT_ENCODER_CONFIG, TEXT_ENCODER_WEIGHTS)}

# ---- embedding directory ----------------------------------------------------------------------------------------
EMBED_CONFIG_FILE = "embed.json"
EMBEDDING_DIRS = {"image": "img_emb", "text": "text_emb"}  # clip-retrieval's folder (and file) names
METADATA_DIR = "metadata"
EMBED_PARTS_DIR = "parts"  # what a resume reads: the plan, and a marker per finished part
EMBED_PLAN_FILE = "plan.json"

# ---- index directory --------------------------------------------------------------------------------------------
INDEX_CONFIG_FILE = "index.json"
INDEX_FILES = {"image": "image.index", "text": "text.index"}  # clip-retrieval's names


# ---- atomic writes -----------------------------------------------------------------------------------------------


def temp_name(path: str | os.PathLike) -> Path:
    """A hidden name beside `path`, unique to this process and call: `.NAME.tmp-PID-RANDOM`."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; renamed over `path` when the block ends without error.

    For writers that take a file name (savefig, safetensors, tar writers). The file is fsynced before the rename and
    the directory after it, so after a crash `path` holds the old content or the new, never part of it. On an error
    the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        commit_temp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit_temp(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a complete temporary file (from `temp_name`) over `path`, durably: fsync, rename, fsync the folder."""
    _fsync_file(Path(tmp))
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def write_atomic(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write `data` (text or bytes) to `path` atomically (see `atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode(encoding) if isinstance(data, str) else data)
    return Path(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; best effort, as some filesystems cannot open or sync a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- run directory lock -----------------------------------------------------------------------------------------


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """The lock of a run directory, held until `release()`, the next `lock_run_dir` of it here, or the process's end.

    A POSIX record lock (`fcntl.lockf`) on `RUN/run.lock`: the OS drops it when the process dies, so a killed run
    leaves no stale lock. Not `flock`: an flock is shared with forked children (DataLoader workers), which outlive a
    killed main process for a while and would keep the directory locked. A POSIX lock is also dropped when this
    process closes any descriptor of the lock file, so nothing else in the run opens it.
    """

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self._fd = run_dir, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None
        if _HELD.get(self.run_dir) is self:
            del _HELD[self.run_dir]


_HELD: dict[Path, RunLock] = {}  # run directory (resolved) -> this process's lock on it


def lock_run_dir(run_dir: str | os.PathLike) -> RunLock:
    """Lock `run_dir` (created if missing) for this process's run; only a run's main process calls this.

    Raises:
        RunDirBusy: another live process holds it; the message names the directory and that process's id.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    if key in _HELD:
        # an earlier run of this process that did not release it: runs in one process follow each other, so it is
        # over. Released before the new descriptor opens: closing any descriptor of the file drops a POSIX lock
        _HELD[key].release()
    path = run_dir / RUN_LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirBusy(f"{run_dir} is in use by another run (pid {holder}, lock {path}); wait for it to end or "
                         f"choose another train.output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    lock = _HELD[key] = RunLock(key, fd)  # kept here, so the lock lives until released even if the caller drops it
    return lock


def release_run_dir(run_dir: str | os.PathLike) -> None:
    """Release this process's lock on `run_dir`, if it holds one."""
    lock = _HELD.get(Path(run_dir).resolve())
    if lock is not None:
        lock.release()


# ---- embedding directories --------------------------------------------------------------------------------------


def embedding_part(embed_dir: str | os.PathLike, modality: str, part: int) -> Path:
    """The array of one part's `modality` ("image" or "text") embeddings in an embedding directory."""
    folder = EMBEDDING_DIRS[modality]
    return Path(embed_dir) / folder / f"{folder}_{part:05d}.npy"


def metadata_part(embed_dir: str | os.PathLike, part: int) -> Path:
    """The parquet table of one part's samples (the rows of its arrays, in order) in an embedding directory."""
    return Path(embed_dir) / METADATA_DIR / f"{METADATA_DIR}_{part:05d}.parquet"


def embed_plan_file(embed_dir: str | os.PathLike) -> Path:
    """The plan of an embedding run (model, input, settings, parts), written before any part."""
    return Path(embed_dir) / EMBED_PARTS_DIR / EMBED_PLAN_FILE


def embed_part_marker(embed_dir: str | os.PathLike, part: int) -> Path:
    """The marker of a finished part, written after its arrays and metadata: its presence means part N is whole."""
    return Path(embed_dir) / EMBED_PARTS_DIR / f"part_{part:05d}.json"


# ---- index directories ------------------------------------------------------------------------------------------


def index_file(index_dir: str | os.PathLike, modality: str) -> Path:
    """The faiss index of one modality's ("image" or "text") embeddings in an index directory."""
    return Path(index_dir) / INDEX_FILES[modality]


# ---- run and checkpoint directories -----------------------------------------------------------------------------


def keys_file(run_dir: str | os.PathLike, rank: int) -> Path:
    """Where process `rank` logs the sample keys of each step (data.log_keys)."""
    return Path(run_dir) / KEYS_DIR / f"rank{rank}.jsonl"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The checkpoint of `step` in a run directory (whether it exists or not)."""
    return Path(run_dir) / CHECKPOINTS_DIR / checkpoint_name(step)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step a checkpoint directory's name gives; None for a name that is not a checkpoint's."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_run_dir(ckpt: str | os.PathLike) -> Path:
    """The run directory a checkpoint directory sits in."""
    return Path(ckpt).parent.parent


def is_sharded_checkpoint(ckpt: str | os.PathLike) -> bool:
    """Whether a checkpoint holds its model and optimizer as torch.distributed.checkpoint shards (FSDP runs)."""
    return (Path(ckpt) / SHARDED_STATE_DIR / ".metadata").is_file()


def read_checkpoint_weights(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's state dict in a checkpoint directory, whole, whichever way it was saved.

    A sharded checkpoint's weights are assembled from every process's file in this one process (no process group
    needed), so a checkpoint of N processes reads the same on one.

    Raises:
        FileNotFoundError: the checkpoint holds no model weights.
    """
    if is_sharded_checkpoint(ckpt):
        return _read_sharded_weights(Path(ckpt) / SHARDED_STATE_DIR)
    from safetensors.torch import load_file

    weights = Path(ckpt) / CHECKPOINT_WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no model weights in this checkpoint (nor {SHARDED_STATE_DIR}/)")
    return load_file(str(weights))


def _read_sharded_weights(directory: Path) -> dict[str, torch.Tensor]:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(directory))
    prefix = "model."
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in reader.read_metadata().state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not state:
        raise FileNotFoundError(f"{directory}: no model weights in this sharded checkpoint")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {key[len(prefix):]: value for key, value in state.items()}


# ---- export directory -------------------------------------------------------------------------------------------


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is an export directory (it has open_clip's config)."""
    return (Path(path) / EXPORT_CONFIG_FILE).is_file()


def read_export_config(path: str | os.PathLike) -> dict[str, Any]:
    """An export directory's open_clip config: {"model_cfg", "preprocess_cfg", "model_name"}."""
    return json.loads((Path(path) / EXPORT_CONFIG_FILE).read_text())


def read_tower(path: str | os.PathLike, tower: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and weights of one tower ("image" or "text") of an export directory.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    from safetensors.torch import load_file

    config_name, weights_name = _TOWER_FILES[tower]
    cfg_path, weights_path = Path(path) / config_name, Path(path) / weights_name
    for needed in (cfg_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} does not exist; export the model with clipalign-export first")
    return json.loads(cfg_path.read_text()), load_file(str(weights_path))


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """A config file of an export directory: indented JSON with a final newline."""
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def write_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> None:
    """A safetensors file of an export directory, with the metadata open_clip's loader expects."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(_standalone(state_dict), str(tmp), metadata={"format": "pt"})


def _standalone(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors that own contiguous storage: safetensors refuses shared or strided views."""
    import torch

    seen: set[int] = set()
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out[key] = tensor
    return out
