"""Distillation from a frozen teacher (`distill.*`): the teacher, its view of each batch, and the loss term.

The term is open_clip's DistillClipLoss's: the cross-entropy between the teacher's and the student's image->text and
text->image distributions, each with its own temperature (the teacher's logit scale for the teacher),

    distill = ( CE(softmax(t T_img T_txt^T), s S_img S_txt^T) + CE(softmax(t T_txt T_img^T), s S_txt S_img^T) ) / 2

with one difference: every row is a distribution over the whole gathered global batch (and, with gradient
accumulation, over every micro-batch of the step), as the contrastive loss scores its rows. Each process scores its
local rows against the gathered columns (the student's gathered with gradient), so N processes give the gradients of
one process on the global batch. The run's loss is `task + distill.weight * distill` (open_clip adds the two).

The teacher is frozen and runs without gradients, in the run's autocast, sharded like the student under
`train.sharding=fsdp`. It sees each batch as its own preprocessing would: the student's crop, resized to the
teacher's image size (antialiased bicubic) and normalised with the teacher's mean and std; and its own token ids
when its tokenizer differs from the student's (the data workers tokenize each caption for both).

Instead of a teacher model, `distill.embeddings` takes a `clipalign-embed` directory of the teacher's embeddings of
the training shards: the run looks each sample up by its key and skips the teacher's forward; embeddings that do
not cover the shards' keys are refused.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipalign.config import ConfigError, DistillConfig, ModelConfig
from clipalign.distributed import all_gather_with_grad, get_world_size
from clipalign.model import DualEncoder, create_model, load, model_config

# captions a student's and a teacher's tokenizer must give the same ids for, to share the workers' ids
_PROBE_CAPTIONS = ["a photo of a cat.", "A RED circle, above: a blue square!", "café naïve 東京 ☕",
                   " ".join(["a very long caption"] * 40)]


def teacher_spec(cfg: DistillConfig) -> str:
    """What distill.teacher names, for messages: a directory, or an open_clip model name with its weights."""
    return cfg.teacher if not cfg.teacher_pretrained else f"{cfg.teacher} ({cfg.teacher_pretrained})"


def load_teacher(cfg: DistillConfig) -> DualEncoder:
    """The teacher of `distill.teacher`: a clipalign export, checkpoint or run directory, or an open_clip model name
    with `distill.teacher_pretrained` (a pretrained tag, which downloads, or a local weights file); frozen, in eval
    mode, on the CPU. ConfigError naming the key when it cannot be had."""
    if os.path.exists(cfg.teacher):
        if cfg.teacher_pretrained:
            raise ConfigError(f"distill.teacher_pretrained={cfg.teacher_pretrained!r} is for an open_clip model name; "
                              f"distill.teacher {cfg.teacher!r} is a directory, which carries its own weights")
        try:
            teacher = load(cfg.teacher)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise ConfigError(f"distill.teacher: {cfg.teacher}: {e}") from None
    else:
        model_config(cfg.teacher)  # ConfigError listing the known names
        if not cfg.teacher_pretrained:
            raise ConfigError(f"distill.teacher={cfg.teacher!r} is a model name without weights: set "
                              f"distill.teacher_pretrained to an open_clip pretrained tag or a local weights file "
                              f"(a randomly initialised teacher teaches nothing)")
        try:
            teacher = create_model(ModelConfig(name=cfg.teacher, pretrained=cfg.teacher_pretrained))
        except Exception as e:  # a tag that needs the network, a file of other weights
            raise ConfigError(f"distill.teacher {teacher_spec(cfg)}: cannot load its weights: {e}") from None
    teacher.requires_grad_(False)
    return teacher.eval()


def shard_keys(path: str | os.PathLike) -> list[str]:
    """The sample keys of a local shard, from its tar headers (WebDataset's rule: a member's name up to the first
    dot of its base name)."""
    import tarfile

    keys: list[str] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            key = (folder + "/" if folder else "") + base.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids: the same kind and context length, and the same ids on probes."""
    if type(a) is not type(b) or a.context_length != b.context_length:
        return False
    return torch.equal(a(_PROBE_CAPTIONS), b(_PROBE_CAPTIONS))


