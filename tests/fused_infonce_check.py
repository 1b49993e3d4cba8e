"""Run clipalign.fused_infonce's Triton kernels under Triton's interpreter on CPU; started by test_fused_infonce.py.

TRITON_INTERPRET=1 must be in the environment before triton is imported, which is why this is a script of its own:

    TRITON_INTERPRET=1 python tests/fused_infonce_check.py --out errors.json

It writes, per case, the relative error (max |ours - reference| / max |reference|) of every checked quantity, and
the dtype class whose tolerance applies; the tolerances live in tests/test_fused_infonce.py. Sizes are tiny and
ragged (the interpreter runs every block in numpy, and 16-wide blocks leave partial blocks in every dimension).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipalign import fused_infonce  # noqa: E402
from clipalign.loss import ContrastiveLoss, _tiled_contrastive_loss, _use_fused_kernels  # noqa: E402

SCALE = 14.0


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _unit(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)


def _kernel_case(rows: int, cols: int, dim: int, dtype: torch.dtype, symmetric: bool,
                 unroll: bool = False) -> dict[str, float]:
    """lse_forward / lse_backward against autograd through a dense fp64 logsumexp of the same (rounded) inputs.

    `unroll`: the kernels' UNROLL_D variant (D slices unrolled at compile time), which autotuning may pick on a GPU.
    """
    fused_infonce._INTERPRETER_BLOCKS["UNROLL_D"] = unroll
    try:
        return _kernel_errors(rows, cols, dim, dtype, symmetric)
    finally:
        fused_infonce._INTERPRETER_BLOCKS["UNROLL_D"] = False


def _kernel_errors(rows: int, cols: int, dim: int, dtype: torch.dtype, symmetric: bool) -> dict[str, float]:
    u, v = _unit(rows, dim, 1, dtype), _unit(cols, dim, 2, dtype)
    scale = torch.tensor(SCALE)
    g = torch.randn(rows, generator=torch.Generator().manual_seed(3))
    h = torch.randn(cols, generator=torch.Generator().manual_seed(4))
    lse_rows, lse_cols = fused_infonce.lse_forward(u, v, scale, symmetric=symmetric)
    sum_rows, sum_cols = fused_infonce.lse_backward(u, v, scale, lse_rows, g, lse_cols if symmetric else None,
                                                    h if symmetric else None)

    ru, rv = u.double().requires_grad_(), v.double().requires_grad_()
    rs = scale.double().requires_grad_()
    logits = rs * ru @ rv.T  # (rows, cols)
    ref_rows, ref_cols = torch.logsumexp(logits, dim=1), torch.logsumexp(logits, dim=0)
    objective = ref_rows @ g.double() + (ref_cols @ h.double() if symmetric else 0)
    d_u, d_v, d_s = torch.autograd.grad(objective, (ru, rv, rs))
    out = {"lse rows": _rel(lse_rows, ref_rows),
           "d rows": _rel(scale * sum_rows, d_u), "d cols": _rel(scale * sum_cols, d_v),
           "d scale": _rel((u.double() * sum_rows.double()).sum(), d_s)}
    if symmetric:
        out["lse cols"] = _rel(lse_cols, ref_cols)
    return out


def _value_and_grads(fn, *inputs: torch.Tensor) -> list[torch.Tensor]:
    loss = fn(*inputs)
    return [loss, *torch.autograd.grad(loss, inputs)]


def _compare(names: list[str], ours: list[torch.Tensor], ref: list[torch.Tensor]) -> dict[str, float]:
    return {name: _rel(a, b) for name, a, b in zip(names, ours, ref)}


def _loss_case(batch: int, dim: int, smoothing: float, autocast: bool) -> dict[str, float]:
    """ContrastiveLoss(mode="tiled", tiled_kernel="triton") end to end against mode dense, one process."""
    image = _unit(batch, dim, 5).requires_grad_()
    text = _unit(batch, dim, 6).requires_grad_()
    scale = torch.tensor(SCALE).requires_grad_()
    bias = torch.tensor(-2.0).requires_grad_()
    inputs = (image, text, scale, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused = _value_and_grads(ContrastiveLoss("tiled", smoothing, tiled_kernel="triton"), *inputs)
        dense = _value_and_grads(ContrastiveLoss("dense", smoothing), *inputs)
    names = ["loss", "d image", "d text", "d scale"]
    out = _compare(names, fused[:4], dense[:4])
    out["|d bias|"] = abs(fused[4].item())  # a bias on every logit cancels out of every softmax
    return out


def _gathered_case(local: int, total: int, dim: int, smoothing: float) -> dict[str, float]:
    """Local rows against gathered columns (rows != cols, as on N processes) against the pure-torch tiled path."""
    offset = 16  # this "process"'s rows sit at offset.. in the gathered columns
    all_image, all_text = _unit(total, dim, 7).requires_grad_(), _unit(total, dim, 8).requires_grad_()
    scale = torch.tensor(SCALE).requires_grad_()

    def loss(kernel: str):
        def fn(all_i, all_t, s):
            image, text = all_i[offset:offset + local], all_t[offset:offset + local]  # views: gradients join
            # fresh copies stand in for the gather's (the torch path writes the column gradients over them)
            return _tiled_contrastive_loss(image, text, (all_i.clone(), all_t.clone()), s, None, smoothing, 5, kernel)
        return fn

    fused = _value_and_grads(loss("triton"), all_image, all_text, scale)
    torch_path = _value_and_grads(loss("torch"), all_image, all_text, scale)
    # and local mode's math written out in fp64
    ai, at, s = (x.detach().double().requires_grad_() for x in (all_image, all_text, scale))
    labels = offset + torch.arange(local)
    by_hand = (F.cross_entropy(s * ai[offset:offset + local] @ at.T, labels, label_smoothing=smoothing)
               + F.cross_entropy(s * at[offset:offset + local] @ ai.T, labels, label_smoothing=smoothing)) / 2
    reference = [by_hand, *torch.autograd.grad(by_hand, (ai, at, s))]
    names = ["loss", "d all image", "d all text", "d scale"]
    out = _compare(names, fused, torch_path)
    out.update({f"{k} vs fp64": v for k, v in _compare(names, fused, reference).items()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    x = torch.zeros(2, 2)
    # the kernels accept CPU tensors only in the interpreter: this is what proves it is the interpreter that runs
    facts = {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "triton": fused_infonce.available(),
             "kernels chosen on CPU": fused_infonce.supports(x, torch.float32)
             and _use_fused_kernels("triton", x, torch.float32)}
    cases = {
        "kernel symmetric fp32 37x37 D24": ("fp32", lambda: _kernel_case(37, 37, 24, torch.float32, True)),
        "kernel rows!=cols fp32 37x53 D24": ("fp32", lambda: _kernel_case(37, 53, 24, torch.float32, False)),
        "kernel rows!=cols fp32 37x53 D130": ("fp32", lambda: _kernel_case(37, 53, 130, torch.float32, False)),
        "kernel symmetric bf16 37x37 D130": ("bf16", lambda: _kernel_case(37, 37, 130, torch.bfloat16, True)),
        "kernel rows!=cols bf16 37x53 D24": ("bf16", lambda: _kernel_case(37, 53, 24, torch.bfloat16, False)),
        "kernel symmetric fp16 21x21 D24": ("bf16", lambda: _kernel_case(21, 21, 24, torch.float16, True)),
        # D a multiple of the 16-wide slices: the unmasked loads (D = 512 on a GPU), unrolled and not
        "kernel symmetric fp32 37x37 D32 unrolled": ("fp32", lambda: _kernel_case(37, 37, 32, torch.float32, True,
                                                                                  unroll=True)),
        "kernel rows!=cols bf16 37x53 D32": ("bf16", lambda: _kernel_case(37, 53, 32, torch.bfloat16, False)),
        "kernel rows!=cols bf16 37x53 D40 unrolled": ("bf16", lambda: _kernel_case(37, 53, 40, torch.bfloat16, False,
                                                                                   unroll=True)),
        "loss symmetric fp32 smoothing": ("fp32", lambda: _loss_case(37, 24, 0.1, autocast=False)),
        "loss symmetric fp32": ("fp32", lambda: _loss_case(23, 40, 0.0, autocast=False)),
        "loss symmetric bf16 autocast smoothing": ("autocast", lambda: _loss_case(37, 24, 0.1, autocast=True)),
        "loss rows!=cols fp32 smoothing": ("fp32", lambda: _gathered_case(21, 53, 24, 0.1)),
        "loss rows!=cols fp32": ("fp32", lambda: _gathered_case(21, 53, 24, 0.0)),
    }
    results = {}
    for name, (tolerance, run) in cases.items():
        start = time.perf_counter()
        errors = run()
        results[name] = {"tolerance": tolerance, "errors": errors, "seconds": time.perf_counter() - start}
        print(f"{name}: {errors} ({results[name]['seconds']:.1f} s)", flush=True)
    Path(args.out).write_text(json.dumps({"facts": facts, "cases": results}, indent=1))


if __name__ == "__main__":
    main()
