"""The dual encoder: an open_clip model (image tower + text tower + learnable temperature) with its input pipeline.

Towers come from open_clip model configs: its built-in ones (`ViT-B-32`, `RN50`, ...) and the JSON configs shipped
in `clipalign/model_configs/`, which are registered with open_clip on import. `load` reads a checkpoint or export
directory back, `load_image_encoder` / `load_text_encoder` one tower of an export; the files they read are named in
`clipalign.layout`, the tokenizers they pick chosen in `clipalign.tokenizer`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import text_global_pool
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from clipalign import finetune
from clipalign.checkpoint import resolve_checkpoint
from clipalign.config import ATTENTION_CHOICES, ConfigError, ModelConfig, read_config
from clipalign.layout import (
    EXPORT_CONFIG_FILE,
    IMAGE_ENCODER_CONFIG,  # noqa: F401  (re-exported: these names lived here)
    IMAGE_ENCODER_WEIGHTS,  # noqa: F401
    RUN_CONFIG_FILE,
    TEXT_ENCODER_CONFIG,  # noqa: F401
    TEXT_ENCODER_WEIGHTS,  # noqa: F401
    TOKENIZER_FILE,
    TRAINER_STATE_FILE,
    is_export,
    read_checkpoint_weights,
    read_export_config,
    read_tower,
)
from clipalign.model_configs import MODEL_CONFIG_DIR  # noqa: F401  (registers our configs with open_clip)
from clipalign.tokenizer import SentencePieceTokenizer, Tokenizer, directory_tokenizer, recipe_tokenizer

LOGIT_SCALE_MAX = 100.0  # CLIP clamps the temperature multiplier here to keep training stable
# SigLIP starts from scale 10 and bias -10 (its paper's init): most pairs are negatives, so begin near "no match"
SIGMOID_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}
# Attention kernels (`scaled_dot_product_attention` backends) a tower may be held to; of ATTENTION_CHOICES, "auto"
# and "torch" pick none
ATTENTION_BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
# "auto" on CPU: under bf16/fp16 autocast, PyTorch's CPU flash-attention backward is 2-3x slower than the plain
# (math) kernels for sequences up to about 128 tokens and faster beyond (docs/benchmarks.md)
CPU_MATH_ATTENTION_MAX_TOKENS = 128


class DualEncoder(nn.Module):
    """An open_clip CLIP model that also takes uint8 images (normalised on the device) and carries its tokenizer.

    `forward(images, texts)` returns L2-normalised image and text features and the logit scale (already
    exponentiated), which is what the losses take.

    `attention` chooses the attention kernels of both towers: "auto" (the plain math kernels when training on CPU
    under bf16/fp16 autocast with sequences of at most 128 tokens, where they are faster; otherwise PyTorch's
    choice), "torch" (always PyTorch's choice), or one backend for every call: "math", "flash", "efficient",
    "cudnn". The result is the same up to rounding whichever kernel runs.
    """

    attention: str = "auto"

    def __init__(self, clip: nn.Module, name: str, tokenizer: Tokenizer | None = None, preprocess=None,
                 model_cfg: dict | None = None):
        super().__init__()
        self.clip = clip
        self.name = name
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.model_cfg = copy.deepcopy(model_cfg) if model_cfg is not None else model_config(name)
        pp = open_clip.get_model_preprocess_cfg(clip)
        self.image_size = _as_int_size(pp.get("size", 224))
        self.register_buffer("pixel_mean", torch.tensor(pp["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pp["std"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.image_tokens = vision_tokens(clip.visual)

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
        with self._attention_kernels(pixels.device, self.image_tokens):
            return self.clip.encode_image(self._pixels(pixels), normalize=normalize)

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text embeddings, (B, D), from token ids (B, context_length), or (B, L) cut by `trim_padding`."""
        with self._attention_kernels(token_ids.device, token_ids.shape[1]):
            if token_ids.shape[1] < self.context_length:
                return self._encode_text_prefix(token_ids, normalize)
            return self.clip.encode_text(token_ids, normalize=normalize)

    def _attention_kernels(self, device: torch.device, tokens: int | None):
        """The `sdpa_kernel` context for a tower whose sequences have `tokens` positions (None: not known)."""
        if self.attention in ATTENTION_BACKENDS:
            return sdpa_kernel([ATTENTION_BACKENDS[self.attention]])
        if self.attention == "auto" and use_cpu_math_attention(device, tokens):
            return sdpa_kernel([SDPBackend.MATH])
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention {self.attention!r}: expected one of {', '.join(ATTENTION_CHOICES)}")
        return contextlib.nullcontext()

    @property
    def context_length(self) -> int:
        return self.model_cfg["text_cfg"].get("context_length", 77)

    @property
    def trims_text(self) -> bool:
        """Whether token ids may be cut after the batch's last text token (`trim_padding`) with the same result.

        True for open_clip's CLIP text transformer with its causal mask and pooling at the end-of-text token (or the
        first token): a position attends only to earlier ones, so the padding after every row's EOT changes nothing
        that is pooled. Not for towers that pool the last position, attend both ways or come from Hugging Face.
        """
        clip = self.clip
        return (type(clip).__name__ == "CLIP" and getattr(clip, "attn_mask", None) is not None
                and clip.text_pool_type in ("argmax", "eos", "first"))

    def _encode_text_prefix(self, token_ids: torch.Tensor, normalize: bool) -> torch.Tensor:
        """`CLIP.encode_text` on ids cut to their first L positions: the same modules, with the positional table and
        the causal mask cut to L. Only for towers where `trims_text` holds."""
        if not self.trims_text:
            raise ValueError(f"model {self.name!r}: its text tower needs full-length ids "
                             f"({self.context_length}), got {token_ids.shape[1]}")
        clip, length = self.clip, token_ids.shape[1]
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(token_ids).to(cast_dtype)  # (B, L, width)
        x = x + clip.positional_embedding[:length].to(cast_dtype)
        # contiguous, like a full-length batch's whole mask: compiled blocks then meet one stride layout at every
        # length (with a strided slice, full-length batches needed a graph of their own)
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length].contiguous()))
        x = text_global_pool(x, token_ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if clip.text_projection is not None:
            x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return nn.functional.normalize(x, dim=-1) if normalize else x

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
        cfg = copy.deepcopy(self.model_cfg)
        if self.clip.logit_bias is not None:
            cfg["init_logit_bias"] = SIGMOID_INIT["init_logit_bias"]
        return cfg

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.clip.logit_scale.clamp_(0, math.log(LOGIT_SCALE_MAX))


def use_cpu_math_attention(device: torch.device, tokens: int | None) -> bool:
    """Whether "auto" attention holds a tower to the math kernels: a training forward (autograd recording) on CPU
    under bf16/fp16 autocast, with at most `CPU_MATH_ATTENTION_MAX_TOKENS` positions. Forward-only passes keep
    PyTorch's flash kernel, which is the faster one there."""
    return (device.type == "cpu" and tokens is not None and tokens <= CPU_MATH_ATTENTION_MAX_TOKENS
            and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16))


