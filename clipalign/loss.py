"""Contrastive image-text losses, called on each process's local features; gathering across processes is their job.

`ContrastiveLoss` is CLIP's symmetric InfoNCE over the global batch. Its invariant: on N processes under DDP (which
averages parameter gradients over processes) the parameter gradients equal those of one process computing the loss
on the whole global batch. See docs/loss.md for the math and for why neither mode needs a rescaling factor.
`SigmoidLoss` is SigLIP's pairwise sigmoid loss, with the same invariant; its exchange of the other processes'
texts is a ring of neighbour-to-neighbour hops or one all-gather.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from clipalign.config import CONTRASTIVE_MODES, LOSS_KINDS, SIGMOID_EXCHANGES, TILED_KERNELS, ConfigError, LossConfig
from clipalign.distributed import all_gather_with_grad, get_rank, get_world_size, ring_exchange_with_grad

# tile_size=0: tiles sized so that their fp32 blocks (about 3 of (B_local, T) at once) take at most this many bytes,
# and at most a quarter of the columns, so that they hold at most 1/8 of local mode's ~6 (B_local, B_global) blocks
TILE_BUDGET_BYTES = 256 * 2**20
_TILE_BLOCKS = 3
_TILE_ALIGN = 64  # a multiple of the matrix-product blocks of CPU and GPU kernels


def auto_tile_size(num_rows: int, num_cols: int) -> int:
    """Columns per tile for `num_rows` local rows against `num_cols` columns when `tile_size` is 0 (auto)."""
    by_budget = TILE_BUDGET_BYTES // (_TILE_BLOCKS * 4 * max(num_rows, 1))
    by_fraction = -(-num_cols // 4)
    tile = max(_TILE_ALIGN, min(by_budget, by_fraction) // _TILE_ALIGN * _TILE_ALIGN)
    return max(1, min(tile, num_cols))


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP loss) of local features against the features of the whole global batch.

    Modes (identical with one process):
        dense: every process builds the full (B_global, B_global) logit matrix and returns the global loss.
        local: every process builds only its own rows, (B_local, B_global) per direction, and returns the mean loss
            of those rows; the mean of the returned values over processes is the global loss.
        tiled: the value and gradients of local, but the rows meet the columns `tile_size` at a time with an online
            log-sum-exp and the backward recomputes each tile: memory O(B_local * tile_size), not O(B_local * B_global).
            On CUDA with triton installed, fused kernels (`clipalign.fused_infonce`) do the same without any tile
            in memory.

    Args:
        mode: "dense", "local" or "tiled".
        label_smoothing: as in `F.cross_entropy`, applied to each row over its B_global classes.
        gather: False scores the local batch alone (world-size-1 semantics, no collectives), e.g. for a reference.
        tile_size: tiled, pure-torch path: columns of the similarity matrix held at once; 0 sizes them from a
            memory budget (`auto_tile_size`).
        tiled_kernel: tiled only. "auto": pure torch (the fused Triton kernels have not yet run on a GPU; auto will
            choose them on CUDA once they have passed the GPU check there); "torch": always pure torch; "triton":
            always the kernels (an error where they cannot run; on CPU only under TRITON_INTERPRET=1).
    """

    def __init__(self, mode: str = "local", label_smoothing: float = 0.0, gather: bool = True, tile_size: int = 0,
                 tiled_kernel: str = "auto"):
        super().__init__()
        if mode not in CONTRASTIVE_MODES:
            raise ValueError(f"contrastive loss mode {mode!r} is not one of {', '.join(CONTRASTIVE_MODES)}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 0:
            raise ValueError(f"tile_size must be a positive integer (or 0: sized from a memory budget), "
                             f"got {tile_size!r}")
        if tiled_kernel not in TILED_KERNELS:
            raise ValueError(f"tiled_kernel {tiled_kernel!r} is not one of {', '.join(TILED_KERNELS)}")
        self.mode = mode
        self.label_smoothing = label_smoothing
        self.gather = gather
        self.tile_size = tile_size
        self.tiled_kernel = tiled_kernel

    def extra_repr(self) -> str:
        tile = f", tile_size={self.tile_size}, tiled_kernel={self.tiled_kernel!r}" if self.mode == "tiled" else ""
        return f"mode={self.mode!r}, label_smoothing={self.label_smoothing}, gather={self.gather}{tile}"

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """The loss (a scalar) of this process's L2-normalised (B_local, D) features; `logit_scale` is exponentiated.

        dense returns the global loss on every process; local and tiled return this process's share, whose mean over
        processes is the global loss (reduce it with `accelerator.reduce(loss.detach(), "mean")` to log it).
        """
        world_size = get_world_size() if self.gather else 1
        if self.mode == "tiled":
            # One gather per tower rather than one of their concatenation: gloo's all-gather holds a second copy of
            # its output while it runs, so two half-size gathers peak lower, and so do their gradients' buffers.
            gathered = None if world_size == 1 else (
                all_gather_with_grad(image_features), all_gather_with_grad(text_features))  # (B_global, D) each
            if not isinstance(logit_scale, torch.Tensor):
                logit_scale = torch.tensor(logit_scale, dtype=image_features.dtype, device=image_features.device)
            return _tiled_contrastive_loss(image_features, text_features, gathered, logit_scale, logit_bias,
                                           self.label_smoothing, self.tile_size, self.tiled_kernel)

        if world_size == 1:
            all_image, all_text = image_features, text_features
        else:
            all_image, all_text = _gather_features(image_features, text_features)  # (B_global, D) each

        if self.mode == "dense" or world_size == 1:
            logits_per_image = logit_scale * all_image @ all_text.T  # (B_global, B_global)
            if logit_bias is not None:
                logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_image.T  # (B_global, B_global)
            labels = torch.arange(all_image.shape[0], device=image_features.device)  # (B_global,)
        else:
            logits_per_image = logit_scale * image_features @ all_text.T  # (B_local, B_global)
            logits_per_text = logit_scale * text_features @ all_image.T  # (B_local, B_global)
            if logit_bias is not None:
                logits_per_image = logits_per_image + logit_bias
                logits_per_text = logits_per_text + logit_bias
            local_size = image_features.shape[0]
            # our rows sit at rank * B_local in the gathered (rank-ordered) columns
            labels = get_rank() * local_size + torch.arange(local_size, device=image_features.device)  # (B_local,)

        return (
            F.cross_entropy(logits_per_image, labels, label_smoothing=self.label_smoothing)
            + F.cross_entropy(logits_per_text, labels, label_smoothing=self.label_smoothing)
        ) / 2


def _gather_features(image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both towers' features from all processes, with gradient, in one collective (and one batch-size check)."""
    both = all_gather_with_grad(torch.cat([image_features, text_features], dim=1))  # (B_global, D_image + D_text)
    return both.split([image_features.shape[1], text_features.shape[1]], dim=1)


def _tiled_contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    gathered: tuple[torch.Tensor, torch.Tensor] | None,
    scale: torch.Tensor,
    bias: torch.Tensor | float | None,
    label_smoothing: float,
    tile_size: int,
    kernel: str = "torch",
) -> torch.Tensor:
    """This process's share of the CLIP loss, scoring the local rows against the columns a tile at a time.

    `gathered` holds every process's (image, text) features, (B_global, D) each, fresh from the gather and the loss's
    own (the backward overwrites them with their gradient); None scores the local batch alone. Per row, with z its
    logits and eps the label smoothing, `F.cross_entropy` is lse(z) - (1 - eps) * z[label] - eps * mean(z);
    `_TiledInfoNCE` gives lse and mean(z) for both directions and the positive logit z[label] = scale * u_i . v_i.
    A bias added to every logit cancels out; it stays in the graph as in dense and local (DDP expects every parameter
    to get a gradient). `kernel` is ContrastiveLoss's `tiled_kernel`; tile_size 0 is `auto_tile_size`'s.
    """
    all_image, all_text = gathered if gathered is not None else (image, text)
    fused = _use_fused_kernels(kernel, image, _compute_dtype(image), all_text.shape[0])
    if tile_size == 0:
        tile_size = auto_tile_size(image.shape[0], all_text.shape[0])
    lse_image, lse_text, mean_image, mean_text, positive = _TiledInfoNCE.apply(
        image, text, all_image, all_text, scale, tile_size, gathered is not None, fused)  # (B_local,) each
    if bias is not None:
        lse_image, lse_text, mean_image, mean_text, positive = (
            x + bias for x in (lse_image, lse_text, mean_image, mean_text, positive))

    def cross_entropy(lse: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        if label_smoothing == 0:
            return (lse - positive).mean()
        return (lse - (1 - label_smoothing) * positive - label_smoothing * mean).mean()

    return (cross_entropy(lse_image, mean_image) + cross_entropy(lse_text, mean_text)) / 2


def _use_fused_kernels(kernel: str, x: torch.Tensor, dtype: torch.dtype, num_cols: int | None = None) -> bool:
    """Whether the tiled loss runs clipalign.fused_infonce's Triton kernels (see ContrastiveLoss's `tiled_kernel`)."""
    if kernel in ("torch", "auto"):
        # auto: pure torch until the kernels have passed the GPU check (tools/gpu_check.py) on a real GPU; CPU users
        # never import triton on this path
        return False
    from clipalign import fused_infonce

    num_cols = x.shape[0] if num_cols is None else num_cols
    if fused_infonce.supports(x, dtype) and fused_infonce.fits(x.shape[0], num_cols, x.shape[-1]):
        return True
    if kernel == "triton":
        why = ("triton is not importable" if not fused_infonce.available() else
               f"products in {dtype} are not supported" if dtype not in fused_infonce.KERNEL_DTYPES else
               f"{num_cols} x {x.shape[-1]} features are too many for 32-bit offsets"
               if not fused_infonce.fits(x.shape[0], num_cols, x.shape[-1]) else
               "the features are on CPU and TRITON_INTERPRET=1 was not set before triton was imported")
        raise RuntimeError(f"loss.tiled_kernel=triton cannot run here: {why}; use tiled_kernel auto or torch")
    return False


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of `x` runs in here: autocast's when it is on (as in dense and local), else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


class _TiledInfoNCE(torch.autograd.Function):
    """Row statistics of both directions' logits, never holding more than a (B_local, tile_size) block of them.

    Inputs: the local rows `image`, `text` (B_local, D), the columns `all_image`, `all_text` (B_global, D), the
    logit scale s. Outputs, (B_local,) each, in fp32 or wider: log-sum-exp and mean over the columns of
    s * image @ all_text.T, the same for s * text @ all_image.T, and the positive logit s * image_i . text_i.

    Forward runs an online log-sum-exp over column tiles and saves only the inputs and the two log-sum-exp vectors;
    backward recomputes each tile's softmax. With `overwrite_columns` (the columns are the loss's own gathered
    copies) the backward writes each column tile's gradient over its features once nothing reads them any more, so
    the gathered features and their gradient never take memory at the same time; running backward twice through
    such a graph then trips autograd's in-place check instead of using overwritten features.

    With `fused`, Triton kernels (clipalign.fused_infonce) replace the tiles: no tile of logits is ever in memory,
    the column gradients go to fresh buffers (no overwriting), and without `overwrite_columns` (one process: the
    columns are the rows themselves) one pass over s * image @ text.T gives both directions' log-sum-exp, and one
    backward both directions' gradients.
    """

    @staticmethod
    def forward(ctx, image, text, all_image, all_text, scale, tile_size, overwrite_columns, fused=False):
        ctx.set_materialize_grads(False)
        ctx.tile_size, ctx.dtype, ctx.overwrite = tile_size, _compute_dtype(image), overwrite_columns
        ctx.fused, ctx.symmetric = fused, fused and not overwrite_columns
        with torch.autocast(image.device.type, enabled=False):
            if fused:
                lse_image, lse_text = _fused_logsumexp(image, text, all_image, all_text, scale, ctx)
            else:
                lse_image = _online_logsumexp(scale * image, all_text, tile_size, ctx.dtype)  # (B_local,)
                lse_text = _online_logsumexp(scale * text, all_image, tile_size, ctx.dtype)  # (B_local,)
            acc = lse_image.dtype
            # mean_j(s u_i . v_j) = s u_i . mean_j(v_j): the smoothing term needs no tiles
            mean_image = (scale * (image @ all_text.mean(dim=0))).to(acc)  # (B_local,)
            mean_text = (scale * (text @ all_image.mean(dim=0))).to(acc)  # (B_local,)
            positive = (scale * (image * text).sum(dim=1)).to(acc)  # (B_local,)
        ctx.save_for_backward(image, text, all_image, all_text, scale, lse_image, lse_text)
        return lse_image, lse_text, mean_image, mean_text, positive

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lse_image, grad_lse_text, grad_mean_image, grad_mean_text, grad_positive):
        image, text, all_image, all_text, scale, lse_image, lse_text = ctx.saved_tensors
        acc, num_cols = lse_image.dtype, all_image.shape[0]
        u, v = image.to(acc), text.to(acc)  # (B_local, D)
        with torch.autocast(image.device.type, enabled=False):
            # mean_image_i = s u_i . c with c the mean text column: c is read before the columns are overwritten,
            # and every text column gets the same gradient s * sum_i g_i u_i / B_global
            center_text = all_text.mean(dim=0, dtype=acc) if grad_mean_image is not None else None  # (D,)
            center_image = all_image.mean(dim=0, dtype=acc) if grad_mean_text is not None else None  # (D,)
            col_text = None if center_text is None else scale * (grad_mean_image @ u) / num_cols  # (D,)
            col_image = None if center_image is None else scale * (grad_mean_text @ v) / num_cols  # (D,)
            if ctx.fused:
                grad_u, grad_v, grad_all_image, grad_all_text, grad_scale = _fused_logsumexp_backward(
                    image, text, all_image, all_text, scale, lse_image, lse_text, grad_lse_image, grad_lse_text,
                    col_image, col_text, ctx)
            else:
                grad_u, grad_all_text, grad_scale = _logsumexp_backward(u, all_text, lse_image, grad_lse_image,
                                                                        scale, col_text, ctx)
                grad_v, grad_all_image, grad_scale_text = _logsumexp_backward(v, all_image, lse_text, grad_lse_text,
                                                                              scale, col_image, ctx)
                grad_scale += grad_scale_text
            if grad_positive is not None:  # positive_i = s u_i . v_i
                grad_u += grad_positive[:, None] * scale * v
                grad_v += grad_positive[:, None] * scale * u
                grad_scale += grad_positive @ (u * v).sum(dim=1)
            if center_text is not None:
                grad_u += grad_mean_image[:, None] * scale * center_text
                grad_scale += grad_mean_image @ (u @ center_text)
            if center_image is not None:
                grad_v += grad_mean_text[:, None] * scale * center_image
                grad_scale += grad_mean_text @ (v @ center_image)
        needs = ctx.needs_input_grad
        return (
            grad_u.to(image.dtype) if needs[0] else None,
            grad_v.to(text.dtype) if needs[1] else None,
            grad_all_image if needs[2] else None,
            grad_all_text if needs[3] else None,
            grad_scale.reshape(scale.shape).to(scale.dtype) if needs[4] else None,
            None,
            None,
            None,
        )


def _fused_logsumexp(image, text, all_image, all_text, scale, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions' log-sum-exp from the Triton kernels: one pass when symmetric, else one per direction."""
    from clipalign import fused_infonce

    dtype = ctx.dtype
    if ctx.symmetric:  # s * text @ image.T is the transpose: its rows' log-sum-exp are the columns'
        return fused_infonce.lse_forward(image.to(dtype), text.to(dtype), scale, symmetric=True)
    lse_image, _ = fused_infonce.lse_forward(image.to(dtype), all_text.to(dtype), scale)  # (B_local,)
    lse_text, _ = fused_infonce.lse_forward(text.to(dtype), all_image.to(dtype), scale)  # (B_local,)
    return lse_image, lse_text


def _fused_logsumexp_backward(image, text, all_image, all_text, scale, lse_image, lse_text, grad_lse_image,
                              grad_lse_text, col_image, col_text, ctx):
    """`_logsumexp_backward` of both directions by the Triton kernels: d image, d text, d all_image, d all_text, d s.

    The per-column terms `col_image` / `col_text` (label smoothing's mean) are added here too. When symmetric, the
    columns are the local rows, so their gradients join the rows' and d all_image = d all_text = None.
    """
    from clipalign import fused_infonce

    dtype, acc = ctx.dtype, lse_image.dtype
    u, v = image.to(acc), text.to(acc)  # (B_local, D)
    grad_u, grad_v = torch.zeros_like(u), torch.zeros_like(v)  # s * sum_j G_ij cols_j, built below
    grad_all_image = grad_all_text = None
    grad_scale = torch.zeros((), dtype=acc, device=u.device)
    if ctx.symmetric:
        if grad_lse_image is not None or grad_lse_text is not None:
            g_image = grad_lse_image if grad_lse_image is not None else torch.zeros_like(lse_image)
            g_text = grad_lse_text if grad_lse_text is not None else torch.zeros_like(lse_text)
            sum_u, sum_v = fused_infonce.lse_backward(image.to(dtype), text.to(dtype), scale, lse_image, g_image,
                                                      lse_text, g_text)  # (B, D) each, fp32
            grad_scale = grad_scale + (u * sum_u.to(acc)).sum()  # both directions: G holds both
            grad_u, grad_v = scale * sum_u.to(acc), scale * sum_v.to(acc)
        if col_image is not None:
            grad_u += col_image
        if col_text is not None:
            grad_v += col_text
        return grad_u, grad_v, None, None, grad_scale

    def one_direction(rows, row_acc, cols, lse, grad_lse, col_grad):
        if grad_lse is None:
            grad_cols = torch.zeros(cols.shape, dtype=acc, device=cols.device)
            return torch.zeros_like(row_acc), grad_cols + col_grad if col_grad is not None else grad_cols, 0.0
        sum_rows, sum_cols = fused_infonce.lse_backward(rows.to(dtype), cols.to(dtype), scale, lse, grad_lse)
        grad_cols = scale * sum_cols.to(acc)  # (B_cols, D)
        if col_grad is not None:
            grad_cols += col_grad
        return scale * sum_rows.to(acc), grad_cols, (row_acc * sum_rows.to(acc)).sum()

    grad_u, grad_all_text, scale_image = one_direction(image, u, all_text, lse_image, grad_lse_image, col_text)
    grad_v, grad_all_image, scale_text = one_direction(text, v, all_image, lse_text, grad_lse_text, col_image)
    grad_scale = grad_scale + scale_image + scale_text
    return grad_u, grad_v, grad_all_image.to(all_image.dtype), grad_all_text.to(all_text.dtype), grad_scale


def _online_logsumexp(scaled_rows: torch.Tensor, cols: torch.Tensor, tile_size: int, dtype: torch.dtype):
    """logsumexp_j(scaled_rows_i . cols_j) for every row, a tile of columns at a time: (B_rows,), fp32 or wider.

    Keeps a running maximum m and sum S of exp(logit - m) per row; a tile with a larger maximum rescales S.
    """
    acc = torch.promote_types(scaled_rows.dtype, torch.float32)  # the sums never run in half precision
    scaled_rows = scaled_rows.to(dtype)
    running_max = torch.full((scaled_rows.shape[0],), -torch.inf, dtype=acc, device=scaled_rows.device)
    running_sum = torch.zeros_like(running_max)  # (B_rows,)
    for tile in cols.split(tile_size):
        logits = (scaled_rows @ tile.to(dtype).T).to(acc)  # (B_rows, T)
        new_max = torch.maximum(running_max, logits.amax(dim=1))  # (B_rows,)
        tile_sum = logits.sub_(new_max[:, None]).exp_().sum(dim=1)  # in place: no second (B_rows, T) block
        running_sum = running_sum * (running_max - new_max).exp() + tile_sum
        running_max = new_max
    return running_max + running_sum.log()


def _logsumexp_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor | None,
    scale: torch.Tensor,
    col_grad: torch.Tensor | None,
    ctx,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of lse_i = logsumexp_j(s rows_i . cols_j) (plus `col_grad` for every column): rows, cols, s.

    With p_ij = exp(s rows_i . cols_j - lse_i) and g = grad_lse: d rows_i = s g_i sum_j p_ij cols_j,
    d cols_j = s sum_i g_i p_ij rows_i and d s = sum_i rows_i . g_i sum_j p_ij cols_j. The cols gradient is written
    over `cols` itself when `ctx.overwrite`, each tile after its last read.
    """
    grad_cols = cols if ctx.overwrite else torch.empty_like(cols)  # (B_cols, D)
    grad_rows = torch.zeros_like(rows)  # sum_j g_i p_ij cols_j until the end; (B_rows, D)
    if grad_lse is None:
        grad_cols.copy_(col_grad.expand_as(cols) if col_grad is not None else torch.zeros_like(cols))
        return grad_rows, grad_cols, torch.zeros((), dtype=rows.dtype, device=rows.device)
    scaled_rows = (scale * rows).to(ctx.dtype)  # (B_rows, D), rounded as in the forward
    start = 0
    for tile in cols.split(ctx.tile_size):
        tile = tile.to(ctx.dtype)  # (T, D)
        probs = _shifted_logits(scaled_rows, tile, lse).exp_().mul_(grad_lse[:, None]).to(ctx.dtype)  # g_i p_ij
        if probs.dtype == grad_rows.dtype:
            grad_rows.addmm_(probs, tile)
        else:
            grad_rows += probs @ tile
        tile_grad = probs.T @ scaled_rows  # (T, D)
        if col_grad is not None:
            tile_grad += col_grad
        grad_cols[start:start + tile.shape[0]] = tile_grad  # the last read of this tile was just above
        start += tile.shape[0]
    grad_scale = (rows * grad_rows).sum()
    grad_rows *= scale
    return grad_rows, grad_cols, grad_scale


def _shifted_logits(scaled_rows: torch.Tensor, tile: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """scaled_rows @ tile.T - shift[:, None] in shift's dtype; one fused addmm when the dtypes agree. (B_rows, T)"""
    if scaled_rows.dtype == shift.dtype:
        return torch.addmm(shift[:, None], scaled_rows, tile.T, beta=-1)
    return (scaled_rows @ tile.T).to(shift.dtype).sub_(shift[:, None])


class SigmoidLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss of local images against the texts of the whole global batch.

    Every (image, text) pair of the global batch is a binary problem, +1 for a matching pair and -1 otherwise:
    -log sigmoid(label * (scale * u . v + bias)), summed over this process's B_local images against all B_global texts
    and divided by B_local, as open_clip's `SigLipLoss`. The mean of the returned values over processes is the loss of
    one process on the global batch (sum over all pairs / B_global), and the DDP gradients equal its gradients.

    The logits are built one (B_local, B_local) block at a time (own texts, then each other process's), in fp32, and
    the backward recomputes each block, so the logits take O(B_local^2) memory however many processes there are.

    Args:
        exchange: how the other processes' texts arrive. "ring": N - 1 neighbour-to-neighbour hops of one block each;
            "gather": one all-gather of all texts, (B_global, D) held per process.
        gather: False scores the local batch alone (world-size-1 semantics, no collectives), e.g. for a reference.
    """

    def __init__(self, exchange: str = "ring", gather: bool = True):
        super().__init__()
        if exchange not in SIGMOID_EXCHANGES:
            raise ValueError(f"sigmoid loss exchange {exchange!r} is not one of {', '.join(SIGMOID_EXCHANGES)}")
        self.exchange = exchange
        self.gather = gather

    def extra_repr(self) -> str:
        return f"exchange={self.exchange!r}, gather={self.gather}"

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """This process's share of the loss (a scalar) for its L2-normalised (B_local, D) features.

        `logit_scale` is exponentiated; `logit_bias` is the learnable bias of a SigLIP model (None: no bias). Reduce the
        value with `accelerator.reduce(loss.detach(), "mean")` to log the global loss.
        """
        if image_features.shape[0] != text_features.shape[0]:
            raise ValueError(f"SigmoidLoss needs one text per image, got {image_features.shape[0]} image and "
                             f"{text_features.shape[0]} text features")
        device = image_features.device
        scale = torch.as_tensor(logit_scale, device=device)
        bias = torch.as_tensor(0.0 if logit_bias is None else logit_bias, device=device)
        loss = _SigmoidBlockLoss.apply(image_features, text_features, scale, bias, True)  # own pairs: the positives
        world_size = get_world_size() if self.gather else 1
        if world_size > 1:
            for other_texts in self._other_texts(text_features, world_size):  # (B_local, D) each, negatives only
                loss = loss + _SigmoidBlockLoss.apply(image_features, other_texts, scale, bias, False)
        return loss / image_features.shape[0]

    def _other_texts(self, text_features: torch.Tensor, world_size: int) -> Iterable[torch.Tensor]:
        """The text features of every other process, with gradient back to their owners, one block at a time."""
        if self.exchange == "ring":
            return ring_exchange_with_grad(text_features)
        all_texts = all_gather_with_grad(text_features).chunk(world_size)  # N x (B_local, D), views of (B_global, D)
        rank = get_rank()
        return [texts for r, texts in enumerate(all_texts) if r != rank]


class _SigmoidBlockLoss(torch.autograd.Function):
    """sum_ij -log sigmoid(label_ij * logit_ij) of one block, logits = scale * image @ text.T + bias, in fp32 or wider.

    label_ij is +1 on the diagonal of a positive block (a process's own pairs) and -1 everywhere else. Only the inputs
    are saved: the backward recomputes the (B_local, B_local) logits instead of keeping every block's.
    """

    @staticmethod
    def forward(ctx, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                positive: bool) -> torch.Tensor:
        ctx.positive = positive
        ctx.save_for_backward(image, text, scale, bias)
        with torch.autocast(image.device.type, enabled=False):
            # label * logit: label -1 everywhere, then +1 on the matching pairs
            signed_logits = _block_logits(image, text, scale, bias).neg_()  # (B_local, B_local)
            if positive:
                signed_logits.diagonal().neg_()
            return -F.logsigmoid(signed_logits).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        image, text, scale, bias = ctx.saved_tensors
        need_image, need_text, need_scale, need_bias = ctx.needs_input_grad[:4]
        with torch.autocast(image.device.type, enabled=False):
            logits = _block_logits(image, text, scale, bias)  # (B_local, B_local), recomputed
            # d/dz -log sigmoid(y z) = -y sigmoid(-y z): sigmoid(z) for the negatives, -sigmoid(-z) for the positives
            diagonal = -torch.sigmoid(-logits.diagonal()) if ctx.positive else None  # (B_local,)
            grad_logits = logits.sigmoid_()  # in place: one (B_local, B_local) buffer
            if diagonal is not None:
                grad_logits.diagonal().copy_(diagonal)
            grad_logits *= grad_loss
            image_, text_, scale_ = (x.to(grad_logits.dtype) for x in (image, text, scale))
            # logit_ij = s u_i . v_j + b, so du_i = s sum_j g_ij v_j and ds = sum_i u_i . sum_j g_ij v_j
            weighted_texts = grad_logits @ text_ if need_image or need_scale else None  # (B_local, D)
            grad_image = (scale_ * weighted_texts).to(image.dtype) if need_image else None
            grad_text = (grad_logits.T @ (scale_ * image_)).to(text.dtype) if need_text else None
            grad_scale = (image_ * weighted_texts).sum().reshape(scale.shape).to(scale.dtype) if need_scale else None
            grad_bias = grad_logits.sum().reshape(bias.shape).to(bias.dtype) if need_bias else None
        return grad_image, grad_text, grad_scale, grad_bias, None


def _block_logits(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """scale * image @ text.T + bias (in open_clip SigLipLoss's order) in fp32, or fp64 for fp64 features."""
    dtype = torch.promote_types(image.dtype, torch.float32)  # bf16 / fp16 logits would blur the sigmoid's margin
    return (scale.to(dtype) * image.to(dtype)) @ text.to(dtype).T + bias.to(dtype)  # (B_local, B_local)


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module a recipe's `loss` section asks for."""
    if cfg.kind == "sigmoid":
        return SigmoidLoss(exchange=cfg.exchange)
    if cfg.kind != "contrastive":
        raise ConfigError(f"loss.kind {cfg.kind!r} is not supported; supported kinds: {', '.join(LOSS_KINDS)}")
    return ContrastiveLoss(mode=cfg.mode, label_smoothing=cfg.label_smoothing, tile_size=cfg.tile_size,
                           tiled_kernel=cfg.tiled_kernel)
