"""An open_clip CLIP model as Hugging Face Transformers files: `CLIPModel` weights and config, and a `CLIPProcessor`
(a fast tokenizer that gives open_clip's token ids, an image processor that gives its pixels).

The files go beside the open_clip files of an export directory (`clipalign-export --format transformers`; their
names are in `clipalign.layout`), so one directory loads in both libraries, as open_clip's models on the Hugging Face
Hub do:

    model = transformers.CLIPModel.from_pretrained(DIR)
    processor = transformers.CLIPProcessor.from_pretrained(DIR, backend="pil")

`convert` checks that the model can be expressed and builds everything in memory, so a model that cannot is refused
before anything is written; `TransformersExport.save` writes the files, loads them back with transformers and
checks the embeddings, token ids and pixels against the open_clip model.

What maps to what:

- open_clip's `CLIP` with a `VisionTransformer` image tower and its own text transformer -> `CLIPModel`: `conv1` ->
  `patch_embedding`, `ln_pre` -> `pre_layrnorm`, each block's fused `in_proj` -> `q_proj`/`k_proj`/`v_proj`,
  `ln_1`/`ln_2` -> `layer_norm1`/`layer_norm2`, `c_fc`/`c_proj` -> `fc1`/`fc2`, `ln_post` -> `post_layernorm`,
  `proj` and `text_projection` (x @ P) -> bias-free `nn.Linear`s (weight P.T), `ln_final` -> `final_layer_norm`.
  QuickGELU -> `quick_gelu`, `nn.GELU` -> `gelu`. The text tower pools at the first end-of-text token, which is where
  open_clip's argmax pooling lands: end-of-text is the highest id, and the first maximum is the one taken.
- Tokenizers: open_clip's BPE becomes a byte-level BPE `tokenizers` model with open_clip's vocabulary, pre-tokenizer
  pattern and special tokens, and a normalizer that replays open_clip's cleaning (the deterministic parts of ftfy,
  the common HTML entities, white space, lower case); a SentencePiece model (`clipalign-train-tokenizer`, unigram or
  BPE) becomes the equivalent `tokenizers` model with ids shifted as `SentencePieceTokenizer` shifts them. Rows are
  padded with the end-of-text id (open_clip pads with 0): the attention mask marks the padding, and with causal
  attention and pooling at the first end-of-text token no padding id reaches an embedding.
- Images: `CLIPImageProcessor` with the model's size, resample filter, mean and std; open_clip's `shortest` resize
  mode is resize + centre crop, `squash` a resize to the square.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch
from open_clip.tokenizer import default_bpe
from torch import nn

from clipalign.layout import (
    TRANSFORMERS_CONFIG_FILE,
    TRANSFORMERS_WEIGHTS_FILE,
    commit_temp,
    write_atomic,
    write_weights,
)
from clipalign.tokenizer import SentencePieceTokenizer

if TYPE_CHECKING:
    from clipalign.model import DualEncoder

log = logging.getLogger(__name__)

# normalised embeddings, transformers vs open_clip, on the probe batch at export time: a wrong mapping is off by O(1);
# kernels that sum in another order differ by ~1e-6 in fp32
TRANSFORMERS_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 1 / 255  # the processor's pixels vs the model's own preprocessing, in [0, 1] units
INSTEAD = "export the open_clip directory (the default --format open_clip) or ONNX (--onnx) instead"
SOT, EOT = "<start_of_text>", "<end_of_text>"  # open_clip's names for them
# SentencePiece ids are shifted by one for padding (`SentencePieceTokenizer`); the name holds a space, which the
# normalizer never leaves in a text, so no caption can spell the piece
_SPM_PAD = "<pad unused>"
_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL's filter numbers, which transformers takes
# Captions every export is checked on: punctuation, case, accents (composed and not), CJK, Arabic, emoji, quotes,
# ligatures, full-width forms, HTML entities, odd white space, an end-of-text token spelled out, and over-long ones
PROBE_CAPTIONS = [
    "a photo of a cat.",
    "Hello, World!!! What's up?? (yes) -- 100% #1 @home don't I'm",
    "Café crème brûlée, naïve façade; Cafe\u0301 in NFD",
    "東京の夜景, 北京烤鸭 and 서울",
    "مرحبا بالعالم، Привет мир, नमस्ते",
    "a dog 🐶 with a family 👨\u200d👩\u200d👧 and ❤️",
    "\u201ccurly\u201d \u2018quotes\u2019 it\u2019s, \ufb01ne \ufb02our",
    "\uff26\uff35\uff2c\uff2c\u3000\uff57\uff49\uff44\uff54\uff48 forms, C1 \x93quotes\x94 and \x1b[1mescapes\x1b[0m",
    "AT&amp;T &lt;b&gt; &quot;q&quot; &#39;s",
    "  tab\tnew\nline   spaces\u00a0no-break\u2003em\u200bzero-width  ",
    "ΟΔΟΣ Σ ΣΑΣ and <end_of_text> in a caption",
    "",
    "a long caption " * 30,
    "x" * 300,
]


class NotExportable(ValueError):
    """The model cannot be expressed as Transformers files; the message says why and what to use instead."""


@dataclass
class TransformersExport:
    """A model converted in memory, ready to `save`: the weights under `CLIPModel`'s names, its config, the processor,
    and what the conversion drops (`notes`, for the model card)."""

    model: DualEncoder
    config: Any  # transformers.CLIPConfig
    state_dict: dict[str, torch.Tensor]
    processor: Any  # transformers.CLIPProcessor
    image_size: int
    logit_bias: float | None = None
    notes: list[str] = field(default_factory=list)

    def save(self, out_dir: str | os.PathLike) -> dict[str, Any]:
        """Write the files into `out_dir` (the export directory, being written), load them back with transformers and
        check them against the open_clip model.

        Returns:
            What the model card reports: the files, `max_diff` (image, text: normalised embeddings), `pixel_diff`,
            `logit_bias` and `notes`.

        Raises:
            RuntimeError: the loaded model's embeddings, token ids or pixels differ from the open_clip model's.
        """
        out = Path(out_dir)
        write_atomic(out / TRANSFORMERS_CONFIG_FILE, self.config.to_json_string())
        write_weights(out / TRANSFORMERS_WEIGHTS_FILE, self.state_dict)
        staging = out / ".transformers-processor"
        self.processor.save_pretrained(str(staging))
        files = [TRANSFORMERS_CONFIG_FILE, TRANSFORMERS_WEIGHTS_FILE]
        for path in sorted(staging.iterdir()):
            if (out / path.name).exists():  # open_clip's files come first and are never replaced
                raise RuntimeError(f"transformers would overwrite {path.name} of the export; nothing written")
            commit_temp(path, out / path.name)
            files.append(path.name)
        shutil.rmtree(staging)
        max_diff, pixel_diff = _check_saved(out, self)
        return {"files": files, "max_diff": max_diff, "pixel_diff": pixel_diff, "logit_bias": self.logit_bias,
                "notes": self.notes}


def convert(model: DualEncoder, model_cfg: dict) -> TransformersExport:
    """`model` as `CLIPModel` weights, config and `CLIPProcessor`, in memory (LoRA adapters merged into the weights).

    Raises:
        NotExportable: one line naming what cannot be expressed (the config field, the tower, the tokenizer) and what
            to use instead; raised before anything is written.
    """
    try:
        import transformers
    except ImportError:
        raise NotExportable("--format transformers needs the transformers package: pip install 'transformers>=5.10' "
                            "(or the clipalign[transformers] extra)") from None
    from clipalign.model import merged_model

    model = merged_model(model)  # CLIPModel holds plain weights: the adapters folded in
    _check_model(model, model_cfg)
    clip = model.clip
    vision = _tower_settings(clip.visual.transformer, [clip.visual], "vision_cfg")
    text = _tower_settings(clip.transformer, [clip.transformer, clip.ln_final], "text_cfg")
    embed_dim = clip.visual.proj.shape[1]
    tokenizer = _fast_tokenizer(model, clip.positional_embedding.shape[0])
    sot, eot = tokenizer.convert_tokens_to_ids(SOT), tokenizer.convert_tokens_to_ids(EOT)
    if eot != clip.token_embedding.num_embeddings - 1:
        raise NotExportable(f"model {model.name!r}: the end-of-text id {eot} is not the highest id of the text tower "
                            f"({clip.token_embedding.num_embeddings - 1}), so open_clip's argmax pooling would not "
                            f"land on it; {INSTEAD}")
    config = transformers.CLIPConfig(
        text_config={**text, "vocab_size": clip.token_embedding.num_embeddings,
                     "max_position_embeddings": clip.positional_embedding.shape[0],
                     "bos_token_id": sot, "eos_token_id": eot, "pad_token_id": eot, "projection_dim": embed_dim},
        vision_config={**vision, "image_size": _square(clip.visual.image_size, "vision_cfg.image_size"),
                       "patch_size": _square(clip.visual.patch_size, "vision_cfg.patch_size"), "num_channels": 3,
                       "projection_dim": embed_dim},
        projection_dim=embed_dim, logit_scale_init_value=float(clip.logit_scale.detach().reshape(())),
        architectures=["CLIPModel"], dtype=str(clip.visual.conv1.weight.dtype).removeprefix("torch."))
    notes = []
    logit_bias = None
    if clip.logit_bias is not None:
        logit_bias = float(clip.logit_bias.detach().reshape(()))
        config.logit_bias = logit_bias  # kept in config.json for whoever needs SigLIP's probabilities
        notes.append(f"The model was trained with the sigmoid (SigLIP) loss and has a learnt logit bias "
                     f"({logit_bias:.4f}), which `CLIPModel` does not have: its `logits_per_image` are "
                     f"`logit_scale.exp() * cos`, without the bias. Add `config.logit_bias` yourself for SigLIP's "
                     f"match probabilities, `sigmoid(logits + logit_bias)`; embeddings and rankings are unaffected. "
                     f"(`SiglipModel` has the bias, but not this model's class-token image pooling or causal text "
                     f"tower with end-of-text pooling.)")
        log.warning("model %r has a logit bias (%.4f) that CLIPModel cannot hold; it is written to %s as logit_bias "
                    "and stated in the model card", model.name, logit_bias, TRANSFORMERS_CONFIG_FILE)
    processor = transformers.CLIPProcessor(image_processor=_image_processor(model), tokenizer=tokenizer)
    return TransformersExport(model=model, config=config, state_dict=_state_dict(clip), processor=processor,
                              image_size=config.vision_config.image_size, logit_bias=logit_bias, notes=notes)


# ---- what CLIPModel can hold ------------------------------------------------------------------------------------

# open_clip config fields that change the computation in ways CLIPModel has no setting for: field -> what it does
_VISION_REFUSED = {
    "ls_init_value": "layer scale",
    "attentional_pool": "an attentional pooler",
    "no_ln_pre": "no LayerNorm before the transformer",
    "act_kwargs": "activation arguments",
    "block_type": "custom attention blocks",
    "qk_norm": "q/k normalisation",
    "scaled_cosine_attn": "scaled cosine attention",
    "scale_heads": "per-head attention scales",
    "scale_attn_inner": "a LayerNorm inside attention",
    "scale_attn": "a LayerNorm after attention",
    "scale_fc": "a LayerNorm inside the MLP",
}
_TEXT_REFUSED = {
    **_VISION_REFUSED,
    "embed_cls": "a class token",
    "no_causal_mask": "bidirectional attention",
    "proj_bias": "a bias in the text projection",
    "hf_tokenizer_name": "a Hugging Face tokenizer chosen by open_clip",
    "tokenizer_mode": "a non-default tokenizer mode",
}
_DEFAULTS = {"block_type": (None, "default")}  # values of a refused field that mean "off"


def _check_model(model: DualEncoder, model_cfg: dict) -> None:
    """Raise NotExportable unless CLIPModel (and its processor) can compute exactly what `model` computes."""
    name = model.name
    vision_cfg, text_cfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})

    def refuse(what: str) -> None:
        raise NotExportable(f"model {name!r}: {what}, which transformers' CLIPModel cannot hold; {INSTEAD}")

    if vision_cfg.get("timm_model_name"):
        refuse(f"vision_cfg.timm_model_name={vision_cfg['timm_model_name']!r} is a timm image tower")
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        refuse(f"vision_cfg.layers={vision_cfg['layers']} is a ResNet image tower")
    if text_cfg.get("hf_model_name"):
        refuse(f"text_cfg.hf_model_name={text_cfg['hf_model_name']!r} is a Hugging Face text tower inside open_clip")
    if type(model.clip).__name__ != "CLIP" or type(model.clip.visual).__name__ != "VisionTransformer":
        refuse(f"{type(model.clip).__name__} with a {type(model.clip.visual).__name__} image tower is not open_clip's "
               f"CLIP with a VisionTransformer")
    for section, cfg, refused in (("vision_cfg", vision_cfg, _VISION_REFUSED), ("text_cfg", text_cfg, _TEXT_REFUSED)):
        for key, what in refused.items():
            if cfg.get(key) not in (None, False, {}, *_DEFAULTS.get(key, ())):
                refuse(f"{section}.{key}={cfg[key]!r} means {what}")
        if set(cfg.get("norm_kwargs") or {}) - {"eps"}:
            refuse(f"{section}.norm_kwargs={cfg['norm_kwargs']!r} changes the LayerNorms beyond their eps")
    # final_ln_after_pool is fine: a LayerNorm acts on each position alone, so before or after pooling one position
    if vision_cfg.get("pool_type", "tok") != "tok":
        refuse(f"vision_cfg.pool_type={vision_cfg['pool_type']!r} pools other than at the class token")
    if vision_cfg.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):  # sin-cos: a fixed table
        refuse(f"vision_cfg.pos_embed_type={vision_cfg['pos_embed_type']!r}")
    if text_cfg.get("proj_type", "linear") != "linear":
        refuse(f"text_cfg.proj_type={text_cfg['proj_type']!r} is not a linear text projection")
    pool = text_cfg.get("pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        refuse(f"text_cfg.pool_type={pool!r} pools other than at the end-of-text token")
    clip = model.clip
    if pool == "eos" and getattr(clip, "text_eos_id", None) != getattr(model.tokenizer, "eot_token_id", None):
        refuse(f"text_cfg.eos_id={clip.text_eos_id} is not the tokenizer's end-of-text id")
    if clip.attn_mask is None:
        refuse("a text tower without the causal mask")
    if any(type(m).__name__ != "ResidualAttentionBlock" for m in (*clip.visual.transformer.resblocks,
                                                                  *clip.transformer.resblocks)):
        refuse("custom transformer blocks")
    if clip.visual.proj is None or clip.text_projection is None or isinstance(clip.text_projection, nn.Linear):
        refuse("a tower without a bias-free linear projection")
    _image_processor_settings(model, open_clip.get_model_preprocess_cfg(clip))


def _square(size: Any, key: str) -> int:
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise NotExportable(f"{key}={list(size)} is not square, which transformers' CLIPModel cannot hold; "
                                f"{INSTEAD}")
        size = size[0]
    return int(size)


def _tower_settings(transformer: nn.Module, parts: list[nn.Module], section: str) -> dict[str, Any]:
    """A tower's CLIPTextConfig / CLIPVisionConfig sizes, read from its modules (they are what ran in training);
    `parts` are the modules that make up the tower, for its LayerNorms."""
    blocks = transformer.resblocks
    first = blocks[0]
    norms = [m for part in parts for m in part.modules() if isinstance(m, nn.LayerNorm)]
    if len({m.eps for m in norms}) != 1:
        raise NotExportable(f"{section}: LayerNorms with different eps ({sorted({m.eps for m in norms})}), which "
                            f"transformers' CLIPModel cannot hold; {INSTEAD}")
    return {"hidden_size": first.attn.embed_dim, "num_attention_heads": first.attn.num_heads,
            "num_hidden_layers": len(blocks), "intermediate_size": first.mlp.c_fc.out_features,
            "hidden_act": _activation(first.mlp.gelu, section), "layer_norm_eps": norms[0].eps,
            "attention_dropout": 0.0}


def _activation(act: nn.Module, section: str) -> str:
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    raise NotExportable(f"{section}: the activation {type(act).__name__} has no transformers name; {INSTEAD}")


def _state_dict(clip: nn.Module) -> dict[str, torch.Tensor]:
    """The CLIP weights under CLIPModel's names."""
    sd = {k: v.detach() for k, v in clip.state_dict().items()}
    out = {
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].T,  # open_clip computes x @ proj, nn.Linear x @ W.T
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].T,
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    towers = (("visual.transformer.resblocks", "vision_model.encoder.layers", len(clip.visual.transformer.resblocks)),
              ("transformer.resblocks", "text_model.encoder.layers", len(clip.transformer.resblocks)))
    for source, target, count in towers:
        for i in range(count):
            s, t = f"{source}.{i}.", f"{target}.{i}."
            for part, weight, bias in zip("qkv", sd[s + "attn.in_proj_weight"].chunk(3),
                                          sd[s + "attn.in_proj_bias"].chunk(3)):
                out[f"{t}self_attn.{part}_proj.weight"], out[f"{t}self_attn.{part}_proj.bias"] = weight, bias
            for theirs, ours in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{t}{theirs}.weight"], out[f"{t}{theirs}.bias"] = sd[f"{s}{ours}.weight"], sd[f"{s}{ours}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


