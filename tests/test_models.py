"""Towers and recipes: model configs with overrides, timm image towers, patch dropout, locked image towers (LiT),
starting weights, and every shipped recipe built on the meta device and (the small ones) trained for a step."""

from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file

from clipalign.config import ConfigError, ModelConfig, load_config
from clipalign.data.synthetic import make_synthetic_dataset
from clipalign.model import SIGMOID_INIT, create_model, resolve_model_config

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
SMALL_PARAMS = 100_000_000  # recipes whose model is under this many parameters train one step in the tests


def _params(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def _train(cfg):
    """One in-process training run (Accelerate's state reset around it, as a fresh process would have it)."""
    from clipalign.train import train

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return train(cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A small synthetic set: train shards and a held-out ImageFolder."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "ds", train_samples=64,
                                  heldout_per_class=1, samples_per_shard=32)


def _recipe(recipe: Path, tmp_path: Path, *overrides: str):
    """A recipe's config; a tokenizer the recipe expects the user to train first is stood in for by a small one."""
    cfg = load_config(recipe, overrides)
    if cfg.model.tokenizer:
        from clipalign.train_tokenizer import train_sentencepiece

        captions = tmp_path / "captions.txt"
        captions.write_text("".join(f"a photo of item {i} in colour {i % 7}\n" for i in range(300)))
        train_sentencepiece(str(captions), tmp_path / "tok.model", vocab_size=400)
        cfg = load_config(recipe, [*overrides, f"model.tokenizer={tmp_path / 'tok.model'}"])
    return cfg


def _one_step(recipe: Path, shards, out: Path, *overrides: str):
    """A recipe pointed at the synthetic shards for a couple of steps at a tiny batch, on the CPU."""
    return load_config(recipe, [f"data.train={shards.train_pattern}", "data.synthetic=false", "data.batch_size=2",
                                "data.workers=0", "data.shuffle_buffer=8", "data.num_samples=0",
                                "train.steps=1", "train.precision=fp32", "train.log_every=1", "train.resume=",
                                "train.checkpoint_every=0", "train.log_with=none", "train.compile=false",
                                "train.channels_last=false", "optim.warmup_steps=1", f"train.output_dir={out}",
                                "eval.zeroshot=", "eval.retrieval=", "export.dir=", "model.pretrained_image=false",
                                "model.pretrained=",  # a fine-tuning recipe's start is the user's to make first
                                *overrides])


# ---- recipes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_is_documented_and_builds_on_meta_with_open_clips_parameter_count(recipe, tmp_path):
    header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "clipalign.train" in text and "Hardware:" in text and "Expected result" in text, recipe.name
    assert yaml.safe_load(recipe.read_text())["model"]["name"]  # every recipe names its towers

    cfg = _recipe(recipe, tmp_path)
    init = SIGMOID_INIT if cfg.loss.kind == "sigmoid" else {}
    with torch.device("meta"):
        ours = create_model(cfg.model, cfg.loss.kind, load_pretrained=False, device="meta")
        theirs = open_clip.create_model(cfg.model.name, pretrained=None, device="meta", **init)
    assert next(ours.parameters()).is_meta
    expected = _params(theirs)
    if cfg.model.tokenizer:  # the token embedding is sized to the SentencePiece vocabulary instead of BPE's
        width = ours.model_cfg["text_cfg"]["width"]
        expected += (ours.tokenizer.vocab_size - theirs.token_embedding.num_embeddings) * width
    assert _params(ours) == expected
    if cfg.model.lock_image:
        assert _params(ours, trainable=True) < _params(ours) - _params(ours.clip.visual) / 2


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_small_recipes_train_a_step_on_cpu(recipe, shards, tmp_path):
    cfg = _recipe(recipe, tmp_path)
    with torch.device("meta"):
        size = _params(create_model(cfg.model, cfg.loss.kind, load_pretrained=False, device="meta"))
    if size >= SMALL_PARAMS:
        pytest.skip(f"{size / 1e6:.0f} M parameters: built on the meta device above, not trained on CPU here")
    overrides = [f"model.tokenizer={cfg.model.tokenizer}"] if cfg.model.tokenizer else []
    summary = _train(_one_step(recipe, shards, tmp_path / "run", *overrides))
    assert summary["step"] == 1 and torch.isfinite(torch.tensor(summary["loss"]))
    assert (tmp_path / "run" / "checkpoints" / "step_00000001" / "model.safetensors").is_file()


# ---- towers --------------------------------------------------------------------------------------------------


def test_overrides_merge_into_the_named_config_and_match_open_clip():
    cfg = ModelConfig(name="tiny-vit-64", embed_dim=64, text_cfg={"layers": 2, "context_length": 16},
                      vision_cfg={"layers": 2})
    resolved = resolve_model_config(cfg)
    assert resolved["embed_dim"] == 64 and resolved["text_cfg"]["layers"] == 2
    assert resolved["text_cfg"]["width"] == 192  # untouched keys keep the named config's values
    model = create_model(cfg)
    reference = open_clip.create_model("tiny-vit-64", pretrained=None, **resolved)
    assert _params(model) == _params(reference) < _params(create_model(ModelConfig(name="tiny-vit-64")))
    assert model.tokenizer("a red circle").shape == (1, 16)  # the tokenizer follows the context length
    assert model.open_clip_config() == resolved  # and the export writes the merged config
    with pytest.raises(ConfigError, match=r"model.vision_cfg: expected a mapping"):
        load_config(None, ["model.vision_cfg=12"])


def test_timm_image_tower_from_a_config_and_from_an_override():
    shipped = create_model(ModelConfig(name="tiny-convnext-64"))
    assert type(shipped.clip.visual).__name__ == "TimmModel"
    assert shipped.clip.visual.trunk.default_cfg["architecture"] == "convnext_atto"
    # any timm model in place of a ViT, with open_clip's pooling and projection options
    swapped = create_model(ModelConfig(name="tiny-vit-64", vision_cfg={
        "timm_model_name": "resnet18", "timm_pool": "avg", "timm_proj": "mlp", "timm_model_pretrained": False}))
    assert type(swapped.clip.visual).__name__ == "TimmModel"
    out = swapped(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), swapped.tokenizer(["a", "b"]))
    assert out["image_features"].shape == (2, 128)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))


