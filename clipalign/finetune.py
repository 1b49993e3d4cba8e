"""Fine-tuning controls: which parameters of an open_clip model train, and how fast each of them learns.

- Locking: `model.lock_image` (LiT, open_clip's `lock_image_tower`) and `model.lock_text` (open_clip's
  `lock_text_tower`) freeze a tower but for its last layer groups.
- LoRA: `model.lora_rank` > 0 puts peft's LoRA adapters on the attention and MLP projections of the transformer blocks
  of one tower or both and freezes every base weight; only the adapters and the temperature (the logit scale, and the
  sigmoid loss's logit bias) train. `merge_adapters` folds them into plain open_clip weights for inference and export.
- Parameter groups (built by `clipalign.optim.param_groups`): `layer_distances` for layer-wise learning-rate decay
  (`optim.layer_decay`), `skips_decay` for the parameters AdamW does not decay (`optim.no_decay`).

peft is imported only when a model gets adapters: runs without LoRA do not need it.
"""

from __future__ import annotations

import fnmatch
import functools
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from clipalign.config import Config, ConfigError, ModelConfig

# optim.no_decay: the entry that stands for every parameter below 2-D (gains, biases, norms, the logit scale)
BELOW_2D = "ndim<2"
# the parameters of the temperature: trained with LoRA too, at the top of the layer-decay ladder
TEMPERATURE = ("logit_scale", "logit_bias")
# what each model.lora_targets entry wraps, as module names inside a transformer block: open_clip's blocks, then timm's
# (ViT, EVA, ConvNeXt). open_clip's attention is one nn.MultiheadAttention, whose packed q/k/v projection is a bare
# parameter that its forward reads directly: peft adapts the module as a whole (in_proj and out_proj together).
_TARGETS = {
    "attn": (r"attn", r"attn\.(?:qkv|q_proj|k_proj|v_proj|proj)"),
    "mlp_fc": (r"mlp\.c_fc", r"mlp\.(?:fc1|fc1_g|fc1_x)"),
    "mlp_proj": (r"mlp\.c_proj", r"mlp\.fc2"),
}
_ADAPTABLE = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)  # of peft's LoRA layers, those blocks hold


# ---- freezing ---------------------------------------------------------------------------------------------------


def check_model_keys(cfg: ModelConfig) -> None:
    """Raise a ConfigError for fine-tuning keys that contradict each other."""
    if cfg.lora_rank > 0 and not cfg.lora_targets:
        raise ConfigError(f"model.lora_targets: empty with model.lora_rank={cfg.lora_rank}; expected one or more of "
                          f"attn, mlp_fc, mlp_proj")
    if cfg.lora_rank > 0:
        for key in ("lock_image", "lock_text"):
            if getattr(cfg, key):
                raise ConfigError(f"model.{key}: with model.lora_rank={cfg.lora_rank} every base weight is frozen "
                                  f"already (the adapters and the temperature train); drop model.{key}")


def check_run_keys(cfg: Config) -> None:
    """Raise a ConfigError for fine-tuning keys the run cannot honour (checked before anything is built)."""
    check_model_keys(cfg.model)
    if cfg.model.lora_rank > 0 and cfg.train.sharding == "fsdp":
        raise ConfigError("model.lora_rank > 0 with train.sharding=fsdp: LoRA is not sharded (peft's LoRA of "
                          "open_clip's attention swaps the attention weights at every forward, which FSDP's sharded "
                          "parameters do not allow); only the adapters have gradients and optimizer state, so use "
                          "train.sharding=ddp")


def prepare(clip: nn.Module, cfg: ModelConfig) -> None:
    """Lock towers and add LoRA adapters to an open_clip model, in place, as `cfg` asks."""
    check_model_keys(cfg)
    if cfg.lock_image:
        clip.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                              freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text:
        lock_text(clip, cfg.lock_text_unlocked_layers, cfg.lock_text_freeze_layer_norm)
    if cfg.lora_rank > 0:
        add_lora(clip, cfg)


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


# ---- LoRA --------------------------------------------------------------------------------------------------------


def lora_target_names(clip: nn.Module, cfg: ModelConfig) -> dict[str, list[str]]:
    """The modules LoRA wraps, per tower ("image", "text"): those of `cfg.lora_targets` in the transformer blocks of
    `cfg.lora_towers`. A target that a tower lacks (attention in a ConvNeXt) is skipped there.

    Raises:
        ConfigError: a tower asked for gets no adapter, or a target is a module that peft's LoRA cannot wrap.
    """
    towers = ("image", "text") if cfg.lora_towers == "both" else (cfg.lora_towers,)
    found: dict[str, list[str]] = {}
    for tower in towers:
        patterns = [_TARGETS[target] for target in cfg.lora_targets]
        ours = "|".join(p[0] for p in patterns)
        timm = "|".join(p[1] for p in patterns)
        blocks = _block_prefixes(clip, tower)
        regex = re.compile(f"(?:{blocks[0]})(?:{ours})" + (f"|(?:{blocks[1]})(?:{timm})" if blocks[1] else ""))
        names = []
        for name, module in clip.named_modules():
            if not regex.fullmatch(name):
                continue
            if not isinstance(module, _ADAPTABLE):
                raise ConfigError(f"model.lora_targets: {name} is a {type(module).__name__}, which LoRA does not "
                                  f"wrap here (it wraps nn.Linear, nn.Conv2d and nn.MultiheadAttention)")
            names.append(name)
        if not names:
            raise ConfigError(f"model.lora_towers: the {tower} tower ({_tower_type(clip, tower)}) has none of "
                              f"model.lora_targets {cfg.lora_targets} in transformer blocks LoRA knows (open_clip's "
                              f"and timm's)")
        found[tower] = names
    return found


