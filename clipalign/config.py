"""Typed configuration of a run: dataclass defaults, then a YAML recipe, then `section.key=value` overrides.

Strict by design: an unknown section or key, or a value of the wrong type, is an error that names the key and
lists the valid ones. The resolved config is written to the run directory as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema."""


@dataclass
class DataConfig:
    train: str = ""  # shard pattern(s), e.g. "/data/cc3m/{00000..00331}.tar"; "::" separates sources
    batch_size: int = 256  # per process
    workers: int = 4  # DataLoader workers per process
    shuffle_buffer: int = 1000  # samples held for shuffling, per worker
    weights: list[float] = field(default_factory=list)  # sampling weight per `::` source (resampled); [] = equal
    resampled: bool = True  # draw shards with replacement (an endless stream); False = exact passes over the shards
    num_samples: int = 0  # samples in one pass over data.train, to log epochs; 0 = unknown
    log_keys: bool = False  # write the sample keys of every step to RUN/keys/rank<R>.jsonl (an audit of data order)
    train_crop_scale: float = 0.9  # RandomResizedCrop lower scale bound (open_clip's default); 1.0 = resize + crop
    decode: str = "auto"  # where JPEGs are decoded: workers (PIL) | device (training device) | auto (device on CUDA)
    synthetic: bool = False  # draw a synthetic captioned data set into the cache when `train` is empty
    synthetic_samples: int = 12000  # training samples of the synthetic set
    cache_dir: str = ""  # where generated data lives; default $CLIPALIGN_CACHE or ~/.cache/clipalign


@dataclass
class ModelConfig:
    name: str = "ViT-B-32"  # an open_clip model config name, built-in or shipped in clipalign/model_configs
    embed_dim: int = 0  # shared embedding width; 0 = the config's
    vision_cfg: dict = field(default_factory=dict)  # merged over the config's vision_cfg (timm_model_name, ...)
    text_cfg: dict = field(default_factory=dict)  # merged over the config's text_cfg (width, layers, heads, ...)
    tokenizer: str = ""  # "" = the config's (open_clip BPE); or a SentencePiece .model file
    patch_dropout: float = 0.0  # FLIP: fraction of image patches dropped in training (ViT towers); 0 = off
    pretrained: str = ""  # start from weights: an open_clip pretrained tag (downloads) or a local weights file
    pretrained_image: bool = False  # timm image tower: start from timm's pretrained weights (downloads)
    lock_image: bool = False  # LiT: freeze the image tower (train the text tower and the temperature)
    lock_image_unlocked_groups: int = 0  # with lock_image: leave the last N layer groups trainable
    lock_image_freeze_bn_stats: bool = False  # with lock_image: also freeze BatchNorm statistics (conv towers)
    grad_checkpointing: bool = False


@dataclass
class LossConfig:
    kind: str = "contrastive"  # contrastive (InfoNCE) | sigmoid (SigLIP); never inferred from the model name
    mode: str = "local"  # contrastive: dense | local | tiled
    tile_size: int = 0  # tiled, pure-torch path: columns of the similarity matrix held at once; 0 = from a budget
    tiled_kernel: str = "auto"  # tiled: auto (fused Triton kernels on CUDA when triton imports) | torch | triton
    label_smoothing: float = 0.0  # contrastive only
    exchange: str = "ring"  # sigmoid: how negatives of other processes arrive, ring (neighbour to neighbour) | gather


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    fused: bool = True  # AdamW's fused kernel (one kernel for all parameters; CPU and CUDA); false = per-tensor loop


@dataclass
class TrainConfig:
    steps: int = 10000
    precision: str = "bf16"  # fp32 | bf16 | fp16
    seed: int = 0
    output_dir: str = "runs/clipalign"
    resume: str = ""  # checkpoint directory, or "auto" for the latest one in output_dir/checkpoints
    accum_steps: int = 1
    log_every: int = 10
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    log_with: str = "tensorboard"  # an Accelerate tracker name, or "none"
    max_nonfinite: int = 10  # stop after more than this many steps in a row with a non-finite loss (each is skipped)
    peak_tflops: float = 0.0  # per-device peak for the MFU estimate; 0 = look up known GPUs (bf16/fp16 dense)
    cpu_threads: int = 0  # torch threads per process on CPU; 0 = the available cores / processes on this machine
    compile: bool = False  # torch.compile the towers (see compile_scope)
    compile_scope: str = "blocks"  # what train.compile compiles: blocks (each transformer block) | model (the forward)
    patch_embed: str = "auto"  # image patch embedding: auto (a matmul on CUDA, else the conv) | conv | matmul
    channels_last: bool = False  # image tower weights and inputs in channels-last memory format (conv towers, GPU)
    trim_text: bool = True  # cut each batch's token ids after its longest caption (causal EOT-pooled text towers)
    attention: str = "auto"  # attention kernels: auto | torch | math | flash | efficient | cudnn (see training.md)