def test_patch_dropout_drops_tokens_in_training_only():
    model = create_model(ModelConfig(name="tiny-vit-64", patch_dropout=0.5))
    assert model.clip.visual.patch_dropout.prob == 0.5
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    model.train()
    torch.manual_seed(0)
    first = model.encode_image(pixels)
    torch.manual_seed(1)
    assert not torch.allclose(first, model.encode_image(pixels))  # a different half of the patches
    model.eval()
    torch.testing.assert_close(model.encode_image(pixels), model.encode_image(pixels))
    with pytest.raises(ConfigError, match=r"model.patch_dropout: the image tower of 'tiny-convnext-64' is the "
                                          r"timm model 'convnext_atto'"):
        create_model(ModelConfig(name="tiny-convnext-64", patch_dropout=0.5))
    with pytest.raises(ConfigError, match=r"model.patch_dropout: 1.5 is not in \[0, 1\)"):
        create_model(ModelConfig(name="tiny-vit-64", patch_dropout=1.5))
    with pytest.raises(ConfigError, match=r"model.pretrained_image: the image tower of 'tiny-vit-64' is not a timm"):
        create_model(ModelConfig(name="tiny-vit-64", pretrained_image=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-vit-64", "tiny-convnext-64"])
def test_lit_trains_the_text_tower_against_a_locked_pretrained_image_tower(name, shards, tmp_path):
    torch.manual_seed(3)
    start = create_model(ModelConfig(name=name))
    weights = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in start.clip.state_dict().items()}, str(weights))
    cfg = _one_step(REPO / "recipes" / "quickstart.yaml", shards, tmp_path / "run", f"model.name={name}",
                    f"model.pretrained={weights}", "model.lock_image=true", "train.steps=2")
    _train(cfg)
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000002" / "model.safetensors"))
    before = start.clip.state_dict()
    image = [k for k in before if k.startswith("visual.") and "head" not in k]
    text = [k for k in before if k.startswith(("token_embedding", "transformer.", "text."))]
    assert image and text
    for key in image:  # the locked tower (a timm trunk: all but its projection head) is bit-identical
        assert torch.equal(trained[f"clip.{key}"], before[key]), key
    assert any(not torch.equal(trained[f"clip.{key}"], before[key]) for key in text)  # the text tower learned


# ---- a SentencePiece tokenizer through training, checkpoints and exports -------------------------------------------


