"""Hand a trained model to downstream users: an open_clip `local-dir:` directory, optionally with ONNX towers and
with transformers' `CLIPModel` / `CLIPProcessor` files (`clipalign.hf_export`).

The directory (its files are listed and named in `clipalign.layout`) loads with
`open_clip.create_model_and_transforms("local-dir:DIR")` or `clipalign.load(DIR)`; one tower on its own loads with
`clipalign.load_image_encoder(DIR)` / `clipalign.load_text_encoder(DIR)`; with `--format transformers`, also with
`transformers.CLIPModel.from_pretrained(DIR)` and `CLIPProcessor.from_pretrained(DIR)`:

    clipalign-export --checkpoint runs/quickstart --out exports/quickstart --onnx --format transformers
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from clipalign import __version__, hf_export
from clipalign.checkpoint import CheckpointError, read_trainer_state, resolve_checkpoint
from clipalign.cli import ONNX_EXPORTERS, export_parser
from clipalign.config import EXPORT_FORMATS, read_config, redact_source
from clipalign.layout import (
    EXPORT_CONFIG_FILE,
    EXPORT_WEIGHTS_FILE,
    IMAGE_ENCODER_CONFIG,
    IMAGE_ENCODER_WEIGHTS,
    IMAGE_ONNX,
    METRICS_FILE,
    MODEL_CARD_FILE,
    RUN_CONFIG_FILE,
    TEXT_ENCODER_CONFIG,
    TEXT_ENCODER_WEIGHTS,
    TEXT_ONNX,
    TOKENIZER_FILE,
    TRANSFORMERS_CONFIG_FILE,
    checkpoint_run_dir,
    is_export,
    read_export_config,
    write_json,
    write_weights,
)
from clipalign.model import DualEncoder, load, merged_model, tower_state_dicts
from clipalign.tokenizer import SentencePieceTokenizer, directory_tokenizer, tokenize

CONFIG_FILE, WEIGHTS_FILE = EXPORT_CONFIG_FILE, EXPORT_WEIGHTS_FILE  # this module's names for them, for callers
ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-4  # max abs difference of normalised embeddings, onnxruntime vs PyTorch
_PROBE_TEXTS = ["a photo of a cat.", "a red circle on a blue background", ""]
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GiB limit: bigger towers keep their weights in FILE.onnx.data

log = logging.getLogger(__name__)


def export_model(model_or_checkpoint: DualEncoder | str | os.PathLike, out_dir: str | os.PathLike,
                 onnx: bool = False, onnx_exporter: str = "auto", export_format: str | None = None,
                 source: str | None = None) -> Path:
    """Write an open_clip-loadable export directory (and ONNX towers, and transformers' files) for a model or
    checkpoint.

    The directory is written under a temporary sibling name and renamed into place when complete. An existing
    `out_dir` is replaced only if it is empty or an earlier export; anything else is an error.

    Args:
        model_or_checkpoint: a `DualEncoder`, or a checkpoint, run (latest checkpoint) or export directory.
        out_dir: the export directory.
        onnx: also export each tower to ONNX and check it against PyTorch with onnxruntime.
        onnx_exporter: "dynamo" (torch.export), "torchscript" (the legacy tracer) or "auto" (dynamo, falling back
            to torchscript if dynamo fails).
        export_format: "open_clip" (its files only) or "transformers" (also `CLIPModel` / `CLIPProcessor` files,
            checked against the model); None: the run's `export.format` for a checkpoint or run, "transformers" for
            an export that has transformers' files, else "open_clip".
        source: what the model card names as the model's origin, for a `DualEncoder` made in memory (a
            checkpoint's or export's own path otherwise).

    Returns:
        The export directory.

    Raises:
        hf_export.NotExportable: "transformers" for a model that `CLIPModel` cannot hold (raised before anything is
            written; the message says why).
    """
    if onnx_exporter not in ONNX_EXPORTERS:
        raise ValueError(f"onnx_exporter {onnx_exporter!r} is not one of {', '.join(ONNX_EXPORTERS)}")
    if export_format is not None and export_format not in EXPORT_FORMATS:
        raise ValueError(f"export_format {export_format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out_dir)
    check_export_target(out)
    if onnx and (missing := onnx_missing(onnx_exporter)):
        raise ModuleNotFoundError(missing)
    model, model_cfg, provenance, resolved_source, own_format = _resolve(model_or_checkpoint)
    source = resolved_source or source
    # converted (and refused) before anything is written
    transformers = hf_export.convert(model, model_cfg) if (export_format or own_format) == "transformers" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # unlike tempfile.mkdtemp's 0700, this keeps the umask's permissions for the final directory
    try:
        config = {"model_cfg": model_cfg, "preprocess_cfg": open_clip.get_model_preprocess_cfg(model.clip),
                  "model_name": model.name}
        write_json(tmp / EXPORT_CONFIG_FILE, config)
        write_weights(tmp / EXPORT_WEIGHTS_FILE, model.clip.state_dict())
        if isinstance(model.tokenizer, SentencePieceTokenizer):
            model.tokenizer.save(tmp / TOKENIZER_FILE)
        elif hasattr(model.tokenizer, "save_pretrained"):
            model.tokenizer.save_pretrained(str(tmp))  # open_clip reads HF tokenizers of a local-dir: from the dir
        _check_tokenizer(model, model_cfg, tmp)
        _write_towers(model, model_cfg, tmp)
        transformers_info = transformers.save(tmp) if transformers else None
        onnx_info = _export_onnx(model, tmp, onnx_exporter) if onnx else None
        (tmp / MODEL_CARD_FILE).write_text(_model_card(model, model_cfg, provenance, source, str(out), onnx_info,
                                                       transformers_info))
        _umask_permissions(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_export_target(out: str | os.PathLike, given_as: str = "--out") -> None:
    """An export may go to `out`: it does not exist, is an empty directory, or holds an earlier export (replaced).
    Anything else is a FileExistsError naming what is there, so that a typo cannot wipe a directory."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{given_as} {out} is a file; an export is a directory: give a new or empty one")
    if any(out.iterdir()) and not is_export(out):
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise FileExistsError(f"{given_as} {out} exists and is not an export (it holds {shown}); an export replaces "
                              f"only an earlier export: give a new or empty directory")


