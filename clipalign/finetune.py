"""Fine-tuning controls: which parameters of an open_clip model train, and how fast each of them learns.

- Locking: `model.lock_image` (LiT, open_clip's `lock_image_tower`) and `model.lock_text` (open_clip's
  `lock_text_tower`) freeze a tower but for its last layer groups.
- Parameter groups (built by `clipalign.optim.param_groups`): `layer_distances` for layer-wise learning-rate decay
  (`optim.layer_decay`), `skips_decay` for the parameters AdamW does not decay (`optim.no_decay`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

from clipalign.config import ConfigError, ModelConfig

# optim.no_decay: the entry that stands for every parameter below 2-D (gains, biases, norms, the logit scale)
BELOW_2D = "ndim<2"
# the parameters of the temperature: at the top of the layer-decay ladder
TEMPERATURE = ("logit_scale", "logit_bias")


# ---- freezing ---------------------------------------------------------------------------------------------------


def prepare(clip: nn.Module, cfg: ModelConfig) -> None:
    """Lock towers of an open_clip model, in place, as `cfg` asks."""
    if cfg.lock_image:
        clip.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                              freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text:
        lock_text(clip, cfg.lock_text_unlocked_layers, cfg.lock_text_freeze_layer_norm)


def lock_text(clip: nn.Module, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
    """open_clip's `lock_text_tower`: freeze the text tower but for its last `unlocked_layers` layer groups (open_clip
    counts the projection, then the last block with the final norm, then each block below, then the embeddings).

    `freeze_layer_norm=False` leaves every LayerNorm of the tower trainable; open_clip's own text transformer does not
    offer it (only its Hugging Face towers do), so it is done here for those.
    """
    hf = type(getattr(clip, "text", None)).__name__ == "HFTextEncoder"
    clip.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=freeze_layer_norm or not hf)
    if not freeze_layer_norm and not hf:
        for module in _text_tower_modules(clip):
            for norm in module.modules():
                if isinstance(norm, nn.LayerNorm):
                    norm.requires_grad_(True)


def _text_tower_modules(clip: nn.Module) -> list[nn.Module]:
    if hasattr(clip, "text"):  # CustomTextCLIP: the tower is one module
        return [clip.text]
    return [m for m in (getattr(clip, "transformer", None), getattr(clip, "ln_final", None)) if m is not None]


# ---- parameter groups ------------------------------------------------------------------------------------------


def skips_decay(name: str, param: torch.Tensor, patterns: Sequence[str]) -> bool:
    """Whether AdamW leaves `param` undecayed: `BELOW_2D` matches every parameter below 2-D, any other entry is an
    fnmatch pattern on the parameter's name (as the CLIP model names it: `visual.positional_embedding`, `*.bias`)."""
    return any(param.ndim < 2 if p == BELOW_2D else fnmatch.fnmatchcase(name, p) for p in patterns)


def check_no_decay(names: Sequence[str], patterns: Sequence[str]) -> None:
    """Every pattern of `optim.no_decay` (but `BELOW_2D`) names a parameter of the model; a typo is a ConfigError."""
    for pattern in patterns:
        if pattern != BELOW_2D and not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(f"optim.no_decay: {pattern!r} matches no parameter of the model; expected {BELOW_2D} "
                              f"or fnmatch patterns on names such as {', '.join(names[:3])}")


def layer_distances(clip: nn.Module) -> dict[str, int]:
    """How many layers each parameter of an open_clip model lies below the top of its tower: 0 for the tower's final
    norm and projection and for the temperature, 1 for its last block, ..., the tower's depth for its embeddings.

    Each tower counts its own layers (a 12-block text tower beside a 24-block image tower: the text embeddings lie 13
    layers down, the image embeddings 25), so the top of both towers learns at the full rate. open_clip's vision and
    text transformers: the embeddings (patch, class, positional, the norm before the blocks; token, positional) are
    layer 0, block i is layer i + 1. timm image towers: timm's own layer map (`group_matcher`), with open_clip's
    projection head on top.

    Raises:
        ConfigError: a tower whose layers are not known (ResNet, Hugging Face text towers).
    """
    layers: dict[str, tuple[int, int]] = {}  # name -> (layer, tower depth)
    layers.update(_image_layers(clip))
    layers.update(_text_layers(clip))
    distances = {}
    for name, _ in clip.named_parameters():
        if name in TEMPERATURE:
            distances[name] = 0
        elif name in layers:
            layer, depth = layers[name]
            distances[name] = depth - layer
        else:
            raise ConfigError(f"optim.layer_decay: no layer is known for the parameter {name} of this "
                              f"{type(clip).__name__}")
    return distances


def _image_layers(clip: nn.Module) -> dict[str, tuple[int, int]]:
    visual = clip.visual
    names = [n for n, _ in visual.named_parameters()]
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        embeddings = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.")
        return {f"visual.{n}": v for n, v in _transformer_layers(names, len(visual.transformer.resblocks),
                                                                 "transformer.resblocks.", embeddings).items()}
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "group_matcher"):
        from timm.models import group_parameters

        trunk_layers = group_parameters(trunk, trunk.group_matcher(coarse=False), reverse=True)
        depth = max(trunk_layers.values()) + 1  # open_clip's head above timm's layers
        return {f"visual.{n}": (trunk_layers[n[len("trunk."):]] if n.startswith("trunk.") else depth,
                                depth) for n in names}
    raise ConfigError(f"optim.layer_decay: the image tower {type(visual).__name__} has no known layers; layer decay "
                      f"works on open_clip's vision transformers and timm towers")


def _text_layers(clip: nn.Module) -> dict[str, tuple[int, int]]:
    text = getattr(clip, "text", None)
    embeddings = ("token_embedding.", "positional_embedding", "cls_emb")
    if text is None:  # CLIP keeps the text tower's parts as its own attributes
        names = [n for n, _ in clip.named_parameters() if not n.startswith("visual.") and n not in TEMPERATURE]
        return _transformer_layers(names, len(clip.transformer.resblocks), "transformer.resblocks.", embeddings)
    if hasattr(text, "transformer") and hasattr(text.transformer, "resblocks"):
        names = [n for n, _ in text.named_parameters()]
        return {f"text.{n}": v for n, v in _transformer_layers(names, len(text.transformer.resblocks),
                                                               "transformer.resblocks.", embeddings).items()}
    raise ConfigError(f"optim.layer_decay: the text tower {type(text).__name__} has no known layers; layer decay "
                      f"works on open_clip's text transformers")


def _transformer_layers(names: Sequence[str], blocks: int, block_prefix: str,
                        embeddings: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(layer, depth) of each name of an open_clip transformer tower: embeddings 0, block i i + 1, the rest on top."""
    depth = blocks + 1
    out = {}
    for name in names:
        if name.startswith(block_prefix):
            out[name] = (int(name[len(block_prefix):].split(".", 1)[0]) + 1, depth)
        elif name.startswith(tuple(embeddings)):
            out[name] = (0, depth)
        else:
            out[name] = (depth, depth)
    return out
