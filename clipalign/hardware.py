"""What the machine a run is on can do: threads for CPU processes, native bf16, and the precision a CPU run trains in.
"""

from __future__ import annotations

import os
import platform

import torch


def cpu_threads(requested: int = 0) -> int:
    """Torch threads for a CPU process: `requested`, else the available cores shared by this machine's processes.

    `accelerate launch` without `--cpu` exports OMP_NUM_THREADS=1, which would leave all cores but one idle.
    """
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def cpu_native_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 matrices natively (x86: AVX-512 BF16 or AMX); None where it cannot be told."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return None


def cpu_precision(precision: str, native_bf16: bool | None) -> tuple[str, str]:
    """The precision a CPU run trains in, and why it differs from the recipe's ("" when it does not).

    Without native bf16, PyTorch multiplies bf16 matrices with its reference kernel: 0.25 GFLOP/s against 65 in fp32
    on a 2-core machine, a 31 s step where fp32 takes a fraction of one. Such a run trains in fp32 instead.
    """
    if precision != "bf16" or native_bf16 is not False:
        return precision, ""
    return "fp32", ("train.precision=bf16 on a CPU without native bf16 (no AVX-512 BF16 or AMX): PyTorch's fallback "
                    "bf16 matrix products run about 250x slower than fp32 here, so this run trains in fp32. Set "
                    "train.precision=fp32 to silence this; bf16 pays off on GPUs and on CPUs with AVX-512 BF16 or AMX")

