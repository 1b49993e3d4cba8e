"""Fine-tuning controls: layer-wise lr decay on both towers, no-decay patterns, a locked text tower, and LoRA adapters
(only they train, they merge into a plain open_clip export, and a LoRA run resumes exactly). Real tiny models, real
peft, real trainer runs and exports."""

import importlib.util
import json
from pathlib import Path

import open_clip
import pytest
import torch
from accelerate.state import AcceleratorState

from clipalign import finetune
from clipalign.checkpoint import CheckpointError
from clipalign.config import ConfigError, ModelConfig, load_config
from clipalign.data.synthetic import make_synthetic_dataset
from clipalign.layout import read_checkpoint_weights
from clipalign.model import create_model, load
from clipalign.optim import apply_optimizer_settings, build_optimizer, optimizer_settings, param_groups
from clipalign.preflight import check_resumable, check_run

# LoRA needs peft (the finetune and dev extras); the other controls do not
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")


def _scales(model: torch.nn.Module, groups: list[dict]) -> dict[str, float]:
    """Parameter name (as the CLIP model names it) -> the lr scale of its group."""
    names = {id(p): n.removeprefix("clip.") for n, p in model.named_parameters()}
    return {names[id(p)]: g.get("lr_scale", 1.0) for g in groups for p in g["params"]}


def _undecayed(model: torch.nn.Module, groups: list[dict]) -> set[str]:
    names = {id(p): n.removeprefix("clip.") for n, p in model.named_parameters()}
    return {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n.removeprefix("clip.") for n, p in model.named_parameters() if p.requires_grad}


