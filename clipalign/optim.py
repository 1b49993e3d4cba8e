"""The optimizer and its schedule: AdamW over parameter groups, linear warmup and cosine decay, and what a resumed run
keeps of its recipe's settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from clipalign import finetune
from clipalign.config import Config

NO_DECAY = (finetune.BELOW_2D, "logit_scale")  # optim.no_decay's default: what CLIP leaves undecayed


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 no_decay: Sequence[str] = NO_DECAY) -> list[dict]:
    """AdamW groups of the trainable parameters of a `DualEncoder` (or an open_clip model).

    Without layer decay: [decayed, undecayed], the parameters `no_decay` names (`clipalign.finetune.skips_decay`;
    by default those below 2-D and the logit scale, as in CLIP) undecayed. With `layer_decay` < 1: one such pair per
    distance from the top of a tower (`clipalign.finetune.layer_distances`), top first, each with its `lr_scale`
    (layer_decay ** distance); empty groups are left out.

    Raises:
        ConfigError: a `no_decay` pattern that matches no parameter, or layer decay on a tower of unknown layers.
    """
    clip = getattr(model, "clip", model)
    prefix = "clip." if clip is not model else ""
    names = [name.removeprefix(prefix) for name, _ in model.named_parameters()]
    finetune.check_no_decay(names, [p for p in no_decay if p not in NO_DECAY])  # a typo would change nothing
    distances = finetune.layer_distances(clip) if layer_decay != 1.0 else {}
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {(0, False): [], (0, True): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix(prefix)
        groups.setdefault((distances.get(name, 0), finetune.skips_decay(name, p, no_decay)), []).append(p)
    if layer_decay == 1.0:
        return [{"params": groups[(0, False)], "weight_decay": weight_decay},
                {"params": groups[(0, True)], "weight_decay": 0.0}]
    return [{"params": params, "weight_decay": 0.0 if undecayed else weight_decay,
             "lr_scale": layer_decay ** distance}
            for (distance, undecayed), params in sorted(groups.items()) if params]


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1, then cosine decay to `min_ratio`, as a multiplier of the base lr per step."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(cfg: Config, model: torch.nn.Module) -> tuple[torch.optim.Optimizer,
                                                                  torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over `model`'s parameter groups and its warmup + cosine schedule, as the recipe's optim.* keys say."""
    # fused: one kernel over all parameters; torch's default on CPU is a per-tensor loop, 17x slower on the tiny ViT
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay, cfg.optim.no_decay)
    for group in groups:
        group["lr"] = cfg.optim.lr * group.get("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                  fused=cfg.optim.fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio))
    return optimizer, scheduler


_OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay", "fused", "lr_scale")


def optimizer_settings(optimizer, scheduler) -> dict:
    """This run's optimizer hyperparameters per group and the schedule's base rates, as built from the recipe."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # the torch scheduler inside Accelerate's wrapper
    return {"groups": [{k: g[k] for k in _OPTIMIZER_KEYS if k in g} for g in optimizer.param_groups],
            "base_lrs": list(scheduler.base_lrs)}


def apply_optimizer_settings(optimizer, scheduler, recipe: dict, ckpt: Path) -> str:
    """Put the recipe's optimizer settings back over the checkpoint's (loading an optimizer or schedule state restores
    the saved ones): a resumed run trains with the optim.* values its config.yaml records. The learning rate of the
    current step follows the recipe's optim.lr and schedule. Returns the changes, as text ("" when none)."""
    names = {"lr": "optim.lr", "betas": "optim.beta1/beta2", "eps": "optim.eps", "weight_decay": "optim.weight_decay",
             "fused": "optim.fused", "lr_scale": "optim.layer_decay (the lr scale of the lowest layers)"}
    scheduler = getattr(scheduler, "scheduler", scheduler)
    changes = {}
    saved_base = list(scheduler.base_lrs)
    if saved_base[0] != recipe["base_lrs"][0]:  # the first group learns at optim.lr (the top, under layer decay)
        changes["lr"] = (saved_base[0], recipe["base_lrs"][0])
    for group, settings in reversed(list(zip(optimizer.param_groups, recipe["groups"]))):
        for key, value in settings.items():
            if key != "lr" and group.get(key) != value:
                changes.setdefault(key, (group.get(key), value))
            if key != "lr":
                group[key] = value
    scheduler.base_lrs = list(recipe["base_lrs"])
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"] = base
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return ", ".join(f"{names[k]} {old} -> {new}" for k, (old, new) in changes.items())
