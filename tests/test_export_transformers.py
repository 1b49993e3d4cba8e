"""clipalign-export --format transformers: the directory loads with transformers' CLIPModel / CLIPProcessor (and the
Auto classes), offline, and gives open_clip's embeddings, token ids and pixels; what CLIPModel cannot hold is refused
before anything is written.

Every model is built here (random init or one training step); nothing is downloaded.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: every model here is a local directory

import json
import logging
import random
from pathlib import Path

import numpy as np
import open_clip
import pytest
import sentencepiece as spm
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from transformers import (
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

from clipalign.checkpoint import save_checkpoint
from clipalign.config import ConfigError, ModelConfig, load_config
from clipalign.data.synthetic import draw_sample
from clipalign.export import export_model, main
from clipalign.hf_export import NotExportable
from clipalign.layout import EXPORT_CONFIG_FILE, TRANSFORMERS_CONFIG_FILE, TRANSFORMERS_FILES
from clipalign.model import create_model
from clipalign.train_tokenizer import train_sentencepiece

RELATIVE = 1e-5  # embeddings, transformers vs open_clip, as a share of the largest entry
_RNG = random.Random(0)
SYNTHETIC = [draw_sample(_RNG, size) for size in (64, 96, 200, 64, 150)]
CAPTIONS = [caption for _, caption, _ in SYNTHETIC] + [
    "Hello, World!!! What's up?? (yes) -- 100% #1 @home; e-mail: a.b@c.org",
    "don't won't I'm they're we've you'll he'd it's ISN'T",
    "Café crème brûlée, naïve façade, jalapeño, Ærøskøbing, straße",
    "Cafe\u0301 written with a combining accent",
    "東京の夜景 and 北京烤鸭 and 서울의 밤",
    "Привет мир, Γειά σου κόσμε ΟΔΟΣ, مرحبا بالعالم, नमस्ते",
    "a dog 🐶 with a family 👨\u200d👩\u200d👧 and a heart ❤️ 🇯🇵",
    "\u201ccurly quotes\u201d and \u2018single\u2019 ones, it\u2019s \ufb01ne \ufb02our",
    "\uff26\uff35\uff2c\uff2c\u3000\uff37\uff29\uff24\uff34\uff28 letters and \uff11\uff12\uff13",
    "Tom &amp; Jerry &lt;3 &quot;classic&quot; &#39;toon&#39;",
    "  lots\tof\nwhite   space\u00a0and\u2003odd\u200bspaces  ",
    "3.14159 and 2,718 and 1/2 and 10x10",
    "",
    "a very long caption about a red circle " * 10,
    "supercalifragilisticexpialidocious" * 8,
]


def _similar(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| as a share of max |want|."""
    assert got.shape == want.shape
    return ((got - want).abs().max() / want.abs().max()).item()


def _save_checkpoint(model, run_dir: Path, cfg) -> Path:
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(cpu=True)
        accelerator.prepare(model)
        return save_checkpoint(accelerator, run_dir, 1, cfg, {"samples_seen": 4})
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny-vit-64 run with one optimizer step taken (weights and temperature off their init), saved."""
    torch.manual_seed(0)
    cfg = load_config(overrides=["model.name=tiny-vit-64", "train.precision=fp32"])
    model = create_model(cfg.model)
    pixels = torch.stack([model.preprocess(image) for image, _, _ in SYNTHETIC[:4]])
    out = model(pixels, model.tokenizer([caption for _, caption, _ in SYNTHETIC[:4]]))
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    run_dir = tmp_path_factory.mktemp("run")
    _save_checkpoint(model.eval(), run_dir, cfg)
    return model, run_dir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    """The run exported by the command line, as a user types it."""
    out = tmp_path_factory.mktemp("exports") / "tiny"
    main(["--checkpoint", str(run[1]), "--out", str(out), "--format", "transformers"])
    return out


@pytest.fixture(scope="module")
def loaded(exported):
    """The export loaded by transformers and by open_clip (`local-dir:`)."""
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{exported}")
    return {"hf": CLIPModel.from_pretrained(exported).eval(), "processor": CLIPProcessor.from_pretrained(
        exported, backend="pil"), "clip": clip.eval(), "preprocess": preprocess,
        "tokenizer": open_clip.get_tokenizer(f"local-dir:{exported}")}


def _images() -> list[Image.Image]:
    """Drawn pictures, square and not, in RGB and grey, up to 4x the model's size."""
    images = [image for image, _, _ in SYNTHETIC]
    images += [images[2].resize((150, 80)), images[2].resize((67, 301)), images[4].resize((250, 130)),
               images[1].resize((97, 64)), images[3].convert("L"),
               Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))]
    return images


