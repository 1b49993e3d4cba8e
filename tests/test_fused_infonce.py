"""clipalign.fused_infonce: the Triton kernels of the tiled loss, on CPU under Triton's interpreter, compiled for sm_90.

TRITON_INTERPRET=1 only takes effect if it is set before triton is imported, so the kernels run in a fresh process
(tests/fused_infonce_check.py), once per module; each test below checks one of its cases. Relative errors are
max |ours - reference| / max |reference|. The offline compiles for an H100/H200 check what the interpreter cannot:
each autotuning candidate's shared memory and registers.
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


HOPPER_SHARED = 227 * 1024  # the shared memory one block of an H100/H200 may opt in to
# (dtype of the features, the products' precision, D, symmetric) compiled for sm_90: bf16 at the widths CLIP models
# use, both modes; fp32 (as TF32, and "ieee" on the FMA units) once each, at D = 768 without symmetry, where fp32
# candidates tried earlier spilled that kept their registers at D = 512 with symmetry (the fp32 lists were compiled
# at every width and mode when they were chosen; this keeps the test near a minute on two cores)
HOPPER_CASES = [("bf16", "tf32", dim, symmetric) for dim in (512, 768, 1024) for symmetric in (True, False)]
HOPPER_CASES += [("fp32", "tf32", 768, False), ("fp32", "ieee", 768, False)]
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _compile_for_hopper(job: tuple) -> dict:
    """Compile one kernel with one configuration for sm_90 (an H100/H200), offline: no GPU needed.

    Specialised as Triton does at run time for 16-byte aligned pointers and sizes that are multiples of 16 (the
    `tt.divisibility` attributes), which is what lets it vectorise, pipeline and so allocate shared memory. Returns
    the shared memory and the stack frame: ptxas puts spilled registers there, so 0 means nothing spilled.
    """
    import re
    import tempfile

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from clipalign import fused_infonce as fi

    name, meta, warps, stages, dtype, dim, symmetric, precision = job
    fn = fi._KERNELS[name]
    constexprs = {"D": dim, "SYMMETRIC": symmetric, "UPCAST": False, "PRECISION": precision, **meta}
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        if arg in ("rows_ptr", "cols_ptr"):
            signature[arg] = f"*{dtype}"
        else:
            signature[arg] = "*fp32" if arg.endswith("_ptr") else "i32"
        attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    return {"shared": compiled.metadata.shared, "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "registers": int(re.search(r"REG:(\d+)", usage).group(1))}


@needs_triton
@pytest.mark.slow
def test_every_config_fits_hopper():
    # the interpreter checks the math, not what only the GPU compiler sees (layouts, wgmma, registers, shared memory)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the interpreter is on here")
    pytest.importorskip("triton.backends.nvidia")
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from clipalign import fused_infonce as fi

    jobs, estimates = [], []
    for dtype, precision, dim, symmetric in HOPPER_CASES:
        size = TORCH_DTYPES[dtype].itemsize
        for name in ("fwd", "rows", "cols"):
            candidates = fi._candidates(name, fi._operands(TORCH_DTYPES[dtype], precision))
            kept = fi._fitting(name, candidates, dim, size, symmetric, HOPPER_SHARED)
            if dtype == "bf16":  # at the widths it is for, the whole search survives the prune
                assert len(kept) == len(candidates), (name, dim, symmetric)
            for config in kept:  # what the autotuner can choose on an H100/H200
                jobs.append((name, config.kwargs, config.num_warps, config.num_stages, dtype, dim, symmetric,
                             precision))
                estimates.append(fi._shared_bytes(name, config, dim, size, symmetric))
    # compiling is single-threaded; spawn, not fork: this process may hold threads (torch's)
    with ProcessPoolExecutor(min(4, os.cpu_count() or 1), mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_compile_for_hopper, jobs))
    bad = [f"{job}: {result} (estimate {estimate})" for job, result, estimate in zip(jobs, results, estimates)
           if result["shared"] > HOPPER_SHARED or result["stack"] or result["shared"] > estimate]
    assert not bad, "over the shared memory, spilled, or over the prune's estimate:\n" + "\n".join(bad)


def _kept(name: str, kind: str, dim: int, symmetric: bool, max_shared: int, size: int = 2) -> list[tuple]:
    from clipalign import fused_infonce as fi

    kept = fi._fitting(name, fi._candidates(name, kind), dim, size, symmetric, max_shared)
    return [(tuple(c.kwargs.values()), c.num_warps, c.num_stages) for c in kept]


@needs_triton
def test_the_prune_keeps_what_fits_the_device():
    from clipalign import fused_infonce as fi

    every = {name: len(fi._candidates(name, "16-bit")) for name in ("fwd", "rows", "cols")}
    for name, count in every.items():  # an H100/H200: the whole search, at every width CLIP models use
        for dim in (512, 768, 1024):
            assert len(_kept(name, "16-bit", dim, True, HOPPER_SHARED)) == count, (name, dim)
    # 99 KB, the most a block gets on an L4, A10 or RTX 4090: the backward candidates holding a 64 x 512 fp32
    # accumulator (128 KB) go; the others stay
    assert (64, 64, 64, 512, False) not in [c[0] for c in _kept("rows", "16-bit", 512, True, 99 * 1024)]
    assert len(_kept("rows", "16-bit", 512, True, 99 * 1024)) == every["rows"] - 1
    # fp32 doubles the buffers: on the same device only the forward that holds one stage of 64 x 64 blocks fits
    assert _kept("fwd", "tf32", 512, True, 99 * 1024, size=4) == [((64, 64, 64, False), 4, 3)]
    # the asymmetric unrolled forward keeps its row block (BLOCK_M x D) in shared memory: it leaves at large D
    unrolled = ((64, 64, 64, True), 4, 1)
    assert unrolled in _kept("fwd", "16-bit", 1024, False, HOPPER_SHARED)
    assert unrolled not in _kept("fwd", "16-bit", 2048, False, HOPPER_SHARED)
    assert unrolled in _kept("fwd", "16-bit", 2048, True, HOPPER_SHARED)
    # nothing fits: the least hungry one is still tried, so that the call can run
    assert _kept("fwd", "16-bit", 512, True, 1024) == [unrolled]
    # narrow features: no slice wider than D (masked work only), no BLOCK_DO beyond 128; narrower than every slice,
    # the least hungry candidate alone
    assert _kept("rows", "16-bit", 128, True, HOPPER_SHARED) == [((128, 64, 64, 128, False), 8, 3)]
    assert len(_kept("rows", "16-bit", 32, True, HOPPER_SHARED)) == 1


@needs_triton
@pytest.mark.parametrize(("dtype", "precision", "kind"), [
    (torch.bfloat16, "tf32", "16-bit"), (torch.float16, "ieee", "16-bit"),  # the flag means nothing to 16-bit ones
    (torch.float32, "tf32", "tf32"), (torch.float32, "ieee", "ieee"),
])
def test_the_autotuner_prune_keeps_the_kind_of_operands_of_the_call(dtype, precision, kind):
    from clipalign import fused_infonce as fi

    for name in ("fwd", "rows", "cols"):
        tuned = fi._cuda_kernel(name)  # every kind's candidates; building it needs no GPU, running it does
        named_args = {"rows_ptr": torch.zeros(8, 768, dtype=dtype), "D": 768}
        kept = fi._prune(name, tuned.configs, named_args, SYMMETRIC=False, UPCAST=False, PRECISION=precision,
                         max_shared=HOPPER_SHARED)
        assert {fi._config_key(c) for c in kept} == {fi._config_key(c) for c in fi._candidates(name, kind)}, name
        assert all(c in tuned.configs for c in kept)
    assert {c.kwargs["BLOCK_D"] for c in fi._candidates("rows", "ieee")} == {16}  # FMA products: thin slices


EVERY_CONFIG = """
import json, sys, torch
from clipalign import fused_infonce
rows = []
for dtype, precision, dims in ((torch.bfloat16, None, (48, 128)), (torch.float32, "tf32", (48,)),
                               (torch.float32, "ieee", (48,))):
    rows += fused_infonce.check_every_config("cpu", dims=dims, dtype=dtype, rows=80, cols=70, precision=precision)
