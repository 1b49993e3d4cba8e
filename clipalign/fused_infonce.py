"""Fused Triton kernels for the tiled InfoNCE loss: log-sum-exp of s * rows @ cols.T without the logit matrix.

The logits of a (BLOCK_M, BLOCK_N) block are computed in registers by `tl.dot` (bf16, fp16 or fp32 inputs, fp32
accumulation) and never written to memory, as in flash attention:

- `lse_forward`: per row block, an online log-sum-exp over the column blocks. With `symmetric` (one process: the
  text->image logits are the transpose of the image->text ones) the same pass also leaves, per row block, each
  column's partial maximum and sum of exp, reduced afterwards to the columns' log-sum-exp: both directions of the
  CLIP loss from one pass over the logits.
- `lse_backward`: recomputes each block and its gradient g_ij = g_i p_ij (+ h_j q_ij, the transposed direction's,
  when symmetric) and returns sum_j g_ij cols_j per row (one kernel, looping over column blocks) and
  sum_i g_ij rows_i per column (a second kernel, looping over row blocks), unscaled, in fp32.

Triton is optional: this module imports without it (`available()` is then False) and `clipalign.loss` falls back to
its pure-torch path. On CPU tensors the kernels run only under Triton's interpreter (`TRITON_INTERPRET=1`, set before
triton is imported); there the matrix products take fp32 operands, as the interpreter multiplies bf16 operands as
their raw 16-bit integers.
"""

from __future__ import annotations

import functools
import math

import torch

try:  # optional: not every platform has triton
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a triton that cannot load on this machine
    triton = None
    tl = None

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The kernels work in log2 units, exp(x) = exp2(x * log2(e)) (exp2 is the cheaper instruction), with log2(e) and
# ln(2) written out as literals: a Python global is not a constant inside a Triton kernel.
_LN2 = 0.6931471805599453


def available() -> bool:
    """Whether triton imported, so that the kernels exist."""
    return triton is not None


