"""What the gradient-check scripts (run under `accelerate launch`) and the loss tests share: the global batch, the
one-process reference, the gradient comparison, a saved-tensor probe and the launch wrapper."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator

_WORDS = ["red", "green", "blue", "small", "large", "striped", "circle", "square", "dog", "cat", "boat", "tree"]


def global_batch(tokenizer, size: int, seed: int = 1234, image_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The same uint8 images (size, 3, image_size, image_size) and token ids (size, 32) on every rank."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    picks = torch.randint(0, len(_WORDS), (size, 3), generator=g).tolist()
    captions = [f"a {_WORDS[a]} {_WORDS[b]} next to a {_WORDS[c]} number {i}" for i, (a, b, c) in enumerate(picks)]
    return images, tokenizer(captions)


def reference_features(reference: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                       local_batch: int) -> dict[str, torch.Tensor]:
    """The unwrapped reference's outputs on the whole global batch, computed in per-rank chunks.

    The encoders treat samples independently, so chunks compute the same features; they keep the reference's matmul
    shapes equal to the ranks' and so remove batch-size-dependent rounding.
    """
    chunks = [reference(images[i:i + local_batch], tokens[i:i + local_batch])
              for i in range(0, images.shape[0], local_batch)]
    out = {key: torch.cat([c[key] for c in chunks]) for key in ("image_features", "text_features")}
    out.update({key: chunks[0][key] for key in ("logit_scale", "logit_bias") if key in chunks[0]})
    return out


def reference_contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                               label_smoothing: float = 0.0) -> torch.Tensor:
    """CLIP loss of one process on the whole batch, written out independently of clipalign.loss."""
    logits = scale * image @ text.T  # (B_global, B_global)
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2


def reference_sigmoid_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                           bias: torch.Tensor) -> torch.Tensor:
    """SigLIP loss of one process on the whole batch, written out independently of clipalign.loss."""
    logits = scale * image @ text.T + bias  # (B_global, B_global)
    labels = 2 * torch.eye(image.shape[0], dtype=logits.dtype) - 1  # +1 on the matching pairs, -1 elsewhere
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


def grad_diffs(ddp_grads: dict[str, torch.Tensor | None], reference: torch.nn.Module) -> dict:
    """Per parameter: max |DDP grad - reference grad|, that relative to max |reference grad|, and the relative L2."""
    grads = {}
    assert list(ddp_grads) == [name for name, _ in reference.named_parameters()]
    for name, ref_p in reference.named_parameters():
        grad = ddp_grads[name]
        if grad is None or ref_p.grad is None:
            grads[name] = {"missing": [grad is None, ref_p.grad is None]}
            continue
        diff = grad.cpu() - ref_p.grad
        abs_diff, scale = diff.abs().max().item(), ref_p.grad.abs().max().item()
        grads[name] = {"max_abs_diff": abs_diff, "ref_max_abs": scale, "rel_diff": abs_diff / max(scale, 1e-30),
                       "rel_l2": (diff.norm() / ref_p.grad.norm().clamp_min(1e-30)).item()}
    return grads


@contextlib.contextmanager
def saved_shapes() -> Iterator[set[tuple[int, ...]]]:
    """The shapes of the tensors autograd saves for the backward inside the block."""
    shapes = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.add(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield shapes


def run_and_report(out: str, check: Callable[[Accelerator], dict]) -> None:
    """Run `check` on every rank and write what rank 0 returns (plus the world size and backend) to `out` as JSON."""
    # Without CUDA, cpu=True is what makes Accelerate pick gloo and wrap the model in DDP.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:
        result = check(accelerator)
        if accelerator.is_main_process:
            result.update(world_size=accelerator.num_processes, distributed_type=str(accelerator.distributed_type))
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
        accelerator.wait_for_everyone()  # no rank takes the group down while rank 0 still writes
    finally:
        # gloo aborts the interpreter at exit ("terminate called without an active exception") if the group lives on
        accelerator.end_training()