def _resolve(source: DualEncoder | str | os.PathLike) -> tuple[DualEncoder, dict, dict, str | None, str]:
    """The model, its open_clip config, what the model card reports of its training (from a checkpoint: the
    trainer state, the run's data and loss, its last evaluation), where it came from, and its own export format
    (the run's `export.format`; an export's, from its files)."""
    if isinstance(source, DualEncoder):  # a LoRA model is exported merged: plain open_clip weights
        return merged_model(source), source.open_clip_config(), {}, None, "open_clip"
    path = Path(source)
    model = load(path)
    if is_export(path):  # re-exporting an export: its config may name a model not registered here
        own_format = "transformers" if (path / TRANSFORMERS_CONFIG_FILE).is_file() else "open_clip"
        return model, read_export_config(path)["model_cfg"], {}, str(path), own_format
    ckpt = resolve_checkpoint(path)
    state = read_trainer_state(ckpt)
    cfg = read_config(ckpt / RUN_CONFIG_FILE)
    # the card is shared: pipe: commands and URL credentials are redacted (the run's config.yaml keeps them)
    data = redact_source(cfg.data.train) if cfg.data.train else (
        f"synthetic ({cfg.data.synthetic_samples} samples)" if cfg.data.synthetic else "")
    provenance = {"step": state.get("step"), "samples_seen": state.get("samples_seen"), "data": data,
                  "loss": f"{cfg.loss.kind} ({cfg.loss.mode})" if cfg.loss.kind == "contrastive" else cfg.loss.kind,
                  "evaluation": _last_evaluation(checkpoint_run_dir(ckpt) / METRICS_FILE, state.get("step"))}
    return model, model.open_clip_config(), provenance, str(ckpt), cfg.export.format


def _last_evaluation(metrics: Path, step: int | None) -> dict:
    """The run's last zero-shot / retrieval record at or before `step` in its metrics file ({} when none)."""
    found: dict = {}
    if not metrics.is_file() or step is None:
        return found
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if record.get("step", step + 1) <= step and ("zeroshot" in record or "retrieval" in record):
            found = record
    return found


