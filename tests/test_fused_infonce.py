"""clipalign.fused_infonce: the Triton kernels of the tiled loss, run on CPU by Triton's interpreter.

TRITON_INTERPRET=1 only takes effect if it is set before triton is imported, so the kernels run in a fresh process
(tests/fused_infonce_check.py), once per module; each test below checks one of its cases. Relative errors are
max |ours - reference| / max |reference|.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipalign.loss import ContrastiveLoss

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "tests" / "fused_infonce_check.py"
# fp32: against fp64 autograd or the fp32 torch paths, only summation order differs (~1e-6 seen).
# bf16 (and fp16) inputs, against fp64 on the same rounded inputs: the products are exact and the log-sum-exp is
# fp32 (~1e-7 seen), but the backward rounds each block's probabilities to the inputs' dtype before its matrix
# products, as the torch path does (~5e-3 seen).
# autocast: ContrastiveLoss under bf16 autocast against mode dense under the same autocast, which also rounds its
# logits to bf16 (~8e-3 seen); the bound of test_loss.py's autocast test.
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "autocast": 2e-2}
LSE_TOLERANCE = 1e-5  # every dtype: the forward's fp32 sums of exact products

CASES = [
    "kernel symmetric fp32 37x37 D24",
    "kernel rows!=cols fp32 37x53 D24",
    "kernel rows!=cols fp32 37x53 D130",
    "kernel symmetric bf16 37x37 D130",
    "kernel rows!=cols bf16 37x53 D24",
    "kernel symmetric fp16 21x21 D24",
    "kernel symmetric fp32 37x37 D32 unrolled",
    "kernel rows!=cols bf16 37x53 D32",
    "kernel rows!=cols bf16 37x53 D40 unrolled",
    "loss symmetric fp32 smoothing",
    "loss symmetric fp32",
    "loss symmetric bf16 autocast smoothing",
    "loss rows!=cols fp32 smoothing",
    "loss rows!=cols fp32",
]

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fused") / "errors.json"
    proc = subprocess.run([sys.executable, str(CHECK), "--out", str(out)], env=_env(TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@needs_triton
def test_the_interpreter_runs_the_kernels(interpreted):
    facts = interpreted["facts"]
    assert facts == {"TRITON_INTERPRET": "1", "triton": True, "kernels chosen on CPU": True}
    assert set(interpreted["cases"]) == set(CASES)


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_the_references(interpreted, case):
    result = interpreted["cases"][case]
    tolerance = TOLERANCE[result["tolerance"]]
    for name, error in result["errors"].items():
        if name == "|d bias|":  # a bias on every logit cancels out of every softmax
            assert error < 1e-6, (case, name, error)
            continue
        bound = LSE_TOLERANCE if name.startswith("lse") else tolerance
        assert error <= bound, f"{case}: {name} off by {error:.2e} (bound {bound:.0e})"


def test_auto_on_cpu_stays_pure_torch_without_importing_triton():
    code = ("import sys, torch; from clipalign.loss import ContrastiveLoss; "
            "x = torch.nn.functional.normalize(torch.randn(9, 8), dim=-1); "
            "ContrastiveLoss('tiled')(x, x.flip(0), torch.tensor(10.0)); "
            "assert 'clipalign.fused_infonce' not in sys.modules")
    env = _env()
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="the interpreter is on here")
def test_forcing_triton_where_it_cannot_run_says_why():
    x = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    with pytest.raises(RuntimeError, match="tiled_kernel=triton cannot run here"):
        ContrastiveLoss("tiled", tiled_kernel="triton")(x, x, torch.tensor(10.0))
    with pytest.raises(ValueError, match="tiled_kernel 'cuda' is not one of auto, torch, triton"):
        ContrastiveLoss("tiled", tiled_kernel="cuda")


def _compile_for_hopper(kernel: str, dtype: str, dim: int, symmetric: bool, precision: str):
    """Compile one kernel with its first CUDA configuration for sm_90 (an H100/H200), offline: no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from clipalign import fused_infonce as fi

    fn = {"fwd": fi._lse_fwd_kernel, "rows": fi._grad_rows_kernel, "cols": fi._grad_cols_kernel}[kernel]
    if kernel == "fwd":
        m, n, d, unroll, warps, stages = fi._FWD_CONFIGS[0]
        blocks = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d}
    else:
        own, loop, d, out, unroll, warps, stages = fi._BWD_CONFIGS[0]
        m, n = (own, loop) if kernel == "rows" else (loop, own)
        blocks = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d, "BLOCK_DO": out}
    constexprs = {"D": dim, "SYMMETRIC": symmetric, "UPCAST": False, "PRECISION": precision, "UNROLL_D": unroll,
                  **blocks}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("rows_ptr", "cols_ptr"):
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "*fp32" if name.endswith("_ptr") else "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "dim", "symmetric", "precision"), [
    ("bf16", 512, True, "tf32"),  # the measured case: one process, bf16, D = 512
    ("fp32", 130, False, "ieee"),  # D not a multiple of the blocks (masked slices), full fp32 products
])
def test_kernels_compile_for_hopper(dtype, dim, symmetric, precision):
    # the interpreter checks the math, not what only the GPU compiler sees (layouts, wgmma, registers, shared memory)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the interpreter is on here")
    pytest.importorskip("triton.backends.nvidia")
    for kernel in ("fwd", "rows", "cols"):
        compiled = _compile_for_hopper(kernel, dtype, dim, symmetric, precision)
        assert "cubin" in compiled.asm, kernel
        assert compiled.metadata.shared <= 227 * 1024, (kernel, compiled.metadata.shared)  # an H100/H200 SM's limit