# ---- image processor --------------------------------------------------------------------------------------------


def _image_processor_settings(model: DualEncoder, pp: dict) -> dict[str, Any]:
    """CLIPImageProcessor's settings for open_clip's preprocess config `pp`, or NotExportable for what it lacks."""
    def refuse(what: str) -> None:
        raise NotExportable(f"model {model.name!r}: preprocess {what}, which transformers' CLIPImageProcessor cannot "
                            f"do; {INSTEAD}")

    size = _square(pp.get("size", 224), "preprocess size")
    if pp.get("mode", "RGB") != "RGB":
        refuse(f"mode {pp['mode']!r} (not RGB)")
    interpolation = pp.get("interpolation", "bicubic")
    if interpolation not in _RESAMPLE:
        refuse(f"interpolation {interpolation!r}")
    settings = {"resample": _RESAMPLE[interpolation], "image_mean": list(pp["mean"]), "image_std": list(pp["std"]),
                "do_convert_rgb": True, "do_rescale": True, "do_normalize": True}
    resize_mode = pp.get("resize_mode", "shortest")
    if resize_mode == "shortest":  # shortest side to size, then the centre crop
        return {**settings, "do_resize": True, "size": {"shortest_edge": size}, "do_center_crop": True,
                "crop_size": {"height": size, "width": size}}
    if resize_mode == "squash":
        return {**settings, "do_resize": True, "size": {"height": size, "width": size}, "do_center_crop": False}
    refuse(f"resize_mode {resize_mode!r} (resize the longest side, then pad)")


