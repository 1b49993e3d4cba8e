"""Fully sharded data parallel training (`train.sharding=fsdp`): PyTorch's FSDP2 (`fully_shard`) over the dual encoder.

Each process keeps 1/N of every parameter, of its gradient and of AdamW's two moments (N processes); a block's whole
parameters exist only while the block runs, gathered just before and freed just after (again in the backward), and
its gradients are reduce-scattered into the shards. The arithmetic is that of DDP: gradients are the mean over
processes of each process's gradient, so N processes under FSDP train the same model as N processes under DDP.

- Units: every transformer block of both towers (`clipalign.model.transformer_blocks`) is one `fully_shard` unit,
  then the root takes the rest (embeddings, patch embedding, final norms, projections).
- The temperature (and the sigmoid loss's bias) are 0-dimensional, which FSDP cannot shard: they stay whole on every
  process, outside FSDP, and `sync_replicated_grads` averages their gradients over processes after the backward.
- `train.precision=bf16`: the blocks gather, compute and keep their unsharded weights in bf16, reduce gradients in
  fp32 and keep fp32 shards (the master weights the optimizer updates); the root's small parameters stay fp32 and run
  under autocast, as they do with DDP.
- `train.fsdp_offload=true`: the shards, their gradients and the optimizer state live in host memory and the
  optimizer steps there (FSDP's `CPUOffloadPolicy`); each unit's shards are copied to the device to be gathered.

The same code runs on CPU processes (gloo) and on GPUs (NCCL); the device mesh is one dimension over all processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from clipalign.model import transformer_blocks


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is a `fully_shard` unit (FSDP2 changes its class in place)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters FSDP leaves whole on every process: the 0-dimensional ones (temperature, logit bias)."""
    return [p for p in model.parameters() if p.ndim == 0]


def shard_model(model: nn.Module, device: torch.device, precision: str = "fp32", offload: bool = False) -> int:
    """Shard `model` in place over all processes: each transformer block, then the root; returns the block count.

    Call after `torch.compile` of the blocks (compiled blocks keep their FSDP hooks outside the compiled code) and
    before the optimizer is built: the optimizer must hold the sharded parameters.

    Args:
        model: the dual encoder, built the same way (same seed) on every process.
        device: this process's device; each unit's shards move there as it is sharded (with `offload` they stay in
            host memory), so the model may be built in host memory and be larger than the device.
        precision: "fp32" or "bf16" (the blocks' mixed-precision policy); fp16 needs loss scaling FSDP does not offer.
        offload: keep shards, gradients and optimizer state in host memory.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train.sharding=fsdp trains in fp32 or bf16, not {precision!r}: fp16 needs a loss scale "
                         f"that the sharded gradients do not get")
    if not dist.is_initialized():
        _single_process_group(device)
    # fully_shard moves each unit's shards (and buffers) to the device: the whole model never has to fit there.
    # The scalars it leaves whole move here.
    replicated = replicated_params(model)
    for p in replicated:
        p.data = p.data.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    offload_policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    reduce_fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else reduce_fp32
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=block_policy, offload_policy=offload_policy)
    fully_shard(model, mesh=mesh, mp_policy=reduce_fp32, offload_policy=offload_policy,
                ignored_params=set(replicated))
    return len(blocks)


def _single_process_group(device: torch.device) -> None:
    """A process group of this process alone, for FSDP in a run started without a launcher (one GPU, e.g. to offload
    the optimizer state to host memory). Raises if the environment says there should be more processes."""
    import atexit
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise RuntimeError(f"train.sharding=fsdp: WORLD_SIZE={world} but no process group is up; create the "
                           f"Accelerator first (launch with `accelerate launch`)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of the parameters FSDP leaves whole (`replicated_params`) over all processes.

    FSDP reduces the gradients of what it shards; these it leaves alone, so every process would otherwise update its
    temperature with its own gradient only. One all-reduce of a few scalars after each step's backward.
    """
    params = [p for p in replicated_params(model) if p.grad is not None]
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if not params or world == 1:
        return
    flat = torch.stack([p.grad.float() for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    for p, g in zip(params, flat):
        p.grad.copy_(g)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Backward passes inside keep their gradients local (accumulating), for all but the last micro-batch.

    FSDP: no reduce-scatter until gradient sync is on again (the unsharded gradients accumulate per unit). DDP: its
    `no_sync`. Anything else (one process): nothing to hold back.
    """
    if is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with getattr(model, "no_sync", contextlib.nullcontext)():
            yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of a sharded model to a total norm of `max_norm`: the norm of the full gradient, over all
    shards and processes (not each shard's own); returns that norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights (fp32, on the host) on process 0 and an empty dict elsewhere; every process must
    call it (the shards are gathered). A model that is not sharded returns its own state dict, on the host."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
