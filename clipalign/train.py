"""Contrastive image-text pretraining: one flat, step-counted loop over Accelerate.

    python -m clipalign.train RECIPE.yaml [section.key=value ...]
    accelerate launch -m clipalign.train RECIPE.yaml [section.key=value ...]
    clipalign-train RECIPE.yaml [section.key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import braceexpand
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env, set_seed
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from clipalign.accumulate import forward_backward
from clipalign.checkpoint import (
    CheckpointError,
    CheckpointSaveError,
    latest_checkpoint,
    load_training_state,
    read_trainer_state,
    resolve_checkpoint,
    rng_restore_error,
    save_checkpoint,
    save_sharded_state,
)
from clipalign.config import Config, ConfigError, describe_keys, load_config, read_config, shareable_config
from clipalign.data.curation import FILTER_REASON_NAMES, SampleFilter
from clipalign.data.device_decode import DeviceDecoder, resolve_decode
from clipalign.data.sample import STREAM_SKIP_REASONS as SKIP_REASONS  # one list, in clipalign.data.sample
from clipalign.data.shards import DataSourceError, expand_sources, make_train_loader
from clipalign.data.synthetic import make_synthetic_dataset
from clipalign.layout import (
    METRICS_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    TOKENIZER_FILE,
    RunDirBusy,
    checkpoint_dir,
    is_sharded_checkpoint,
    keys_file,
    lock_run_dir,
    release_run_dir,
    write_atomic,
)
from clipalign.loss import build_loss
from clipalign.model import CompileReport, compile_blocks, create_model, trim_padding, use_matmul_patch_embed
from clipalign.sharding import clip_grad_norm, full_state_dict, is_sharded, shard_model, sync_replicated_grads
from clipalign.tokenizer import SentencePieceTokenizer, Tokenizer

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def cache_dir(cfg: Config) -> Path:
    """Where generated data goes: data.cache_dir, else $CLIPALIGN_CACHE, else ~/.cache/clipalign."""
    return Path(cfg.data.cache_dir or os.environ.get("CLIPALIGN_CACHE") or Path.home() / ".cache" / "clipalign")


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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on gains, biases, norms and the logit scale (anything below 2-D), as in CLIP."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1, then cosine decay to `min_ratio`, as a multiplier of the base lr per step."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _prepare_data(cfg: Config, accelerator: Accelerator, image_size: int) -> None:
    """Fill in data.train (and eval.zeroshot, eval.retrieval) from the synthetic set when the recipe asks for it."""
    if cfg.data.train or not cfg.data.synthetic:
        return
    root = cache_dir(cfg) / "synthetic" / f"n{cfg.data.synthetic_samples}-px{image_size}"
    # one process per machine draws; the others wait and then read the finished set
    with accelerator.local_main_process_first():
        ds = make_synthetic_dataset(root, train_samples=cfg.data.synthetic_samples, image_size=image_size)
    cfg.data.train = ds.train_pattern
    if not cfg.eval.zeroshot:  # "none" turns it off
        cfg.eval.zeroshot = str(ds.heldout_dir)
    if not cfg.eval.retrieval:
        cfg.eval.retrieval = str(ds.heldout_captions)


def _eval_set(cfg: Config, kind: str) -> str:
    """eval.zeroshot or eval.retrieval, "" when there is none to run ("none" turns off the synthetic set's)."""
    value = getattr(cfg.eval, kind)
    return "" if value == "none" else value


def _evaluates(cfg: Config) -> bool:
    return bool(_eval_set(cfg, "zeroshot") or _eval_set(cfg, "retrieval"))


def _resume_from(cfg: Config, run_dir: Path) -> Path | None:
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "auto":
        return latest_checkpoint(run_dir)  # None on a fresh run: start from scratch
    try:
        return resolve_checkpoint(cfg.train.resume)
    except FileNotFoundError as e:
        raise ConfigError(f"train.resume: {e}") from None


def _expand_train_sources(spec: str, key: str = "data.train") -> list[list[str]]:
    """`expand_sources`, with a missing shard or an empty pattern reported as the recipe error it is."""
    try:
        return expand_sources(spec, key)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _check_val(cfg: Config, world: int) -> None:
    """data.val's shards exist (local ones), and eval.val_samples fills at least one global batch of validation."""
    if not cfg.data.val:
        if cfg.eval.val_every:
            raise ConfigError(f"eval.val_every={cfg.eval.val_every} validates on data.val, which is not set")
        return
    _expand_train_sources(cfg.data.val, "data.val")
    val_batch = cfg.data.batch_size * cfg.train.accum_steps * world  # the rows a training loss is computed over
    if cfg.eval.val_samples < val_batch:
        raise ConfigError(f"eval.val_samples={cfg.eval.val_samples} is less than one global batch of validation, "
                          f"the training's: data.batch_size x train.accum_steps x {world} processes = {val_batch}")


def _check_eval_sources(cfg: Config) -> None:
    """The evaluation sets named in the recipe exist (local ones): found now, not after the training."""
    for key in ("zeroshot", "retrieval", "classnames", "templates"):
        value = getattr(cfg.eval, key)
        if not value or value == "none" or "://" in value or value.startswith("pipe:"):
            continue
        if key in ("classnames", "templates") and not any(sep in value for sep in "/\\.") :
            continue  # a built-in set (cifar10, imagenet1k, ...): checked when it is read
        missing = [p for p in braceexpand.braceexpand(value) if not os.path.exists(p)]
        if missing:
            raise ConfigError(f"eval.{key}: {value!r} does not exist" + (f" ({len(missing)} paths, e.g. {missing[0]})"
                                                                         if missing != [value] else ""))


# model keys that may change between a checkpoint and the run resuming from it: they change no parameter
RESUMABLE_MODEL_KEYS = ("grad_checkpointing", "patch_dropout", "pretrained", "pretrained_image")


def _check_resumable(cfg: Config, ckpt: Path) -> None:
    """Refuse a checkpoint of another model (or loss kind) before building anything, naming what differs."""
    saved_path = ckpt / RUN_CONFIG_FILE
    if not saved_path.is_file():
        return  # an old checkpoint without its config: the weights' shapes are the only check
    saved = read_config(saved_path)
    ours, theirs = cfg.to_dict(), saved.to_dict()
    differing = [f"model.{key} ({theirs['model'][key]!r} in the checkpoint, {ours['model'][key]!r} here)"
                 for key in ours["model"] if key not in RESUMABLE_MODEL_KEYS and ours["model"][key] !=
                 theirs["model"].get(key)]
    if ours["loss"]["kind"] != theirs["loss"]["kind"]:
        differing.append(f"loss.kind ({theirs['loss']['kind']!r} in the checkpoint, {ours['loss']['kind']!r} here)")
    if differing:
        raise CheckpointError(f"cannot resume from {ckpt}: it is a checkpoint of another model: "
                              f"{'; '.join(differing)}. Resume with the checkpoint's settings, or start a new run "
                              f"(another train.output_dir, or train.resume='')")


_OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay", "fused")


def _optimizer_settings(optimizer, scheduler) -> dict:
    """This run's optimizer hyperparameters per group and the schedule's base rates, as built from the recipe."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # the torch scheduler inside Accelerate's wrapper
    return {"groups": [{k: g[k] for k in _OPTIMIZER_KEYS if k in g} for g in optimizer.param_groups],
            "base_lrs": list(scheduler.base_lrs)}


def _apply_optimizer_settings(optimizer, scheduler, recipe: dict, ckpt: Path) -> str:
    """Put the recipe's optimizer settings back over the checkpoint's (loading an optimizer or schedule state restores
    the saved ones): a resumed run trains with the optim.* values its config.yaml records. The learning rate of the
    current step follows the recipe's optim.lr and schedule. Returns the changes, as text ("" when none)."""
    names = {"lr": "optim.lr", "betas": "optim.beta1/beta2", "eps": "optim.eps", "weight_decay": "optim.weight_decay",
             "fused": "optim.fused"}
    scheduler = getattr(scheduler, "scheduler", scheduler)
    changes = {}
    saved_base = list(scheduler.base_lrs)
    if saved_base != recipe["base_lrs"]:
        changes["lr"] = (saved_base[0], recipe["base_lrs"][0])
    for group, settings in zip(optimizer.param_groups, recipe["groups"]):
        for key, value in settings.items():
            if key != "lr" and group.get(key) != value:
                changes.setdefault(key, (group.get(key), value))
            if key != "lr":
                group[key] = value
    scheduler.base_lrs = list(recipe["base_lrs"])
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"] = base
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return ", ".join(f"{names[k]} {old} -> {new}" for k, (old, new) in changes.items())


def _checkpoint(accelerator: Accelerator, run_dir: Path, step: int, cfg: Config, state: dict,
                tokenizer: Tokenizer, sharded: tuple | None = None) -> Path:
    """Save a checkpoint; `sharded` = (model, optimizer, scheduler) of a sharded run, whose state is written as
    torch.distributed.checkpoint shards rather than by Accelerate."""
    # a SentencePiece tokenizer travels with the weights: the checkpoint alone must rebuild the model
    files = {TOKENIZER_FILE: tokenizer.model_proto} if isinstance(tokenizer, SentencePieceTokenizer) else None
    write_state = None
    if sharded is not None:
        def write_state(directory: Path) -> None:
            save_sharded_state(directory, *sharded, process_index=accelerator.process_index)
    return save_checkpoint(accelerator, run_dir, step, cfg, state, keep=cfg.train.keep_checkpoints, files=files,
                           write_state=write_state)


def _trainer_state(accelerator: Accelerator, samples_seen: int, positions: dict[int, tuple[int, int]],
                   streams: int, sharding: str) -> dict:
    """What a checkpoint records beyond Accelerate's state: samples seen, every data stream's position, and the
    processes that wrote it (how many, and whether they sharded the model)."""
    merged: dict[str, list[int]] = {}
    for part in gather_object([positions]):  # one dict per process
        merged.update({str(stream): list(pos) for stream, pos in part.items()})
    return {"samples_seen": samples_seen, "data": {"streams": streams, "positions": merged},
            "processes": accelerator.num_processes, "sharding": sharding}


def _data_start(state: dict, streams: int) -> dict[int, tuple[int, int]]:
    """Resume positions of the exact-pass streams, if the checkpoint's streams match this run's."""
    data = state.get("data") or {}
    if not data.get("positions"):
        return {}
    if data.get("streams") != streams:
        warnings.warn(f"the checkpoint's data position covers {data.get('streams')} streams (processes x workers) "
                      f"but this run has {streams}; the exact pass restarts from its beginning", stacklevel=2)
        return {}
    return {int(k): tuple(v) for k, v in data["positions"].items()}


def _last_logged_loss(metrics: Path) -> float | None:
    """The loss of the last metrics line of a run (a launch that trained no step reports the run's), or None."""
    if not metrics.is_file():
        return None
    losses = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if "loss" in record:
            losses.append(record["loss"])
    return losses[-1] if losses else None


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class NonfiniteGuard:
    """Skips the update of every step whose loss or gradients are not finite on some process, without the host
    waiting for it.

    The fused AdamW takes the verdict as a device tensor (`found_inf`, the way GradScaler hands it over) and leaves
    weights, moments and its step count as they were when it is set, so nothing has to come back to the host before
    the update is queued. The host reads each verdict later, through a pinned copy, to count the skipped steps and to
    stop after more than `limit` in a row. A skipped step still counts as a step (as fp16 loss scaling's skipped
    steps do). An unfused optimizer cannot skip on the device: `arm` then waits for the verdict and says whether to
    call `step()`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, world: int, limit: int, run_dir: Path):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside Accelerate's wrapper
        self.on_device = all(group.get("fused") for group in self.optimizer.param_groups)
        # where the update runs: the parameters' device (host memory when FSDP offloads them)
        self.update_device = next(p.device for g in self.optimizer.param_groups for p in g["params"])
        self.world, self.limit, self.run_dir = world, limit, run_dir
        self.total = self.run = 0
        self.pending: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []  # (step, verdict, copy done)

    @staticmethod
    def local_verdict(loss: torch.Tensor, model: torch.nn.Module, grads: bool = True) -> torch.Tensor:
        """1.0 if this process's loss (and, with `grads`, its part of every gradient) is finite, else 0.0: a float
        tensor on the loss's device, computed there. A finite loss can still come with gradients that overflowed
        (a bf16 backward, a division in the loss's gradient); under fp16 the loss scaler judges the gradients itself,
        so pass `grads=False` there."""
        finite = torch.isfinite(loss.detach()).float().reshape(())
        if not grads:
            return finite
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in model.parameters():
            if p.grad is not None:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # a sharded model: our shard
                by_device.setdefault(grad.device, []).append(grad)
        one = torch.ones((), device=loss.device)
        for device, grads_here in by_device.items():
            # the loss scaler's own check: one fused pass over all gradients, a device flag, no host wait
            found = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads_here, found, torch.ones(1, device=device))
            finite = finite * (one - found.to(loss.device).reshape(()))
        return finite

    def arm(self, finite_count: torch.Tensor, step: int) -> bool:
        """Take the number of processes whose loss and gradients are finite (a device scalar, the sum of their
        `local_verdict`s); returns whether to call `step()`."""
        finite = finite_count >= self.world  # () bool
        if not self.on_device:
            self._record(step, bool(finite))
            return bool(finite)
        self.optimizer.found_inf = (~finite).float().to(self.update_device)
        if finite.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(finite, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self.pending.append((step, host, done))
        else:
            self.pending.append((step, finite, None))
        return True

    def check(self, wait: bool) -> None:
        """Count the verdicts that have arrived (all of them if `wait`); raises after too many bad steps in a row."""
        while self.pending:
            step, verdict, done = self.pending[0]
            if done is not None and not done.query():
                if not wait:
                    return
                done.synchronize()
            self.pending.pop(0)
            self._record(step, bool(verdict))

    def _record(self, step: int, finite: bool) -> None:
        if finite:
            self.run = 0
            return
        self.total += 1
        self.run += 1
        if self.run > self.limit:
            raise FloatingPointError(
                f"the loss was not finite for {self.run} steps in a row (after step {step - self.run}); stopping. "
                f"Last good checkpoint: {latest_checkpoint(self.run_dir) or 'none yet'}. Resume from it with "
                "train.resume=auto and a lower optim.lr, optim.grad_clip, or train.precision=fp32/bf16")


class MetricsWindow:
    """The steps since the last metrics line: their time, data wait and skipped samples, and the totals so far.

    The loop adds to `steps`, `wait` (seconds spent waiting for batches), `decode` (seconds spent decoding JPEGs in
    this process, `data.decode=device`), `skipped` and `filtered` (counts by reason,
    on the host); `line` sums the skip and filter counts over processes, returns the metrics record and starts the
    next window. The FLOPs of one optimizer step are counted once, on the first step (`counting_flops`), for the
    achieved TFLOP/s and the MFU estimate.
    """

    def __init__(self, accelerator: Accelerator, global_batch: int, peak_tflops: float, num_samples: int = 0,
                 decoder: DeviceDecoder | None = None):
        self.accelerator, self.global_batch, self.peak_tflops = accelerator, global_batch, peak_tflops
        self.decoder = decoder  # data.decode=device: its stream's time is logged beside the host's
        self.num_samples = num_samples  # samples in one pass over the data, for the epoch; 0 = unknown
        self.step_flops: int | None = None  # FLOPs of one optimizer step over all processes
        self.skipped_total: Counter[str] = Counter()
        self.filtered_total: Counter[str] = Counter()  # samples the curation settings filtered out (data.keep, ...)
        self._restart()

    def _restart(self) -> None:
        self.start, self.steps, self.wait, self.decode = time.perf_counter(), 0, 0.0, 0.0
        self.skipped: Counter[str] = Counter()
        self.filtered: Counter[str] = Counter()

    def counting_flops(self):
        """A context that counts the FLOPs of what runs inside it the first time, and does nothing after."""
        return contextlib.nullcontext() if self.step_flops is not None else self._count_flops()

    @contextlib.contextmanager
    def _count_flops(self):
        with FlopCounterMode(display=False) as counter:
            yield
        self.step_flops = counter.get_total_flops() * self.accelerator.num_processes

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent inside out of the window (evaluation is not training)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - start

    def line(self, step: int, samples_seen: int, loss: torch.Tensor, model, lr: float, nonfinite_steps: int) -> dict:
        """The metrics record of the window ending at `step`, then a new window; every process calls it."""
        accelerator = self.accelerator
        loss_mean = accelerator.reduce(loss.detach().float(), reduction="mean").item()
        # skipped and filtered counts, summed over processes in one reduction
        counts = torch.tensor([self.skipped[r] for r in SKIP_REASONS] + [self.filtered[r] for r in FILTER_REASON_NAMES],
                              device=accelerator.device)
        summed = accelerator.reduce(counts, reduction="sum").tolist()
        self.skipped_total.update({r: int(n) for r, n in zip(SKIP_REASONS, summed) if n})
        self.filtered_total.update({r: int(n) for r, n in zip(FILTER_REASON_NAMES, summed[len(SKIP_REASONS):]) if n})
        elapsed = time.perf_counter() - self.start
        tflops = (self.step_flops or 0) * self.steps / elapsed / 1e12  # achieved, all processes together
        record = {
            "step": step,
            "samples": samples_seen,
            **({"epoch": round(samples_seen / self.num_samples, 4)} if self.num_samples else {}),
            "loss": round(loss_mean, 5),
            "logit_scale": round(model.logit_scale.exp().item(), 4),
            "lr": lr,
            "samples_per_s": round(self.global_batch * self.steps / elapsed, 2),
            "data_wait": round(self.wait / elapsed, 4),
            "decode": round(self.decode / elapsed, 4),
            "tflops": round(tflops, 4),
            "nonfinite_steps": nonfinite_steps,
            "skipped": dict(self.skipped_total),
            "filtered": dict(self.filtered_total),
        }
        if model.clip.logit_bias is not None:
            record["logit_bias"] = round(model.clip.logit_bias.item(), 4)
        if self.decoder is not None and self.decoder.stream is not None:  # the decode stream's own busy time
            record["decode_gpu"] = round(self.decoder.take_gpu_seconds() / elapsed, 4)
        if self.peak_tflops:
            record["mfu"] = round(tflops / (self.peak_tflops * accelerator.num_processes), 4)
        self._restart()
        return record


def train(cfg: Config) -> dict:
    """Run the training described by `cfg`; returns the last logged metrics (and zero-shot results, if any)."""
    # ---- processes, precision, run directory -------------------------------------------------------------------
    if cfg.train.accum_steps < 1:
        raise ConfigError(f"train.accum_steps must be at least 1, got {cfg.train.accum_steps}")
    if cfg.train.sharding == "fsdp" and cfg.train.precision == "fp16":
        raise ConfigError("train.sharding=fsdp trains with train.precision=bf16 or fp32: fp16 needs a loss scale "
                          "that the sharded gradients do not get")
    if cfg.train.fsdp_offload and cfg.train.sharding != "fsdp":
        raise ConfigError("train.fsdp_offload=true offloads FSDP's shards: it needs train.sharding=fsdp")
    _refuse_sharded_strategies()
    if not torch.accelerator.is_available():
        precision, why = cpu_precision(cfg.train.precision, cpu_native_bf16())
        if why:
            warnings.warn(why, stacklevel=2)
            cfg.train.precision = precision  # the run's config.yaml records what it trained in
    run_dir = Path(cfg.train.output_dir)
    log_with = None if cfg.train.log_with in ("", "none") else cfg.train.log_with
    # Without an accelerator, Accelerate must be told it runs on CPU; otherwise a multi-process launch on a
    # CPU-only machine starts torch.distributed but wraps nothing in DDP and gradients are never averaged.
    accelerator = Accelerator(mixed_precision=_PRECISION[cfg.train.precision], log_with=log_with,
                              project_dir=str(run_dir), step_scheduler_with_optimizer=False,
                              cpu=not torch.accelerator.is_available())
    try:
        return _train(cfg, accelerator, run_dir, log_with)
    finally:
        # closes the process group: a gloo process that exits with it open aborts the whole launch
        accelerator.end_training()
        release_run_dir(run_dir)  # the run directory's lock, if _train took it


def _refuse_sharded_strategies() -> None:
    """Stop a launch that asks Accelerate for FSDP or DeepSpeed before it starts. Sharding is the recipe's choice
    (`train.sharding=fsdp`, PyTorch's FSDP2, the same on CPU and GPU); Accelerate's own FSDP would drop the request
    without a word on CPU, and DeepSpeed is not supported. `accelerate launch` passes both requests (config file or
    flags) to the processes as these variables."""
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        raise ConfigError("this launch asks Accelerate for FSDP (ACCELERATE_USE_FSDP=true, from `accelerate config` "
                          "or the launcher's flags); clipalign shards the model itself: launch with --multi_gpu and "
                          "set train.sharding=fsdp (see docs/scaling.md)")
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError("this launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true, from `accelerate config` "
                          "or the launcher's flags), which clipalign does not support: launch with --multi_gpu, and "
                          "for models that do not fit one device set train.sharding=fsdp (see docs/scaling.md)")


def _train(cfg: Config, accelerator: Accelerator, run_dir: Path, log_with: str | None) -> dict:
    set_seed(cfg.train.seed)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.train.cpu_threads))
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    sharded = cfg.train.sharding == "fsdp"

    # ---- what the run reads, checked before anything is built: a typo costs seconds, not a model build ------------
    resume = _resume_from(cfg, run_dir)
    if resume is not None:
        _check_resumable(cfg, resume)
    if cfg.data.train or not cfg.data.synthetic:
        _expand_train_sources(cfg.data.train)
    _check_val(cfg, world)
    _check_eval_sources(cfg)
    # data.keep, keep_probability, min_score: their files read (and checked) now; None when none is set
    sample_filter = SampleFilter.from_config(cfg.data)
    if sample_filter is not None:
        accelerator.print(f"curating at load time: {sample_filter.describe()}")
    # batches to the device; data.decode=device: its decoder library is looked for now, not at the first batch
    decode = resolve_decode(cfg.data.decode, accelerator.device)
    to_device = DeviceDecoder(accelerator.device, cfg.data.decode_backend if decode == "device" else None,
                              budget_bytes=int(cfg.data.decode_budget_mb * 2**20))

    # ---- model, loss, optimizer, schedule ----------------------------------------------------------------------
    model = create_model(cfg.model, cfg.loss.kind)
    tokenizer = model.tokenizer
    model.attention = cfg.train.attention
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    if cfg.train.channels_last:
        model.clip.visual.to(memory_format=torch.channels_last)
    if cfg.train.patch_embed == "matmul":  # auto: the convolution until the matmul has been measured on a GPU
        use_matmul_patch_embed(model)
    if cfg.train.compile:
        # in place: the modules keep their parameter names, so checkpoints and exports are unchanged
        model.compile() if cfg.train.compile_scope == "model" else compile_blocks(model)
    compile_report = CompileReport() if cfg.train.compile else None  # warns if a function falls back to eager
    if sharded:  # after compiling the blocks, before the optimizer: it must hold the shards
        shard_model(model, accelerator.device, cfg.train.precision, offload=cfg.train.fsdp_offload)
    loss_fn = build_loss(cfg.loss)
    # fused: one kernel over all parameters; torch's default on CPU is a per-tensor loop, 17x slower on the tiny ViT
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                  fused=cfg.optim.fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio))
    if not sharded:  # DDP through Accelerate; a sharded model, its optimizer and schedule are used as they are
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(model)
    sharded_state = (raw_model, optimizer, scheduler) if sharded else None  # what a sharded checkpoint saves

    # ---- data ---------------------------------------------------------------------------------------------------
    _prepare_data(cfg, accelerator, raw_model.image_size)
    sources = _expand_train_sources(cfg.data.train)
    # one live run per run directory: the main process locks it for the run's lifetime (the OS drops the lock when the
    # process dies), and every process learns the verdict, so none starts training into a directory in use
    busy = None
    if is_main:
        try:
            lock_run_dir(run_dir)  # released by train() when the run ends
        except RunDirBusy as e:
            busy = str(e)
    if world > 1:
        busy = broadcast_object_list([busy])[0]
    if busy:
        raise ConfigError(busy)
    if is_main:
        cfg.save(run_dir / RUN_CONFIG_FILE)

    # ---- resume ------------------------------------------------------------------------------------------------
    step, samples_seen, state = 0, 0, {}
    if resume is not None:
        recipe_optim = _optimizer_settings(optimizer, scheduler)  # this run's, before the checkpoint's replace them
        state = read_trainer_state(resume)
        step, samples_seen = state["step"], state.get("samples_seen", 0)
        if sharded or is_sharded_checkpoint(resume):  # either kind into either kind, resharded for these processes
            load_training_state(resume, raw_model, getattr(optimizer, "optimizer", optimizer), scheduler,
                                accelerator.process_index)
        else:
            accelerator.load_state(str(resume))
        if state.get("processes", world) == world:
            # accelerate swallows a failed RNG restore (an info log): check each process's; all stop if one failed
            rng_errors = [e for e in gather_object([rng_restore_error(resume, accelerator.process_index)]) if e]
            if rng_errors:
                raise CheckpointError(f"cannot resume from {resume}: {'; '.join(rng_errors)}")
        else:
            warnings.warn(f"{resume} was written by {state['processes']} processes and this run has {world}: the "
                          f"weights, optimizer state and schedule resume exactly; the random streams (augmentation, "
                          f"dropout) and the data order start afresh, seeded by the step", stacklevel=2)
            set_seed(cfg.train.seed + step, device_specific=True)
        changed = _apply_optimizer_settings(optimizer, scheduler, recipe_optim, resume)
        if changed:
            accelerator.print(f"optimizer settings changed since {resume.name}, applied from step {step}: {changed}")
        accelerator.print(f"resumed from {resume} at step {step} ({state.get('sharding', 'ddp')} checkpoint, "
                          f"{cfg.train.sharding} run)")
    streams = world * max(1, cfg.data.workers)
    if cfg.data.resampled:
        # an endless random stream has no position to return to: a resumed run draws a fresh one, seeded by the step
        stream_args = {"seed": cfg.train.seed * 1_000_003 + step, "weights": cfg.data.weights}
    else:
        # exact passes replay the same shard permutations and continue each worker where it stopped
        stream_args = {"seed": cfg.train.seed, "start": _data_start(state, streams)}
    # where this process's streams stand: a launch that trains no step (resumed at its last step) saves them again
    workers_per_process = max(1, cfg.data.workers)
    start_positions = {} if cfg.data.resampled else {
        s: p for s, p in stream_args["start"].items() if s // workers_per_process == accelerator.process_index}
    loader = make_train_loader(sources, tokenizer, raw_model.image_size, cfg.data.batch_size, cfg.data.workers,
                               resampled=cfg.data.resampled, shuffle_buffer=cfg.data.shuffle_buffer,
                               crop_scale=cfg.data.train_crop_scale, pin_memory=accelerator.device.type == "cuda",
                               decode=decode, decode_budget_mb=cfg.data.decode_budget_mb,
                               max_image_pixels=cfg.data.max_image_pixels,
                               # a dead source or a stalled worker stops the run with a DataSourceError naming it
                               max_source_failures=cfg.data.max_source_failures,
                               batch_timeout=cfg.data.batch_timeout, max_unusable=cfg.data.max_unusable,
                               captions=cfg.data.captions,  # caption sources and weights; {} = the default rule
                               sample_filter=sample_filter,  # curation: before decoding, counted as `filtered`
                               # the model's resize (interpolation, resize mode), the one its evaluation uses
                               preprocess_cfg=getattr(raw_model.clip.visual, "preprocess_cfg", None), **stream_args)
    batches = iter(loader)
    positions: dict[int, tuple[int, int]] = dict(start_positions)  # stream -> (epoch, emitted) of the last batch

    # ---- logging -----------------------------------------------------------------------------------------------
    if log_with:
        # trackers are shared: pipe: commands and URL query strings (credentials) are redacted there
        accelerator.init_trackers("tensorboard", config=_flat(shareable_config(cfg)))
    metrics_path = run_dir / METRICS_FILE
    global_batch = cfg.data.batch_size * world * cfg.train.accum_steps  # samples per optimizer step
    peak_tflops = cfg.train.peak_tflops or _known_peak_tflops(accelerator.device, cfg.train.precision)
    window = MetricsWindow(accelerator, global_batch, peak_tflops, cfg.data.num_samples, to_device)
    nonfinite = NonfiniteGuard(optimizer, world, cfg.train.max_nonfinite, run_dir)
    last: dict = {}
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not is_main, dynamic_ncols=True, desc="train")

    # ---- the loop ----------------------------------------------------------------------------------------------
    # padding after every caption's end is cut per batch where the text tower cannot see it (causal, EOT-pooled)
    trim_text = cfg.train.trim_text and raw_model.trims_text
    model.train()
    first_step = step
    try:
        while step < cfg.train.steps:
            _sync_debug(cfg.train.sync_debug and step > first_step)  # the first step syncs (autotuning, FLOP count)
            t0, decoding = time.perf_counter(), to_device.seconds
            micro_batches, step_keys = [], []
            for _ in range(cfg.train.accum_steps):
                batch = next(batches)
                texts = trim_padding(batch["texts"]) if trim_text else batch["texts"]
                # data.decode=device: JPEG rows are decoded here; rows nothing decodes are counted like the workers'
                # skips
                images, decode_skipped = to_device(batch, memory_format)
                micro_batches.append((images, texts.to(accelerator.device, non_blocking=True)))
                window.skipped.update(batch["skipped"])
                window.skipped.update(decode_skipped)
                window.filtered.update(batch.get("filtered", {}))
                stream, epoch, emitted = batch["position"]
                positions[stream] = (epoch, emitted)
                step_keys.extend(batch["keys"])
            window.decode += to_device.seconds - decoding  # decoding is work, not waiting: its own figure
            window.wait += time.perf_counter() - t0 - (to_device.seconds - decoding)

            # accumulated micro-batches are scored together: negatives come from the whole accumulated batch;
            # the first step also counts the FLOPs of a step, for the MFU estimate
            with window.counting_flops():
                loss = forward_backward(model, loss_fn, micro_batches, accelerator)
            if sharded:
                sync_replicated_grads(raw_model)  # the temperature (and bias): whole on every process, outside FSDP
            samples_seen += global_batch

            # a non-finite loss or gradient on any process makes no update anywhere, decided on the device: no wait for
            # the GPU here (under fp16 the loss scaler skips steps with non-finite gradients itself)
            finite = nonfinite.local_verdict(loss, raw_model, grads=cfg.train.precision != "fp16")
            update = nonfinite.arm(accelerator.reduce(finite, reduction="sum"), step + 1)
            if cfg.optim.grad_clip > 0:
                if sharded:  # the norm of the whole gradient, over every shard
                    clip_grad_norm(raw_model, cfg.optim.grad_clip)
                else:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            if update:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            raw_model.clamp_logit_scale()
            step += 1
            nonfinite.check(wait=False)  # the previous step's verdict, long since computed: counts, or stops the run
            _sync_debug(False)  # logging, evaluation and checkpoints wait for the device on purpose
            if cfg.data.log_keys:
                _append_jsonl(keys_file(run_dir, accelerator.process_index), {"step": step, "keys": step_keys})
            window.steps += 1
            bar.update(1)

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                nonfinite.check(wait=True)
                last = window.line(step, samples_seen, loss, raw_model, scheduler.get_last_lr()[0], nonfinite.total)
                if is_main:
                    _append_jsonl(metrics_path, last)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", scale=f"{last['logit_scale']:.1f}",
                                    sps=f"{last['samples_per_s']:.0f}")
                if log_with:
                    accelerator.log({k: v for k, v in last.items() if k not in ("skipped", "filtered")}, step=step)

            if _evaluates(cfg) and cfg.eval.every and step % cfg.eval.every == 0 \
                    and step < cfg.train.steps:
                with window.paused():  # evaluation time is not training time
                    # every process: a sharded model gathers its weights
                    eval_model = _whole_model(cfg, raw_model, accelerator.device)
                    if is_main:
                        results = _evaluate(cfg, eval_model)
                        _append_jsonl(metrics_path, {"step": step, **results})
                        if log_with:
                            accelerator.log({f"{kind}/{k}": v for kind, result in results.items()
                                             for k, v in result.items() if isinstance(v, (int, float))}, step=step)
                    accelerator.wait_for_everyone()

            if cfg.data.val and cfg.eval.val_every and step % cfg.eval.val_every == 0 and step < cfg.train.steps:
                with window.paused():  # validation time is not training time
                    _validate(cfg, accelerator, raw_model, loss_fn, memory_format, step, metrics_path, log_with)

            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
                _checkpoint(accelerator, run_dir, step, cfg,
                            _trainer_state(accelerator, samples_seen, positions, streams, cfg.train.sharding),
                            tokenizer, sharded_state)
    finally:  # before an error is printed: the message starts its own line
        bar.close()
    nonfinite.check(wait=True)

    # ---- end: checkpoint, zero-shot, export --------------------------------------------------------------------
    if resume is not None and resume.resolve() == checkpoint_dir(run_dir, step).resolve():
        final = resume  # relaunched after its last checkpoint (killed while ending): nothing new to save
    else:
        final = _checkpoint(accelerator, run_dir, step, cfg,
                            _trainer_state(accelerator, samples_seen, positions, streams, cfg.train.sharding),
                            tokenizer, sharded_state)
    summary = {"step": step, "samples": samples_seen, "checkpoint": str(final), "skipped": dict(window.skipped_total),
               "filtered": dict(window.filtered_total), "loss": last.get("loss", _last_logged_loss(metrics_path))}
    if cfg.data.val:  # every process, on the model as it trains (a sharded one stays sharded)
        summary["val"] = _validate(cfg, accelerator, raw_model, loss_fn, memory_format, step, metrics_path, log_with)
    eval_model = _whole_model(cfg, raw_model, accelerator.device) if _evaluates(cfg) \
        else raw_model
    if is_main:
        summary.update(_evaluate_and_export(cfg, eval_model, final, metrics_path))
        if compile_report is not None:
            summary["compile"] = compile_report.summary()
        accelerator.print(json.dumps(summary, indent=2))
        write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary


def _sync_debug(on: bool) -> None:
    """Report each host-device synchronisation as a warning naming its line (`train.sync_debug`), or stop."""
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn" if on else 0)


def _whole_model(cfg: Config, model, device: torch.device):
    """The model to evaluate: `model` itself, or for a sharded one a whole copy on process 0 (None on the others),
    built from the gathered weights. Every process must call it."""
    if not is_sharded(model):
        return model
    state = full_state_dict(model)  # gathers every shard; process 0 receives them
    if not state:
        return None
    whole = create_model(cfg.model, cfg.loss.kind, load_pretrained=False)
    whole.load_state_dict(state)
    whole.tokenizer, whole.attention = model.tokenizer, model.attention
    return whole.to(device)


@torch.compiler.set_stance("force_eager")  # as _evaluate
def _validate(cfg: Config, accelerator: Accelerator, model, loss_fn, memory_format: torch.memory_format, step: int,
              metrics_path: Path, log_with: str | None) -> dict:
    """Validate on data.val with the training's loss and batches (every process; see clipalign.validate), log the
    result to the metrics file (main process) and the tracker (`val/...`), and return it."""
    from clipalign.validate import validate

    result = validate(model, loss_fn, accelerator, cfg.data.val, cfg.data.batch_size * cfg.train.accum_steps,
                      cfg.eval.val_samples, forward_size=cfg.data.batch_size, trim_text=cfg.train.trim_text,
                      max_image_pixels=cfg.data.max_image_pixels, captions=cfg.data.captions or None,
                      memory_format=memory_format)
    if accelerator.is_main_process:
        _append_jsonl(metrics_path, {"step": step, "val": result})
    if log_with:
        accelerator.log({f"val/{k}": v for k, v in result.items() if isinstance(v, (int, float))}, step=step)
    return result


# eagerly under train.compile: these no-grad, eval-mode passes, at batch sizes and text lengths of their own, would
# need graphs beside training's within each compiled block's recompile limit (compile_blocks counts training's), to
# speed up passes that spend their time decoding images
@torch.compiler.set_stance("force_eager")
def _evaluate(cfg: Config, model) -> dict:
    """The configured evaluations: {"zeroshot": classification results, "retrieval": retrieval results}."""
    from clipalign.evaluate import resolve_lines, zero_shot_classification, zero_shot_retrieval

    results = {}
    if _eval_set(cfg, "zeroshot"):
        classnames = resolve_lines(cfg.eval.classnames, "classnames") if cfg.eval.classnames else None
        templates = resolve_lines(cfg.eval.templates, "templates") if cfg.eval.templates else None
        results["zeroshot"] = zero_shot_classification(model, _eval_set(cfg, "zeroshot"), classnames=classnames,
                                                       templates=templates, batch_size=cfg.eval.batch_size,
                                                       progress=False, precision=cfg.eval.precision,
                                                       max_image_pixels=cfg.data.max_image_pixels,
                                                       table_format=_table_format(cfg))
    if _eval_set(cfg, "retrieval"):
        results["retrieval"] = zero_shot_retrieval(model, _eval_set(cfg, "retrieval"), batch_size=cfg.eval.batch_size,
                                                   progress=False, precision=cfg.eval.precision,
                                                   max_image_pixels=cfg.data.max_image_pixels,
                                                   table_format=_table_format(cfg))
    return results


def _table_format(cfg: Config) -> str | None:
    """eval.table_format for the evaluation readers: None (from the extension) for auto."""
    return None if cfg.eval.table_format == "auto" else cfg.eval.table_format


def _evaluate_and_export(cfg: Config, model, checkpoint: Path, metrics_path: Path) -> dict:
    from clipalign.export import export_model

    out: dict = {}
    if _evaluates(cfg):
        out.update(_evaluate(cfg, model))
        _append_jsonl(metrics_path, {"step": read_trainer_state(checkpoint)["step"], **out})
    if cfg.export.dir:
        out["export"] = str(export_model(checkpoint, cfg.export.dir, onnx=cfg.export.onnx))
    return out


# dense bf16/fp16 tensor-core peaks (TFLOP/s) by device name, for the MFU estimate; train.peak_tflops overrides
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0,
                "RTX 4090": 165.0, "V100": 125.0}


def _known_peak_tflops(device: torch.device, precision: str) -> float:
    if device.type != "cuda" or precision == "fp32":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_TFLOPS.items() if key in name), 0.0)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def main(argv: list[str] | None = None) -> None:
    epilog = ("Overrides are section.key=value, e.g. train.steps=100 optim.lr=1e-3\n\n"
              "Recipe keys as section.key=default (values are checked against their ranges before anything starts):\n\n"
              + describe_keys())
    parser = argparse.ArgumentParser(prog="clipalign-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    parser.add_argument("recipe", help="YAML recipe (sections data, model, loss, optim, train, eval, export)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        train(load_config(args.recipe, args.overrides))
    # a bad recipe or launch, a full disk, a data source that cannot be read: say what, not where
    except (ConfigError, CheckpointSaveError, DataSourceError) as e:
        parser.exit(2, f"clipalign-train: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