def supports(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernels can run on `x` with products in `dtype`: CUDA, or CPU under Triton's interpreter."""
    return available() and dtype in KERNEL_DTYPES and (x.is_cuda or (x.device.type == "cpu" and _interpreting()))


def fits(num_rows: int, num_cols: int, dim: int) -> bool:
    """Whether the features' element offsets fit the kernels' 32-bit arithmetic (B * D < 2**31)."""
    return max(num_rows, num_cols) * max(dim, 1) < 2**31


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """acc + a @ b; UPCAST (interpreter) multiplies fp32 copies, exact for bf16/fp16 values."""
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _load_slice(ptr, idx, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows `idx` (always in range) of a contiguous (., D) matrix, columns offs_d (zero past D); (len, BLOCK_D)."""
        if D % BLOCK_D == 0:  # no mask at all: masks cost registers and block vectorised loads
            return tl.load(ptr + idx[:, None] * D + offs_d[None, :])
        return tl.load(ptr + idx[:, None] * D + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)

    @triton.jit
    def _block_dots(rows_ptr, cols_ptr, idx_m, idx_n, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL_D: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr):
        """rows[idx_m] @ cols[idx_n].T in fp32, over D in BLOCK_D slices (D up to thousands); (BLOCK_M, BLOCK_N).

        UNROLL_D unrolls the slices, which leaves the loop over blocks innermost (pipelined, and loop-invariant row
        loads hoisted) at the price of shared memory: a pipeline stage then holds all of D (see the candidates).
        """
        dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if UNROLL_D:
            for d0 in tl.static_range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                a = _load_slice(rows_ptr, idx_m, offs_d, D, BLOCK_D)  # (BLOCK_M, BLOCK_D)
                b = _load_slice(cols_ptr, idx_n, offs_d, D, BLOCK_D)  # (BLOCK_N, BLOCK_D)
                dots = _mma(a, tl.trans(b), dots, UPCAST, PRECISION)
        else:
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                a = _load_slice(rows_ptr, idx_m, offs_d, D, BLOCK_D)
                b = _load_slice(cols_ptr, idx_n, offs_d, D, BLOCK_D)
                dots = _mma(a, tl.trans(b), dots, UPCAST, PRECISION)
        return dots

    @triton.jit
    def _block_grad(rows_ptr, cols_ptr, scale_ptr, lse_r_ptr, g_r_ptr, lse_c_ptr, g_c_ptr, offs_m, offs_n, M, N,
                    D: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, UNROLL_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """d loss / d logit of one block, recomputed: g_i p_ij (+ h_j q_ij), zero outside the matrix; fp32."""
        idx_m, idx_n = offs_m % M, offs_n % N  # past the edge, read valid rows again: no masked loads
        scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634  # logits in log2 units
        z2 = _block_dots(rows_ptr, cols_ptr, idx_m, idx_n, D, BLOCK_M, BLOCK_N, BLOCK_D, UNROLL_D, UPCAST,
                         PRECISION) * scale2  # (BLOCK_M, BLOCK_N)
        lse_r = tl.load(lse_r_ptr + idx_m) * 1.4426950408889634
        grad = tl.exp2(z2 - lse_r[:, None]) * tl.load(g_r_ptr + idx_m)[:, None]
        if SYMMETRIC:
            lse_c = tl.load(lse_c_ptr + idx_n) * 1.4426950408889634
            grad += tl.exp2(z2 - lse_c[None, :]) * tl.load(g_c_ptr + idx_n)[None, :]
        return tl.where((offs_m < M)[:, None] & (offs_n < N)[None, :], grad, 0.0)

    @triton.jit
    def _lse_fwd_kernel(rows_ptr, cols_ptr, scale_ptr, lse_ptr, col_max_ptr, col_sum_ptr, M, N, D: tl.constexpr,
                        SYMMETRIC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL_D: tl.constexpr):
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < M
        idx_m = offs_m % M
        scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
        running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # in log2 units
        running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            z2 = _block_dots(rows_ptr, cols_ptr, idx_m, offs_n % N, D, BLOCK_M, BLOCK_N, BLOCK_D, UNROLL_D, UPCAST,
                             PRECISION) * scale2  # (BLOCK_M, BLOCK_N)
            z_rows = tl.where(col_ok[None, :], z2, float("-inf"))  # every block has a valid column: max is finite
            new_max = tl.maximum(running_max, tl.max(z_rows, axis=1))
            running_sum = running_sum * tl.exp2(running_max - new_max) + tl.sum(tl.exp2(z_rows - new_max[:, None]),
                                                                                axis=1)
            running_max = new_max
            if SYMMETRIC:  # the transposed direction: this row block's share of every column's sum
                z_cols = tl.where(row_ok[:, None], z2, float("-inf"))  # every block has a valid row
                col_max = tl.max(z_cols, axis=0)  # (BLOCK_N,)
                col_sum = tl.sum(tl.exp2(z_cols - col_max[None, :]), axis=0)
                partial = pid.to(tl.int64) * N  # (row blocks, N) can pass 2**31 elements
                tl.store(col_max_ptr + partial + offs_n, col_max, mask=col_ok)
                tl.store(col_sum_ptr + partial + offs_n, col_sum, mask=col_ok)
        lse = (running_max + tl.log2(running_sum)) * 0.6931471805599453
        tl.store(lse_ptr + offs_m, lse, mask=row_ok)

    @triton.jit
    def _grad_rows_kernel(rows_ptr, cols_ptr, scale_ptr, lse_r_ptr, g_r_ptr, lse_c_ptr, g_c_ptr, out_ptr, M, N,
                          D: tl.constexpr, SYMMETRIC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DO: tl.constexpr, UNROLL_D: tl.constexpr):
        """out[i, d-slice] = sum_j grad_ij cols[j, d-slice] for one row block and one BLOCK_DO slice of D."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            grad = _block_grad(rows_ptr, cols_ptr, scale_ptr, lse_r_ptr, g_r_ptr, lse_c_ptr, g_c_ptr, offs_m, offs_n,
                               M, N, D, SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_D, UNROLL_D, UPCAST,
                               PRECISION)  # (BLOCK_M, BLOCK_N)
            v = _load_slice(cols_ptr, offs_n % N, offs_o, D, BLOCK_DO)  # (BLOCK_N, BLOCK_DO)
            acc = _mma(grad.to(v.dtype), v, acc, UPCAST, PRECISION)  # rounded to the inputs' dtype like torch's
        tl.store(out_ptr + offs_m[:, None] * D + offs_o[None, :], acc, mask=(offs_m < M)[:, None] & (offs_o < D))

    @triton.jit
    def _grad_cols_kernel(rows_ptr, cols_ptr, scale_ptr, lse_r_ptr, g_r_ptr, lse_c_ptr, g_c_ptr, out_ptr, M, N,
                          D: tl.constexpr, SYMMETRIC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DO: tl.constexpr, UNROLL_D: tl.constexpr):
        """out[j, d-slice] = sum_i grad_ij rows[i, d-slice] for one column block and one BLOCK_DO slice of D."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            grad = _block_grad(rows_ptr, cols_ptr, scale_ptr, lse_r_ptr, g_r_ptr, lse_c_ptr, g_c_ptr, offs_m, offs_n,
                               M, N, D, SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_D, UNROLL_D, UPCAST,
                               PRECISION)  # (BLOCK_M, BLOCK_N)
            u = _load_slice(rows_ptr, offs_m % M, offs_o, D, BLOCK_DO)  # (BLOCK_M, BLOCK_DO)
            acc = _mma(tl.trans(grad.to(u.dtype)), u, acc, UPCAST, PRECISION)
        tl.store(out_ptr + offs_n[:, None] * D + offs_o[None, :], acc, mask=(offs_n < N)[:, None] & (offs_o < D))

    _KERNELS = {"fwd": _lse_fwd_kernel, "rows": _grad_rows_kernel, "cols": _grad_cols_kernel}


# Block sizes. The interpreter runs one small fixed configuration (tiny blocks exercise the masking). CUDA autotunes
# per (M, N, D, SYMMETRIC, PRECISION, the tensors' dtypes) on first use among the candidates of the operands' kind
# (`_operands`), less those `_fitting` drops for D and the device's shared memory. Not yet run on a GPU, let alone
# timed: which candidate wins is for the autotuner to say there. What is measured, offline: every candidate below
# compiled for sm_90 (H100/H200), specialised as at run time (16-byte aligned pointers, sizes multiples of 16), at
# D = 512, 768 and 1024 in both modes, takes at most 192 KB of shared memory (an H100/H200 block may have 227 KB)
# and spills no register; tests/test_fused_infonce.py::test_every_config_fits_hopper repeats it for bf16 and for
# one fp32 case per precision. That alignment lets Triton pipeline the loads: the buffers are num_stages copies of
# a BLOCK_D slice of a row block and a column block, whatever D is. UNROLL_D (the D loop unrolled, the block loop
# innermost) pipelines whole rows instead, all of D per stage: 256 KB to 1.5 MB at D = 512-1024, so it appears here
# with one stage only (then, in the asymmetric forward, the row block stays in shared memory: BLOCK_M x D).
# Kinds: bf16/fp16, and fp32 as TF32, run on the tensor cores; fp32 doubles the buffers and the operand registers,
# so its list leaves out the 16-bit candidates that spilled or outgrew the device with it. fp32 "ieee" (torch's
# default for fp32 matmuls) runs on the FMA units, which hold whole operand slices in registers: with the 16-bit
# candidates nearly every kernel spilled (up to 10 KB), so its candidates take thin slices (BLOCK_D 16 or 32) and
# small blocks.
# Every forward BLOCK_M is >= 64: lse_forward sizes its column partials for that.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "BLOCK_DO": 16, "UNROLL_D": False}
_FWD_CONFIGS = {  # BLOCK_M, BLOCK_N, BLOCK_D, UNROLL_D, warps, stages
    "16-bit": [(128, 128, 64, False, 8, 3), (128, 64, 64, False, 8, 3), (64, 128, 64, False, 4, 4),
               (64, 64, 64, True, 4, 1)],
    "tf32": [(128, 128, 64, False, 8, 3), (128, 64, 64, False, 8, 3), (64, 128, 64, False, 4, 4),
             (64, 64, 64, False, 4, 3)],
    "ieee": [(64, 64, 16, False, 4, 2), (64, 64, 16, False, 8, 2), (128, 128, 16, False, 8, 2),
             (64, 64, 32, False, 4, 2)],
}
_BWD_CONFIGS = {  # own block, looped block, BLOCK_D, BLOCK_DO, UNROLL_D, warps, stages
    "16-bit": [(64, 64, 64, 256, False, 8, 3), (64, 128, 64, 256, False, 8, 3), (128, 64, 64, 128, False, 8, 3),
               (64, 64, 64, 512, False, 16, 2), (64, 64, 64, 256, True, 8, 1)],
    "tf32": [(64, 64, 64, 256, False, 8, 3), (64, 64, 32, 256, False, 8, 3), (64, 32, 64, 256, False, 8, 3),
             (128, 64, 32, 128, False, 8, 3), (64, 64, 64, 256, True, 8, 1)],
    "ieee": [(64, 64, 16, 128, False, 8, 2), (32, 32, 16, 128, False, 4, 2), (64, 16, 16, 256, False, 8, 2),
             (64, 32, 16, 128, False, 8, 2)],
}
_KINDS = ("16-bit", "tf32", "ieee")
_SCRATCH = 2048  # bytes of shared memory beside the buffers (barriers, the reductions' exchange), measured <= 2 KB
_tuned: dict[str, object] = {}


def _operands(dtype: torch.dtype, precision: str) -> str:
    """The kind of operands the products take, which picks the candidate configurations: 16-bit, tf32 or ieee."""
    if dtype == torch.float32:
        return precision
    return "16-bit"


def _candidates(name: str, kind: str) -> list:
    """The candidate configurations (triton.Config) of kernel `name` ("fwd", "rows" or "cols") for `kind`."""
    if name == "fwd":
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d, "UNROLL_D": u}, num_warps=w, num_stages=s)
                for m, n, d, u, w, s in _FWD_CONFIGS[kind]]
    own, loop = ("BLOCK_M", "BLOCK_N") if name == "rows" else ("BLOCK_N", "BLOCK_M")
    return [triton.Config({own: a, loop: b, "BLOCK_D": d, "BLOCK_DO": o, "UNROLL_D": u}, num_warps=w, num_stages=s)
            for a, b, d, o, u, w, s in _BWD_CONFIGS[kind]]


def _shared_bytes(name: str, config, dim: int, element_size: int, symmetric: bool) -> int:
    """An upper bound of the shared memory kernel `name` takes with `config` (a triton.Config) at width `dim`.

    The buffers Triton allocates, as read off compiles for sm_90 (tests/test_fused_infonce.py checks the bound
    against every candidate): the pipeline's `num_stages` copies of one slice of a row block and a column block;
    with UNROLL_D and several stages, copies of all of D instead; in the backward kernels, the larger of that, the
    second product's operands (the block's gradient and a slice of the other side) and the fp32 accumulator on its
    way out. Against the compiles of every candidate at D = 512, 768 and 1024: 2 KB over for most, 10-18 KB over
    for the one-stage unrolled ones, up to 46 KB over for "ieee" (its products do not stage their operands).
    """
    meta, stages, size = config.kwargs, max(config.num_stages, 1), element_size
    m, n, d = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_D"]
    width = d * -(-dim // d)  # D in whole slices
    unrolled = meta["UNROLL_D"] and stages > 1
    slices = stages * (m + n) * (width if unrolled else d) * size
    if name == "fwd":
        if meta["UNROLL_D"] and not symmetric:  # no store in its loop: the row block is loaded once and kept
            slices += m * width * size
        return slices + _SCRATCH
    out = meta["BLOCK_DO"]
    loop = n if name == "rows" else m
    if unrolled:  # the second product's operands are staged with the slices
        return slices + (stages * loop * out + m * n) * size + _SCRATCH
    second = (m * n + loop * out) * size
    accumulator = (m if name == "rows" else n) * out * 4
    return max(slices, second, accumulator) + _SCRATCH


def _fitting(name: str, candidates: list, dim: int, element_size: int, symmetric: bool, max_shared: int) -> list:
    """The candidates worth compiling at width `dim` on a device with `max_shared` bytes of shared memory per block.

    Drops those whose D slices exceed D (masked work only) and those whose `_shared_bytes` exceed `max_shared` (they
    would compile only to fail at launch); if none is left, keeps the one that needs the least shared memory.
    """
    width = triton.next_power_of_2(max(dim, 16))

    def shared(config) -> int:
        return _shared_bytes(name, config, dim, element_size, symmetric)

    kept = [c for c in candidates if c.kwargs["BLOCK_D"] <= width and c.kwargs.get("BLOCK_DO", 0) <= max(width, 128)
            and shared(c) <= max_shared]
    return kept or [min(candidates, key=shared)]


def _max_shared(device: torch.device) -> int:
    """Bytes of shared memory a block may use on `device` (the opt-in maximum, as Triton checks at launch)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def _prune(name: str, candidates: list, named_args: dict, max_shared: int | None = None, **kwargs) -> list:
    """The autotuner's early prune: the candidates of the call's kind of operands that fit the call and the device.

    `named_args` holds the call's positional arguments, `kwargs` its keywords (SYMMETRIC, PRECISION, ...); the
    device's shared memory is read from the device of the features unless `max_shared` gives it.
    """
    rows = named_args["rows_ptr"]
    mine = {_config_key(c) for c in _candidates(name, _operands(rows.dtype, kwargs["PRECISION"]))}
    if max_shared is None:
        max_shared = _max_shared(rows.device)
    return _fitting(name, [c for c in candidates if _config_key(c) in mine], int(named_args["D"]), rows.element_size(),
                    bool(kwargs["SYMMETRIC"]), max_shared)