def _image_processor(model: DualEncoder):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(**_image_processor_settings(model, open_clip.get_model_preprocess_cfg(model.clip)))


# ---- tokenizers -------------------------------------------------------------------------------------------------


def _fast_tokenizer(model: DualEncoder, context_length: int):
    """A transformers fast tokenizer that gives the model's token ids, checked on `PROBE_CAPTIONS`."""
    from transformers import PreTrainedTokenizerFast

    ours = model.tokenizer
    if isinstance(ours, SentencePieceTokenizer):
        backend, split_special = _sentencepiece_backend(model, ours), True
    elif isinstance(ours, open_clip.SimpleTokenizer):
        backend, split_special = _bpe_backend(model, ours), False
    else:
        raise NotExportable(f"model {model.name!r}: its tokenizer {type(ours).__name__} has no fast-tokenizer "
                            f"conversion here (open_clip's BPE and SentencePiece models do); {INSTEAD}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sequence longer than the maximum": the probes are meant to be
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SOT, eos_token=EOT, pad_token=EOT,
                                       model_max_length=context_length,
                                       split_special_tokens=split_special)
    mismatch = first_mismatch(ours, fast, PROBE_CAPTIONS, context_length)
    if mismatch:
        raise NotExportable(f"model {model.name!r}: the fast tokenizer converted from its {type(ours).__name__} "
                            f"gives other ids ({mismatch}); {INSTEAD}")
    return fast