class Teacher(nn.Module):
    """A frozen dual encoder that embeds the student's batches as its own preprocessing would.

    Args:
        model: the teacher.
        student_image_size: the side of the student's (square, uint8) image batches.
        own_tokens: whether the teacher needs its own token ids (`teacher_texts` in the batch) rather than the
            student's.
    """

    def __init__(self, model: DualEncoder, student_image_size: int, own_tokens: bool):
        super().__init__()
        self.model = model
        self.student_image_size = student_image_size
        self.own_tokens = own_tokens

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 student crops -> the teacher's normalised pixels at its own size."""
        size = self.model.image_size
        if size == images.shape[-1]:
            return images  # uint8: the teacher normalises with its own mean and std
        pixels = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True,
                               align_corners=False).clamp_(0, 255)
        return (pixels - self.model.pixel_mean) / self.model.pixel_std

    @torch.no_grad()
    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised features of the teacher and its logit scale (exponentiated), all without gradients."""
        return {"image_features": self.model.encode_image(self._pixels(images)),
                "text_features": self.model.encode_text(texts),
                "logit_scale": self.model.clip.logit_scale.exp().detach()}


class TeacherEmbeddings:
    """Precomputed teacher embeddings (`distill.embeddings`, a `clipalign-embed` directory) looked up by sample key."""

    def __init__(self, directory: str | os.PathLike, logit_scale: float | None = None):
        from clipalign.layout import EMBED_CONFIG_FILE, embedding_part, metadata_part

        root = Path(directory)
        config_path = root / EMBED_CONFIG_FILE
        if not config_path.is_file():
            raise ConfigError(f"distill.embeddings: {root} is not an embedding directory (no {EMBED_CONFIG_FILE}; "
                              f"make one with clipalign-embed)")
        info = json.loads(config_path.read_text())
        images, texts, keys = [], [], []
        part = 0
        import pyarrow.parquet as pq

        while metadata_part(root, part).is_file():
            for modality, out in (("image", images), ("text", texts)):
                path = embedding_part(root, modality, part)
                if not path.is_file():
                    raise ConfigError(f"distill.embeddings: {path} is missing: the teacher's {modality} embeddings "
                                      f"of part {part} (embed both: clipalign-embed --modalities image text)")
                out.append(np.load(path, mmap_mode="r"))
            keys.extend(str(k) for k in pq.read_table(metadata_part(root, part), columns=["key"]).column("key")
                        .to_pylist())
            part += 1
        if not keys:
            raise ConfigError(f"distill.embeddings: {root} holds no embeddings")
        self.image = np.concatenate(images) if len(images) > 1 else images[0]
        self.text = np.concatenate(texts) if len(texts) > 1 else texts[0]
        if not (len(self.image) == len(self.text) == len(keys)):
            raise ConfigError(f"distill.embeddings: {root}: {len(self.image)} image and {len(self.text)} text "
                              f"embeddings for {len(keys)} keys")
        self.rows = {key: row for row, key in enumerate(keys)}
        scale = logit_scale or (info.get("model") or {}).get("logit_scale") or info.get("logit_scale")
        if not scale:
            raise ConfigError(f"distill.embeddings: {root} does not record its model's logit scale; set "
                              f"distill.teacher_logit_scale (the teacher's exponentiated temperature, e.g. 100)")
        self.logit_scale = float(scale)
        self.root = root

    def check_keys(self, keys: list[str], where: str) -> None:
        """Every one of `keys` has embeddings; a ConfigError naming the first that has not."""
        missing = [k for k in keys if k not in self.rows]
        if missing:
            raise ConfigError(f"distill.embeddings: {self.root} has no embedding of {len(missing)} of the "
                              f"{len(keys)} samples of {where}, e.g. key {missing[0]!r}: embed these shards with "
                              f"the teacher (clipalign-embed), or drop distill.embeddings")

    def __call__(self, keys: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        try:
            rows = [self.rows[k] for k in keys]
        except KeyError as e:
            raise KeyError(f"distill.embeddings: no embedding of sample {e.args[0]!r} in {self.root}") from None
        image = torch.from_numpy(np.asarray(self.image[rows], dtype=np.float32)).to(device, non_blocking=True)
        text = torch.from_numpy(np.asarray(self.text[rows], dtype=np.float32)).to(device, non_blocking=True)
        return {"image_features": F.normalize(image, dim=-1), "text_features": F.normalize(text, dim=-1),
                "logit_scale": torch.tensor(self.logit_scale, device=device)}


def distillation_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, teacher_image: torch.Tensor,
                      teacher_text: torch.Tensor, teacher_scale: torch.Tensor) -> torch.Tensor:
    """The distillation term of this process's rows: student distributions against the teacher's, image->text and
    text->image, over the whole gathered global batch (see the module docstring). Features are L2-normalised,
    (B_local, D) for the student and (B_local, D_teacher) for the teacher; scales are exponentiated."""
    world = get_world_size()
    if world > 1:
        # the student's columns with gradient (every process's rows score them), the teacher's without
        all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)  # (B_global, D)
        with torch.no_grad():
            t_all_image, t_all_text = all_gather_with_grad(teacher_image), all_gather_with_grad(teacher_text)
    else:
        all_image, all_text, t_all_image, t_all_text = image, text, teacher_image, teacher_text
    s_i2t, s_t2i = scale * image @ all_text.T, scale * text @ all_image.T  # (B_local, B_global)
    with torch.no_grad():
        t_i2t = (teacher_scale * teacher_image @ t_all_text.T).float().softmax(dim=1)  # (B_local, B_global)
        t_t2i = (teacher_scale * teacher_text @ t_all_image.T).float().softmax(dim=1)
    ce_i2t = -(t_i2t * s_i2t.float().log_softmax(dim=1)).sum(dim=1).mean()
    ce_t2i = -(t_t2i * s_t2i.float().log_softmax(dim=1)).sum(dim=1).mean()
    return (ce_i2t + ce_t2i) / 2


class DistillationLoss(nn.Module):
    """The run's loss with a teacher: `task(...) + weight * distillation_loss(...)`.

    Called as the task loss is, `loss(image_features, text_features, logit_scale[, logit_bias])`, plus the teacher's
    features and scale as keywords (`teacher_image`, `teacher_text`, `teacher_scale`); without them (validation) it
    is the task loss.
    """

    def __init__(self, task: nn.Module, weight: float):
        super().__init__()
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"distill.weight must be a finite number >= 0, got {weight}")
        self.task, self.weight = task, weight

    def extra_repr(self) -> str:
        return f"weight={self.weight}"

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, *, teacher_image: torch.Tensor | None = None,
                teacher_text: torch.Tensor | None = None, teacher_scale: torch.Tensor | None = None) -> torch.Tensor:
        task = self.task(image_features, text_features, logit_scale, logit_bias)
        if not self.weight or teacher_image is None:  # validation scores the task loss alone, comparable across runs
            return task
        distill = distillation_loss(image_features, text_features, logit_scale, teacher_image, teacher_text,
                                    teacher_scale)
        return task + self.weight * distill