def _config_key(config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


def _cuda_kernel(name: str):
    """The autotuned launcher of one kernel, built on first use (autotuning needs a GPU).

    It holds the candidates of every kind of operands; the prune keeps the call's own.
    """
    if name not in _tuned:
        candidates = {}
        for kind in _KINDS:
            candidates.update((_config_key(c), c) for c in _candidates(name, kind))
        key = ["M", "N", "D", "SYMMETRIC", "PRECISION"]  # and, added by triton, the tensors' dtypes
        prune = functools.partial(_prune, name)
        _tuned[name] = triton.autotune(configs=list(candidates.values()), key=key,
                                       prune_configs_by={"early_config_prune": prune})(_KERNELS[name])
    return _tuned[name]


def _precision(x: torch.Tensor) -> str:
    """fp32 products as torch's CUDA matmuls do them: TF32 only where torch allows it (it is the default for, and
    has no effect on, bf16 and fp16 operands)."""
    if x.dtype == torch.float32 and x.is_cuda and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch(name: str, grid_of, args: tuple, x: torch.Tensor, fixed: tuple | None = None, **constexprs):
    """Run kernel `name` on `grid_of(meta)`: autotuned on CUDA, with the fixed small blocks in the interpreter.

    `fixed`, a (triton.Config, precision) pair, launches that configuration instead, on CUDA or in the interpreter
    (check_every_config). Returns what triton's launch returns: the compiled kernel on CUDA.
    """
    upcast = not x.is_cuda  # only the interpreter runs CPU tensors
    config, precision = fixed if fixed is not None else (None, _precision(x))
    flags = {**constexprs, "UPCAST": upcast, "PRECISION": precision}
    if config is None and upcast:
        meta = dict(_INTERPRETER_BLOCKS)
        if name == "fwd":
            del meta["BLOCK_DO"]
        return _KERNELS[name][grid_of(meta)](*args, **flags, **meta)
    if upcast:
        return _KERNELS[name][grid_of(config.kwargs)](*args, **flags, **config.kwargs)
    with torch.cuda.device(x.device):
        if config is None:
            return _cuda_kernel(name)[grid_of](*args, **flags)
        return _KERNELS[name][grid_of(config.kwargs)](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                                                      num_stages=config.num_stages)


def _check_sizes(num_rows: int, num_cols: int, dim: int) -> None:
    if not fits(num_rows, num_cols, dim):
        raise ValueError(f"fused InfoNCE kernels: {max(num_rows, num_cols)} x {dim} features pass their 32-bit "
                         "offsets; use tiled_kernel torch")


def lse_forward(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor,
                symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-sum-exp of s * rows @ cols.T over its rows (B_rows,) and, if `symmetric`, over its columns (B_cols,); fp32.

    Args:
        rows, cols: (B_rows, D) and (B_cols, D), in the dtype the products run in (fp32, bf16 or fp16).
        scale: the logit scale s, a one-element tensor on the same device (read by the kernel: no host sync).
        symmetric: also return the columns' log-sum-exp, from the same pass.
    """
    lse_rows, lse_cols, _ = _lse_forward(rows, cols, scale, symmetric)
    return lse_rows, lse_cols


def _lse_forward(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, symmetric: bool,
                 fixed: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None, object]:
    """lse_forward, and the compiled kernel where triton returns it; `fixed` as in _launch."""
    rows, cols = rows.contiguous(), cols.contiguous()
    (num_rows, dim), num_cols = rows.shape, cols.shape[0]
    _check_sizes(num_rows, num_cols, dim)
    scale = scale.reshape(1).contiguous()
    lse_rows = torch.empty(num_rows, dtype=torch.float32, device=rows.device)  # (B_rows,)
    if fixed is not None:
        smallest = fixed[0].kwargs["BLOCK_M"]
    elif not rows.is_cuda:
        smallest = _INTERPRETER_BLOCKS["BLOCK_M"]
    else:
        smallest = min(c[0] for kind in _FWD_CONFIGS.values() for c in kind)
    row_blocks_max = math.ceil(num_rows / smallest)  # room for the partials of any configuration's row blocks
    shape = (row_blocks_max, num_cols) if symmetric else (1,)
    col_max = torch.empty(shape, dtype=torch.float32, device=rows.device)  # (row blocks, B_cols), log2 units
    col_sum = torch.empty(shape, dtype=torch.float32, device=rows.device)
    used = {}

    def grid(meta):
        used["BLOCK_M"] = meta["BLOCK_M"]
        return (triton.cdiv(num_rows, meta["BLOCK_M"]),)

    kernel = _launch("fwd", grid, (rows, cols, scale, lse_rows, col_max, col_sum, num_rows, num_cols, dim), rows,
                     fixed, SYMMETRIC=symmetric)
    if not symmetric:
        return lse_rows, None, kernel
    blocks = triton.cdiv(num_rows, used["BLOCK_M"])  # the row blocks the chosen configuration wrote
    col_max, col_sum = col_max[:blocks], col_sum[:blocks]  # (row blocks, B_cols)
    top = col_max.amax(dim=0)  # (B_cols,)
    lse_cols = (top + torch.log2((col_sum * torch.exp2(col_max - top)).sum(dim=0))) * _LN2
    return lse_rows, lse_cols, kernel


def lse_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    lse_rows: torch.Tensor,
    grad_rows: torch.Tensor,
    lse_cols: torch.Tensor | None = None,
    grad_cols: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_j G_ij cols_j per row and sum_i G_ij rows_i per column, (B_rows, D) and (B_cols, D) in fp32.

    G_ij = grad_rows_i * exp(z_ij - lse_rows_i) (+ grad_cols_j * exp(z_ij - lse_cols_j) when `lse_cols` is given) is
    the gradient of sum_i grad_rows_i lse_rows_i (+ sum_j grad_cols_j lse_cols_j) with respect to the logits
    z = s * rows @ cols.T. The features' gradients are s times the two results; the scale's is rows . (first result).
    """
    args = _backward_args(rows, cols, scale, lse_rows, grad_rows, lse_cols, grad_cols)
    symmetric = lse_cols is not None
    return _grad_sum("rows", args, symmetric)[0], _grad_sum("cols", args, symmetric)[0]


def _backward_args(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, lse_rows: torch.Tensor,
                   grad_rows: torch.Tensor, lse_cols: torch.Tensor | None, grad_cols: torch.Tensor | None) -> tuple:
    """The backward kernels' tensor arguments: contiguous, the vectors in fp32 (the columns' are the rows' when
    not symmetric: never read)."""
    rows, cols = rows.contiguous(), cols.contiguous()
    _check_sizes(rows.shape[0], cols.shape[0], rows.shape[1])
    f32 = dict(dtype=torch.float32, device=rows.device)
    lse_rows, grad_rows = lse_rows.to(**f32).contiguous(), grad_rows.to(**f32).contiguous()
    if lse_cols is not None:
        lse_cols, grad_cols = lse_cols.to(**f32).contiguous(), grad_cols.to(**f32).contiguous()
    else:
        lse_cols = grad_cols = lse_rows
    return rows, cols, scale.reshape(1).contiguous(), lse_rows, grad_rows, lse_cols, grad_cols


def _grad_sum(name: str, args: tuple, symmetric: bool, fixed: tuple | None = None) -> tuple[torch.Tensor, object]:
    """One backward kernel's result, (B_rows, D) for "rows" or (B_cols, D) for "cols" in fp32, and the compiled
    kernel where triton returns it; `args` from _backward_args, `fixed` as in _launch."""
    rows, cols = args[0], args[1]
    (num_rows, dim), num_cols = rows.shape, cols.shape[0]
    own, block = (num_rows, "BLOCK_M") if name == "rows" else (num_cols, "BLOCK_N")
    out = torch.empty(own, dim, dtype=torch.float32, device=rows.device)  # (B_own, D)
    kernel = _launch(name, lambda meta: (triton.cdiv(own, meta[block]), triton.cdiv(dim, meta["BLOCK_DO"])),
                     (*args, out, num_rows, num_cols, dim), rows, fixed, SYMMETRIC=symmetric)
    return out, kernel


def check_every_config(device: str | torch.device, dims: tuple[int, ...] = (512,), dtype: torch.dtype = torch.bfloat16,
                       rows: int = 1024, cols: int = 1000, precision: str | None = None,
                       symmetric: tuple[bool, ...] = (True, False), seed: int = 0) -> list[dict]:
    """Launch every candidate configuration of every kernel once, without autotuning, against float64 torch.

    For the check on a GPU: each kernel runs each candidate of the operands' kind, also those the autotuner's prune
    would drop (a failure there confirms the shared-memory estimate), on random L2-normalised features rounded to
    `dtype`. The reference is torch in float64 on the same rounded features; the backward kernels are fed its
    log-sum-exp, so each kernel is judged alone. A launch that faults the device leaves CUDA unusable in this
    process: every launch after it then reports an error too, so the first error is the one to read.

    Args:
        device: "cuda", "cuda:N", or "cpu" under Triton's interpreter (TRITON_INTERPRET=1 set before triton imports).
        dims: the feature widths D to check.
        dtype: the features' dtype, which the products take (fp32, bf16 or fp16).
        rows, cols: B_rows and B_cols.
        precision: fp32 only: "tf32" or "ieee" (default: what the loss would use here, after torch's allow_tf32).
        symmetric: the kernels' modes to check (one process, or rows against gathered columns).
        seed: of the features and of the incoming gradients.

    Returns:
        One dict per kernel ("fwd", "rows", "cols"), configuration, D and mode: `config` (its block sizes,
        num_warps, num_stages), `kind`, `dim`, `symmetric`, `ok`, `error` (the exception's text, or None),
        `max_abs_error` and `max_abs_reference` per output ("lse rows", "lse cols"; "rows"; "cols"),
        `shared_estimate` (bytes), `kept` (whether the autotuner would keep it on this device; None off CUDA), and
        `shared`, `registers`, `spills` as the compiled kernel reports them (None where triton does not: interpreter).
    """
    if not available():
        raise RuntimeError("triton is not importable")
    device = torch.device(device)
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"{device}: the kernels run on CUDA, or on CPU with TRITON_INTERPRET=1 set before triton is "
                         "imported")
    if precision is None:
        precision = _precision(torch.empty(0, dtype=dtype, device=device))
    kind = _operands(dtype, precision)
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([20.0], device=device)
    grads = torch.randn(rows, generator=gen).to(device), torch.randn(cols, generator=gen).to(device)
    results = []
    for dim in dims:
        u = torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=-1).to(device, dtype)
        v = torch.nn.functional.normalize(torch.randn(cols, dim, generator=gen), dim=-1).to(device, dtype)
        for sym in symmetric:
            ref = _reference(u, v, scale, *grads, sym)
            args = _backward_args(u, v, scale, ref["lse rows"].float(), grads[0],
                                  ref["lse cols"].float() if sym else None, grads[1] if sym else None)
            for name in ("fwd", "rows", "cols"):
                candidates = _candidates(name, kind)
                kept = (_fitting(name, candidates, dim, u.element_size(), sym, _max_shared(device))
                        if device.type == "cuda" else None)
                for config in candidates:
                    if name == "fwd":
                        run = functools.partial(_lse_forward, u, v, scale, sym, (config, precision))
                        names = ("lse rows", "lse cols") if sym else ("lse rows",)
                    else:
                        run = functools.partial(_grad_sum, name, args, sym, (config, precision))
                        names = (name,)
                    row = {"kernel": name, "config": {**config.kwargs, "num_warps": config.num_warps,
                                                      "num_stages": config.num_stages},
                           "kind": kind, "dtype": str(dtype).removeprefix("torch."), "precision": precision,
                           "dim": dim, "symmetric": sym, "rows": rows, "cols": cols,
                           "shared_estimate": _shared_bytes(name, config, dim, u.element_size(), sym),
                           "kept": None if kept is None else any(c is config for c in kept)}
                    results.append({**row, **_run_one(run, names, ref)})
    return results