with open(sys.argv[1], "w") as f:
    json.dump(rows, f)
"""


@needs_triton
@pytest.mark.slow
def test_check_every_config_launches_each_candidate_in_the_interpreter(tmp_path):
    from clipalign import fused_infonce as fi

    out = tmp_path / "every.json"
    proc = subprocess.run([sys.executable, "-c", EVERY_CONFIG, str(out)], env=_env(TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(out.read_text())
    launched = {(r["kind"], r["kernel"], r["dim"], r["symmetric"], json.dumps(r["config"])) for r in results}
    widths = {"16-bit": 2, "tf32": 1, "ieee": 1}
    expected = sum(len(fi._candidates(name, kind)) * count * 2 for kind, count in widths.items()  # 2 modes
                   for name in ("fwd", "rows", "cols"))
    assert len(results) == len(launched) == expected
    for r in results:
        assert r["ok"] and r["error"] is None, r
        assert r["kept"] is None and r["shared"] is None  # no device to ask, no compiled kernel: the interpreter
        lse = {"lse rows", "lse cols"} if r["symmetric"] else {"lse rows"}
        assert set(r["max_abs_error"]) == (lse if r["kernel"] == "fwd" else {r["kernel"]})
        tolerance = TOLERANCE["fp32" if r["dtype"] == "float32" else "bf16"]
        for name, error in r["max_abs_error"].items():
            bound = LSE_TOLERANCE if name.startswith("lse") else tolerance
            assert error <= bound * r["max_abs_reference"][name], (r["kernel"], r["config"], r["dim"], name, error)