def first_mismatch(ours, fast, captions: list[str], context_length: int) -> str | None:
    """Where the fast tokenizer's ids differ from the model tokenizer's on `captions` (None: nowhere).

    Compared: every id up to and including end-of-text, with truncation to `context_length`. After it open_clip pads
    with 0 and the fast tokenizer with the end-of-text id, which the attention mask marks as padding.
    """
    want = ours(captions, context_length=context_length)
    got = fast(captions, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
    for caption, row, ids, mask in zip(captions, want, got["input_ids"], got["attention_mask"]):
        length = int(mask.sum())
        if not torch.equal(ids[:length], row[:length]) or bool(row[length:].any()):
            return f"{ids[:length].tolist()[:12]} for {row[:length].tolist()[:12]} on {caption[:60]!r}"
    return None


def _bpe_backend(model: DualEncoder, ours):
    """open_clip's BPE (`SimpleTokenizer` with its default vocabulary and cleaning) as a `tokenizers.Tokenizer`."""
    from open_clip.tokenizer import _clean_lower, bytes_to_unicode
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    kwargs = model.model_cfg.get("text_cfg", {}).get("tokenizer_kwargs") or {}
    if ours.clean_fn is not _clean_lower or ours.reduction_fn is not None:
        raise NotExportable(f"model {model.name!r}: text_cfg.tokenizer_kwargs={kwargs!r} (clean/reduction_mask) has "
                            f"no fast-tokenizer equivalent; {INSTEAD}")
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
    if vocab != list(ours.encoder):
        raise NotExportable(f"model {model.name!r}: its BPE vocabulary is not open_clip's default "
                            f"({len(ours.encoder)} entries); {INSTEAD}")
    ids = {token: i for i, token in enumerate(vocab)}
    backend = Tokenizer(BPE(vocab=ids, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                            fuse_unk=False))
    backend.normalizer = _open_clip_cleaning()
    # open_clip's pattern (after cleaning the text is lower case, so its IGNORECASE changes nothing)
    pattern = rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+"
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> characters, no second split
    ])
    backend.decoder = decoders.ByteLevel()
    # matched in the cleaned text, as open_clip's pattern matches them
    backend.add_special_tokens([AddedToken(SOT, special=True, normalized=True),
                                AddedToken(EOT, special=True, normalized=True)])
    backend.post_processor = processors.TemplateProcessing(single=f"{SOT} $A {EOT}",
                                                           special_tokens=[(SOT, ids[SOT]), (EOT, ids[EOT])])
    return backend


