"""Attention kernels of a training step: what `train.attention=auto` picks against PyTorch's own choice, in one run.

For each shape (batch, heads, positions, head width; a causal mask for text towers) and precision, it times one
`scaled_dot_product_attention` forward and backward (the part of a training step the kernel choice changes) under
PyTorch's choice (the reference: on CPU its flash kernel) and under the math kernels (`bmm` + softmax), which is
what `auto` runs on CPU under bf16/fp16 autocast for up to `clipalign.model.CPU_MATH_ATTENTION_MAX_TOKENS`
positions. With `--forward-only` it times the forward under `no_grad` instead (evaluation, where `auto` keeps
PyTorch's choice). The kernels take turns within every repeat; it prints the medians and the ratio reference / math
(above 1: math is faster), and which one `auto` runs for that shape.

    python tools/benchmark_attention.py                       # the towers of tiny-vit-64, ViT-B/32, ViT-B/16
    python tools/benchmark_attention.py --shapes 128x4x65x48 128x4x24x48c --precision bf16 fp32 --repeats 11
    python tools/benchmark_attention.py --forward-only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clipalign.model import use_cpu_math_attention  # noqa: E402

# BATCHxHEADSxPOSITIONSxHEAD_WIDTH, "c" = causal mask (a text tower): tiny-vit-64's towers at batch 128, ViT-B/32's
# towers (50 patches+class, 77 text positions) and ViT-B/16's image tower (197), at batch 64
DEFAULT_SHAPES = ["128x4x65x48", "128x4x24x48c", "64x12x50x64", "64x8x77x64c", "64x12x197x64"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_shape(text: str) -> tuple[int, int, int, int, bool]:
    causal = text.endswith("c")
    parts = text.rstrip("c").split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected BATCHxHEADSxPOSITIONSxHEAD_WIDTH, e.g. 128x4x65x48 "
                                         f"(a trailing 'c' for a causal mask)")
    b, h, n, d = (int(p) for p in parts)
    return b, h, n, d, causal


def _step(q, k, v, mask, backend: SDPBackend | None, forward_only: bool) -> float:
    start = time.perf_counter()
    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():  # None: PyTorch's choice
        if forward_only:
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def measure(shape, precision: str, repeats: int, forward_only: bool) -> dict:
    b, h, n, d, causal = shape
    dtype = DTYPES[precision]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype).requires_grad_(not forward_only) for _ in range(3))
    # open_clip's text towers pass the causal mask as an additive float mask, as here
    mask = torch.full((n, n), float("-inf")).triu(1).to(dtype) if causal else None
    kernels = {"reference": None, "math": SDPBackend.MATH}
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for backend in kernels.values():  # warm-up
        _step(q, k, v, mask, backend, forward_only)
    for _ in range(repeats):
        for name, backend in kernels.items():
            times[name].append(_step(q, k, v, mask, backend, forward_only))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    # what a tower of n positions runs under `auto` in a training step (or an evaluation) at this precision
    with torch.set_grad_enabled(not forward_only), torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
        auto_math = use_cpu_math_attention(torch.device("cpu"), n)
    return {"shape": f"{b}x{h}x{n}x{d}{'c' if causal else ''}", "precision": precision,
            "pass": "forward" if forward_only else "forward+backward",
            "reference_ms": med["reference"] * 1e3, "math_ms": med["math"] * 1e3,
            "reference_over_math": med["reference"] / med["math"], "auto_runs": "math" if auto_math else "reference",
            "times_ms": {name: [round(t * 1e3, 2) for t in ts] for name, ts in times.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in DEFAULT_SHAPES],
                   help="BATCHxHEADSxPOSITIONSxHEAD_WIDTH[c] (c: causal mask)")
    p.add_argument("--precision", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=7, help="timed passes per kernel (>= 3 for a median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--forward-only", action="store_true", help="time the forward under no_grad (evaluation)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"scaled_dot_product_attention on CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"medians of {args.repeats}; reference = PyTorch's choice")
    print("\n| shape (BxHxNxD) | precision | pass | reference ms | math ms | reference / math | auto runs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    results = []
    for shape in args.shapes:
        for precision in args.precision:
            r = measure(shape, precision, args.repeats, args.forward_only)
            results.append(r)
            print(f"| {r['shape']} | {r['precision']} | {r['pass']} | {r['reference_ms']:.1f} | {r['math_ms']:.1f} | "
                  f"{r['reference_over_math']:.2f}x | {r['auto_runs']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