@dataclass
class EvalConfig:
    zeroshot: str = ""  # ImageFolder, labelled shards or CSV to score zero-shot at the end (and every `every` steps)
    retrieval: str = ""  # CSV of (filepath, caption) rows, or captioned shards, for image-text retrieval
    every: int = 0  # steps between zero-shot evaluations during training; 0 = only at the end
    classnames: str = ""  # file with one class name per line, or cifar10 | cifar100 | imagenet1k (built in)
    templates: str = ""  # file with one prompt template per line ("{}" for the class name), or a built-in set
    batch_size: int = 128
    precision: str = "fp32"  # fp32 | bf16 | fp16 autocast of the towers during evaluation


@dataclass
class ExportConfig:
    dir: str = ""  # export the trained encoders here at the end of training; "" = no export
    onnx: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (atomically, so a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(tmp, path)


# The loss choices (clipalign.loss validates its arguments against the same tuples)
LOSS_KINDS = ("contrastive", "sigmoid")
CONTRASTIVE_MODES = ("dense", "local", "tiled")
TILED_KERNELS = ("auto", "torch", "triton")
SIGMOID_EXCHANGES = ("ring", "gather")
# data.decode: where training JPEGs are decoded (clipalign.data.device_decode)
DECODE_CHOICES = ("auto", "workers", "device")
# train.attention: "auto", PyTorch's own choice, or one scaled_dot_product_attention backend (clipalign.model)
ATTENTION_CHOICES = ("auto", "torch", "math", "flash", "efficient", "cudnn")

_CHOICES = {
    ("loss", "kind"): LOSS_KINDS,
    ("loss", "mode"): CONTRASTIVE_MODES,
    ("loss", "tiled_kernel"): TILED_KERNELS,
    ("loss", "exchange"): SIGMOID_EXCHANGES,
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("train", "attention"): ATTENTION_CHOICES,
    ("train", "compile_scope"): ("blocks", "model"),
    ("train", "patch_embed"): ("auto", "conv", "matmul"),
    ("eval", "precision"): ("fp32", "bf16", "fp16"),
    ("data", "decode"): DECODE_CHOICES,
}


def _valid(names) -> str:
    return ", ".join(sorted(names))


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    """Check `value` against the field's annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(where, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys to values, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads `5e-4` (no dot) as a string; take it as the number it plainly is
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected a {annotation.__name__}, got {value!r}")
    return value


def _set(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown section {section!r}; valid sections: {_valid(sections)}")
    sub = getattr(cfg, section)
    hints = typing.get_type_hints(type(sub))
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key}; valid keys of {section}: {_valid(hints)}")
    where = f"{source}: {section}.{key}"
    value = _coerce(where, value, hints[key])
    choices = _CHOICES.get((section, key))
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    setattr(sub, key, value)


def _apply_mapping(cfg: Config, mapping: Any, source: str) -> None:
    if mapping is None:
        return
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(mapping).__name__}")
    for section, values in mapping.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            _set(cfg, str(section), str(key), value, source)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split `section.key=value` into its parts; the value is read as YAML (so `1e-3`, `true`, `[1, 2]` work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value with exactly one dot in the name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    # A bare word such as `auto` or a path stays a string; numbers stay numbers.
    return parts[0], parts[1], value


def load_config(recipe: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a Config from defaults, an optional YAML recipe, and `section.key=value` overrides (in that order)."""
    cfg = Config()
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist")
        try:
            mapping = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {e}") from e
        _apply_mapping(cfg, mapping, str(path))
    for text in overrides:
        section, key, value = parse_override(text)
        # A string field given a number on the command line (e.g. data.train=123) keeps the text.
        hint = typing.get_type_hints(type(getattr(cfg, section, None) or object())).get(key)
        if hint is str and not isinstance(value, str):
            value = text.split("=", 1)[1]
        _set(cfg, section, key, value, f"override {text!r}")
    return cfg


def config_from_dict(mapping: dict, source: str = "config") -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. a run's config.yaml)."""
    cfg = Config()
    _apply_mapping(cfg, mapping, source)
    return cfg


def read_config(path: str | os.PathLike) -> Config:
    """Read a resolved `config.yaml` written by a run."""
    return load_config(path)