def _char_class(chars) -> str:
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in chars) + "]"


@functools.cache
def _python_whitespace() -> str:
    """A regex class of the characters `str.split()` splits on (regex engines disagree on a few)."""
    return _char_class(c for c in map(chr, range(0x110000)) if c.isspace())


def _open_clip_cleaning():
    """open_clip's `_clean_lower` as a `tokenizers` normalizer: ftfy's character-level fixes (C1 controls, Latin
    ligatures, full/half-width forms, curly quotes, control characters, terminal escapes, NFC), the common HTML
    entities unescaped twice, white space collapsed and stripped, lower case (with Greek final sigma, as Python's).

    Not replayed: ftfy's repair of mojibake and HTML entities beyond those below; such text gets other ids.
    """
    from ftfy import chardata, fixes
    from tokenizers import Regex, normalizers

    steps = [normalizers.Replace(Regex(fixes.ANSI_RE.pattern), "")]
    for i in range(0x80, 0xA0):  # in ftfy's order: C1 controls, ligatures, widths, quotes, control characters, NFC
        fixed = fixes.fix_c1_controls(chr(i))
        if fixed != chr(i):
            steps.append(normalizers.Replace(chr(i), fixed))
    tables = {**chardata.LIGATURES, **chardata.WIDTH_MAP}
    steps += [normalizers.Replace(chr(code), text) for code, text in tables.items()]
    steps += [normalizers.Replace(Regex(chardata.SINGLE_QUOTE_RE.pattern), "'"),
              normalizers.Replace(Regex(chardata.DOUBLE_QUOTE_RE.pattern), '"'),
              normalizers.Replace(Regex(_char_class(map(chr, chardata.CONTROL_CHARS))), ""),
              normalizers.NFC()]
    entities = [("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&#39;", "'"), ("&#039;", "'"), ("&#x27;", "'"),
                ("&apos;", "'"), ("&nbsp;", "\xa0"), ("&amp;", "&")]  # &amp; last: one pass of html.unescape
    steps += [normalizers.Replace(entity, text) for entity, text in entities] * 2
    cased = r"[\p{Lu}\p{Ll}\p{Lt}]"
    steps += [normalizers.Replace(Regex(_python_whitespace() + "+"), " "), normalizers.Strip(),
              normalizers.Replace(Regex(f"(?<={cased})\u03a3(?!{cased})"), "\u03c2"), normalizers.Lowercase()]
    return normalizers.Sequence(steps)


