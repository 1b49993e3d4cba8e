"""Check SigmoidLoss's invariant on real processes; run by tests/test_sigmoid_loss.py under `accelerate launch`.

Every rank builds the same tiny dual encoder with a SigLIP logit bias and the same global batch, wraps it in DDP
through `accelerator.prepare`, and backpropagates the sigmoid loss of its own slice, once per exchange. Rank 0 also
computes the loss of the whole global batch on an unwrapped copy in one process and writes, as JSON, how far the DDP
gradients (per parameter: max |difference| / max |reference|) and the mean of the ranks' losses are from it:

    accelerate launch --multi_gpu --num_processes 2 tests/dist_sigmoid_check.py --out result.json

With --open-clip every rank also scores its features with open_clip's `SigLipLoss(rank, world_size)` (its
neighbour-exchange and all-gather implementations) and the JSON says how far our loss and feature gradients are
from those, per rank. On a machine without GPUs this script passes `cpu=True` to the Accelerator (gloo and DDP).
"""

from __future__ import annotations

import argparse
import copy
import warnings

import open_clip
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from dist_common import (
    global_batch,
    grad_diffs,
    reference_features,
    reference_sigmoid_loss,
    run_and_report,
    saved_shapes,
)

from clipalign.config import ModelConfig
from clipalign.loss import SIGMOID_EXCHANGES, SigmoidLoss
from clipalign.model import create_model

_OPEN_CLIP_IMPLS = ("bidir", "shift", "gather")  # "reduce" exchanges N full all-reduces: no different in kind


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exchanges", nargs="+", choices=SIGMOID_EXCHANGES, default=list(SIGMOID_EXCHANGES))
    p.add_argument("--local-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logit-bias", type=float, default=None,
                   help="start the bias here instead of -10, where the negatives carry more of the gradient")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="float64 shrinks the numerical noise to ~1e-14, to tell it apart from a real discrepancy")
    p.add_argument("--open-clip", action="store_true", help="also compare with open_clip's SigLipLoss on every rank")
    p.add_argument("--mismatch", action="store_true",
                   help="afterwards, give rank 1 a smaller local batch and record each exchange's error")
    p.add_argument("--out", required=True, help="JSON file that rank 0 writes")
    return p.parse_args()


def _check_gradients(accelerator: Accelerator, args: argparse.Namespace) -> dict:
    set_seed(args.seed)
    model = create_model(ModelConfig(name="tiny-vit-64"), loss_kind="sigmoid").to(getattr(torch, args.dtype))
    if args.logit_bias is not None:
        with torch.no_grad():
            model.clip.logit_bias.fill_(args.logit_bias)
    reference = copy.deepcopy(model)
    world, rank, b = accelerator.num_processes, accelerator.process_index, args.local_batch
    images, tokens = global_batch(model.tokenizer, world * b)
    if args.dtype == "float64":  # the model would normalise uint8 images in float32
        images = (images.double() - model.pixel_mean.double()) / model.pixel_std.double()
    ddp_model = accelerator.prepare(model)
    local_images = images[rank * b:(rank + 1) * b].to(accelerator.device)
    local_tokens = tokens[rank * b:(rank + 1) * b].to(accelerator.device)

    runs, features = {}, None
    for exchange in args.exchanges:
        ddp_model.zero_grad(set_to_none=True)
        out = ddp_model(local_images, local_tokens)
        with saved_shapes() as shapes:
            loss = SigmoidLoss(exchange)(out["image_features"], out["text_features"], out["logit_scale"],
                                         out["logit_bias"])
        accelerator.backward(loss)
        features = {k: v.detach() for k, v in out.items()}
        runs[exchange] = {"losses": accelerator.gather(loss.detach()[None]).tolist(),  # (N,)
                          "saved_shapes": sorted(shapes)}
        if accelerator.is_main_process:
            runs[exchange]["grads"] = {n: None if p.grad is None else p.grad.clone()
                                       for n, p in accelerator.unwrap_model(ddp_model).named_parameters()}

    open_clip_diffs = _compare_with_open_clip(accelerator, features) if args.open_clip else None
    if not accelerator.is_main_process:
        return {}

    ref_out = reference_features(reference, images, tokens, b)
    ref_loss = reference_sigmoid_loss(ref_out["image_features"], ref_out["text_features"], ref_out["logit_scale"],
                                      ref_out["logit_bias"])
    ref_loss.backward()

    result = {"ref_loss": ref_loss.item(), "exchanges": {}}
    for exchange, run in runs.items():
        grads = grad_diffs(run.pop("grads"), reference)
        losses = run["losses"]
        value = sum(losses) / len(losses)  # the mean over ranks is the global loss
        result["exchanges"][exchange] = {
            "losses": losses,
            "saved_shapes": run["saved_shapes"],
            "loss": value,
            "loss_abs_diff": abs(value - ref_loss.item()),
            "max_rel_diff": max(g["rel_diff"] for g in grads.values() if "rel_diff" in g),
            "grads": grads,
        }
    if open_clip_diffs is not None:
        result["open_clip"] = open_clip_diffs
    return result


