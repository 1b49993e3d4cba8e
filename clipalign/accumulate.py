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
extra forward pass of the towers.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from clipalign.sharding import no_gradient_sync


def forward_backward(model: nn.Module, loss_fn: nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                     accelerator) -> torch.Tensor:
    """Forward and backward of one optimizer step; returns the (detached) loss of the whole step.

    Args:
        model: the prepared dual encoder (forward(images, texts) -> features, logit scale, optional logit bias).
        loss_fn: a clipalign loss, called on this process's features of all micro-batches together.
        micro_batches: (images, token ids) pairs already on the device; one pair means no accumulation.
        accelerator: the run's Accelerator (autocast, loss scaling).
    """
    if len(micro_batches) == 1:
        images, texts = micro_batches[0]
        with accelerator.autocast():
            loss = _loss(loss_fn, model(images, texts))
        accelerator.backward(loss)
        return loss.detach()

    # 1. embeddings of every micro-batch, no graph
    device = micro_batches[0][0].device
    cached, rng_states = [], []
    with torch.no_grad():
        for images, texts in micro_batches:
            rng_states.append(_rng_state(device))
            with accelerator.autocast():
                cached.append(model(images, texts))

    # 2. the loss of the whole accumulated batch and its gradient w.r.t. the cached embeddings
    leaves = {key: torch.cat([c[key] for c in cached]).detach().requires_grad_()  # (k * B_local, D)
              for key in ("image_features", "text_features")}
    for key in ("logit_scale", "logit_bias"):
        if key in cached[-1]:
            leaves[key] = cached[-1][key].detach().requires_grad_()
    with accelerator.autocast():
        loss = _loss(loss_fn, leaves)
    accelerator.backward(loss)  # applies the fp16 loss scale, if any, to every cached gradient
    sizes = [images.shape[0] for images, _ in micro_batches]
    grads = {key: leaves[key].grad.split(sizes) for key in ("image_features", "text_features")}

    # 3. re-forward each micro-batch with a graph and push the cached gradients through it; DDP and FSDP reduce
    #    the gradients over processes once, on the last
    for i, (images, texts) in enumerate(micro_batches):
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
    return loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))


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
