"""FSDP trains the model DDP and one process train; run by tests/test_sharding.py under `accelerate launch`.

Every rank builds the same seeded dual encoder three times: one copy sharded with `clipalign.sharding.shard_model`
(FSDP2), one wrapped in DDP, and on rank 0 a plain reference that trains on the whole global batch in one process.
All three take `--steps` AdamW steps on the same global batches (a new one each step), the distributed copies through
the trainer's `forward_backward` (gradient-cache accumulation with `accum` > 1), the reference through a loss written
out independently of clipalign.loss. Rank 0 writes, per scenario, the largest parameter difference between each pair
after the steps, and the loss of each step:

    accelerate launch --multi_gpu --num_processes 2 tests/dist_fsdp_check.py --out result.json
    accelerate launch --multi_gpu --num_processes 4 tests/dist_fsdp_check.py --scenarios local tiled --out r.json

Scenarios (all of them by default): the contrastive loss's local and tiled modes, the sigmoid loss's ring and gather
exchanges, accumulation over 2 micro-batches (local and tiled), gradient checkpointing with a locked image tower
(LiT), a timm image tower (ConvNeXt), gradient clipping to a norm below the gradient's, compiled blocks
(`train.compile`), shards and optimizer state offloaded to host memory, and bf16 (FSDP's mixed-precision policy
against DDP under bf16 autocast). After the steps, the fp32 scenarios also check the non-finite guard: a step whose
verdict is "not finite" leaves the sharded parameters and moments as they were.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from dist_common import (
    global_batch,
    reference_contrastive_loss,
    reference_features,
    reference_sigmoid_loss,
    run_and_report,
)
from torch.nn.parallel import DistributedDataParallel

from clipalign.accumulate import forward_backward
from clipalign.config import ModelConfig
from clipalign.loss import ContrastiveLoss, SigmoidLoss
from clipalign.model import compile_blocks, create_model
from clipalign.monitor import NonfiniteGuard
from clipalign.optim import param_groups
from clipalign.sharding import clip_grad_norm, full_state_dict, shard_model, sync_replicated_grads

# name -> what differs from the "local" scenario: loss kind, contrastive mode or sigmoid exchange, micro-batches per
# step, model config keys, gradient clip, precision, compiled blocks, offload
_BASE = {"kind": "contrastive", "variant": "local", "accum": 1, "model": {}, "clip": 0.0, "precision": "fp32",
         "compile": False, "offload": False}
SCENARIOS = {name: {**_BASE, **changes} for name, changes in {
    "local": {},
    "tiled": {"variant": "tiled"},
    "sigmoid-ring": {"kind": "sigmoid", "variant": "ring"},
    "sigmoid-gather": {"kind": "sigmoid", "variant": "gather"},
    "accum": {"accum": 2},
    "tiled-accum": {"variant": "tiled", "accum": 2},
    "lit-checkpointing": {"accum": 2, "model": {"lock_image": True, "grad_checkpointing": True}},
    "timm": {"model": {"name": "tiny-convnext-64"}},
    "clip": {"clip": 0.05},
    "compile": {"compile": True},
    "offload": {"offload": True},
    "bf16": {"precision": "bf16"},
}.items()}


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--local-batch", type=int, default=4)
    p.add_argument("--out", required=True, help="JSON file that rank 0 writes")
    return p.parse_args()


def _loss_fn(kind: str, variant: str) -> torch.nn.Module:
    return SigmoidLoss(exchange=variant) if kind == "sigmoid" else ContrastiveLoss(variant, tile_size=3)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, eps=1e-6, fused=True)


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _reference_step(model, optimizer, images, tokens, kind, local_batch, clip, precision) -> float:
    with _autocast(precision):
        out = reference_features(model, images, tokens, local_batch)
        if kind == "sigmoid":
            loss = reference_sigmoid_loss(out["image_features"].float(), out["text_features"].float(),
                                          out["logit_scale"], out["logit_bias"])
        else:
            loss = reference_contrastive_loss(out["image_features"].float(), out["text_features"].float(),
                                              out["logit_scale"])
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


class _Autocasting:
    """What `forward_backward` needs of an Accelerator, with the scenario's autocast (the launch's Accelerator has
    one fixed mixed-precision setting for the whole process)."""

    def __init__(self, accelerator: Accelerator, precision: str):
        self.accelerator, self.precision = accelerator, precision

    def autocast(self):
        return _autocast(self.precision)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)


def _scenario(accelerator: Accelerator, name: str, args: argparse.Namespace) -> dict:
    scenario = SCENARIOS[name]
    kind, variant, accum, model_kw = scenario["kind"], scenario["variant"], scenario["accum"], scenario["model"]
    clip, precision = scenario["clip"], scenario["precision"]
    world, rank, b = accelerator.num_processes, accelerator.process_index, args.local_batch
    set_seed(0)
    model = create_model(ModelConfig(**{"name": "tiny-vit-64", **model_kw}), kind)
    fsdp = copy.deepcopy(model)
    if scenario["compile"]:  # as the trainer does: compile the blocks, then shard them
        compile_blocks(fsdp)
    shard_model(fsdp, accelerator.device, precision, offload=scenario["offload"])
    ddp = DistributedDataParallel(copy.deepcopy(model))
    reference = model if rank == 0 else None
    optimizers = {"fsdp": _optimizer(fsdp), "ddp": _optimizer(ddp.module)}
    ref_optimizer = _optimizer(reference) if reference is not None else None
    step_runner = accelerator if precision == "fp32" else _Autocasting(accelerator, precision)
    loss_fn = _loss_fn(kind, variant)

    # the dtype a sharded block's weight has while it computes: bf16 under the bf16 policy
    block = fsdp.clip.visual.transformer.resblocks[0] if hasattr(fsdp.clip.visual, "transformer") else None
    seen_dtypes: set[str] = set()
    if block is not None:
        # runs after FSDP's own pre-forward hook (registered first), which has gathered the block's weights
        block.register_forward_pre_hook(lambda m, i: seen_dtypes.add(str(m.mlp.c_fc.weight.dtype)))

    losses: dict[str, list[float]] = {"fsdp": [], "ddp": [], "reference": []}
    for step in range(args.steps):
        images, tokens = global_batch(model.tokenizer, world * b, seed=100 + step)
        local = slice(rank * b, (rank + 1) * b)
        micro = b // accum
        micro_batches = [(images[local][i:i + micro], tokens[local][i:i + micro]) for i in range(0, b, micro)]
        for label, wrapped in (("fsdp", fsdp), ("ddp", ddp)):
            loss = forward_backward(wrapped, loss_fn, micro_batches, step_runner)
            if label == "fsdp":
                sync_replicated_grads(fsdp)
                if clip:
                    clip_grad_norm(fsdp, clip)
            elif clip:
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), clip)
            optimizers[label].step()
            optimizers[label].zero_grad(set_to_none=True)
            losses[label].append(accelerator.reduce(loss, reduction="mean").item())
        if reference is not None:
            losses["reference"].append(_reference_step(reference, ref_optimizer, images, tokens, kind, b, clip,
                                                       precision))

    fsdp_state = full_state_dict(fsdp)  # collective: every rank takes part, rank 0 receives
    skip = _nonfinite_step_keeps_everything(accelerator, fsdp, optimizers["fsdp"], micro_batches, loss_fn,
                                            step_runner) if precision == "fp32" else None
    if rank != 0:
        return {}
    ddp_state = {k: v.detach() for k, v in ddp.module.state_dict().items()}
    ref_state = {k: v.detach() for k, v in reference.state_dict().items()}
    init = {k: v.detach() for k, v in create_model_like(model_kw, kind).state_dict().items()}
    shard_dtypes = sorted({str(p.dtype) for p in fsdp.parameters()})
    return {
        "losses": losses,
        "max_abs_diff": {"fsdp-ddp": _max_diff(fsdp_state, ddp_state), "fsdp-reference": _max_diff(fsdp_state,
                                                                                                   ref_state),
                         "ddp-reference": _max_diff(ddp_state, ref_state)},
        "max_abs_change": _max_diff(ref_state, init),
        # |update_a - update_b| / |update_b| over all weights: bf16 flips the sign of some tiny first Adam updates,
        # which a largest-difference figure overstates
        "update_rel_l2": {"fsdp-ddp": _update_rel_l2(fsdp_state, ddp_state, init),
                          "fsdp-reference": _update_rel_l2(fsdp_state, ref_state, init),
                          "ddp-reference": _update_rel_l2(ddp_state, ref_state, init)},
        "num_params": len(fsdp_state),
        "same_keys": sorted(fsdp_state) == sorted(ddp_state) == sorted(ref_state),
        "compute_dtypes": sorted(seen_dtypes),
        "shard_dtypes": shard_dtypes,
        "nonfinite_step_keeps_state": skip,
        "precision": precision,
    }


def create_model_like(model_kw: dict, kind: str) -> torch.nn.Module:
    """The scenario's model as initialised (the same seed), to measure how far the steps moved the weights."""
    set_seed(0)
    return create_model(ModelConfig(**{"name": "tiny-vit-64", **model_kw}), kind)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _update_rel_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> float:
    diff = sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in a)
    update = sum(((b[k].float() - init[k].float()) ** 2).sum().item() for k in a)
    return (diff / max(update, 1e-30)) ** 0.5