def _write_towers(model: DualEncoder, model_cfg: dict, out_dir: Path) -> None:
    """Each tower on its own: weights with open_clip's tower key names, and a config that rebuilds the tower."""
    image, text = tower_state_dicts(model.clip)
    common = {"embed_dim": model_cfg["embed_dim"], "quick_gelu": model_cfg.get("quick_gelu", False),
              "model_name": model.name, "clipalign_version": __version__}
    image_cfg = {"tower": "image", "vision_cfg": model_cfg["vision_cfg"],
                 "preprocess_cfg": open_clip.get_model_preprocess_cfg(model.clip), **common}
    spm = isinstance(model.tokenizer, SentencePieceTokenizer)
    text_cfg = {"tower": "text", "text_cfg": model_cfg["text_cfg"],
                "tokenizer": TOKENIZER_FILE if spm else "open_clip", **common}
    for weights, name, cfg, cfg_name in ((image, IMAGE_ENCODER_WEIGHTS, image_cfg, IMAGE_ENCODER_CONFIG),
                                         (text, TEXT_ENCODER_WEIGHTS, text_cfg, TEXT_ENCODER_CONFIG)):
        write_weights(out_dir / name, weights)
        write_json(out_dir / cfg_name, cfg)


def _check_tokenizer(model: DualEncoder, model_cfg: dict, export_dir: Path) -> None:
    """The export must rebuild the very tokenizer the model was trained with, or it is useless: the tokenizer is
    rebuilt as loading does it (open_clip's own from the directory, or the SentencePiece model written there)."""
    spm = isinstance(model.tokenizer, SentencePieceTokenizer)
    theirs = directory_tokenizer(export_dir, model_cfg.get("text_cfg", {}), spm)
    ours_ids, theirs_ids = tokenize(model.tokenizer, _PROBE_TEXTS), tokenize(theirs, _PROBE_TEXTS)
    if not torch.equal(ours_ids, theirs_ids):
        source = f"the {TOKENIZER_FILE} written" if spm else "open_clip.get_tokenizer('local-dir:...')"
        raise ValueError(f"model {model.name!r}: {source} does not reproduce the model's tokenizer "
                         f"({type(model.tokenizer).__name__}); it cannot be exported")


def _umask_permissions(directory: Path) -> None:
    """Give every file the umask's usual permissions: safetensors writes 0600, too tight for a shared export."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():  # an earlier export or an empty directory (checked before the work started)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- ONNX ------------------------------------------------------------------------------------------------------


class _ImageTower(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixel_values, normalize=True)  # (B, D)


class _TextTower(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(input_ids, normalize=True)  # (B, D)


def onnx_missing(exporter: str = "auto") -> str | None:
    """What ONNX export lacks on this machine, as one line naming the extra to install; None when nothing does.

    The export needs `onnx` (torch.onnx writes with it) and `onnxruntime` (each tower is checked with it); the
    dynamo exporter (`auto`, `dynamo`) also needs `onnxscript`."""
    needed = ("onnx", "onnxruntime") + (("onnxscript",) if exporter != "torchscript" else ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"ONNX export needs {', '.join(missing)} (not installed): pip install 'clipalign[onnx]' (or pip install "
            f"{' '.join(missing)})")


def _export_onnx(model: DualEncoder, out_dir: Path, exporter: str) -> dict[str, Any]:
    """Export both towers, check each with onnxruntime on a batch of 3; returns what the model card reports."""
    clip = copy.deepcopy(model.clip).cpu().float().eval()  # the caller's model keeps its device and mode
    size = model.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = tokenize(model.tokenizer, _PROBE_TEXTS)
    info: dict[str, Any] = {"opset": ONNX_OPSET}
    towers = [("image", _ImageTower(clip), pixels, IMAGE_ONNX, "pixel_values", "image_embeds"),
              ("text", _TextTower(clip), ids, TEXT_ONNX, "input_ids", "text_embeds")]
    for kind, tower, example, filename, input_name, output_name in towers:
        path = out_dir / filename
        used = _export_tower(tower.eval(), example[:2], path, input_name, output_name, exporter)
        diff = _check_onnx(path, tower, example)
        info[kind] = {"file": filename, "exporter": used, "input": input_name, "output": output_name,
                      "max_abs_diff": diff}
    return info


def _export_tower(tower: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
                  exporter: str) -> str:
    """Export one tower with a dynamic batch axis; returns the exporter that succeeded."""
    if exporter in ("auto", "dynamo"):
        try:
            big = sum(p.numel() * p.element_size() for p in tower.parameters()) > _EXTERNAL_DATA_BYTES
            torch.onnx.export(tower, (example,), str(path), input_names=[input_name], output_names=[output_name],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=ONNX_OPSET,
                              dynamo=True, external_data=big, verbose=False)
            return "dynamo"
        except Exception as e:
            if exporter == "dynamo":
                raise
            log.warning("dynamo ONNX export of %s failed (%s: %s); trying the TorchScript exporter",
                        path.name, type(e).__name__, e)
            for leftover in (path, path.with_name(path.name + ".data")):
                leftover.unlink(missing_ok=True)
    with warnings.catch_warnings():
        # The tracer warns about every Python-level branch; the onnxruntime check below is what counts.
        warnings.simplefilter("ignore")
        torch.onnx.export(tower, (example,), str(path), input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False)
    return "torchscript"


@torch.no_grad()
def _check_onnx(path: str | os.PathLike, tower: nn.Module, example: torch.Tensor,
               tolerance: float = ONNX_TOLERANCE) -> float:
    """Run an exported tower with onnxruntime on `example`; returns the max abs difference from PyTorch.

    Raises:
        RuntimeError: when the difference is `tolerance` or more.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    got = torch.from_numpy(session.run(None, {inp.name: example.numpy()})[0])
    want = tower(example).float()
    diff = (got - want).abs().max().item()
    if not diff < tolerance:
        raise RuntimeError(f"{path}: onnxruntime output differs from PyTorch by {diff:.3g} (tolerance {tolerance:g}) "
                           f"on a batch of {len(example)}")
    return diff


