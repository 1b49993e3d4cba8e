"""Fine-tuning controls: layer-wise lr decay on both towers, no-decay patterns and a locked text tower. Real tiny
models."""

from pathlib import Path

import pytest
import torch

from clipalign.config import ConfigError, ModelConfig, load_config
from clipalign.model import create_model
from clipalign.optim import apply_optimizer_settings, build_optimizer, optimizer_settings, param_groups


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