class MatmulPatchEmbed(nn.Conv2d):
    """A patch-embedding convolution (kernel = stride, no padding) computed as one matrix product.

    The same parameters under the same names, so checkpoints and exports do not change: only `forward` differs. Cutting
    the image into patches is a reshape, and the product runs on the GEMM kernels that the rest of the tower uses; on
    GPUs cuDNN's weight-gradient kernel for this convolution shape was slow (about 5 ms of a 118 ms ViT-B/32 step).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        (p, q), (gh, gw) = self.kernel_size, (h // self.kernel_size[0], w // self.kernel_size[1])
        x = x[:, :, :gh * p, :gw * q]  # a strided convolution drops the ragged edge too
        patches = x.reshape(b, c, gh, p, gw, q).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * q)
        out = nn.functional.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)  # (B, N, width)
        return out.view(b, gh, gw, -1).permute(0, 3, 1, 2)  # (B, width, gh, gw), as the convolution returns it


def _is_patch_conv(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.kernel_size == module.stride and module.groups == 1
            and module.padding in ((0, 0), "valid") and module.dilation == (1, 1) and module.padding_mode == "zeros")


def use_matmul_patch_embed(model: nn.Module) -> int:
    """Compute every patch-embedding convolution of `model` (open_clip's `visual.conv1`, timm's `patch_embed.proj`)
    as a matrix product, in place; returns how many were switched (0 for towers without one)."""
    switched = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("conv1", "proj") and _is_patch_conv(module):
            module.__class__ = MatmulPatchEmbed
            switched += 1
    return switched


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of both towers, in module order: each member of a `ModuleList` or `Sequential` of at
    least two modules of one class (open_clip's `resblocks`, timm's `blocks`, a ConvNeXt's stages). Lists inside a
    block are part of it. Towers without such lists contribute nothing."""
    return [block for blocks in _block_lists(model) for block in blocks]


