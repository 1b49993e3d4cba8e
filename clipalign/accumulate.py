"""One optimizer step's forward and backward, over one batch or several accumulated micro-batches.

Plain gradient accumulation would score each micro-batch only against itself, shrinking the pool of negatives to
one micro-batch. Here the micro-batches are scored together, as one big batch, with the gradient-cache method
(Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):

1. forward every micro-batch without a graph and keep only the embeddings (and the RNG state it started from);
2. compute the loss of all cached embeddings at once (gathered across processes as usual) and its gradient with
   respect to the embeddings, the logit scale and the bias;
3. forward each micro-batch again, now with a graph and the same RNG state, and back-propagate the cached
   embedding gradients through it.

The parameter gradients are those of one big batch; activation memory is that of one micro-batch; the cost is one
extra forward pass of the towers. With a teacher (distillation), its features of every micro-batch are computed in
step 1, once, and the loss of step 2 scores the whole accumulated batch against them too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from clipalign.sharding import no_gradient_sync


def forward_backward(model: nn.Module, loss_fn: nn.Module, micro_batches: Sequence[tuple], accelerator,
                     teacher: Callable[..., dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """Forward and backward of one optimizer step; returns the (detached) loss of the whole step.

    Args:
        model: the prepared dual encoder (forward(images, texts) -> features, logit scale, optional logit bias).
        loss_fn: a clipalign loss, called on this process's features of all micro-batches together.
        micro_batches: (images, token ids[, batch]) already on the device (`batch`: the loader's dict, for what a
            teacher reads of it); one means no accumulation.
        accelerator: the run's Accelerator (autocast, loss scaling).
        teacher: with distillation, `teacher(images, token ids, batch)` -> the teacher's `image_features`,
            `text_features` and `logit_scale` (no gradients), which the loss takes as `teacher_image`,
            `teacher_text` and `teacher_scale`.
    """
    if len(micro_batches) == 1:
        images, texts, *batch = micro_batches[0]
        with accelerator.autocast():
            out = model(images, texts)
            if teacher is not None:
                out.update(_teacher_out(teacher(images, texts, *batch)))
            loss = _loss(loss_fn, out)
        accelerator.backward(loss)
        return loss.detach()

    # 1. embeddings of every micro-batch, no graph
    device = micro_batches[0][0].device
    cached, rng_states, taught = [], [], []
    with torch.no_grad():
        for images, texts, *batch in micro_batches:
            rng_states.append(_rng_state(device))
            with accelerator.autocast():
                cached.append(model(images, texts))
                if teacher is not None:
                    taught.append(_teacher_out(teacher(images, texts, *batch)))

    # 2. the loss of the whole accumulated batch and its gradient w.r.t. the cached embeddings
    leaves = {key: torch.cat([c[key] for c in cached]).detach().requires_grad_()  # (k * B_local, D)
              for key in ("image_features", "text_features")}
    for key in ("logit_scale", "logit_bias"):
        if key in cached[-1]:
            leaves[key] = cached[-1][key].detach().requires_grad_()
    extra = {}
    if taught:  # the teacher's view of the whole accumulated batch: every negative, as for the student
        extra = {key: torch.cat([t[key] for t in taught]) for key in ("teacher_image", "teacher_text")}
        extra["teacher_scale"] = taught[-1]["teacher_scale"]
    with accelerator.autocast():
        loss = _loss(loss_fn, {**leaves, **extra})
    accelerator.backward(loss)  # applies the fp16 loss scale, if any, to every cached gradient
    sizes = [micro[0].shape[0] for micro in micro_batches]
    grads = {key: leaves[key].grad.split(sizes) for key in ("image_features", "text_features")}

    # 3. re-forward each micro-batch with a graph and push the cached gradients through it; DDP and FSDP reduce
    #    the gradients over processes once, on the last
    for i, (images, texts, *_) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else no_gradient_sync(model):
            with _replayed_rng(rng_states[i], device), accelerator.autocast():
                out = model(images, texts)
            outputs = [out["image_features"], out["text_features"]]
            out_grads = [grads["image_features"][i], grads["text_features"][i]]
            if last:  # the temperature and bias gradients come from the loss once, not once per micro-batch
                for key in ("logit_scale", "logit_bias"):
                    if key in leaves:
                        outputs.append(out[key])
                        out_grads.append(leaves[key].grad)
            # a locked tower (LiT) has no graph: only what requires a gradient is back-propagated
            pairs = [(o, g) for o, g in zip(outputs, out_grads) if o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return loss.detach()


def _loss(loss_fn: nn.Module, out: dict[str, torch.Tensor]) -> torch.Tensor:
    teacher = {key: out[key] for key in ("teacher_image", "teacher_text", "teacher_scale") if key in out}
    return loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"), **teacher)


def _teacher_out(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A teacher's features under the loss's keyword names."""
    return {"teacher_image": features["image_features"], "teacher_text": features["text_features"],
            "teacher_scale": features["logit_scale"]}


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _replayed_rng(state: tuple, device: torch.device):
    """Run with the RNG state a micro-batch's first forward saw (dropout, patch dropout), then restore the RNG."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1], device)
        yield