def _block_prefixes(clip: nn.Module, tower: str) -> tuple[str, str]:
    """Regexes of the names of a tower's blocks as open_clip and as timm name them ("" where it has none)."""
    if tower == "image":
        return r"visual\.transformer\.resblocks\.\d+\.", r"visual\.trunk\.(?:.+\.)?blocks\.\d+\."
    if hasattr(clip, "text"):
        return r"text\.transformer\.resblocks\.\d+\.", ""
    return r"transformer\.resblocks\.\d+\.", ""


def _tower_type(clip: nn.Module, tower: str) -> str:
    module = clip.visual if tower == "image" else getattr(clip, "text", clip)
    return type(module).__name__


def add_lora(clip: nn.Module, cfg: ModelConfig) -> dict[str, list[str]]:
    """Wrap the modules `lora_target_names` names with peft's LoRA (rank `cfg.lora_rank`, scale lora_alpha / rank,
    dropout before the adapter of each linear layer), in place, and freeze everything but the adapters and the
    temperature. Returns the wrapped module names per tower.

    The adapters start as peft starts them (B = 0): the model computes what it did before.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora.layer import MultiheadAttention as PeftAttention
    except ImportError:
        raise ConfigError("model.lora_rank > 0 needs peft: pip install 'clipalign[finetune]' (or pip install "
                          "peft)") from None
    targets = lora_target_names(clip, cfg)
    # one regex of the exact names: peft takes a list's entries as name suffixes, which would reach the other tower
    exact = "|".join(re.escape(name) for names in targets.values() for name in names)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=f"(?:{exact})")
    inject_adapter_in_model(config, clip)  # freezes every parameter that is not an adapter's

    for name in TEMPERATURE:
        param = getattr(clip, name, None)
        if isinstance(param, nn.Parameter):
            param.requires_grad_(True)
    for module in clip.modules():
        if isinstance(module, PeftAttention):
            module.__class__ = _exact_lora_attention()
    return targets


@functools.cache
def _exact_lora_attention() -> type:
    """peft's LoRA of nn.MultiheadAttention, with its frozen weights left exactly as they were by each forward, which
    torch.compile leaves eager.

    peft adds the adapters' product into the packed in_proj and the out_proj weights before each forward and
    subtracts it after, registering new parameters: (W + d) - d moves W by float rounding at every forward, and the
    parameter objects change. Here the very weights are put back. torch.compile cannot trace that swap (a `set_` on a
    graph input), so a compiled block runs its attention eagerly and compiles the rest.
    """
    from peft.tuners.lora.layer import MultiheadAttention

    class ExactLoraMultiheadAttention(MultiheadAttention):
        @torch.compiler.disable
        def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
            base = self.get_base_layer()
            out_base = base.out_proj.get_base_layer()
            in_weight, out_weight = base.in_proj_weight, out_base.weight
            out_values = out_weight.detach().clone()  # peft merges into this one in place
            try:
                return super().forward(query, *args, **kwargs)
            finally:
                with torch.no_grad():
                    out_weight.copy_(out_values)
                del base.in_proj_weight, out_base.weight
                base.register_parameter("in_proj_weight", in_weight)  # merging left this tensor as it was
                out_base.register_parameter("weight", out_weight)

    return ExactLoraMultiheadAttention


def has_adapters(module: nn.Module) -> bool:
    """Whether `module` holds peft layers (without importing peft: none exist where it was never imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in module.modules())


@torch.no_grad()
def merge_adapters(clip: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of `clip` into its base weights and put the plain modules back, in place; returns
    `clip`, whose parameters then have open_clip's names and shapes (no peft needed to load them)."""
    if not has_adapters(clip):
        return clip
    from peft.tuners.tuners_utils import BaseTunerLayer

    outermost: list[str] = []
    for name, module in clip.named_modules():
        if isinstance(module, BaseTunerLayer) and not any(name.startswith(done + ".") for done in outermost):
            outermost.append(name)
    for name in outermost:
        parent_name, _, child = name.rpartition(".")
        parent = clip.get_submodule(parent_name)
        layer = parent.get_submodule(child)
        if hasattr(layer, "unload_and_optionally_merge_module"):  # peft's MultiheadAttention: in and out projections
            plain = layer.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
        else:
            layer.merge()
            plain = layer.get_base_layer()
        setattr(parent, child, plain)
    return clip


# ---- parameter groups ------------------------------------------------------------------------------------------


def plain_name(name: str) -> str:
    """A parameter name as open_clip's model names it: without peft's `base_layer` levels."""
    return name.replace(".base_layer", "")


def skips_decay(name: str, param: torch.Tensor, patterns: Sequence[str]) -> bool:
    """Whether AdamW leaves `param` undecayed: `BELOW_2D` matches every parameter below 2-D, any other entry is an
    fnmatch pattern on the parameter's name (as the CLIP model names it: `visual.positional_embedding`, `*.bias`),
    matched with and without peft's `base_layer` levels."""
    plain = plain_name(name)
    return any(param.ndim < 2 if p == BELOW_2D else fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(plain, p)
               for p in patterns)


def check_no_decay(names: Sequence[str], patterns: Sequence[str]) -> None:
    """Every pattern of `optim.no_decay` (but `BELOW_2D`) names a parameter of the model; a typo is a ConfigError."""
    for pattern in patterns:
        if pattern != BELOW_2D and not any(fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(plain_name(n),
                                                                                                  pattern)
                                           for n in names):
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
