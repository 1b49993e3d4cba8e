"""Typed configuration of a run: dataclass defaults, then a YAML recipe, then `section.key=value` overrides.

Strict by design: an unknown section or key, or a value of the wrong type, is an error that names the key and
lists the valid ones; a number outside its key's range is an error that names the key, the value and the range. Each
field's help line and range live in its metadata (`_key`), which `clipalign-train --help` lists (`describe_keys`).
The resolved config is written to the run directory as `config.yaml`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema."""


@dataclass(frozen=True)
class Range:
    """An interval of valid values for a numeric key; `high=None` is unbounded above."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, spec: str) -> Range:
        """`>= 1`, `> 0`, or interval notation such as `[0, 1)`, `(0, 1]`."""
        spec = spec.strip()
        if spec.startswith(">"):
            op, low = spec.split(maxsplit=1)
            return cls(_number(low), low_open=op == ">")
        low, high = spec[1:-1].split(",")
        return cls(_number(low), _number(high), low_open=spec[0] == "(", high_open=spec[-1] == ")")

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False  # inf and nan are nobody's learning rate, batch size or ratio
        above = value > self.low if self.low_open else value >= self.low
        if self.high is None:
            return above
        return above and (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


def _number(text: str) -> float:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


def _key(default: Any, doc: str, valid: str | None = None) -> Any:
    """A config field: its default, one line of help (`clipalign-train --help`), and, for numbers, the valid range.

    The range of a list applies to each of its entries.
    """
    metadata = {"help": doc}
    if valid is not None:
        metadata["range"] = Range.parse(valid)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# data.max_image_pixels: Pillow's own warning threshold (PIL.Image.MAX_IMAGE_PIXELS, ~89.5 MP)
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


# Every int and float key (and list of numbers) carries its valid range; 0 means "off", "auto" or "unknown" where its
# help says so. A test walks these dataclasses, so a numeric key without a range fails it.
@dataclass
class DataConfig:
    train: str = _key("", 'shard pattern(s), e.g. "/data/cc3m/{00000..00331}.tar"; "::" separates sources')
    val: str = _key("", "validation shard pattern(s), read like data.train: the training loss and retrieval recall "
                        "on their first eval.val_samples samples; \"\" = no validation")
    batch_size: int = _key(256, "samples per process per step (global batch = this x processes)", ">= 1")
    workers: int = _key(4, "DataLoader workers per process; 0 = load in the training process", ">= 0")
    shuffle_buffer: int = _key(1000, "samples held for shuffling, per worker; 0 or 1 = no shuffling", ">= 0")
    weights: list[float] = _key([], "sampling weight per `::` source (resampled); [] = equal", ">= 0")
    captions: dict = _key({}, "training caption sources and weights, e.g. {txt: 0.5, json.recaption: 0.5}: each "
                              "sample draws one of those it has; {} = the .txt, else the JSON captions/caption")
    resampled: bool = _key(True, "draw shards with replacement (an endless stream); false = exact passes over the "
                                 "shards")
    num_samples: int = _key(0, "samples in one pass over data.train, to log epochs; 0 = unknown", ">= 0")
    log_keys: bool = _key(False, "write the sample keys of every step to RUN/keys/rank<R>.jsonl (an audit of data "
                                 "order)")
    train_crop_scale: float = _key(0.9, "RandomResizedCrop lower scale bound (open_clip's); 1.0 = resize + crop",
                                   "(0, 1]")
    decode: str = _key("auto", "where JPEGs are decoded: workers (PIL) | device (the training device; unmeasured on "
                               "GPUs) | auto (the workers until the device path has passed the GPU check)")
    decode_backend: str = _key("auto", "data.decode=device: auto (torchcodec where it is installed, else "
                                       "torchvision) | torchcodec | torchvision")
    decode_budget_mb: float = _key(1024.0, "data.decode=device: decoded full-resolution pixels of one batch on the "
                                           "device at most (MiB of RGB); the largest JPEGs past it decode in the "
                                           "workers", "> 0")
    max_image_pixels: int = _key(DEFAULT_MAX_IMAGE_PIXELS, "images with more pixels are skipped as bad_image "
                                                           "before decoding; 0 = no limit", ">= 0")
    max_source_failures: int = _key(10, "failed shard reads of one `::` source in a row (no sample between) that stop "
                                        "the run with an error naming it", ">= 1")
    batch_timeout: float = _key(600.0, "seconds a data worker may go without a batch before the run stops with an "
                                       "error; 0 = wait forever", ">= 0")
    max_unusable: int = _key(20_000, "samples in a row skipped or filtered out before a data worker stops the run "
                                     "saying why (a whole exact pass without a usable one stops it too); 0 = no "
                                     "bound", ">= 0")
    keep: str = _key("", "file of sample ids to keep (DataComp .npy of uids, a text file of one id per line, CSV or "
                         "parquet with a uid/key column); other samples are filtered before decoding; \"\" = all")
    keep_id: str = _key("uid", "what data.keep and a keep_probability file list: uid (the .json's uid, DataComp) | "
                               "key (the WebDataset __key__)")
    keep_probability: str = _key("", "json:FIELD, or a .npy/.csv/.parquet file of ids and probabilities: each sample "
                                     "is kept with its probability, drawn from its seed (same in a resumed run)")
    min_score: str = _key("", "FIELD>=VALUE on a number of the sample's .json, e.g. clip_b32_similarity_score>=0.28; "
                              "samples below it or without it are filtered")
    synthetic: bool = _key(False, "draw a synthetic captioned data set into the cache when `train` is empty")
    synthetic_samples: int = _key(12000, "training samples of the synthetic set", ">= 1")
    cache_dir: str = _key("", "where generated data lives; default $CLIPALIGN_CACHE or ~/.cache/clipalign")


@dataclass
class ModelConfig:
    name: str = _key("ViT-B-32", "an open_clip model config name, built-in or shipped in clipalign/model_configs")
    embed_dim: int = _key(0, "shared embedding width; 0 = the config's", ">= 0")
    vision_cfg: dict = _key({}, "merged over the config's vision_cfg (timm_model_name, ...)")
    text_cfg: dict = _key({}, "merged over the config's text_cfg (width, layers, heads, ...)")
    tokenizer: str = _key("", '"" = the config\'s (open_clip BPE); or a SentencePiece .model file')
    patch_dropout: float = _key(0.0, "FLIP: fraction of image patches dropped in training (ViT towers); 0 = off",
                                "[0, 1)")
    pretrained: str = _key("", "start from weights: an open_clip pretrained tag (downloads) or a local weights file")
    pretrained_image: bool = _key(False, "timm image tower: start from timm's pretrained weights (downloads)")
    lock_image: bool = _key(False, "LiT: freeze the image tower (train the text tower and the temperature)")
    lock_image_unlocked_groups: int = _key(0, "with lock_image: leave the last N layer groups trainable", ">= 0")
    lock_image_freeze_bn_stats: bool = _key(False, "with lock_image: also freeze BatchNorm statistics (conv towers)")
    lock_text: bool = _key(False, "freeze the text tower (train the image tower and the temperature)")
    lock_text_unlocked_layers: int = _key(0, "with lock_text: leave the last N layer groups trainable (open_clip's "
                                             "count: the projection, then the last block with the final norm, then "
                                             "each block down)", ">= 0")
    lock_text_freeze_layer_norm: bool = _key(True, "with lock_text: freeze the LayerNorms too; false leaves every "
                                                   "LayerNorm of the text tower trainable")
    lora_rank: int = _key(0, "LoRA adapters of this rank (peft) on lora_targets of lora_towers; every base weight is "
                             "frozen, adapters and temperature train; 0 = off", ">= 0")
    lora_alpha: float = _key(8.0, "LoRA scale numerator: adapters add (lora_alpha / lora_rank) x B A", "> 0")
    lora_dropout: float = _key(0.0, "dropout on the input of each linear layer's adapter (open_clip's attention "
                                    "adapters have none)", "[0, 1)")
    lora_targets: list[str] = _key(["attn", "mlp_fc", "mlp_proj"], "what LoRA adapts in each block: attn (the "
                                   "attention's projections, q/k/v and out), mlp_fc, mlp_proj")
    lora_towers: str = _key("both", "the towers LoRA adapts: image | text | both (the other is frozen)")
    grad_checkpointing: bool = _key(False, "recompute tower activations in backward to save memory")


@dataclass
class LossConfig:
    kind: str = _key("contrastive", "contrastive (InfoNCE) | sigmoid (SigLIP); never inferred from the model name")
    mode: str = _key("local", "contrastive: dense | local | tiled")
    tile_size: int = _key(0, "tiled, pure-torch path: columns of the similarity matrix held at once; 0 = from a budget",
                          ">= 0")
    tiled_kernel: str = _key("auto", "tiled: auto (pure torch until the Triton kernels have passed the GPU check) | "
                                     "torch | triton (the fused kernels, CUDA; unmeasured on GPUs)")
    label_smoothing: float = _key(0.0, "contrastive only: label smoothing of the cross-entropies", "[0, 1)")
    exchange: str = _key("ring", "sigmoid: how negatives of other processes arrive, ring (neighbour to neighbour) | "
                                 "gather")


@dataclass
class OptimConfig:
    lr: float = _key(5e-4, "peak learning rate of AdamW (0 leaves the weights as they are)", ">= 0")
    weight_decay: float = _key(0.2, "AdamW decay of weight matrices (gains, biases, norms, logit scale get none)",
                               ">= 0")
    beta1: float = _key(0.9, "AdamW beta1", "[0, 1)")
    beta2: float = _key(0.98, "AdamW beta2", "[0, 1)")
    eps: float = _key(1e-6, "AdamW epsilon", "> 0")
    warmup_steps: int = _key(2000, "linear warmup steps, then cosine decay to lr * min_lr_ratio at train.steps",
                             ">= 0")
    min_lr_ratio: float = _key(0.0, "cosine decays to lr * min_lr_ratio", "[0, 1]")
    grad_clip: float = _key(0.0, "max gradient norm; 0 = off", ">= 0")
    fused: bool = _key(True, "AdamW's fused kernel (one kernel for all parameters; CPU and CUDA); false = per-tensor "
                             "loop")
    layer_decay: float = _key(1.0, "layer-wise lr decay: lr x layer_decay^(layers below the top of the parameter's "
                                   "tower), embeddings lowest, final norm, projection and temperature on top; 1 = off",
                              "(0, 1]")
    no_decay: list[str] = _key(["ndim<2", "logit_scale"], "parameters AdamW does not decay: ndim<2 (every parameter "
                                                          "below 2-D: gains, biases, norms) and fnmatch patterns on "
                                                          "parameter names (visual.positional_embedding, *.bias); the "
                                                          "list replaces the default")


@dataclass
class TrainConfig:
    steps: int = _key(10000, "optimizer steps (the run counts steps and samples, not epochs)", ">= 1")
    precision: str = _key("bf16", "fp32 | bf16 | fp16")
    # numpy (seeded by Accelerate's set_seed) takes only 32-bit unsigned seeds
    seed: int = _key(0, "model init and data order; each process and worker derives its own", "[0, 4294967295]")
    output_dir: str = _key("runs/clipalign", "the run directory")
    resume: str = _key("", 'checkpoint directory, or "auto" for the latest one in output_dir/checkpoints (a fresh '
                           'start when there is none)')
    overwrite: bool = _key(False, "start over in an output_dir that holds an earlier run: delete its checkpoints, "
                                  "metrics, summary, logs and export first (without it such a run is refused)")
    accum_steps: int = _key(1, "micro-batches per optimizer step, scored together", ">= 1")
    log_every: int = _key(10, "steps between metric lines", ">= 1")
    checkpoint_every: int = _key(0, "steps between checkpoints; 0 = only at the end", ">= 0")
    keep_checkpoints: int = _key(2, "the newest checkpoints kept; 0 = keep all", ">= 0")
    log_with: str = _key("tensorboard", 'an Accelerate tracker name, or "none"')
    max_nonfinite: int = _key(10, "stop after more than this many steps in a row with a non-finite loss (each is "
                                  "skipped); 0 = stop at the first", ">= 0")
    peak_tflops: float = _key(0.0, "per-device peak for the MFU estimate; 0 = look up known GPUs (bf16/fp16 dense)",
                              ">= 0")
    cpu_threads: int = _key(0, "torch threads per process on CPU; 0 = the available cores / processes on this machine",
                            ">= 0")
    sharding: str = _key("ddp", "ddp (every process holds the whole model) | fsdp (parameters, gradients and optimizer "
                                "state sharded over the processes; see scaling.md)")
    fsdp_offload: bool = _key(False, "with sharding=fsdp: keep the shards, gradients and optimizer state in host "
                                     "memory")
    compile: bool = _key(False, "torch.compile the towers (see compile_scope)")
    compile_scope: str = _key("blocks", "what train.compile compiles: blocks (each transformer block) | model (the "
                                        "forward)")
    patch_embed: str = _key("auto", "image patch embedding: auto (the conv until the matmul has been measured on a "
                                    "GPU) | conv | matmul")
    channels_last: bool = _key(False, "image tower weights and inputs in channels-last memory format (conv towers, "
                                      "GPU)")
    trim_text: bool = _key(True, "cut each batch's token ids after its longest caption (causal EOT-pooled text towers)")
    attention: str = _key("auto", "attention kernels: auto | torch | math | flash | efficient | cudnn (see "
                                  "training.md)")
    sync_debug: bool = _key(False, "CUDA: warn, naming the line, at each host-device synchronisation inside a "
                                   "training step from the second on (log steps excepted): what stalls the GPU")


@dataclass
class EvalConfig:
    zeroshot: str = _key("", "ImageFolder, labelled shards or CSV to score zero-shot at the end (and every `every` "
                             "steps); none = no zero-shot evaluation (not even the synthetic set's)")
    retrieval: str = _key("", "CSV of (filepath, caption) rows, or captioned shards, for image-text retrieval; none = "
                              "no retrieval evaluation")
    every: int = _key(0, "steps between zero-shot evaluations during training; 0 = only at the end", ">= 0")
    classnames: str = _key("", "file with one class name per line, or cifar10 | cifar100 | imagenet1k (built in)")
    templates: str = _key("", 'file with one prompt template per line ("{}" for the class name), or a built-in set')
    table_format: str = _key("auto", "how a zeroshot/retrieval CSV separates columns: auto (from the extension: .tsv "
                                     "tabs, else commas) | csv | tsv")
    batch_size: int = _key(128, "images (and prompts) per evaluation forward pass", ">= 1")
    precision: str = _key("fp32", "fp32 | bf16 | fp16 autocast of the towers during evaluation")
    val_every: int = _key(0, "with data.val: steps between validations during training; 0 = only at the end",
                          ">= 0")
    val_samples: int = _key(10000, "with data.val: samples validated each time, the first of the shards (rounded "
                                   "down to whole global batches)", ">= 1")


# export.format: open_clip's files alone, or with transformers' CLIPModel/CLIPProcessor files beside them
EXPORT_FORMATS = ("open_clip", "transformers")


@dataclass
class ExportConfig:
    dir: str = _key("", 'export the trained encoders here at the end of training, inside the run directory when '
                        'relative (e.g. export = RUN/export); "" = no export')
    onnx: bool = _key(False, "also write ONNX encoders")
    format: str = _key("open_clip", "open_clip (the local-dir: files) | transformers (those plus CLIPModel and "
                                    "CLIPProcessor files in the same directory); clipalign-export's default for "
                                    "this run's checkpoints")


@dataclass
class DistillConfig:
    teacher: str = _key("", 'distil from this teacher: a clipalign export, checkpoint or run directory, or an '
                            'open_clip model name (with teacher_pretrained); "" = no distillation')
    teacher_pretrained: str = _key("", "with an open_clip model name as teacher: its pretrained tag (downloads) or a "
                                       "local weights file")
    weight: float = _key(1.0, "the run's loss is the contrastive (or sigmoid) loss + weight x the distillation term",
                         ">= 0")
    embeddings: str = _key("", "a clipalign-embed directory of the teacher's image and text embeddings of the "
                               "training shards, looked up by key instead of running the teacher")
    teacher_logit_scale: float = _key(0.0, "with embeddings: the teacher's temperature multiplier (exponentiated); 0 "
                                           "= embed.json's", ">= 0")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (atomically, so a reader never sees half a file)."""
        from clipalign.layout import write_atomic  # imported here: layout sits below config and imports nothing

        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# The loss choices (clipalign.loss validates its arguments against the same tuples)