def _step(model, optimizer) -> dict[str, torch.Tensor]:
    """One contrastive training step on random inputs; returns the weights from before it."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=generator)
    texts = torch.randint(1, 1000, (4, 32), generator=generator)
    out = model(images, texts)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T  # (B, B)
    labels = torch.arange(4)
    loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return before


def _changed(model, before: dict[str, torch.Tensor]) -> set[str]:
    return {n.removeprefix("clip.") for n, p in model.named_parameters() if not torch.equal(p, before[n])}


# ---- layer-wise learning-rate decay ------------------------------------------------------------------------------


def test_layer_decay_counts_layers_down_from_the_top_of_each_tower():
    # a 4-block image tower beside a 2-block text tower: each tower's top learns at the full rate
    model = create_model(ModelConfig(name="tiny-vit-64", text_cfg={"layers": 2}))
    groups = param_groups(model, 0.1, layer_decay=0.5)
    scales = _scales(model, groups)
    assert set(scales) == _trainable(model)
    expected = {"visual.conv1.weight": 0.5 ** 5, "visual.class_embedding": 0.5 ** 5, "visual.ln_pre.weight": 0.5 ** 5,
                "visual.transformer.resblocks.0.attn.in_proj_weight": 0.5 ** 4,
                "visual.transformer.resblocks.3.mlp.c_fc.weight": 0.5, "visual.ln_post.weight": 1.0,
                "visual.proj": 1.0, "token_embedding.weight": 0.5 ** 3, "positional_embedding": 0.5 ** 3,
                "transformer.resblocks.0.ln_1.bias": 0.5 ** 2, "transformer.resblocks.1.mlp.c_proj.weight": 0.5,
                "ln_final.weight": 1.0, "text_projection": 1.0, "logit_scale": 1.0}
    assert {name: scales[name] for name in expected} == expected
    # top first (its lr is the logged one), each pair decayed then undecayed; no empty group
    assert [g["lr_scale"] for g in groups] == sorted((g["lr_scale"] for g in groups), reverse=True)
    assert groups[0]["lr_scale"] == 1.0 and groups[0]["weight_decay"] == 0.1 and all(g["params"] for g in groups)

    cfg = load_config(None, ["model.name=tiny-vit-64", "optim.layer_decay=0.5", "optim.lr=1e-3"])
    optimizer, scheduler = build_optimizer(cfg, create_model(cfg.model))
    assert [g["initial_lr"] for g in optimizer.param_groups] == [1e-3 * g["lr_scale"] for g in optimizer.param_groups]

    # off: the two groups CLIP trains with, as before
    assert [len(g) for g in param_groups(model, 0.1)] == [2, 2]


def test_layer_decay_on_a_timm_image_tower_follows_timms_layer_map():
    model = create_model(ModelConfig(name="tiny-convnext-64"))
    scales = _scales(model, param_groups(model, 0.1, layer_decay=0.8))
    stem, first, last = (scales[f"visual.trunk.{n}"] for n in ("stem.0.weight", "stages.0.blocks.0.mlp.fc1.weight",
                                                                 "stages.3.blocks.1.mlp.fc1.weight"))
    assert stem < first < last < scales["visual.head.proj.weight"] == 1.0


def test_resuming_with_another_layer_decay_applies_each_groups_rate():
    model = create_model(ModelConfig(name="tiny-vit-64"))
    old = load_config(None, ["model.name=tiny-vit-64", "optim.layer_decay=0.5", "optim.warmup_steps=0"])
    optimizer, scheduler = build_optimizer(old, model)
    _step(model, optimizer)
    scheduler.step()
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()

    new = load_config(None, ["model.name=tiny-vit-64", "optim.layer_decay=0.8", "optim.warmup_steps=0"])
    optimizer, scheduler = build_optimizer(new, model)
    recipe = optimizer_settings(optimizer, scheduler)
    optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(saved_scheduler)
    changed = apply_optimizer_settings(optimizer, scheduler, recipe, Path("step_00000001"))
    assert changed.startswith("optim.layer_decay") and "optim.lr" not in changed
    factor = scheduler.lr_lambdas[0](1)
    assert [g["lr"] for g in optimizer.param_groups] == [new.optim.lr * g["lr_scale"] * factor
                                                         for g in optimizer.param_groups]
    assert {g["lr_scale"] for g in optimizer.param_groups} == {0.8 ** d for d in range(6)}


# ---- which parameters skip weight decay ----------------------------------------------------------------------------


def test_no_decay_patterns_default_to_clips_rule_and_replace_it_when_given():
    model = create_model(ModelConfig(name="tiny-vit-64"))
    below_2d = {n.removeprefix("clip.") for n, p in model.named_parameters() if p.ndim < 2}
    assert _undecayed(model, param_groups(model, 0.1)) == below_2d | {"logit_scale"}

    patterns = ["ndim<2", "logit_scale", "*positional_embedding"]
    assert _undecayed(model, param_groups(model, 0.1, no_decay=patterns)) == \
        below_2d | {"positional_embedding", "visual.positional_embedding"}
    # without ndim<2, only what the patterns name: biases decay, gains too
    assert _undecayed(model, param_groups(model, 0.1, no_decay=["*.bias", "*bias"])) == \
        {n for n in below_2d if n.endswith("bias")}
    # with layer decay too: the same parameters, spread over the layers
    assert _undecayed(model, param_groups(model, 0.1, layer_decay=0.7, no_decay=patterns)) == \
        below_2d | {"positional_embedding", "visual.positional_embedding"}

    with pytest.raises(ConfigError, match=r"optim.no_decay: '\*pos_embed' matches no parameter of the model"):
        param_groups(model, 0.1, no_decay=["ndim<2", "*pos_embed"])


# ---- locking the text tower --------------------------------------------------------------------------------------


def test_lock_text_freezes_the_text_tower_but_its_unlocked_layers():
    locked = create_model(ModelConfig(name="tiny-vit-64", lock_text=True))
    full = {n.removeprefix("clip.") for n, _ in locked.named_parameters()}
    image = {n for n in full if n.startswith("visual.")}
    assert _trainable(locked) == image | {"logit_scale"}

    # open_clip's groups from the top: the projection, then the last block with the final norm
    model = create_model(ModelConfig(name="tiny-vit-64", lock_text=True, lock_text_unlocked_layers=2))
    text_trainable = _trainable(model) - image - {"logit_scale"}
    assert text_trainable == {"text_projection", "ln_final.weight", "ln_final.bias"} | {
        n for n in full if n.startswith("transformer.resblocks.3.")}
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    before = _step(model, optimizer)
    assert _changed(model, before) == _trainable(model)  # a step moves what trains, nothing else

    norms = create_model(ModelConfig(name="tiny-vit-64", lock_text=True, lock_text_freeze_layer_norm=False))
    assert _trainable(norms) - image - {"logit_scale"} == {
        n for n in full if not n.startswith("visual.") and (".ln_" in n or n.startswith("ln_final"))}


# ---- LoRA --------------------------------------------------------------------------------------------------------


def _adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


@needs_peft
def test_lora_trains_only_adapters_and_the_temperature():
    rank, width, blocks = 4, 192, 8  # tiny-vit-64: 4 blocks of width 192 in each tower
    model = create_model(ModelConfig(name="tiny-vit-64", lora_rank=rank))
    trainable = _trainable(model)
    assert {n for n in trainable if not _adapter(n)} == {"logit_scale"}
    # per block: attention in (d -> 3d) and out (d -> d), MLP fc (d -> 4d) and proj (4d -> d), each r x (in + out)
    per_block = rank * ((width + 3 * width) + 2 * width + (width + 4 * width) + (4 * width + width))
    assert sum(p.numel() for n, p in model.named_parameters() if _adapter(n)) == blocks * per_block

    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    before = _step(model, optimizer)
    before.update({n: p.detach().clone() for n, p in model.named_parameters() if n not in before})
    _step(model, optimizer)
    changed = _changed(model, before)
    # B starts at zero, so the first step moves B and the second A too; every frozen weight stays bit for bit
    assert changed == trainable
    assert {n for n, p in model.named_parameters() if n.removeprefix("clip.") not in trainable and
            not torch.equal(p, before[n])} == set()

    text_only = create_model(ModelConfig(name="tiny-vit-64", lora_rank=rank, lora_towers="text",
                                         lora_targets=["mlp_fc"]))
    assert {n for n in _trainable(text_only) if _adapter(n)} == {
        f"transformer.resblocks.{i}.mlp.c_fc.lora_{ab}.default.weight" for i in range(4) for ab in "AB"}

    # a timm ConvNeXt has no attention: its MLPs get the adapters
    convnext = create_model(ModelConfig(name="tiny-convnext-64", lora_rank=rank, lora_towers="image"))
    mlps = {n for n, _ in convnext.clip.named_modules() if n.endswith((".mlp.fc1", ".mlp.fc2"))}
    assert {n.split(".lora_")[0] for n in _trainable(convnext) if _adapter(n)} == mlps and len(mlps) == 2 * 12


@needs_peft
def test_contradicting_or_unsupported_settings_stop_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"model.lora_targets\[1\]: 'qkv' is not one of attn, mlp_fc, mlp_proj"):
        load_config(None, ["model.lora_targets=[attn, qkv]"])
    with pytest.raises(ConfigError, match="model.lock_text: with model.lora_rank=4 every base weight is frozen"):
        create_model(ModelConfig(name="tiny-vit-64", lora_rank=4, lock_text=True))
    with pytest.raises(ConfigError, match="model.lora_targets: empty with model.lora_rank=4"):
        create_model(ModelConfig(name="tiny-vit-64", lora_rank=4, lora_targets=[]))
    fsdp = load_config(None, ["model.lora_rank=4", "train.sharding=fsdp", f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="train.sharding=fsdp: LoRA is not sharded"):
        check_run(fsdp, 2)
    with pytest.raises(ConfigError, match=r"optim.layer_decay: the image tower ModifiedResNet has no known layers"):
        param_groups(create_model(ModelConfig(name="RN50"), load_pretrained=False, device="meta"), 0.1,
                     layer_decay=0.8)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """A LoRA run of 4 steps with checkpoints at 2 and 4 (the uninterrupted one), and a run resumed from its step 2."""
    from clipalign.train import train

    root = tmp_path_factory.mktemp("lora")
    shards = make_synthetic_dataset(root / "ds", train_samples=64, heldout_per_class=1, samples_per_shard=32)
    common = ["model.name=tiny-vit-64", "model.lora_rank=4", "model.lora_alpha=8", "model.lora_dropout=0.1",
              "optim.layer_decay=0.8", "optim.lr=1e-2", "optim.warmup_steps=1", f"data.train={shards.train_pattern}",
              "data.resampled=false", "data.batch_size=4", "data.workers=0", "data.shuffle_buffer=8",
              "train.steps=4", "train.precision=fp32", "train.log_every=1", "train.checkpoint_every=2",
              "train.keep_checkpoints=0", "train.log_with=none", "eval.zeroshot=", "eval.retrieval=", "export.dir="]
    runs = {"whole": root / "whole", "resumed": root / "resumed"}
    for name, extra in (("whole", []), ("resumed", [f"train.resume={runs['whole']}/checkpoints/step_00000002"])):
        AcceleratorState._reset_state(reset_partial_state=True)  # as a fresh process would have it
        try:
            train(load_config(None, [*common, f"train.output_dir={runs[name]}", *extra]))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    return runs


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


@needs_peft
def test_a_lora_run_resumes_exactly_and_refuses_other_lora_settings(lora_runs):
    whole = read_checkpoint_weights(lora_runs["whole"] / "checkpoints" / "step_00000004")
    resumed = read_checkpoint_weights(lora_runs["resumed"] / "checkpoints" / "step_00000004")
    assert any(_adapter(k) for k in whole)  # the checkpoint holds the adapters (beside the frozen weights)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    losses, continued = _losses(lora_runs["whole"]), _losses(lora_runs["resumed"])
    assert sorted(continued) == [3, 4] and all(continued[s] == losses[s] for s in continued)

    ckpt = lora_runs["whole"] / "checkpoints" / "step_00000004"
    for override in ("model.lora_rank=8", "model.lora_targets=[attn]", "optim.no_decay=[ndim<2]",
                     "optim.layer_decay=1.0"):
        key = override.split("=")[0]
        cfg = load_config(lora_runs["whole"] / "config.yaml", [override])
        with pytest.raises(CheckpointError, match=f"cannot resume from .*{key} "):
            check_resumable(cfg, ckpt)
    check_resumable(load_config(lora_runs["whole"] / "config.yaml", ["model.lora_dropout=0.0",
                                                                       "optim.layer_decay=0.9"]), ckpt)


@needs_peft
def test_a_lora_checkpoint_loads_merged_and_exports_plain_open_clip_weights(lora_runs, tmp_path):
    from clipalign.export import export_model
    from clipalign.hf_export import convert

    ckpt = lora_runs["whole"] / "checkpoints" / "step_00000004"
    cfg = load_config(ckpt / "config.yaml")
    unmerged = create_model(cfg.model, load_pretrained=False)
    unmerged.load_state_dict(read_checkpoint_weights(ckpt))
    unmerged.eval()
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    texts = unmerged.tokenizer(["a red circle", "a blue square above a green star", ""])
    with torch.no_grad():
        want = unmerged.encode_image(images), unmerged.encode_text(texts)

    loaded = load(ckpt)
    assert not finetune.has_adapters(loaded)
    out = export_model(ckpt, tmp_path / "export")
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")  # open_clip's loader is strict
    assert clip.state_dict().keys() == open_clip.create_model("tiny-vit-64").state_dict().keys()
    assert not any(type(m).__module__.startswith("peft") for m in clip.modules())
    with torch.no_grad():
        pixels = (images.float() - unmerged.pixel_mean) / unmerged.pixel_std
        for model, (image, text) in ((loaded, (loaded.encode_image(images), loaded.encode_text(texts))),
                                     (clip, (clip.encode_image(pixels, normalize=True),
                                             clip.encode_text(texts, normalize=True)))):
            assert torch.allclose(image, want[0], atol=1e-5) and torch.allclose(text, want[1], atol=1e-5), model
    # the transformers weights come from the merged model too, and the caller's model keeps its adapters
    weights = convert(unmerged, unmerged.open_clip_config()).state_dict
    assert torch.allclose(weights["text_model.encoder.layers.0.self_attn.q_proj.weight"],
                          clip.transformer.resblocks[0].attn.in_proj_weight[:192], atol=1e-7)
    assert finetune.has_adapters(unmerged)