# ---- model card ------------------------------------------------------------------------------------------------


def _model_card(model: DualEncoder, model_cfg: dict, provenance: dict, source: str | None, dirname: str,
                onnx_info: dict | None, transformers_info: dict | None = None) -> str:
    context_length = model_cfg.get("text_cfg", {}).get("context_length", 77)
    params = sum(p.numel() for p in model.clip.parameters())
    lines = [
        f"# {model.name} (clipalign export)",
        "",
        f"A CLIP-style dual encoder trained with clipalign {__version__}: image and text embeddings share one space "
        "and are compared by cosine similarity.",
        "",
        "| | |",
        "| --- | --- |",
        f"| model config | `{model.name}` (in `{EXPORT_CONFIG_FILE}`) |",
        f"| embedding dim | {model_cfg.get('embed_dim')} |",
        f"| image size | {model.image_size} px |",
        f"| context length | {context_length} tokens |",
        f"| parameters | {params / 1e6:.1f} M |",
        f"| logit scale | {model.clip.logit_scale.exp().item():.2f} |",
    ]
    if model.clip.logit_bias is not None:
        lines.append(f"| logit bias | {model.clip.logit_bias.item():.4f} |")
    for key, label in (("data", "training data"), ("loss", "loss"), ("step", "training steps"),
                       ("samples_seen", "samples seen")):
        if provenance.get(key) not in (None, ""):
            value = provenance[key]
            lines.append(f"| {label} | `{value}` |" if key == "data" else f"| {label} | {value} |")
    if source:
        lines.append(f"| exported from | `{source}` |")
    lines += _evaluation_lines(provenance.get("evaluation") or {})
    spm = isinstance(model.tokenizer, SentencePieceTokenizer)
    lines += [
        "",
        "## Load with open_clip",
        "",
        *([f"The text tower reads ids from the SentencePiece tokenizer in `{TOKENIZER_FILE}`, which open_clip's "
           "`get_tokenizer` cannot build: tokenize with clipalign's `SentencePieceTokenizer` (below).", ""]
          if spm else []),
        "```python",
        "import open_clip",
        f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{dirname}")',
        (f'from clipalign.tokenizer import SentencePieceTokenizer\ntokenizer = SentencePieceTokenizer("{dirname}/'
         f'{TOKENIZER_FILE}", context_length={context_length})') if spm else
        f'tokenizer = open_clip.get_tokenizer("local-dir:{dirname}")',
        "image_features = model.encode_image(preprocess(image).unsqueeze(0), normalize=True)",
        'text_features = model.encode_text(tokenizer(["a photo of a cat"]), normalize=True)',
        "```",
        "",
        "## Load with clipalign",
        "",
        "```python",
        "import clipalign",
        f'model = clipalign.load("{dirname}")',
        "image_features = model.encode_image(model.preprocess(image).unsqueeze(0))",
        'text_features = model.encode_text(model.tokenizer(["a photo of a cat"]))',
        "```",
    ]
    lines += [
        "",
        "## One tower on its own",
        "",
        f"`{IMAGE_ENCODER_WEIGHTS}` and `{TEXT_ENCODER_WEIGHTS}` hold each tower's weights, with "
        f"`{IMAGE_ENCODER_CONFIG}` / `{TEXT_ENCODER_CONFIG}` to rebuild it, for systems that need only one side "
        "(an image index, a text query service):",
        "",
        "```python",
        "import clipalign",
        f'text_encoder = clipalign.load_text_encoder("{dirname}")',
        'embeddings = text_encoder(text_encoder.tokenizer(["a photo of a cat"]))  # L2-normalised',
        "```",
    ]
    if transformers_info:
        lines += hf_export.card_lines(transformers_info, dirname)
    if onnx_info:
        image, text = onnx_info["image"], onnx_info["text"]
        lines += [
            "",
            "## ONNX",
            "",
            f"Opset {onnx_info['opset']}, dynamic batch axis; outputs are L2-normalised embeddings. "
            "Checked against PyTorch with onnxruntime on a batch of 3 at export time.",
            "",
            "| file | input | output | exporter | max abs diff |",
            "| --- | --- | --- | --- | --- |",
            f"| `{image['file']}` | `{image['input']}` float32 (B, 3, {model.image_size}, {model.image_size}), "
            f"normalised as `preprocess` does | `{image['output']}` (B, {model_cfg.get('embed_dim')}) "
            f"| {image['exporter']} | {image['max_abs_diff']:.1e} |",
            f"| `{text['file']}` | `{text['input']}` int64 (B, {context_length}) from the tokenizer "
            f"| `{text['output']}` (B, {model_cfg.get('embed_dim')}) | {text['exporter']} "
            f"| {text['max_abs_diff']:.1e} |",
        ]
    return "\n".join(lines) + "\n"