def _spm_proto(model: DualEncoder, ours: SentencePieceTokenizer):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(ours.model_proto)
    kinds = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
    kind = proto.trainer_spec.model_type
    if kind not in (1, 2):
        raise NotExportable(f"model {model.name!r}: its SentencePiece tokenizer is a {kinds.get(kind, kind)!r} model, "
                            f"which has no fast-tokenizer conversion (unigram and bpe do); {INSTEAD}")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise NotExportable(f"model {model.name!r}: its SentencePiece model treats white space as a suffix, which the "
                            f"fast-tokenizer conversion does not; {INSTEAD}")
    return proto


def _sentencepiece_backend(model: DualEncoder, ours: SentencePieceTokenizer):
    """A SentencePiece model as a `tokenizers.Tokenizer` with `SentencePieceTokenizer`'s ids: piece p -> p + 1, 0 for
    padding, start and end of text after the pieces; its cleaning (white space) before SentencePiece's own."""
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = _spm_proto(model, ours)
    unigram = proto.trainer_spec.model_type == 1
    if unigram:
        vocab: Any = [(p.piece, p.score) for p in proto.pieces]
    else:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # transformers' own conversion, which follows the model's normaliser spec; then the ids are shifted by one
    spec = json.loads(SpmConverter.build_tokenizer_from_spm_proto(proto, vocab).to_str())
    spec_model = spec["model"]
    if unigram:
        # SentencePiece never matches its unknown or control pieces in a text; a unigram `tokenizers` model matches
        # any piece, so those get names that no normalised text contains (a space). Byte pieces keep their names,
        # which byte fallback looks up: a caption that spells one out ("<0x41>") reads as that byte here
        spec_model["vocab"] = [[_SPM_PAD, 0.0]] + [
            [p.piece if p.type in (1, 4, 6) else f"{p.piece} unused", p.score] for p in proto.pieces]
        spec_model["unk_id"] = (spec_model["unk_id"] or 0) + 1
    else:
        spec_model["vocab"] = {_SPM_PAD: 0, **{piece: i + 1 for piece, i in spec_model["vocab"].items()}}
    backend = Tokenizer.from_str(json.dumps(spec))
    steps = [normalizers.Replace(Regex(_python_whitespace() + "+"), " "), normalizers.Strip()]  # clean_text
    backend.normalizer = normalizers.Sequence(steps + ([backend.normalizer] if backend.normalizer else []))
    backend.add_special_tokens([AddedToken(SOT, special=True), AddedToken(EOT, special=True)])
    sot, eot = backend.token_to_id(SOT), backend.token_to_id(EOT)
    if (sot, eot) != (ours.sot_token_id, ours.eot_token_id):
        raise NotExportable(f"model {model.name!r}: the converted SentencePiece tokenizer puts start/end of text at "
                            f"{sot}/{eot}, not {ours.sot_token_id}/{ours.eot_token_id}; {INSTEAD}")
    backend.post_processor = processors.TemplateProcessing(single=f"{SOT} $A {EOT}",
                                                           special_tokens=[(SOT, sot), (EOT, eot)])
    return backend