@pytest.mark.slow
def test_sentencepiece_tokenizer_travels_with_checkpoints_and_exports(shards, tmp_path):
    import clipalign
    from clipalign.export import export_model
    from clipalign.model import TEXT_ENCODER_CONFIG, TEXT_ENCODER_WEIGHTS, TOKENIZER_FILE
    from clipalign.tokenizer import SentencePieceTokenizer
    from clipalign.train_tokenizer import train_sentencepiece

    tok_file = tmp_path / "tok" / "captions.model"
    tok_file.parent.mkdir()
    train_sentencepiece(shards.train_pattern, tok_file, vocab_size=400)
    tokenizer = SentencePieceTokenizer(tok_file, context_length=32)
    run = tmp_path / "run"
    _train(_one_step(REPO / "recipes" / "quickstart.yaml", shards, run, f"model.tokenizer={tok_file}",
                     "train.steps=2"))
    ckpt = run / "checkpoints" / "step_00000002"
    assert (ckpt / TOKENIZER_FILE).read_bytes() == tok_file.read_bytes()
    weights = load_file(str(ckpt / "model.safetensors"))
    assert weights["clip.token_embedding.weight"].shape == (tokenizer.vocab_size, 192)  # sized from the tokenizer

    tok_file.unlink()  # the checkpoint alone must rebuild the model: it carries its own copy
    model = clipalign.load(run)
    captions = ["a small red circle above a blue square", "two green triangles"]
    assert isinstance(model.tokenizer, SentencePieceTokenizer)
    assert torch.equal(model.tokenizer(captions), tokenizer(captions))
    with torch.no_grad():
        want = model.encode_text(model.tokenizer(captions))

    export = export_model(run, tmp_path / "export")
    assert (export / TOKENIZER_FILE).is_file()
    assert "SentencePieceTokenizer(" in (export / "README.md").read_text()
    reloaded = clipalign.load(export)
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    for name in (TEXT_ENCODER_WEIGHTS, TEXT_ENCODER_CONFIG, TOKENIZER_FILE):
        (text_only / name).write_bytes((export / name).read_bytes())
    text_encoder = clipalign.load_text_encoder(text_only)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_text(reloaded.tokenizer(captions)), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(text_encoder(text_encoder.tokenizer(captions)), want, atol=1e-6, rtol=0)
    (text_only / TOKENIZER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model does not exist; this text encoder was trained "
                                                r"with a SentencePiece tokenizer"):
        clipalign.load_text_encoder(text_only)


# ---- cutting the padding off text batches ------------------------------------------------------------------------


def test_trim_padding_cuts_only_columns_after_every_rows_end():
    from clipalign.model import trim_padding

    ids = torch.zeros(3, 32, dtype=torch.long)
    ids[0, :5] = torch.tensor([49406, 320, 0, 1125, 49407])  # id 0 is also BPE's "!": inside a row it is kept
    ids[1, :11] = 7
    assert trim_padding(ids).shape == (3, 16)  # 11 used columns, rounded up to a multiple of 8
    assert trim_padding(ids, multiple=1).shape == (3, 11)
    assert torch.equal(trim_padding(ids, multiple=1), ids[:, :11])
    ids[2, 30] = 5
    assert trim_padding(ids).shape == (3, 32)  # never longer than the context


def test_trimmed_text_gives_the_full_length_embeddings_and_gradients():
    from clipalign.model import trim_padding

    torch.manual_seed(0)
    model = create_model(ModelConfig(name="tiny-vit-64"))
    assert model.trims_text
    ids = model.tokenizer(["a small red circle above a blue square", "cyan", "two green triangles on the left"])
    cut = trim_padding(ids)
    assert cut.shape[1] < ids.shape[1]
    full = model.encode_text(ids)
    grads_full = torch.autograd.grad(full.square().sum() + full[:, 0].sum(), list(model.clip.parameters()),
                                     allow_unused=True)
    short = model.encode_text(cut)
    grads_short = torch.autograd.grad(short.square().sum() + short[:, 0].sum(), list(model.clip.parameters()),
                                      allow_unused=True)
    torch.testing.assert_close(short, full, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads_short, grads_full):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # a text tower that pools the last position cannot be cut
    model.clip.text_pool_type = "last"
    assert not model.trims_text
    with pytest.raises(ValueError, match=r"needs full-length ids \(32\), got 16"):
        model.encode_text(cut)


# ---- attention kernels -------------------------------------------------------------------------------------------


