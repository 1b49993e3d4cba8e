"""What the training loop watches, step by step: the non-finite guard, the metrics of each log window, and where
the host waits for the device (`train.sync_debug`).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from clipalign.checkpoint import latest_checkpoint
from clipalign.data.curation import FILTER_REASON_NAMES
from clipalign.data.device_decode import DeviceDecoder
from clipalign.data.sample import STREAM_SKIP_REASONS as SKIP_REASONS  # one list, in clipalign.data.sample


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


# dense bf16/fp16 tensor-core peaks (TFLOP/s) by device name, for the MFU estimate; train.peak_tflops overrides
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0,
                "RTX 4090": 165.0, "V100": 125.0}


def known_peak_tflops(device: torch.device, precision: str) -> float:
    if device.type != "cuda" or precision == "fp32":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_TFLOPS.items() if key in name), 0.0)


def sync_debug(on: bool) -> None:
    """Report each host-device synchronisation as a warning naming its line (`train.sync_debug`), or stop."""
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn" if on else 0)