LOSS_KINDS = ("contrastive", "sigmoid")
CONTRASTIVE_MODES = ("dense", "local", "tiled")
TILED_KERNELS = ("auto", "torch", "triton")
SIGMOID_EXCHANGES = ("ring", "gather")
# data.decode: where training JPEGs are decoded (clipalign.data.device_decode)
DECODE_CHOICES = ("auto", "workers", "device")
DECODE_BACKENDS = ("auto", "torchcodec", "torchvision")
# train.attention: "auto", PyTorch's own choice, or one scaled_dot_product_attention backend (clipalign.model)
ATTENTION_CHOICES = ("auto", "torch", "math", "flash", "efficient", "cudnn")
# train.sharding: DDP (whole model per process) or FSDP2 (clipalign.sharding)
SHARDING_CHOICES = ("ddp", "fsdp")
# model.lora_targets (each entry) and model.lora_towers (clipalign.finetune)
LORA_TARGETS = ("attn", "mlp_fc", "mlp_proj")
LORA_TOWERS = ("image", "text", "both")
# data.captions: a sample's `.txt` member, or a field of its `.json` (a string, or a list of strings)
CAPTION_TXT = "txt"
CAPTION_JSON_PREFIX = "json."
# data.keep_id: what identifies a sample to data.keep and data.keep_probability (clipalign.data.curation)
KEEP_ID_CHOICES = ("uid", "key")
# eval.table_format / --table-format: an evaluation table's separator (clipalign.evaluate; auto: from the extension)
TABLE_SEPARATORS = {"csv": ",", "tsv": "\t"}