def _attention_ops(model, precision: str, grad: bool = True) -> set[str]:
    """The attention kernels a forward (and backward, when `grad`) of both towers really ran."""
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    ids = model.tokenizer(["a red circle", "blue", "two green squares", "cyan"])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            out = model(pixels, ids)
        if grad:
            (out["image_features"] @ out["text_features"].t()).sum().backward()
    names = {event.key for event in prof.key_averages()}
    return {name for name in names if "scaled_dot_product" in name or name in ("aten::bmm", "aten::_softmax")}


def test_auto_attention_runs_math_kernels_only_when_training_in_bf16_on_cpu():
    from clipalign.model import CPU_MATH_ATTENTION_MAX_TOKENS, vision_tokens

    model = create_model(ModelConfig(name="tiny-vit-64"))
    assert model.attention == "auto" and model.image_tokens == 65 == vision_tokens(model.clip.visual)
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    trained_bf16 = _attention_ops(model, "bf16")
    assert flash not in trained_bf16 and {"aten::bmm", "aten::_softmax"} <= trained_bf16
    assert flash in _attention_ops(model, "fp32")  # fp32: PyTorch's choice
    assert flash in _attention_ops(model, "bf16", grad=False)  # forward only: flash is the faster one there
    model.attention = "torch"
    assert flash in _attention_ops(model, "bf16")
    model.attention = "math"
    assert flash not in _attention_ops(model, "fp32")
    # longer sequences than the threshold keep PyTorch's choice
    model.attention = "auto"
    model.image_tokens = CPU_MATH_ATTENTION_MAX_TOKENS + 1
    assert flash in _attention_ops(model, "bf16")
    model.attention = "fastest"
    with pytest.raises(ValueError, match=r"attention 'fastest': expected one of auto, torch, math"):
        model.encode_text(model.tokenizer(["a"]))
    with pytest.raises(ConfigError, match=r"train.attention"):
        load_config(None, ["train.attention=fastest"])
    from clipalign.config import _CHOICES
    from clipalign.model import ATTENTION_CHOICES

    assert _CHOICES[("train", "attention")] == ATTENTION_CHOICES  # the recipe key offers what the model runs


