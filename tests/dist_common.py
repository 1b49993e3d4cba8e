"""What the gradient-check scripts (run under `accelerate launch`) share: the global batch and the launch wrapper."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from accelerate import Accelerator

_WORDS = ["red", "green", "blue", "small", "large", "striped", "circle", "square", "dog", "cat", "boat", "tree"]


def global_batch(tokenizer, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same uint8 images (size, 3, 64, 64) and token ids (size, 32) on every rank."""
    g = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (size, 3, 64, 64), dtype=torch.uint8, generator=g)
    picks = torch.randint(0, len(_WORDS), (size, 3), generator=g).tolist()
    captions = [f"a {_WORDS[a]} {_WORDS[b]} next to a {_WORDS[c]} number {i}" for i, (a, b, c) in enumerate(picks)]
    return images, tokenizer(captions)


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
    finally:
        # gloo aborts the interpreter at exit ("terminate called without an active exception") if the group lives on
        accelerator.end_training()
