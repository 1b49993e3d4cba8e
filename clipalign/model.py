"""The dual encoder: an open_clip model (image tower + text tower + learnable temperature) with its input pipeline.

Towers come from open_clip model configs: its built-in ones (`ViT-B-32`, `RN50`, ...) and the JSON configs shipped
in `clipalign/model_configs/`, which are registered with open_clip on import.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load_file
from torch import nn

from clipalign.checkpoint import resolve_checkpoint
from clipalign.config import ConfigError, ModelConfig, read_config
from clipalign.model_configs import MODEL_CONFIG_DIR  # noqa: F401  (registers our configs with open_clip)
from clipalign.tokenizer import build_tokenizer

LOGIT_SCALE_MAX = 100.0  # CLIP clamps the temperature multiplier here to keep training stable
# SigLIP starts from scale 10 and bias -10 (its paper's init): most pairs are negatives, so begin near "no match"
SIGMOID_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}
WEIGHTS_FILE = "model.safetensors"  # what Accelerate's save_state writes for the first prepared model


class DualEncoder(nn.Module):
    """An open_clip CLIP model that also takes uint8 images (normalised on the device) and carries its tokenizer.

    `forward(images, texts)` returns L2-normalised image and text features and the logit scale (already
    exponentiated), which is what the losses take.
    """

    def __init__(self, clip: nn.Module, name: str, tokenizer=None, preprocess=None):
        super().__init__()
        self.clip = clip
        self.name = name
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        pp = open_clip.get_model_preprocess_cfg(clip)
        self.image_size = _as_int_size(pp.get("size", 224))
        self.register_buffer("pixel_mean", torch.tensor(pp["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pp["std"]).view(1, 3, 1, 1) * 255, persistent=False)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        # uint8 batches cross to the device at a quarter of the float size; normalise there
        if images.dtype == torch.uint8:
            return (images.float() - self.pixel_mean) / self.pixel_std
        return images

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings, (B, D); `pixels` is uint8 (B, 3, H, W) or already normalised floats."""
        return self.clip.encode_image(self._pixels(pixels), normalize=normalize)

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text embeddings, (B, D), from token ids (B, context_length)."""
        return self.clip.encode_text(token_ids, normalize=normalize)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {
            "image_features": self.encode_image(images),  # (B_local, D)
            "text_features": self.encode_text(texts),  # (B_local, D)
            "logit_scale": self.clip.logit_scale.exp(),
        }
        if self.clip.logit_bias is not None:
            out["logit_bias"] = self.clip.logit_bias
        return out

    def open_clip_config(self) -> dict:
        """The open_clip model config that rebuilds this model (with its logit bias, if it has one)."""
        cfg = copy.deepcopy(model_config(self.name))
        if self.clip.logit_bias is not None:
            cfg["init_logit_bias"] = SIGMOID_INIT["init_logit_bias"]
        return cfg

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.clip.logit_scale.clamp_(0, math.log(LOGIT_SCALE_MAX))


@contextlib.contextmanager
def _quiet_random_init():
    """Hide open_clip's warning that no pretrained weights were loaded: random init is what pretraining wants."""

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _as_int_size(size: Any) -> int:
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"non-square image size {size} is not supported")
        return int(size[0])
    return int(size)


def model_config(name: str) -> dict:
    """The open_clip config dict of a model name, or an error listing the known names."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        known = ", ".join(open_clip.list_models())
        raise ConfigError(f"model.name {name!r} is not an open_clip model config; known: {known}")
    return cfg


def create_model(cfg: ModelConfig, loss_kind: str = "contrastive") -> DualEncoder:
    """A randomly initialised dual encoder for a loss kind.

    contrastive: logit scale starts at 1/0.07, as in CLIP; sigmoid: scale 10 and a learnable logit bias at -10.
    """
    model_config(cfg.name)  # validates the name with a readable error
    init = SIGMOID_INIT if loss_kind == "sigmoid" else {}
    with _quiet_random_init():
        clip = open_clip.create_model(cfg.name, pretrained=None, output_dict=True, **init)
    if cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    model = DualEncoder(clip, cfg.name, tokenizer=build_tokenizer(cfg.name))
    model.preprocess = eval_preprocess(model)
    return model


def eval_preprocess(model: DualEncoder):
    """open_clip's eval transform for this model: PIL image -> normalised float tensor."""
    pp = open_clip.get_model_preprocess_cfg(model.clip)
    return open_clip.image_transform(pp["size"], is_train=False, mean=pp.get("mean"), std=pp.get("std"),
                                     resize_mode=pp.get("resize_mode"), interpolation=pp.get("interpolation"),
                                     fill_color=pp.get("fill_color", 0))


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> DualEncoder:
    """Load a trained model from a checkpoint directory, a run directory (latest checkpoint) or an export directory.

    The result has `encode_image(pixels)`, `encode_text(token_ids)`, `.tokenizer` and `.preprocess`, in eval mode.
    """
    path = Path(path)
    if (path / "open_clip_config.json").is_file():
        model = _load_export(path)
    else:
        ckpt = resolve_checkpoint(path)
        cfg = read_config(ckpt / "config.yaml")
        model = create_model(cfg.model, cfg.loss.kind)
        weights = ckpt / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: no model weights in this checkpoint")
        model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()


def _load_export(path: Path) -> DualEncoder:
    uri = f"local-dir:{path}"
    clip, _, preprocess = open_clip.create_model_and_transforms(uri, output_dict=True)
    name = json.loads((path / "open_clip_config.json").read_text()).get("model_name", path.name)
    return DualEncoder(clip, name, tokenizer=open_clip.get_tokenizer(uri), preprocess=preprocess)