def _evaluation_lines(record: dict) -> list[str]:
    """The model card's results table from a metrics record with "zeroshot" and/or "retrieval" results."""
    rows = []
    zeroshot = record.get("zeroshot") or {}
    for key, label in (("top1", "zero-shot top-1"), ("top5", "zero-shot top-5"),
                       ("mean_per_class_recall", "zero-shot mean per-class recall")):
        if key in zeroshot:
            rows.append(f"| {label} | {100 * zeroshot[key]:.1f} % |")
    if "num_classes" in zeroshot:
        rows.append(f"| zero-shot classes (chance) | {zeroshot['num_classes']} ({100 * zeroshot['chance']:.1f} %) |")
    retrieval = record.get("retrieval") or {}
    for direction, prefix in (("text to image", "image_retrieval"), ("image to text", "text_retrieval")):
        recalls = [f"{100 * retrieval[f'{prefix}_recall@{k}']:.1f}" for k in (1, 5, 10)
                   if f"{prefix}_recall@{k}" in retrieval]
        if len(recalls) == 3:
            rows.append(f"| retrieval {direction}, recall@1/5/10 | {' / '.join(recalls)} % |")
    if not rows:
        return []
    return ["", f"## Evaluation at step {record.get('step', '?')}", "", "| | |", "| --- | --- |", *rows]


def main(argv: Sequence[str] | None = None) -> None:
    """`clipalign-export`: write an open_clip `local-dir:` export (and ONNX towers, and transformers' files) of a
    checkpoint."""
    parser = export_parser()
    args = parser.parse_args(argv)
    try:
        out = export_model(args.checkpoint, args.out, onnx=args.onnx, onnx_exporter=args.onnx_exporter,
                           export_format=args.format)
    except (hf_export.NotExportable, FileExistsError, FileNotFoundError, CheckpointError, ModuleNotFoundError) as e:
        parser.exit(2, f"clipalign-export: error: {e}\n")
    print(f"exported {args.checkpoint} -> {out}")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<32}{path.stat().st_size / 1e6:10.1f} MB")


if __name__ == "__main__":
    main()