def _nonfinite_step_keeps_everything(accelerator, model, optimizer, micro_batches, loss_fn, step_runner) -> bool:
    """One more backward, then the guard's verdict "not finite on some process": the fused AdamW must leave the
    shards and their moments untouched."""
    forward_backward(model, loss_fn, micro_batches, step_runner)
    sync_replicated_grads(model)
    before = _local_state(model, optimizer)
    guard = NonfiniteGuard(optimizer, accelerator.num_processes, limit=5, run_dir=Path("."))
    assert guard.arm(torch.tensor(float(accelerator.num_processes - 1)), step=99)  # one process saw a NaN
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after = _local_state(model, optimizer)
    guard.check(wait=True)
    kept = torch.tensor(float(all(torch.equal(before[k], after[k]) for k in before)))
    return bool(accelerator.reduce(kept, reduction="sum").item() == accelerator.num_processes) and guard.total == 1


def _local_state(model, optimizer) -> dict[str, torch.Tensor]:
    state = {}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        state[name] = local.detach().clone()
        for key, value in optimizer.state.get(p, {}).items():
            value = value.to_local() if hasattr(value, "to_local") else value
            state[f"{name}/{key}"] = value.detach().clone()
    return state


def main() -> None:
    args = _parse_args()

    def check(accelerator: Accelerator) -> dict:
        return {"scenarios": {name: _scenario(accelerator, name, args) for name in args.scenarios},
                "steps": args.steps, "local_batch": args.local_batch}

    run_and_report(args.out, check)


if __name__ == "__main__":
    main()