def _block_lists(model: nn.Module) -> list[list[nn.Module]]:
    """`transformer_blocks`, one list per `ModuleList` or `Sequential` they come from."""
    lists: list[list[nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(done + ".") for done in inside):
            continue
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2 \
                and len({type(m) for m in module}) == 1:
            lists.append(list(module))
            inside.extend(f"{name}.{index}" for index in range(len(module)))
    return lists


# a region of its own per compiled stage where torch.compile offers it (torch 2.14: `isolate_recompiles`)
_OWN_REGION = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters \
    else {}


def compile_blocks(model: nn.Module) -> int:
    """Regional compilation: `torch.compile` each transformer block of both towers in place; returns how many.

    The blocks are `transformer_blocks(model)`. Dynamo keeps its graphs per code object, so blocks of one class share
    them (parameters are graph inputs; open_clip's image and text towers both use `ResidualAttentionBlock`):
    compiling costs about one block per tower, and a new text length recompiles one small graph, which then runs
    with dynamic shapes. One code object holds at most `torch._dynamo.config.recompile_limit` (8) graphs; training
    needs 3 per grad mode (the image tower's; the text tower's at its first length, then with dynamic length), so 6
    with `train.accum_steps` > 1, whose first forward runs without gradients; the trainer evaluates and validates
    eagerly, adding none. Blocks of one list that differ in shape (a ConvNeXt's stages) get a static graph each, in a
    region of their own: their shapes differ by stage, not by batch, and inductor fails on the dynamic-channel graph
    that automatic dynamic shapes would make of them. Parameter names do not change. Towers without such blocks are
    left eager.
    """
    lists = _block_lists(model)
    for blocks in lists:
        alike = len({tuple(p.shape for p in block.parameters()) for block in blocks}) == 1
        for block in blocks:
            block.compile() if alike else block.compile(dynamic=False, **_OWN_REGION)
    return sum(len(blocks) for blocks in lists)


class CompileReport:
    """What torch.compile did in this process from the report's creation on: the graphs dynamo compiled (first
    compilations and recompilations, one cache entry each) and the functions it stopped compiling.

    Dynamo compiles a function at most `torch._dynamo.config.recompile_limit` times; past that it compiles nothing
    more of it for the rest of the process, and every variant it has not compiled yet (a grad mode, shape, dtype,
    mask or module mode) runs eagerly: slower, with the same results, said in one log line among many. Here each such
    fallback is warned about once, naming the function, the limit and the guard that failed last.
    """

    def __init__(self) -> None:
        _listen_for_fallbacks()
        self._graphs_before = _compiled_graphs()
        self._fallbacks_before = len(_FALLBACKS)

    def summary(self) -> dict[str, Any]:
        """`graphs` compiled so far and `fallbacks`, one line per function that fell back to eager (none, normally)."""
        return {"graphs": _compiled_graphs() - self._graphs_before, "fallbacks": _FALLBACKS[self._fallbacks_before:]}


_FALLBACKS: list[str] = []  # every function dynamo stopped compiling in this process: "function: limit; last reason"


class _FallbackWarnings(logging.Handler):
    """Turns dynamo's "hit config.recompile_limit" warning into an entry of `_FALLBACKS` and a Python warning."""

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("torch._dynamo hit config."):
            return
        lines = [line.strip() for line in record.getMessage().splitlines()]
        limit = lines[0].removeprefix("torch._dynamo hit config.")  # e.g. "recompile_limit (8)"
        function = next((line.removeprefix("function:").strip() for line in lines if line.startswith("function:")),
                        "a compiled function")
        reason = next((" ".join(line.removeprefix("last reason:").split()) for line in lines
                       if line.startswith("last reason:")), "not given")
        _FALLBACKS.append(f"{function}: {limit}; last reason: {reason}")
        warnings.warn(f"torch.compile stopped compiling {function}: it reached dynamo's {limit}, and its variants not "
                      f"compiled yet run eagerly from now on (slower, same results). The guard that failed last: "
                      f"{reason}. TORCH_LOGS=recompiles lists every recompilation and its cause", stacklevel=1)


def _listen_for_fallbacks() -> None:
    """Attach `_FallbackWarnings` to dynamo's logger, once per process."""
    dynamo_log = logging.getLogger("torch._dynamo")
    if not any(isinstance(h, _FallbackWarnings) for h in dynamo_log.handlers):
        dynamo_log.addHandler(_FallbackWarnings())


def _compiled_graphs() -> int:
    """Frames dynamo has compiled in this process (its own tally: one per cache entry)."""
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


def vision_tokens(visual: nn.Module) -> int | None:
    """How many positions an image tower's attention sees: patches plus prefix tokens for open_clip's and timm's
    vision transformers; None for towers without that structure (convolutional ones have no attention)."""
    grid = getattr(visual, "grid_size", None)
    if grid is not None and hasattr(visual, "class_embedding"):  # open_clip VisionTransformer
        return math.prod(grid) + 1
    trunk = getattr(visual, "trunk", None)  # open_clip's TimmModel
    num_patches = getattr(getattr(trunk, "patch_embed", None), "num_patches", None)
    if num_patches is not None:
        return int(num_patches) + int(getattr(trunk, "num_prefix_tokens", 0))
    return None


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


def trim_padding(token_ids: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Token ids (B, context_length) without the padding columns after the batch's last text token.

    The kept length is rounded up to a multiple of `multiple` (fewer distinct shapes for compiled models and
    kernels). Padding is id 0 at the end of each row, after its end-of-text token, as open_clip's BPE tokenizer and
    clipalign's SentencePiece tokenizer lay rows out. Returns a view; nothing is cut when no column can go.
    """
    used = (token_ids != 0).any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    length = min(-(-length // multiple) * multiple, token_ids.shape[1])
    return token_ids[:, :length]


def resolve_model_config(cfg: ModelConfig, tokenizer: Tokenizer | None = None) -> dict:
    """The open_clip model config a recipe asks for: the named config with the recipe's embed_dim, vision_cfg and
    text_cfg keys merged over it, patch dropout, and a SentencePiece tokenizer's vocabulary size.

    Raises:
        ConfigError: an unknown model name, or an option the tower type does not have (naming the key).
    """
    resolved = copy.deepcopy(model_config(cfg.name))
    if cfg.embed_dim:
        resolved["embed_dim"] = cfg.embed_dim
    resolved["vision_cfg"].update(copy.deepcopy(cfg.vision_cfg))
    resolved["text_cfg"].update(copy.deepcopy(cfg.text_cfg))
    vision = resolved["vision_cfg"]
    if cfg.patch_dropout:
        if not 0.0 <= cfg.patch_dropout < 1.0:
            raise ConfigError(f"model.patch_dropout: {cfg.patch_dropout} is not in [0, 1)")
        if "timm_model_name" in vision:
            raise ConfigError(f"model.patch_dropout: the image tower of {cfg.name!r} is the timm model "
                              f"{vision['timm_model_name']!r}, which has no patch dropout; it works on open_clip's "
                              f"ViT towers")
        vision["patch_dropout"] = cfg.patch_dropout
    if isinstance(tokenizer, SentencePieceTokenizer):
        if "hf_model_name" in resolved["text_cfg"]:
            raise ConfigError(f"model.tokenizer: {cfg.name!r} has a Hugging Face text tower with its own tokenizer; "
                              f"a SentencePiece tokenizer needs open_clip's text transformer")
        resolved["text_cfg"]["vocab_size"] = tokenizer.vocab_size
    return resolved


def create_model(cfg: ModelConfig, loss_kind: str = "contrastive", load_pretrained: bool = True,
                 tokenizer_file: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> DualEncoder:
    """A dual encoder for a loss kind, randomly initialised unless `cfg.pretrained` names weights, with the towers
    locked and the LoRA adapters that `cfg` asks for (`clipalign.finetune`).

    contrastive: logit scale starts at 1/0.07, as in CLIP; sigmoid: scale 10 and a learnable logit bias at -10.
    `load_pretrained=False` skips `cfg.pretrained` (the caller loads its own weights next, as `load` does);
    `tokenizer_file` replaces `cfg.tokenizer` (a checkpoint carries its own copy of the tokenizer). Under
    `with torch.device("meta")` and `device="meta"`, the model is built without memory (to count parameters).
    """
    model_config(cfg.name)  # validates the name with a readable error
    tokenizer = recipe_tokenizer(cfg.name, tokenizer_file or cfg.tokenizer, cfg.text_cfg.get("context_length"))
    resolved = resolve_model_config(cfg, tokenizer)
    init = SIGMOID_INIT if loss_kind == "sigmoid" else {}
    pretrained = cfg.pretrained if load_pretrained and cfg.pretrained else None
    vision = dict(resolved["vision_cfg"])
    if "timm_model_name" in vision:  # what open_clip's pretrained_image flag sets, given explicitly here
        vision["timm_model_pretrained"] = cfg.pretrained_image and load_pretrained
    elif cfg.pretrained_image:
        raise ConfigError(f"model.pretrained_image: the image tower of {cfg.name!r} is not a timm model; use "
                          f"model.pretrained for open_clip weights")
    with _quiet_random_init():
        clip = open_clip.create_model(cfg.name, pretrained=pretrained, output_dict=True, device=device,
                                      embed_dim=resolved["embed_dim"], vision_cfg=vision,
                                      text_cfg=resolved["text_cfg"], **init)
    finetune.prepare(clip, cfg)  # model.lock_image, lock_text, LoRA adapters
    if cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    model = DualEncoder(clip, cfg.name, tokenizer=tokenizer, model_cfg=resolved)
    model.preprocess = eval_preprocess(model)
    return model


def eval_preprocess(model: DualEncoder):
    """open_clip's eval transform for this model: PIL image -> normalised float tensor."""
    return _eval_transform(open_clip.get_model_preprocess_cfg(model.clip))


def _eval_transform(pp: dict):
    """open_clip's eval transform for a preprocess config (size, mean, std, resize mode, ...)."""
    return open_clip.image_transform(pp["size"], is_train=False, mean=pp.get("mean"), std=pp.get("std"),
                                     resize_mode=pp.get("resize_mode"), interpolation=pp.get("interpolation"),
                                     fill_color=pp.get("fill_color", 0))


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> DualEncoder:
    """Load a trained model from a checkpoint directory, a run directory (latest checkpoint) or an export directory.

    The result has `encode_image(pixels)`, `encode_text(token_ids)`, `.tokenizer` and `.preprocess`, in eval mode.
    A checkpoint of a LoRA run comes back with its adapters merged into plain open_clip weights.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected an export, checkpoint or run directory")
    if is_export(path):
        model = _load_export(path)
    else:
        try:
            ckpt = resolve_checkpoint(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is not a model: neither an export directory (no {EXPORT_CONFIG_FILE}), "
                                    f"a checkpoint (no {TRAINER_STATE_FILE}) nor a run directory with checkpoints"
                                    ) from None
        cfg = read_config(ckpt / RUN_CONFIG_FILE)
        own_tokenizer = ckpt / TOKENIZER_FILE
        model = create_model(cfg.model, cfg.loss.kind, load_pretrained=False,
                             tokenizer_file=own_tokenizer if own_tokenizer.is_file() else None)
        model.load_state_dict(read_checkpoint_weights(ckpt))
        finetune.merge_adapters(model.clip)
    return model.to(device).eval()


def merged_model(model: DualEncoder) -> DualEncoder:
    """`model` itself when it has no LoRA adapters; else a copy with them merged into plain open_clip weights (what
    exports write), the caller's model left as it is."""
    if not finetune.has_adapters(model.clip):
        return model
    merged = DualEncoder(finetune.merge_adapters(copy.deepcopy(model.clip)), model.name, tokenizer=model.tokenizer,
                         preprocess=model.preprocess, model_cfg=model.model_cfg)
    merged.attention = model.attention
    return merged


def _load_export(path: Path) -> DualEncoder:
    uri = f"local-dir:{path}"
    clip, _, preprocess = open_clip.create_model_and_transforms(uri, output_dict=True)
    config = read_export_config(path)
    model_cfg = config["model_cfg"]
    tokenizer = directory_tokenizer(path, model_cfg.get("text_cfg", {}), (path / TOKENIZER_FILE).is_file())
    return DualEncoder(clip, config.get("model_name", path.name), tokenizer=tokenizer, preprocess=preprocess,
                       model_cfg=model_cfg)


# ---- one tower on its own ---------------------------------------------------------------------------------------


def tower_state_dicts(clip: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The image and text towers' weights of an open_clip model, keyed as its standalone tower modules
    (`_build_vision_tower` / `_build_text_tower`) name them."""
    state = clip.state_dict()
    image = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if hasattr(clip, "text"):  # CustomTextCLIP (timm or HF towers): the text tower is one module
        text = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    else:  # CLIP keeps the text tower's parts as its own attributes, under the tower's names
        text = {k: v for k, v in state.items() if not k.startswith(("visual.", "logit_scale", "logit_bias"))}
    return image, text


class ImageEncoder(nn.Module):
    """An exported image tower alone: `forward(pixels)` -> L2-normalised embeddings (B, D), with `.preprocess`."""

    def __init__(self, tower: nn.Module, preprocess, config: dict):
        super().__init__()
        self.tower, self.preprocess, self.config = tower, preprocess, config

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.tower(pixels), dim=-1)

    encode_image = forward


class TextEncoder(nn.Module):
    """An exported text tower alone: `forward(token_ids)` -> L2-normalised embeddings (B, D), with `.tokenizer`."""

    def __init__(self, tower: nn.Module, tokenizer: Tokenizer, config: dict):
        super().__init__()
        self.tower, self.tokenizer, self.config = tower, tokenizer, config

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.tower(token_ids), dim=-1)

    encode_text = forward


def load_image_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> ImageEncoder:
    """The image tower of an export directory, without building the text tower."""
    from open_clip.model import _build_vision_tower

    cfg, weights = read_tower(path, "image")
    with _quiet_random_init():
        tower = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))
    tower.load_state_dict(weights)
    return ImageEncoder(tower, _eval_transform(cfg["preprocess_cfg"]), cfg).to(device).eval()


def load_text_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> TextEncoder:
    """The text tower of an export directory, with its tokenizer, without building the image tower."""
    from open_clip.model import _build_text_tower

    cfg, weights = read_tower(path, "text")
    with _quiet_random_init():
        tower = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], cfg.get("quick_gelu", False))
    tower.load_state_dict(weights)
    tokenizer = directory_tokenizer(path, cfg["text_cfg"], cfg.get("tokenizer") == TOKENIZER_FILE)
    return TextEncoder(tower, tokenizer, cfg).to(device).eval()