def _compare_with_open_clip(accelerator: Accelerator, features: dict[str, torch.Tensor]) -> dict:
    """Max relative difference, over ranks, of our loss and its input gradients from open_clip's SigLipLoss.

    Both run on the same detached features, so every input gradient (which includes what the other ranks' losses
    send back through the exchange) must agree per rank, not only after DDP's average.
    """
    names = ["image_features", "text_features", "logit_scale", "logit_bias"]

    def value_and_grads(loss_fn) -> list[torch.Tensor]:
        inputs = [features[k].clone().requires_grad_() for k in names]
        loss = loss_fn(*inputs)
        return [loss.detach(), *torch.autograd.grad(loss, inputs)]

    ours = {exchange: value_and_grads(SigmoidLoss(exchange)) for exchange in SIGMOID_EXCHANGES}
    diffs = {}
    with warnings.catch_warnings():  # open_clip's all-gather uses torch.distributed.nn, which now warns
        warnings.simplefilter("ignore", FutureWarning)
        for impl in _OPEN_CLIP_IMPLS:
            theirs = value_and_grads(open_clip.loss.SigLipLoss(rank=accelerator.process_index,
                                                               world_size=accelerator.num_processes, dist_impl=impl))
            for exchange, values in ours.items():
                rel = torch.stack([(a - t).abs().max() / t.abs().max().clamp_min(1e-30)
                                   for a, t in zip(values, theirs)])  # (5,): loss, then each input's gradient
                worst = accelerator.gather(rel[None]).amax(dim=0)  # (5,), the worst rank
                diffs[f"{exchange} vs {impl}"] = dict(zip(["loss", *names], worst.tolist()))
    return diffs


def _mismatch_errors(accelerator: Accelerator, args: argparse.Namespace) -> dict[str, str | None]:
    """Rank 1 brings two rows fewer; every rank should raise the same clear error instead of hanging."""
    rows = args.local_batch - 2 if accelerator.process_index == 1 else args.local_batch
    features = F.normalize(torch.randn(rows, 16), dim=-1).to(accelerator.device)
    errors = {}
    for exchange in SIGMOID_EXCHANGES:
        try:
            SigmoidLoss(exchange)(features, features, torch.tensor(10.0), torch.tensor(-10.0))
            errors[exchange] = None
        except ValueError as e:
            errors[exchange] = str(e)
    return errors


def main() -> None:
    args = _parse_args()

    def check(accelerator: Accelerator) -> dict:
        result = _check_gradients(accelerator, args)
        if args.mismatch:
            result["mismatch_errors"] = _mismatch_errors(accelerator, args)
        result.update(local_batch=args.local_batch, dtype=args.dtype, logit_bias=args.logit_bias)
        return result

    run_and_report(args.out, check)


if __name__ == "__main__":
    main()