def _reference(u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, grad_rows: torch.Tensor,
               grad_cols: torch.Tensor, symmetric: bool) -> dict[str, torch.Tensor]:
    """What the kernels compute, in float64: both log-sum-exps and both sums of the gradient G (lse_backward)."""
    u, v = u.double(), v.double()
    z = scale.double() * u @ v.T  # (B_rows, B_cols)
    lse_rows, lse_cols = z.logsumexp(dim=1), z.logsumexp(dim=0)
    grad = grad_rows.double()[:, None] * torch.exp(z - lse_rows[:, None])
    if symmetric:
        grad += grad_cols.double()[None, :] * torch.exp(z - lse_cols[None, :])
    return {"lse rows": lse_rows, "lse cols": lse_cols, "rows": grad @ v, "cols": grad.T @ u}


def _run_one(run, names: tuple[str, ...], ref: dict[str, torch.Tensor]) -> dict:
    """Launch once; its errors against `ref` for `names`, or the exception's text; what the compiler reports."""
    out = {"ok": False, "error": None, "max_abs_error": {}, "max_abs_reference": {}, "shared": None,
           "registers": None, "spills": None}
    try:
        *values, kernel = run()
        if values[0].is_cuda:
            torch.cuda.synchronize(values[0].device)  # a fault of the launch surfaces here, not in a later one
    except Exception as error:  # a compile or launch failure is a result to report
        out["error"] = f"{type(error).__name__}: {error}"[-2000:]
        return out
    for key, value in zip(names, values):
        out["max_abs_error"][key] = (value.double() - ref[key]).abs().max().item()
        out["max_abs_reference"][key] = ref[key].abs().max().item()
    metadata = getattr(kernel, "metadata", None)
    out.update(ok=True, shared=getattr(metadata, "shared", None), registers=getattr(kernel, "n_regs", None),
               spills=getattr(kernel, "n_spills", None))
    return out
