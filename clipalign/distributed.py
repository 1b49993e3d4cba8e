"""Rank and world size as Accelerate set them up, and an all-gather that carries gradients back to every process.

`accelerator.gather` (like `torch.distributed.all_gather`) returns tensors with no gradient, so a loss that scores local
rows against gathered columns would only train on its own samples' side of the matrix. `all_gather_with_grad` is the
differentiable version: its backward sums the incoming gradient over all processes and hands each one its own slice.
`ring_exchange_with_grad` passes a tensor around the ring of processes instead, neighbour to neighbour, with the
gradient of every hop sent back the way the tensor came.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from accelerate import PartialState

# Recent torch renamed the single-tensor collectives (the old names warn); older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _torch_distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _accelerate_state() -> PartialState | None:
    """Accelerate's process state if something already created it; never creates one (that would init a group)."""
    return PartialState() if PartialState._shared_state else None


def get_world_size() -> int:
    """Number of processes: torch.distributed's world when a group is up, else Accelerate's, else 1.

    Raises:
        RuntimeError: if Accelerate counts fewer processes than torch.distributed; it then wraps no model in DDP.
    """
    state = _accelerate_state()
    if _torch_distributed_ready():
        world_size = dist.get_world_size()
        if state is not None and state.num_processes != world_size:
            # `accelerate launch --multi_gpu` on a machine without GPUs: the group is up but Accelerate says NO.
            raise RuntimeError(
                f"torch.distributed runs {world_size} processes but Accelerate counts {state.num_processes} "
                f"({state.distributed_type}), so gradients would not be averaged; without GPUs create the "
                "Accelerator with cpu=True or export ACCELERATE_USE_CPU=true"
            )
        return world_size
    return state.num_processes if state is not None else 1


def get_rank() -> int:
    """This process's global rank (0 when not distributed)."""
    if _torch_distributed_ready():
        return dist.get_rank()
    state = _accelerate_state()
    return state.process_index if state is not None else 0


def is_distributed() -> bool:
    """True when more than one process takes part."""
    return get_world_size() > 1


# local shapes already checked against every process's: the check reads its result on the host, which on a GPU waits
# for all queued work, so it runs once per shape rather than on every exchange of every step
_checked_shapes: set[tuple[int, tuple[int, ...]]] = set()


def _check_same_shape(x: torch.Tensor, world_size: int, user: str = "all_gather_with_grad") -> None:
    """Raise on every rank alike when local batch sizes (or row shapes) differ, where an exchange would hang or fail.

    Each local shape is checked once: a training run exchanges features of one shape on every step. Every process
    meets a new shape at the same call (processes exchange equal batches, or the first check fails on all of them),
    so all of them take part in the check together.
    """
    key = (world_size, tuple(x.shape))
    if key in _checked_shapes:
        return
    local = torch.tensor([x.shape[0], math.prod(x.shape[1:]), x.dim()], dtype=torch.int64, device=x.device)
    shapes = torch.empty(world_size * 3, dtype=torch.int64, device=x.device)
    _all_gather_single(shapes, local)
    sizes, row_numels, dims = shapes.view(world_size, 3).T.tolist()
    if len(set(sizes)) > 1:
        raise ValueError(
            f"{user} needs the same local batch size on every process, got {sizes} (by rank); "
            "drop the last partial batch or pad it to the full size"
        )
    if len(set(row_numels)) > 1 or len(set(dims)) > 1:
        raise ValueError(f"{user} needs the same row shape on every process; rank {get_rank()} has "
                         f"{tuple(x.shape[1:])}, elements per row by rank: {row_numels}")
    _checked_shapes.add(key)


def _uses_nccl(device: torch.device) -> bool:
    return device.type == "cuda" and "nccl" in str(dist.get_backend()).lower()


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0 in rank order. Backward: sum the gradient over processes, keep our slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.local_size = dist.get_rank(), x.shape[0]
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))  # (N * B_local, ...)
        _all_gather_single(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every process's loss may depend on our rows, so our gradient is the sum of everyone's slice for us.
        grad = grad.contiguous()
        if _uses_nccl(grad.device):
            out = grad.new_empty((ctx.local_size, *grad.shape[1:]))
            _reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM)
            return out
        # gloo (and other backends) may lack reduce-scatter: reduce everything, keep our slice.
        total = grad.clone()  # all_reduce works in place; autograd's incoming gradient must stay untouched
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[ctx.rank * ctx.local_size:(ctx.rank + 1) * ctx.local_size]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B_local, ...) from every process along dim 0, in rank order, keeping the autograd graph.

    The backward sums the gradient of the gathered tensor over all processes and returns this rank's slice, so a
    loss computed on the gathered tensor trains every process's encoder. Returns `x` itself with one process.

    Raises:
        ValueError: on every rank, if the processes' local batch sizes (or row shapes) differ; the message lists them.
    """
    world_size = get_world_size()
    if world_size == 1:
        return x
    if not _torch_distributed_ready():
        raise RuntimeError(f"{world_size} processes but no torch.distributed process group; launch with "
                           "`accelerate launch` and create the Accelerator before the first loss call")
    _check_same_shape(x, world_size)
    return _AllGatherWithGrad.apply(x)


def _ring_neighbours() -> tuple[int, int]:
    """The ranks before and after this one on the ring 0 -> 1 -> ... -> N - 1 -> 0."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return (rank - 1) % world_size, (rank + 1) % world_size


def _send_recv(x: torch.Tensor, to_rank: int, from_rank: int) -> torch.Tensor:
    """Send `x` to `to_rank` while receiving a tensor of the same shape from `from_rank` (both at once: no deadlock)."""
    received = torch.empty_like(x)
    requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, to_rank), dist.P2POp(dist.irecv, received, from_rank)])
    for request in requests:
        request.wait()
    return received


class _RingShift(torch.autograd.Function):
    """Forward: hand x to the next rank, take the previous rank's. Backward: the gradient goes back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        previous, following = _ring_neighbours()
        return _send_recv(x.contiguous(), to_rank=following, from_rank=previous)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # what we received came from `previous`, so its gradient belongs there; ours comes back from `following`
        previous, following = _ring_neighbours()
        return _send_recv(grad.contiguous(), to_rank=previous, from_rank=following)


def _ring_hops(x: torch.Tensor, world_size: int) -> Iterator[torch.Tensor]:
    for _ in range(world_size - 1):
        x = _RingShift.apply(x)
        yield x


def ring_exchange_with_grad(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield the `x` (B_local, ...) of ranks rank - 1, rank - 2, ..., rank - (N - 1) (mod N), one hop at a time.

    Each hop is a point-to-point exchange (send to rank + 1, receive from rank - 1) of one B_local block, and its
    backward sends the gradient back the way the block came, so a loss computed on the blocks trains the process
    that owns them. Every process must take all N - 1 blocks, in order; yields nothing with one process.

    Raises:
        ValueError: on every rank, when called, if the processes' local batch sizes (or row shapes) differ.
    """
    world_size = get_world_size()
    if world_size == 1:
        return iter(())
    if not _torch_distributed_ready():
        raise RuntimeError(f"{world_size} processes but no torch.distributed process group; launch with "
                           "`accelerate launch` and create the Accelerator before the first loss call")
    _check_same_shape(x, world_size, user="ring_exchange_with_grad")
    return _ring_hops(x, world_size)
