"""Check ContrastiveLoss's invariant on real processes; run by tests/test_loss.py under `accelerate launch`.

Every rank builds the same tiny dual encoder and the same global batch, wraps a copy in DDP through
`accelerator.prepare`, and backpropagates the loss of its own slice. Rank 0 also computes the loss of the whole
global batch on an unwrapped copy in one process and writes, as JSON, how far the DDP gradients (per parameter:
max |difference| / max |reference|) and loss are from that reference:

    accelerate launch --multi_gpu --num_processes 2 tests/dist_grad_check.py --mode local --out result.json
    accelerate launch --multi_gpu --num_processes 4 tests/dist_grad_check.py --mode tiled --tile-size 5 --out r.json
    accelerate launch --multi_gpu --num_processes 2 tests/dist_grad_check.py --kind sigmoid --accum 4 --out r.json

With `--accum K` each rank splits its local batch into K micro-batches and runs them through the trainer's
gradient-cache accumulation (`clipalign.accumulate.forward_backward`); the reference is still one process on the
whole batch, so the check is that accumulation across processes gives the gradients of the single big batch.

With `--distill W` a frozen teacher (another tiny model, another embedding width) joins: the loss is the contrastive
loss + W x the distillation term (`clipalign.distill`), and the reference adds W x the distillation term of one
process on the whole batch, written out here.

On a machine without GPUs, `--multi_gpu` alone leaves Accelerate at DistributedType.NO (no DDP wrapping); this script
passes `cpu=True` there, which selects gloo and DDP (the same as exporting ACCELERATE_USE_CPU=true).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from dist_common import (
    global_batch,
    grad_diffs,
    reference_contrastive_loss,
    reference_features,
    reference_sigmoid_loss,
    run_and_report,
)

from clipalign.accumulate import forward_backward
from clipalign.config import ModelConfig
from clipalign.distill import DistillationLoss, Teacher
from clipalign.loss import ContrastiveLoss, SigmoidLoss
from clipalign.model import create_model


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["contrastive", "sigmoid"], default="contrastive")
    p.add_argument("--mode", choices=["dense", "local", "tiled"], default="local", help="contrastive loss mode")
    p.add_argument("--exchange", choices=["ring", "gather"], default="ring", help="sigmoid loss exchange")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per rank (gradient-cache accumulation)")
    p.add_argument("--tile-size", type=int, default=4096, help="tiled: columns per tile")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--distill", type=float, default=0.0, help="distillation weight; 0 = no teacher")
    p.add_argument("--local-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="float64 shrinks the numerical noise to ~1e-14, to tell it apart from a real discrepancy")
    p.add_argument("--mismatch", action="store_true",
                   help="afterwards, give rank 1 a smaller local batch and record the loss's error as mismatch_error")
    p.add_argument("--out", required=True, help="JSON file that rank 0 writes")
    args = p.parse_args()
    if args.accum < 1 or args.local_batch % args.accum:
        p.error(f"--accum {args.accum} must be a positive divisor of --local-batch {args.local_batch}")
    return args


def _loss_fn(args: argparse.Namespace) -> torch.nn.Module:
    if args.kind == "sigmoid":
        return SigmoidLoss(exchange=args.exchange)
    return ContrastiveLoss(args.mode, args.label_smoothing, tile_size=args.tile_size)


def _mismatch_error(accelerator: Accelerator, args: argparse.Namespace) -> str | None:
    """Rank 1 brings two rows fewer; every rank should raise the same clear error instead of hanging."""
    rows = args.local_batch - 2 if accelerator.process_index == 1 else args.local_batch
    features = F.normalize(torch.randn(rows, 16), dim=-1).to(accelerator.device)
    try:
        ContrastiveLoss(args.mode, tile_size=args.tile_size)(features, features, torch.tensor(10.0))
    except ValueError as e:
        return str(e)
    return None


def _check_gradients(accelerator: Accelerator, args: argparse.Namespace) -> dict:
    set_seed(args.seed)
    model = create_model(ModelConfig(name="tiny-vit-64"), args.kind).to(getattr(torch, args.dtype))
    reference = copy.deepcopy(model)
    world, rank, b = accelerator.num_processes, accelerator.process_index, args.local_batch
    images, tokens = global_batch(model.tokenizer, world * b)
    if args.dtype == "float64":  # the model would normalise uint8 images in float32
        images = (images.double() - model.pixel_mean.double()) / model.pixel_std.double()

    teacher, loss_fn = None, _loss_fn(args)
    if args.distill:
        torch.manual_seed(args.seed + 1)
        teacher_model = create_model(ModelConfig(name="tiny-vit-64", embed_dim=96)).to(model.pixel_mean.dtype).eval()
        teacher_model.requires_grad_(False)
        teacher = Teacher(teacher_model, model.image_size, own_tokens=False)
        loss_fn = DistillationLoss(loss_fn, args.distill)
    ddp_model = accelerator.prepare(model)
    local_images = images[rank * b:(rank + 1) * b].to(accelerator.device)
    local_tokens = tokens[rank * b:(rank + 1) * b].to(accelerator.device)
    micro = b // args.accum
    micro_batches = [(local_images[i:i + micro], local_tokens[i:i + micro]) for i in range(0, b, micro)]
    view = None if teacher is None else (lambda images, texts, *batch: teacher(images, texts))
    loss = forward_backward(ddp_model, loss_fn, micro_batches, accelerator, view)
    losses = accelerator.gather(loss[None]).tolist()  # (N,)
    if not accelerator.is_main_process:
        return {}

    ref_out = reference_features(reference, images, tokens, b)
    if args.kind == "sigmoid":
        ref_loss = reference_sigmoid_loss(ref_out["image_features"], ref_out["text_features"],
                                          ref_out["logit_scale"], ref_out["logit_bias"])
    else:
        ref_loss = reference_contrastive_loss(ref_out["image_features"], ref_out["text_features"],
                                              ref_out["logit_scale"], args.label_smoothing)
    if teacher is not None:
        taught = teacher(images, tokens)
        ref_loss = ref_loss + args.distill * _reference_distillation(ref_out, taught)
    ref_loss.backward()
    grads = grad_diffs({name: p.grad for name, p in accelerator.unwrap_model(ddp_model).named_parameters()},
                       reference)

    # dense: every rank holds the global loss; local and tiled: the mean over ranks is the global loss
    value = losses[0] if args.kind == "contrastive" and args.mode == "dense" else sum(losses) / len(losses)
    rel = [g["rel_diff"] for g in grads.values() if "rel_diff" in g]
    return {
        "losses": losses,
        "loss": value,
        "ref_loss": ref_loss.item(),
        "loss_abs_diff": abs(value - ref_loss.item()),
        "max_rel_diff": max(rel),
        "num_params": len(grads),
        "grads": grads,
    }


def _reference_distillation(student: dict, teacher: dict) -> torch.Tensor:
    """The distillation term of one process on the whole batch, written out independently of clipalign.distill."""
    s_i2t = student["logit_scale"] * student["image_features"] @ student["text_features"].T  # (B_global, B_global)
    t_i2t = teacher["logit_scale"] * teacher["image_features"] @ teacher["text_features"].T
    i2t = -(t_i2t.softmax(dim=1) * s_i2t.log_softmax(dim=1)).sum(dim=1).mean()
    t2i = -(t_i2t.T.softmax(dim=1) * s_i2t.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (i2t + t2i) / 2


def main() -> None:
    args = _parse_args()

    def check(accelerator: Accelerator) -> dict:
        result = _check_gradients(accelerator, args)
        if args.mismatch:
            result["mismatch_error"] = _mismatch_error(accelerator, args)
        result.update(kind=args.kind, mode=args.mode, exchange=args.exchange, accum=args.accum,
                      tile_size=args.tile_size, local_batch=args.local_batch, dtype=args.dtype, distill=args.distill)
        return result

    run_and_report(args.out, check)


if __name__ == "__main__":
    main()