@torch.no_grad()
def _open_clip_embeddings(clip, tokenizer, pixels: torch.Tensor, captions: list[str]):
    return clip.encode_image(pixels), clip.encode_text(tokenizer(captions))


@torch.no_grad()
def _transformers_embeddings(hf, processor, pixels: torch.Tensor, captions: list[str]):
    text = processor(text=captions, padding="max_length", truncation=True, return_tensors="pt")
    return (hf.get_image_features(pixel_values=pixels).pooler_output,
            hf.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output)


def _assert_same_ids(tokenizer, fast, captions: list[str], context_length: int) -> None:
    """Ids equal up to and including end-of-text; after it open_clip pads with 0, the fast tokenizer with the
    end-of-text id under a zero attention mask."""
    want = tokenizer(captions)
    got = fast(captions, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
    eot = fast.eos_token_id
    for caption, row, ids, mask in zip(captions, want, got["input_ids"], got["attention_mask"]):
        length = int(mask.sum())
        assert ids[:length].tolist() == row[:length].tolist(), caption
        assert ids[length - 1] == eot and not row[length:].any() and (ids[length:] == eot).all(), caption
        assert not mask[length:].any()


def test_directory_holds_open_clips_and_transformers_files(exported, run):
    names = {p.name for p in exported.iterdir()}
    assert set(TRANSFORMERS_FILES) <= names and EXPORT_CONFIG_FILE in names
    assert not any(name.startswith(".") for name in names)  # no staging leftovers
    config = json.loads((exported / TRANSFORMERS_CONFIG_FILE).read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (config["model_type"], config["architectures"], config["projection_dim"]) == ("clip", ["CLIPModel"], 128)
    assert (text["hidden_act"], text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == \
        ("gelu", 192, 4, 4)
    assert (text["max_position_embeddings"], text["vocab_size"], text["eos_token_id"], text["layer_norm_eps"]) == \
        (32, 49408, 49407, 1e-5)
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"], vision["intermediate_size"]) == \
        (64, 8, 192, 768)
    assert config["logit_scale_init_value"] == pytest.approx(run[0].clip.logit_scale.item())
    assert "logit_bias" not in config
    card = (exported / "README.md").read_text()
    assert "## Load with transformers" in card and f'CLIPModel.from_pretrained("{exported}")' in card
    assert "Checked at export time against open_clip" in card


def test_auto_classes_load_the_directory(exported):
    assert type(AutoModel.from_pretrained(exported)) is CLIPModel
    processor = AutoProcessor.from_pretrained(exported)
    assert type(processor) is CLIPProcessor and isinstance(processor.image_processor, CLIPImageProcessor)
    assert AutoTokenizer.from_pretrained(exported)("a cat")["input_ids"] == [49406, 320, 2368, 49407]


def test_embeddings_equal_open_clips_on_drawn_images_and_captions(loaded, run):
    pixels = torch.stack([loaded["preprocess"](image) for image in _images()])
    want = _open_clip_embeddings(loaded["clip"], loaded["tokenizer"], pixels, CAPTIONS)
    got = _transformers_embeddings(loaded["hf"], loaded["processor"], pixels, CAPTIONS)
    for g, w in zip(got, want):
        assert _similar(g, w) < RELATIVE
    with torch.no_grad():  # the trained model itself, not only what open_clip rebuilds from the export
        assert _similar(got[0], run[0].clip.encode_image(pixels)) < RELATIVE
        logits = loaded["hf"](pixel_values=pixels, **loaded["processor"](
            text=CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")).logits_per_image
        want_logits, _ = loaded["clip"].get_logits(pixels, loaded["tokenizer"](CAPTIONS))
    assert _similar(logits, want_logits) < RELATIVE


def test_token_ids_equal_open_clips(exported, loaded):
    tokenizer = loaded["tokenizer"]
    for fast in (loaded["processor"].tokenizer, AutoTokenizer.from_pretrained(exported)):
        _assert_same_ids(tokenizer, fast, CAPTIONS, 32)
    over_long = loaded["processor"](text=CAPTIONS[-2:], truncation=True)["input_ids"]
    assert [len(ids) for ids in over_long] == [32, 32] and [ids[-1] for ids in over_long] == [49407, 49407]
    # padding=True pads to the longest row: a prefix of open_clip's rows
    short = loaded["processor"](text=["a red circle", "two squares"], padding=True, truncation=True,
                                return_tensors="pt")
    assert torch.equal(short["input_ids"] * short["attention_mask"], tokenizer(["a red circle", "two squares"])[:, :5])
    # CLIPTokenizer.from_pretrained rebuilds transformers' own cleaning, without ftfy's: quotes stay curly
    stock = CLIPTokenizer.from_pretrained(exported)
    assert stock("a cat")["input_ids"] == [49406, 320, 2368, 49407]
    assert stock("\u201cq\u201d")["input_ids"] != tokenizer(["\u201cq\u201d"])[0, :5].tolist()


def _crop_rounds_alike(image: Image.Image, size: int) -> bool:
    """Whether open_clip's centre crop (offsets rounded half to even) and transformers' (floored) start at one place."""
    w, h = image.size
    long_side = int(size * max(w, h) / min(w, h))
    return round((long_side - size) / 2) == (long_side - size) // 2


def _floor_crop(image: Image.Image, size: int, pp: dict) -> torch.Tensor:
    """open_clip's preprocessing with transformers' crop offsets."""
    resized = open_clip.transform.Resize(size, interpolation=open_clip.transform.InterpolationMode.BICUBIC)(image)
    w, h = resized.size
    left, top = (w - size) // 2, (h - size) // 2
    tensor = torch.from_numpy(np.array(resized.crop((left, top, left + size, top + size)).convert("RGB")))
    tensor = tensor.permute(2, 0, 1).float() / 255
    return (tensor - torch.tensor(pp["mean"]).view(3, 1, 1)) / torch.tensor(pp["std"]).view(3, 1, 1)


def test_processor_pixels_equal_the_models_preprocessing(exported, loaded, run):
    model = run[0]
    pp = open_clip.get_model_preprocess_cfg(model.clip)
    std = torch.tensor(pp["std"]).view(3, 1, 1)
    torchvision_backend = AutoProcessor.from_pretrained(exported).image_processor
    alike = 0
    for image in _images():
        want = model.preprocess(image)
        got = loaded["processor"](images=image, return_tensors="pt")["pixel_values"][0]
        if _crop_rounds_alike(image, 64):
            alike += 1
            assert ((got - want) * std).abs().max() <= 1 / 255 + 1e-6, image.size
            # the torchvision backend resizes with its own bicubic filter: a few levels off PIL's
            other = torchvision_backend(images=image, return_tensors="pt")["pixel_values"][0]
            assert ((other - want) * std).abs().max() <= 3 / 255 + 1e-6, image.size
        else:  # the crop sits one pixel earlier along the long side; otherwise the same pixels
            assert ((got - _floor_crop(image, 64, pp)) * std).abs().max() <= 1 / 255 + 1e-6, image.size
    assert 0 < alike < len(_images())


def _variant_model(kind: str, tmp_path_factory) -> "torch.nn.Module":
    torch.manual_seed(1)
    if kind == "quick_gelu":  # a shipped config with QuickGELU, shrunk
        return create_model(ModelConfig(name="ViT-B-32-quickgelu", embed_dim=64, vision_cfg={
            "image_size": 64, "patch_size": 16, "width": 128, "head_width": 32, "layers": 2},
            text_cfg={"width": 64, "heads": 2, "layers": 3, "context_length": 16}))
    if kind == "odd_sizes":  # widths, depths and MLP ratios of no shipped config; options CLIPModel can still hold
        return create_model(ModelConfig(name="tiny-vit-64", embed_dim=40, vision_cfg={
            "image_size": 48, "patch_size": 16, "width": 96, "head_width": 24, "layers": 3, "mlp_ratio": 2.5,
            "final_ln_after_pool": True, "pos_embed_type": "sin_cos_2d", "patch_dropout": 0.5},
            text_cfg={"width": 80, "heads": 5, "layers": 1, "mlp_ratio": 3.0, "context_length": 20}))
    if kind == "vit_b_16_widths":  # the shipped recipes' ViT-B-16 (and B-32's) widths, heads and sizes, one block
        return create_model(ModelConfig(name="ViT-B-16", vision_cfg={"layers": 1}, text_cfg={"layers": 1}))
    if kind == "sigmoid":
        return create_model(ModelConfig(name="tiny-vit-64"), loss_kind="sigmoid")
    if kind.startswith("sentencepiece"):
        model_type = kind.split("_")[1]
        captions = tmp_path_factory.mktemp("captions") / "captions.txt"
        rng = random.Random(0)
        lines = [draw_sample(rng, 16)[1] for _ in range(300)] + CAPTIONS * 3
        captions.write_text("\n".join(line.replace("\n", " ") for line in lines) + "\n")
        tokenizer = train_sentencepiece(str(captions), captions.with_name(f"{model_type}.model"), vocab_size=600,
                                        model_type=model_type)["output"]
        return create_model(ModelConfig(name="tiny-vit-64", tokenizer=str(tokenizer)))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["quick_gelu", "odd_sizes", "vit_b_16_widths", "sigmoid", "sentencepiece_unigram",
                                  "sentencepiece_bpe"])
def test_each_tower_shape_exports_with_open_clips_embeddings(kind, tmp_path_factory, caplog):
    model = _variant_model(kind, tmp_path_factory).eval()
    out = tmp_path_factory.mktemp(kind) / "export"
    with caplog.at_level(logging.WARNING, logger="clipalign.hf_export"):
        export_model(model, out, export_format="transformers")
    hf = CLIPModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    clip.eval()
    tokenizer = model.tokenizer  # open_clip's own for BPE; a SentencePiece model travels as tokenizer.model
    size, context = model.image_size, model.context_length
    images = [image for image, _, _ in SYNTHETIC[:3]]
    pixels = torch.stack([preprocess(image) for image in images])
    want = _open_clip_embeddings(clip, tokenizer, pixels, CAPTIONS)
    got = _transformers_embeddings(hf, processor, pixels, CAPTIONS)
    for g, w in zip(got, want):
        assert _similar(g, w) < RELATIVE, kind
    _assert_same_ids(tokenizer, processor.tokenizer, CAPTIONS, context)
    assert torch.equal(processor(images=images[:1], return_tensors="pt")["pixel_values"][0], preprocess(images[0]))
    config = json.loads((out / TRANSFORMERS_CONFIG_FILE).read_text())
    assert config["vision_config"]["image_size"] == size
    assert config["text_config"]["hidden_act"] == ("quick_gelu" if kind == "quick_gelu" else "gelu")
    if kind == "sigmoid":  # CLIPModel has no logit bias: it is kept in config.json, and the card and log say so
        bias = model.clip.logit_bias.item()
        assert config["logit_bias"] == pytest.approx(bias) and bias == pytest.approx(-10.0)
        assert "sigmoid (SigLIP) loss" in (out / "README.md").read_text()
        assert any("logit bias" in r.getMessage() for r in caplog.records)


def _char_sentencepiece(directory: Path) -> str:
    """A SentencePiece model of the `char` type, which transformers cannot convert."""
    lines = directory / "chars.txt"
    lines.write_text("\n".join(CAPTIONS[:5] * 4) + "\n")
    spm.SentencePieceTrainer.train(input=str(lines), model_prefix=str(directory / "chars"), model_type="char",
                                   vocab_size=60, pad_id=-1, bos_id=-1, eos_id=-1, minloglevel=2)
    return str(directory / "chars.model")


@pytest.mark.parametrize("case, expected", [
    ("timm", "vision_cfg.timm_model_name='convnext_atto' is a timm image tower"),
    ("layer_scale", "vision_cfg.ls_init_value=0.1 means layer scale"),
    ("avg_pool", "vision_cfg.pool_type='avg' pools other than at the class token"),
    ("text_last_pool", "text_cfg.pool_type='last' pools other than at the end-of-text token"),
    ("bidirectional_text", "text_cfg.no_causal_mask=True means bidirectional attention"),
    ("char_sentencepiece", "SentencePiece tokenizer is a 'char' model, which has no fast-tokenizer conversion"),
    ("longest_resize", "preprocess resize_mode 'longest'"),
])
def test_what_clipmodel_cannot_hold_is_refused_before_anything_is_written(case, expected, tmp_path):
    vision, text, name, tokenizer = {}, {}, "tiny-vit-64", ""
    if case == "timm":
        name = "tiny-convnext-64"
    elif case == "layer_scale":
        vision = {"ls_init_value": 0.1}
    elif case == "avg_pool":
        vision = {"pool_type": "avg"}
    elif case == "text_last_pool":
        text = {"pool_type": "last"}
    elif case == "bidirectional_text":
        text = {"no_causal_mask": True}
    elif case == "char_sentencepiece":
        tokenizer = _char_sentencepiece(tmp_path)
    model = create_model(ModelConfig(name=name, vision_cfg=vision, text_cfg=text, tokenizer=tokenizer))
    if case == "longest_resize":
        model.clip.visual.preprocess_cfg["resize_mode"] = "longest"
    before = set(tmp_path.iterdir())
    with pytest.raises(NotExportable) as refused:
        export_model(model, tmp_path / "export", export_format="transformers")
    message = str(refused.value)
    assert expected in message and "\n" not in message
    assert "open_clip directory" in message and "ONNX" in message
    assert set(tmp_path.iterdir()) == before  # no export, no temporary directory


def test_recipe_format_is_the_default_and_the_command_line_refuses_in_one_line(tmp_path, capsys):
    cfg = load_config(overrides=["model.name=tiny-convnext-64", "export.format=transformers"])
    with pytest.raises(ConfigError, match=r"export\.format: 'onnx' is not one of open_clip, transformers"):
        load_config(overrides=["export.format=onnx"])
    run_dir = tmp_path / "run"
    _save_checkpoint(create_model(cfg.model).eval(), run_dir, cfg)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "export")])  # the recipe asks for transformers
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipalign-export: error: model 'tiny-convnext-64': vision_cfg.timm_model_name")
    assert "\n" not in err  # stripped: one line
    assert not (tmp_path / "export").exists()
    out = export_model(run_dir, tmp_path / "export", export_format="open_clip")  # the open_clip files still work
    assert (out / EXPORT_CONFIG_FILE).is_file() and not (out / TRANSFORMERS_CONFIG_FILE).exists()