# ---- checks of the written files --------------------------------------------------------------------------------


@torch.no_grad()
def _check_saved(out: Path, export: TransformersExport) -> tuple[dict[str, float], float]:
    """Load `out` with transformers (offline) and compare with the open_clip model on probe images and captions."""
    import copy

    from transformers import AutoProcessor, CLIPModel
    from transformers.utils import logging as transformers_logging

    model = export.model
    quiet = not transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a bar per load in the middle of an export says nothing
    try:
        hf = CLIPModel.from_pretrained(str(out), local_files_only=True).eval()
        processor = AutoProcessor.from_pretrained(str(out), local_files_only=True, backend="pil")
    finally:
        if not quiet:
            transformers_logging.enable_progress_bar()
    clip = copy.deepcopy(model.clip).cpu().float().eval()  # the caller's model keeps its device and mode
    context_length = export.config.text_config.max_position_embeddings
    mismatch = first_mismatch(model.tokenizer, processor.tokenizer, PROBE_CAPTIONS, context_length)
    if mismatch:
        raise RuntimeError(f"{out}: the saved tokenizer gives other ids than the model's ({mismatch})")
    texts = processor(text=PROBE_CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    images = _probe_images(export.image_size)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    want_pixels = torch.stack([model.preprocess(image) for image in images])
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    pixel_diff = ((pixels - want_pixels) * std).abs().max().item()  # in [0, 1] units, before normalisation
    if not pixel_diff <= PIXEL_TOLERANCE + 1e-6:
        raise RuntimeError(f"{out}: the saved image processor's pixels differ from the model's preprocessing by "
                           f"{pixel_diff * 255:.1f}/255")
    got = {"image": hf.get_image_features(pixel_values=want_pixels).pooler_output,
           "text": hf.get_text_features(**texts).pooler_output}
    want = {"image": clip.encode_image(want_pixels), "text": clip.encode_text(model.tokenizer(PROBE_CAPTIONS,
                                                                                              context_length))}
    diff = {}
    for kind in ("image", "text"):
        a, b = nn.functional.normalize(got[kind], dim=-1), nn.functional.normalize(want[kind], dim=-1)
        diff[kind] = (a - b).abs().max().item()
        if not diff[kind] < TRANSFORMERS_TOLERANCE:
            raise RuntimeError(f"{out}: transformers' {kind} embeddings differ from open_clip's by {diff[kind]:.3g} "
                               f"(tolerance {TRANSFORMERS_TOLERANCE:g}); the conversion is wrong for this model")
    return diff, pixel_diff


def _probe_images(size: int) -> list:
    """Square pictures (so no centre-crop rounding is involved) at and above the model's size: gradients and noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for side in (size, size * 2 + 3):
        ramp = np.linspace(0, 255, side, dtype=np.float32)
        gradient = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)), np.full((side, side), 90.0)], -1)
        images.append(Image.fromarray(gradient.astype(np.uint8)))
        images.append(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
    return images


# ---- model card -------------------------------------------------------------------------------------------------


def card_lines(info: dict[str, Any], dirname: str) -> list[str]:
    """The model card's section on loading the export with transformers and what differs from open_clip."""
    diff = info["max_diff"]
    lines = [
        "",
        "## Load with transformers",
        "",
        "The same directory holds transformers' files (`" + "`, `".join(info["files"]) + "`):",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import CLIPModel, CLIPProcessor",
        f'model = CLIPModel.from_pretrained("{dirname}").eval()',
        f'processor = CLIPProcessor.from_pretrained("{dirname}", backend="pil")  # PIL: open_clip\'s own resize',
        'inputs = processor(text=["a photo of a cat", "a photo of a dog"], images=Image.open("cat.jpg"),',
        '                   padding="max_length", truncation=True, return_tensors="pt")',
        "with torch.no_grad():",
        "    out = model(**inputs)",
        "print(out.logits_per_image.softmax(dim=-1))  # out.image_embeds, out.text_embeds: L2-normalised",
        "```",
        "",
        f"Checked at export time against open_clip: normalised embeddings within {diff['image']:.1e} (image) and "
        f"{diff['text']:.1e} (text) on probe images and captions; the processor's pixels within "
        f"{info['pixel_diff'] * 255:.1f}/255 of open_clip's preprocessing.",
        "",
        "Differences from open_clip:",
        "",
        "- Padding: the processor pads with the end-of-text id where open_clip pads with 0; the attention mask marks "
        "it and no embedding depends on it. Pass `truncation=True`: open_clip cuts over-long captions to the context "
        "length keeping the end-of-text token, and so does the processor then.",
        "- Load the tokenizer with `AutoTokenizer`/`CLIPProcessor`/`AutoProcessor`, which read `tokenizer.json` as "
        "written; `CLIPTokenizer.from_pretrained` rebuilds transformers' stock CLIP cleaning instead and differs "
        "from open_clip on curly quotes, ligatures, full-width forms and HTML entities.",
        "- Text that ftfy repairs heuristically (mojibake) or with HTML entities other than the common ones (`&amp;`, "
        "`&lt;`, `&gt;`, `&quot;`, `&#39;`, `&apos;`, `&nbsp;`) gets other ids than open_clip's.",
        "- Images: the default (torchvision) image backend resizes with its own bicubic filter, within a few /255 of "
        "PIL's; `backend=\"pil\"` gives open_clip's pixels. transformers centre-crops at floor((size - crop) / 2) "
        "where open_clip rounds half to even, so on some aspect ratios the crop sits one pixel earlier along the "
        "long side; images with transparency are put on white where open_clip drops the alpha channel.",
    ]
    lines += [f"- {note}" for note in info["notes"]]
    return lines