def test_attention_kernels_give_the_same_embeddings_and_gradients():
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="tiny-vit-64"))
    pixels = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    ids = model.tokenizer(["a small red circle above a blue square", "cyan", "two green triangles on the left"])
    results = {}
    for kernels in ("torch", "math"):
        model.attention = kernels
        out = model(pixels, ids)
        loss = (out["image_features"] @ out["text_features"].t()).square().sum()
        results[kernels] = (out, torch.autograd.grad(loss, list(model.clip.parameters()), allow_unused=True))
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(results["math"][0][key], results["torch"][0][key], atol=1e-6, rtol=1e-5)
    for got, want in zip(results["math"][1], results["torch"][1]):
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_vision_tokens_of_timm_towers():
    from clipalign.model import vision_tokens

    convnext = create_model(ModelConfig(name="tiny-convnext-64"))
    assert convnext.image_tokens is None  # no attention in a ConvNeXt
    vit = create_model(ModelConfig(name="tiny-vit-64", vision_cfg={
        "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "image_size": 224}))
    assert vision_tokens(vit.clip.visual) == 14 * 14 + 1  # patches and the class token


def test_the_trainer_hands_train_attention_to_the_model(shards, tmp_path):
    # PyTorch has no memory-efficient attention kernel on CPU: a run held to it fails inside the towers' attention
    with pytest.raises(RuntimeError, match=r"No viable backend for scaled_dot_product_attention"):
        _train(_one_step(REPO / "recipes" / "quickstart.yaml", shards, tmp_path / "run", "train.attention=efficient"))


@pytest.mark.parametrize("vision_cfg", [{}, {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                                             "image_size": 224}], ids=["open_clip-vit", "timm-vit"])
def test_matmul_patch_embedding_gives_the_convolutions_features_and_gradients(vision_cfg):
    from clipalign.model import MatmulPatchEmbed, use_matmul_patch_embed

    torch.manual_seed(0)
    model = create_model(ModelConfig(name="tiny-vit-64", vision_cfg=vision_cfg))
    images = torch.randint(0, 256, (3, 3, model.image_size, model.image_size), dtype=torch.uint8)
    names = [name for name, _ in model.named_parameters()]

    def features_and_grads():
        model.zero_grad()
        features = model.encode_image(images)
        (features * torch.arange(features.shape[1])).sum().backward()
        return features.detach(), [p.grad.clone() for p in model.clip.visual.parameters()]

    want, want_grads = features_and_grads()
    assert use_matmul_patch_embed(model) == 1
    assert sum(isinstance(m, MatmulPatchEmbed) for m in model.modules()) == 1
    got, got_grads = features_and_grads()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints and exports are unchanged
    # towers without a patch convolution are left alone
    assert use_matmul_patch_embed(create_model(ModelConfig(name="tiny-convnext-64"))) == 0


def test_compile_blocks_compiles_each_transformer_block_in_place():
    from clipalign.model import compile_blocks

    model = create_model(ModelConfig(name="tiny-vit-64"))
    names = [name for name, _ in model.named_parameters()]
    blocks = [*model.clip.visual.transformer.resblocks, *model.clip.transformer.resblocks]
    assert compile_blocks(model) == len(blocks) == 8
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert model._compiled_call_impl is None and model.clip.visual._compiled_call_impl is None
    assert [name for name, _ in model.named_parameters()] == names
    # the ConvNeXt trunk's stages differ in shape but not in class: each is compiled whole, nothing inside twice
    convnext = create_model(ModelConfig(name="tiny-convnext-64"))
    compiled = compile_blocks(convnext)
    inner = [m for m in convnext.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == len(inner) > 0
    assert not any(any(c is not m and getattr(c, "_compiled_call_impl", None) is not None for c in m.modules())
                   for m in inner)


def _ids_of_length(model, rows: int, length: int) -> torch.Tensor:
    """Token ids (rows, context length) whose captions fill `length` positions, SOT and EOT included."""
    ids = torch.zeros(rows, model.context_length, dtype=torch.long)
    ids[:, 0], ids[:, 1:length - 1], ids[:, length - 1] = 49406, 320, 49407
    return ids


def test_compiled_text_blocks_need_two_graphs_for_every_text_length():
    """trim_padding's lengths, the whole context included (open_clip's own encode_text, its whole mask), run on two
    graphs of the text blocks: the first length's and one with dynamic length. A full-length batch used to need a
    third, for the mask's other strides."""
    from clipalign.model import CompileReport, trim_padding

    torch.manual_seed(0)
    model = create_model(ModelConfig(name="tiny-vit-64"))
    for block in model.clip.transformer.resblocks:  # as compile_blocks does, without inductor's code generation
        block.compile(backend="aot_eager")
    report = CompileReport()
    for length in (16, 24, 32, 8):
        model.encode_text(trim_padding(_ids_of_length(model, 2, length))).sum().backward()
    assert report.summary() == {"graphs": 2, "fallbacks": []}


@pytest.mark.slow
def test_compiled_convnext_stages_train_with_a_static_graph_each():
    """A ConvNeXt's stages are blocks of one class that differ in shape: automatic dynamic shapes made them a
    dynamic-channel graph that inductor failed to compile. Each stage has a static graph now, with eager's results."""
    from clipalign.model import CompileReport, compile_blocks

    torch.manual_seed(0)
    model = create_model(ModelConfig(name="tiny-convnext-64"))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    want = model.encode_image(images)
    compile_blocks(model)
    report = CompileReport()
    got = model.encode_image(images)
    got.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert report.summary() == {"graphs": len(model.clip.visual.trunk.stages), "fallbacks": []}


def test_compile_report_warns_once_when_dynamo_stops_compiling_a_function():
    from clipalign.model import CompileReport

    def scaled(x: torch.Tensor, k: int) -> torch.Tensor:
        return x * k

    report = CompileReport()
    compiled = torch.compile(scaled, backend="eager", dynamic=False)  # a graph per k
    with torch._dynamo.config.patch(recompile_limit=2), \
            pytest.warns(UserWarning, match=r"stopped compiling 'scaled'.*recompile_limit \(2\).*k == 1") as caught:
        for k in range(4):
            assert torch.equal(compiled(torch.ones(2), k), torch.full((2,), float(k)))  # eager from k=2 on
    assert sum("stopped compiling" in str(w.message) for w in caught) == 1
    summary = report.summary()
    assert summary["graphs"] == 2 and len(summary["fallbacks"]) == 1 and "'scaled'" in summary["fallbacks"][0]