def check_caption_sources(sources: Any) -> dict[str, float]:
    """`data.captions` as {source: weight}: each source `txt` or `json.FIELD` (a top-level key of the sample's JSON),
    each weight a finite number > 0 (a string such as `5e-1` read as one). Raises ValueError naming the bad entry."""
    if not isinstance(sources, dict):
        raise ValueError(f"expected a mapping of caption sources to weights, got {sources!r}")
    checked = {}
    for name, weight in sources.items():
        if not isinstance(name, str) or not (name == CAPTION_TXT or (
                name.startswith(CAPTION_JSON_PREFIX) and len(name) > len(CAPTION_JSON_PREFIX))):
            raise ValueError(f"caption source {name!r} is neither {CAPTION_TXT} nor {CAPTION_JSON_PREFIX}FIELD "
                             f"(FIELD: a key of the sample's .json)")
        number = weight
        if isinstance(weight, str):
            try:
                number = float(weight)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or number <= 0:
            raise ValueError(f"caption source {name}: the weight must be a finite number > 0, got {weight!r}")
        checked[name] = float(number)
    return checked


_CHOICES = {
    ("loss", "kind"): LOSS_KINDS,
    ("loss", "mode"): CONTRASTIVE_MODES,
    ("loss", "tiled_kernel"): TILED_KERNELS,
    ("loss", "exchange"): SIGMOID_EXCHANGES,
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("train", "attention"): ATTENTION_CHOICES,
    ("train", "compile_scope"): ("blocks", "model"),
    ("train", "sharding"): SHARDING_CHOICES,
    ("train", "patch_embed"): ("auto", "conv", "matmul"),
    ("eval", "precision"): ("fp32", "bf16", "fp16"),
    ("eval", "table_format"): ("auto", *TABLE_SEPARATORS),
    ("data", "decode"): DECODE_CHOICES,
    ("data", "decode_backend"): DECODE_BACKENDS,
    ("data", "keep_id"): KEEP_ID_CHOICES,
    ("export", "format"): EXPORT_FORMATS,
    ("model", "lora_targets"): LORA_TARGETS,  # each entry of the list
    ("model", "lora_towers"): LORA_TOWERS,
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
    if (section, key) == ("data", "captions"):
        try:
            value = check_caption_sources(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    choices = _CHOICES.get((section, key))
    for i, entry in enumerate(value) if isinstance(value, list) else [(None, value)]:
        if choices and entry not in choices:
            at = "" if i is None else f"[{i}]"
            raise ConfigError(f"{where}{at}: {entry!r} is not one of {', '.join(choices)}")
    valid = _fields(type(sub))[key].metadata.get("range")
    if valid is not None:
        _check_range(source, f"{section}.{key}", value, valid)
    setattr(sub, key, value)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _check_range(source: str, name: str, value: Any, valid: Range) -> None:
    """Raise a ConfigError naming the key, the value and the range unless `value` (each entry of a list) is in it."""
    values = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
    for i, v in values:
        if v not in valid:
            finite = " a finite number" if isinstance(v, float) and not math.isfinite(v) else ""
            raise ConfigError(f"{source}: {name}{'' if i is None else f'[{i}]'} must be{finite} {valid}, got {v!r}")
    if isinstance(value, list) and value and not any(value):
        # data.weights: all-zero weights give no distribution to draw from (random.choices raises in every worker)
        raise ConfigError(f"{source}: {name} needs at least one entry > 0, got {value!r}")


def describe_keys() -> str:
    """Every recipe key, grouped by section, as `section.key=DEFAULT  help; must be RANGE` lines.

    Each default is written as YAML, so it can be pasted back as an override.
    """
    lines = []
    for section in dataclasses.fields(Config):
        rows = []
        for f in dataclasses.fields(section.default_factory):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            valid = f.metadata.get("range")
            rows.append((f"{section.name}.{f.name}={_yaml_scalar(default)}",
                         f.metadata.get("help", "") + (f"; must be {valid}" if valid else "")))
        width = max(len(name) for name, _ in rows)
        lines += [f"{section.name}:"] + [f"  {name:<{width}}  {doc}" for name, doc in rows] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _yaml_scalar(value: Any) -> str:
    """`value` as one line of YAML (what an override would say): '', [], {}, true, 0.0005."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("...").strip()


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


# ---- what may leave the run directory -------------------------------------------------------------------------------


def redact_source(spec: str) -> str:
    """A data source spec as it may be shown outside the run: each `pipe:` command (which may carry keys or tokens)
    and each URL's query string and user info (signed URLs, `user:password@`) replaced by a marker. Sources are
    separated by `::`; local paths and plain URLs stay as they are."""
    from urllib.parse import urlsplit, urlunsplit

    parts = []
    for source in spec.split("::"):
        stripped = source.strip()
        if stripped.startswith("pipe:"):
            parts.append("pipe:<command redacted>")
        elif "://" in stripped:
            url = urlsplit(stripped)
            netloc = ("<user redacted>@" if "@" in url.netloc else "") + url.netloc.rsplit("@", 1)[-1]
            parts.append(urlunsplit((url.scheme, netloc, url.path, "<query redacted>" if url.query else "",
                                     url.fragment)))
        else:
            parts.append(stripped)
    return "::".join(parts)


# the keys that name data sources, and are redacted in what is shared (trackers, export model cards)
SOURCE_KEYS = (("data", "train"), ("data", "val"), ("eval", "zeroshot"), ("eval", "retrieval"))


def shareable_config(cfg: Config) -> dict[str, dict[str, Any]]:
    """`cfg.to_dict()` with every data source redacted (`redact_source`), for trackers and exports; the run's own
    config.yaml keeps the exact values."""
    out = cfg.to_dict()
    for section, key in SOURCE_KEYS:
        if out[section][key]:
            out[section][key] = redact_source(out[section][key])
    return out
