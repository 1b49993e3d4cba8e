"""Memory per process of DDP against FSDP (`train.sharding=fsdp`) on CPU processes, with the step time beside it.

For each process count (`--processes`) and sharding (`--sharding`), one group of fresh processes (`accelerate launch
--multi_gpu`, gloo on CPU, `OMP_NUM_THREADS=1` and torch threads = cores / processes as the trainer sets them) builds
the model the trainer's way: `clipalign.model.create_model(ModelConfig(name=--model, vision_cfg={"image_size": S}))`
with the same seed everywhere, then `clipalign.sharding.shard_model(model, device, "fp32")` (fsdp) before
`torch.optim.AdamW(clipalign.optim.param_groups(model, 0.2), fused=True)`, or `accelerator.prepare(model,
optimizer)` (ddp). It trains `--steps` steps of `clipalign.accumulate.forward_backward` with the contrastive local
loss on a random uint8 batch of `--batch-size` images per process and tokenized random captions (cut after their
longest caption, as the trainer does), fp32, then (fsdp) `sync_replicated_grads`, `optimizer.step()`,
`zero_grad(set_to_none=True)`, `clamp_logit_scale()`. `--image-size` (default 112) shrinks the images, not the
model: a ViT's parameters do not depend on its input size beyond the positional table.

What each process reports (the table shows the largest over processes; --json has every process):

- state: the bytes of parameters, gradients (after the last backward) and AdamW state (exp_avg, exp_avg_sq and the
  step tensors, after the last update) that the process holds: for DTensors (FSDP's shards) the storage of
  `.to_local()`, each storage counted once (FSDP's shards are views of padded flat buffers).
- DDP's gradient buckets: DDP keeps a second copy of the gradients in its communication buckets
  (`gradient_as_bucket_view=False`, Accelerate's default); counted from DDP's own logging data (`bucket_sizes`),
  else analytically as the gradients' size (the table says which). FSDP's all-gather and reduce-scatter buffers
  are transient (one unit at a time) and are not counted here; they show in the peak RSS.
- resident memory, from /proc/self/status: VmRSS and VmHWM (peak) after the model is built and sharded or wrapped
  and the optimizer made ("build"), then VmHWM is reset (/proc/self/clear_refs) and read again after the steps
  ("train"); peak RSS = max of both peaks and `getrusage(RUSAGE_SELF).ru_maxrss`. Every process builds the whole
  model before FSDP cuts it, so FSDP's build peak holds a whole fp32 model.
- the median step time over the steps after the first, each from a barrier to the next (the slowest process).

The FSDP/DDP ratio is that of state bytes at the same process count: against DDP's measured state, or when DDP did
not run there, against DDP's state computed from the parameter count (every process holds all of it: 16 bytes per
parameter plus the step tensors), marked "computed".

The allocator: glibc serves allocations below its mmap threshold from its heap, and that threshold rises (up to
32 MiB) as large blocks are freed. FSDP allocates and frees every unit's whole parameters and gradients each step;
on CPU, glibc's heap then keeps a growing store of freed blocks: with its own threshold, FSDP's peak RSS on 4
processes was 1.6-2.7 GiB above its live allocations (mallinfo2), 1.3-3.6 whole fp32 models of free heap, on
ViT-B-32 and on ViT-L-14-shaped models of 137M and 266M parameters. The workers therefore run with a fixed
MALLOC_MMAP_THRESHOLD_ (`--mmap-threshold-mib`, default 4 MiB), under which blocks of 4 MiB and more are mapped and
returned to the OS when freed, so that RSS follows the tensors (peak 1.82 GiB instead of 2.33 GiB on the 137M model,
at 1.3-1.6x its step time from page faults); `--mmap-threshold-mib 0` measures glibc's default, what
`python -m clipalign.train` gets.

Memory safety: before launching a configuration, its memory is predicted from the parameter count P (built on the
meta device), the processes N and the parameters U of the FSDP units held whole at once (the root unit and two
transformer blocks: the running one and the prefetched one):

    DDP  per process = 1.2 x 20 P                                        + 1 GiB
         (fp32 params 4 P + grads 4 P + DDP buckets 4 P + AdamW moments 8 P)
    FSDP per process = 1.2 x max(4 P + 4 P / N, 16 P / N + 8 U) [+ 16 P] + 1 GiB
         (build: the whole fp32 model and its shards; training: 1/N of the 16 P, and U whole, params + grads;
          [+ 16 P], four whole fp32 models of heap, only with --mmap-threshold-mib 0)
    total            = N x per process + 0.5 GiB (the launcher)

1.2 is the margin for activations, communication buffers and allocator slack; 1 GiB is one process's Python, torch,
open_clip, accelerate (0.74 GiB measured after the imports) and gloo. A configuration whose total exceeds
MemAvailable (/proc/meminfo, read just before its launch) is not launched: it prints "does not fit: needs ~X GiB of
Y GiB available" with the arithmetic, and its table row says so (a DDP row then shows DDP's state as computed from
P). While a configuration runs, its processes are killed if MemAvailable falls under `--min-free-gib` (a prediction
that was wrong must not take the machine down). Measured against it (ViT-B-32 at 64 px, 2 processes, glibc's
threshold): DDP peaked at 0.74 GiB + 1.04 x 20 P.

    python tools/benchmark_sharding.py                                   # ViT-L-14 at 112 px, 2 and 4 processes
    python tools/benchmark_sharding.py --json sharding.json --steps 2
    python tools/benchmark_sharding.py --model ViT-B-32 --image-size 64 --processes 2 4 --batch-size 4
    python tools/benchmark_sharding.py --model tiny-vit-64 --image-size 64 --processes 2 --sharding fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
SHARDINGS = ("ddp", "fsdp")
MARGIN = 1.2  # activations, communication buffers, allocator slack
PROCESS_BASE = GIB  # one worker: 0.75 GiB after its imports (torch, open_clip, accelerate), then gloo, autograd
LAUNCHER = int(0.5 * GIB)  # `accelerate launch` (torchrun's agent), once per configuration
RETAINED_MODELS = 4  # FSDP under glibc's dynamic mmap threshold: freed unit buffers kept in the heap (whole models)
_WORDS = ["red", "green", "blue", "small", "large", "striped", "circle", "square", "dog", "cat", "boat", "tree"]


# ---- the prediction ------------------------------------------------------------------------------------------------


def predict_memory(sharding: str, processes: int, params: int, unit_params: int = 0,
                   heap_retention: bool = False) -> dict:
    """Predicted memory of one configuration: `per_process` and `total` bytes, and the `formula` that gave them.

    Args:
        sharding: "ddp" or "fsdp".
        processes: N, the processes of the launch.
        params: P, the model's parameter count.
        unit_params: U, the parameters FSDP holds whole at once (root unit + two blocks); FSDP only.
        heap_retention: glibc's own mmap threshold (`--mmap-threshold-mib 0`): FSDP's freed unit buffers stay in
            the heap, counted as RETAINED_MODELS whole fp32 models more per process.
    """
    n, p, u = processes, params, unit_params
    extra = 0
    if sharding == "ddp":
        core = 20 * p
        formula = f"{MARGIN} x 20 x {p / 1e6:.1f}M params"
    elif sharding == "fsdp":
        build, train = 4 * p + 4 * p / n, 16 * p / n + 8 * u
        core = max(build, train)
        formula = (f"{MARGIN} x max(build 4 x {p / 1e6:.1f}M x (1 + 1/{n}), train 16 x {p / 1e6:.1f}M / {n} "
                   f"+ 8 x {u / 1e6:.1f}M unsharded)")
        if heap_retention:
            extra = RETAINED_MODELS * 4 * p
            formula += f" + heap {RETAINED_MODELS} x 4 x {p / 1e6:.1f}M"
    else:
        raise ValueError(f"sharding {sharding!r}: expected one of {', '.join(SHARDINGS)}")
    per_process = int(MARGIN * core + extra) + PROCESS_BASE
    total = n * per_process + LAUNCHER
    formula = (f"{n} x ({formula} = {(MARGIN * core + extra) / GIB:.2f} GiB, + {PROCESS_BASE / GIB:.2f} GiB per "
               f"process) + {LAUNCHER / GIB:.2f} GiB launcher = {total / GIB:.1f} GiB")
    return {"per_process": per_process, "total": total, "formula": formula}


def fit_verdict(prediction: dict, available: int) -> str | None:
    """None when the predicted total fits in `available` bytes; else why the configuration must not run (the
    arithmetic is `prediction["formula"]`)."""
    if prediction["total"] <= available:
        return None
    return f"does not fit: needs ~{prediction['total'] / GIB:.1f} GiB of {available / GIB:.1f} GiB available"


def ddp_state_bytes(params: int, tensors: int) -> int:
    """The params + grads + AdamW state of one DDP process (it holds them all): fp32 param, grad, exp_avg and
    exp_avg_sq per parameter, and one fp32 step tensor per parameter tensor (fused AdamW)."""
    return 16 * params + 4 * tensors


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


# ---- the parent ----------------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-L-14", help="open_clip model config (clipalign's own ones included)")
    p.add_argument("--image-size", type=int, default=112,
                   help="input side of the image tower (vision_cfg.image_size); 0 = the config's own")
    p.add_argument("--processes", type=int, nargs="+", default=[2, 4], help="process counts, each a launch")
    p.add_argument("--sharding", nargs="+", choices=SHARDINGS, default=list(SHARDINGS), help="what to run")
    p.add_argument("--batch-size", type=int, default=2, help="images per process and step")
    p.add_argument("--steps", type=int, default=3, help="training steps per configuration (the first is not timed)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration before it is killed")
    p.add_argument("--mmap-threshold-mib", type=float, default=4.0,
                   help="the workers' MALLOC_MMAP_THRESHOLD_: blocks this large or larger are mapped and unmapped "
                        "(returned to the OS when freed); 0 = glibc's own (dynamic) threshold, whose heap keeps "
                        "FSDP's freed unit buffers")
    p.add_argument("--min-free-gib", type=float, default=0.75,
                   help="kill a running configuration when MemAvailable falls below this")
    p.add_argument("--json", help="also write every process's figures to this file")
    # internal: the parameter count (a subprocess, so the parent stays small) and one process of a configuration
    p.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-sharding", choices=SHARDINGS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be at least 1")
    if any(n < 2 for n in args.processes):
        p.error("--processes: each count must be at least 2 (one process has nothing to shard over)")
    if args.image_size < 0 or args.mmap_threshold_mib < 0:
        p.error("--image-size and --mmap-threshold-mib must be positive, or 0 (the config's own, glibc's own)")
    return args


def _model_config(args: argparse.Namespace):
    from clipalign.config import ModelConfig

    return ModelConfig(name=args.model, vision_cfg={"image_size": args.image_size} if args.image_size else {})


def count_params(args: argparse.Namespace) -> dict:
    """Parameter counts of the model, built on the meta device: total, tensors, the FSDP units, image size."""
    import torch

    from clipalign.model import create_model, transformer_blocks

    with torch.device("meta"):
        model = create_model(_model_config(args), "contrastive", device="meta")
    total = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in transformer_blocks(model)]
    root = total - sum(blocks)
    largest = sorted(blocks, reverse=True)[:2]
    return {"params": total, "tensors": sum(1 for _ in model.parameters()), "blocks": len(blocks),
            "root_params": root, "unit_params": root + sum(largest), "image_size": model.image_size}


def _env(mmap_threshold_mib: float = 0.0) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold_mib > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold_mib * 2**20))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["ACCELERATE_USE_CPU"] = "true"  # gloo and DDP on CPU; --multi_gpu alone gives no backend there
    env["OMP_NUM_THREADS"] = "1"  # the workers set torch's threads themselves (cores / processes)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes even on a GPU machine
    return env


def _counts_subprocess(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--count", "--model", args.model,
           "--image-size", str(args.image_size)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _malloc(args: argparse.Namespace) -> str:
    if args.mmap_threshold_mib > 0:
        return f"MALLOC_MMAP_THRESHOLD_={int(args.mmap_threshold_mib * 2**20)} ({args.mmap_threshold_mib:g} MiB)"
    return "glibc's dynamic mmap threshold"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: argparse.Namespace, sharding: str, processes: int) -> dict:
    """One configuration under `accelerate launch`, watched for time and memory; returns what rank 0 wrote,
    or {"status": why not}."""
    with tempfile.TemporaryDirectory(prefix="bench-sharding-") as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "launch.log"
        worker = [str(Path(__file__).resolve()), "--worker", "--run-sharding", sharding, "--model", args.model,
                  "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                  "--steps", str(args.steps), "--out", str(out)]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(processes),
               "--main_process_port", str(_free_port()), *worker]
        start = time.monotonic()
        status, lowest = None, mem_available()
        with open(log, "w") as f:
            # a session of its own: a kill takes the launcher and every worker
            proc = subprocess.Popen(cmd, cwd=REPO, env=_env(args.mmap_threshold_mib), stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            while proc.poll() is None:
                time.sleep(0.25)
                free = mem_available()
                lowest = min(lowest, free)
                if free < args.min_free_gib * GIB:
                    status = f"killed: MemAvailable fell to {free / GIB:.2f} GiB"
                elif time.monotonic() - start > args.timeout:
                    status = f"timed out ({args.timeout:.0f} s)"
                if status:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
        wall = time.monotonic() - start
        tail = log.read_text(errors="replace")[-4000:]
        if status is None and (proc.returncode != 0 or not out.exists()):
            status = f"failed (exit {proc.returncode})"
        if status:
            print(f"  {sharding} x {processes}: {status}; log tail:\n{tail}", flush=True)
            return {"status": status, "wall_s": round(wall, 1), "log_tail": tail}
        result = json.loads(out.read_text())
        result.update(status="ok", wall_s=round(wall, 1), lowest_mem_available=lowest)
        return result


def summarize(per_process: list[dict]) -> dict:
    """The figures of one configuration: the largest per process, and the peak RSS summed over processes."""
    peaks = [r["rss"]["peak"] for r in per_process]
    out = {k: max(r[k] for r in per_process)
           for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "state_bytes")}
    comm = [r["comm_bytes"] for r in per_process if r.get("comm_bytes") is not None]
    out["comm_bytes"] = max(comm) if comm else None
    out["comm_source"] = per_process[0].get("comm_source")
    out["peak_rss"] = max(peaks)
    out["sum_peak_rss"] = sum(peaks)
    for key in ("built", "ready", "hwm_build", "hwm_train"):
        values = [r["rss"][key] for r in per_process if r["rss"].get(key) is not None]
        out[f"rss_{key}"] = max(values) if values else None
    out["step_times_s"] = per_process[0]["step_times_s"]
    timed = out["step_times_s"][1:] or out["step_times_s"]
    out["step_s"] = statistics.median(timed)
    out["losses"] = per_process[0]["losses"]
    return out


def _gib(x: float | None, suffix: str = "") -> str:
    return f"{x / GIB:.2f}{suffix}" if isinstance(x, (int, float)) else "–"


def add_ratios(rows: list[dict], counts: dict) -> None:
    """Each FSDP row's `state_ratio`: its state over DDP's at the same process count (measured, else computed)."""
    ddp = {r["processes"]: r for r in rows if r["sharding"] == "ddp" and r["status"] == "ok"}
    computed = ddp_state_bytes(counts["params"], counts["tensors"])
    for row in rows:
        if row["sharding"] != "fsdp" or row["status"] != "ok":
            continue
        ref = ddp.get(row["processes"])
        row["ddp_state_bytes"] = ref["summary"]["state_bytes"] if ref else computed
        row["ddp_state_source"] = "measured" if ref else "computed"
        row["state_ratio"] = row["summary"]["state_bytes"] / row["ddp_state_bytes"]


def format_table(rows: list[dict], counts: dict) -> str:
    """Markdown: one row per configuration; one that did not run says why."""
    header = ("| configuration | processes | state GiB / process (params + grads + AdamW) | DDP buckets GiB / process "
              "| peak RSS GiB / process (build, train) | Σ peak RSS GiB | step s (median) | state FSDP / DDP |")
    lines = [header, "| " + " | ".join("---" for _ in range(header.count("|") - 1)) + " |"]
    computed = ddp_state_bytes(counts["params"], counts["tensors"])
    for row in rows:
        name, n = row["sharding"].upper(), row["processes"]
        if row["status"] != "ok":
            state = f"{_gib(computed)} (computed)" if row["sharding"] == "ddp" else "–"
            buckets = f"{_gib(4 * counts['params'])} (computed)" if row["sharding"] == "ddp" else "–"
            lines.append(f"| {name} | {n} | {state} | {buckets} | {row['status']} | – | – | – |")
            continue
        s = row["summary"]
        buckets = "–" if s["comm_bytes"] is None else \
            _gib(s["comm_bytes"]) + ("" if s["comm_source"] == "ddp" else " (analytic)")
        ratio = f"{row['state_ratio']:.3f}x" + (" (vs computed DDP)" if row["ddp_state_source"] == "computed" else "") \
            if "state_ratio" in row else "–"
        lines.append(f"| {name} | {n} | {_gib(s['state_bytes'])} | {buckets} | {_gib(s['peak_rss'])} "
                     f"({_gib(s['rss_hwm_build'])}, {_gib(s['rss_hwm_train'])}) | {_gib(s['sum_peak_rss'])} "
                     f"| {s['step_s']:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parse_args(argv)
    if args.count:
        print(json.dumps(count_params(args)))
        return []
    if args.worker:
        _worker(args)
        return []
    counts = _counts_subprocess(args)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    print(f"{args.model} at {counts['image_size']} px: {counts['params'] / 1e6:.1f}M parameters in "
          f"{counts['tensors']} tensors, {counts['blocks']} blocks (largest FSDP units held at once: "
          f"{counts['unit_params'] / 1e6:.1f}M); batch {args.batch_size} per process, {args.steps} steps, fp32, "
          f"{cores} cores; workers' malloc: {_malloc(args)}", flush=True)
    rows = []
    for processes in args.processes:
        for sharding in args.sharding:
            prediction = predict_memory(sharding, processes, counts["params"], counts["unit_params"],
                                        heap_retention=args.mmap_threshold_mib <= 0)
            available = mem_available()
            row = {"sharding": sharding, "processes": processes, "prediction": prediction,
                   "mem_available": available}
            verdict = fit_verdict(prediction, available)
            if verdict:
                row["status"] = verdict
                print(f"{sharding} x {processes}: {verdict}: {prediction['formula']}; not launched", flush=True)
                rows.append(row)
                continue
            print(f"{sharding} x {processes}: predicted ~{prediction['total'] / GIB:.1f} GiB of "
                  f"{available / GIB:.1f} GiB available; launching", flush=True)
            result = _launch(args, sharding, processes)
            row.update(status=result.pop("status"), wall_s=result.pop("wall_s"))
            if row["status"] == "ok":
                row["per_process"] = result["per_process"]
                row["summary"] = summarize(result["per_process"])
                row["lowest_mem_available"] = result["lowest_mem_available"]
                s = row["summary"]
                print(f"  state {_gib(s['state_bytes'])} GiB / process, peak RSS {_gib(s['peak_rss'])} GiB / process "
                      f"(sum {_gib(s['sum_peak_rss'])}), step {s['step_s']:.2f} s; {row['wall_s']:.0f} s in all",
                      flush=True)
            else:
                row["log_tail"] = result.get("log_tail", "")
            rows.append(row)
    add_ratios(rows, counts)
    print()
    print(format_table(rows, counts))
    print()
    print("state: params + grads + AdamW moments and steps held by one process (the largest over processes); "
          "peak RSS: the largest process's (its peak while building and sharding or wrapping the model, and while "
          "training); step: median over the steps after the first.")
    fsdp_ratios = {r["processes"]: r["state_ratio"] for r in rows if "state_ratio" in r}
    if fsdp_ratios:
        n = max(fsdp_ratios)
        print(f"FSDP at {n} processes holds {fsdp_ratios[n]:.3f}x of DDP's params + grads + optimizer memory per "
              f"process ({1 / n:.3f}x is the ideal 1/N).")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv if argv is None else argv, "model": args.model,
                                               "counts": counts, "batch_size": args.batch_size,
                                               "malloc": _malloc(args),
                                               "steps": args.steps, "cores": cores, "rows": rows}, indent=1))
    return rows


# ---- one process of a configuration --------------------------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _storage_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors` (DTensors: their local shards), each storage once."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "to_local"):
            t = t.to_local()
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _ddp_bucket_bytes(model) -> int | None:
    """Bytes of DDP's gradient buckets, from its logging data (after the first backward), or None."""
    try:
        sizes = model._get_ddp_logging_data().get("bucket_sizes")
        if model.gradient_as_bucket_view:
            return 0  # the gradients are views of the buckets: no second copy
        return sum(int(s) for s in str(sizes).replace(" ", "").split(",") if s)
    except Exception:  # a private API: the caller falls back to the analytic figure
        return None


def _worker(args: argparse.Namespace) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    from clipalign.accumulate import forward_backward
    from clipalign.config import LossConfig
    from clipalign.loss import build_loss
    from clipalign.model import create_model, trim_padding
    from clipalign.optim import param_groups
    from clipalign.sharding import shard_model, sync_replicated_grads
    from clipalign.train import cpu_threads

    rss = {"start": _proc_status()["VmRSS"]}
    accelerator = Accelerator(mixed_precision="no", cpu=True, step_scheduler_with_optimizer=False)
    try:
        device, rank = accelerator.device, accelerator.process_index
        torch.set_num_threads(cpu_threads(0))
        set_seed(0)  # the same initial model on every process, as the trainer builds it
        model = create_model(_model_config(args), "contrastive")
        rss["built"] = _proc_status()["VmRSS"]
        sharded = args.run_sharding == "fsdp"
        if sharded:
            shard_model(model, device, "fp32")
        loss_fn = build_loss(LossConfig())
        optimizer = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4, fused=True)
        if not sharded:
            model, optimizer = accelerator.prepare(model, optimizer)
        raw = accelerator.unwrap_model(model)
        status = _proc_status()
        rss.update(ready=status["VmRSS"], hwm_build=max(status["VmHWM"], _maxrss()))
        peak_so_far = _maxrss()
        rss["reset"] = _reset_peak_rss()

        g = torch.Generator().manual_seed(1000 + rank)
        images = torch.randint(0, 256, (args.batch_size, 3, raw.image_size, raw.image_size), dtype=torch.uint8,
                               generator=g)
        picks = torch.randint(0, len(_WORDS), (args.batch_size, 3), generator=g).tolist()
        texts = raw.tokenizer([f"a {_WORDS[a]} {_WORDS[b]} next to a {_WORDS[c]} number {i}"
                               for i, (a, b, c) in enumerate(picks)])
        if raw.trims_text:
            texts = trim_padding(texts)
        optim = getattr(optimizer, "optimizer", optimizer)
        model.train()
        times, losses, rss_steps = [], [], []  # rss_steps: (VmRSS, VmHWM) after each step
        for _ in range(args.steps):
            accelerator.wait_for_everyone()
            start = time.perf_counter()
            loss = forward_backward(model, loss_fn, [(images.to(device), texts.to(device))], accelerator)
            if sharded:
                sync_replicated_grads(raw)
            grads_bytes = _storage_bytes(p.grad for p in raw.parameters())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            raw.clamp_logit_scale()
            accelerator.wait_for_everyone()  # the step ends when the last process is done
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
            status = _proc_status()
            rss_steps.append([status["VmRSS"], status["VmHWM"]])
        status = _proc_status()
        rss.update(train_end=status["VmRSS"], hwm_train=status["VmHWM"])
        rss["peak"] = max(rss["hwm_build"], rss["hwm_train"], peak_so_far, _maxrss())
        rss["steps"] = rss_steps

        params_bytes = _storage_bytes(raw.parameters())
        optimizer_bytes = _storage_bytes(t for state in optim.state.values() for t in state.values()
                                         if isinstance(t, torch.Tensor))
        comm, source = None, None
        if not sharded:
            comm, source = _ddp_bucket_bytes(model), "ddp"
            if comm is None:
                comm, source = sum(p.numel() * p.element_size() for p in raw.parameters() if p.requires_grad), \
                    "analytic"
        record = {"rank": rank, "params_bytes": params_bytes, "grads_bytes": grads_bytes,
                  "optimizer_bytes": optimizer_bytes, "state_bytes": params_bytes + grads_bytes + optimizer_bytes,
                  "comm_bytes": comm, "comm_source": source, "rss": rss, "step_times_s": times, "losses": losses,
                  "threads": torch.get_num_threads()}
        gathered = gather_object([record])
        if accelerator.is_main_process:
            Path(args.out).write_text(json.dumps({"world": accelerator.num_processes, "sharding": args.run_sharding,
                                                  "image_size": raw.image_size,
                                                  "per_process": sorted(gathered, key=lambda r: r["rank"])}))
        # every process meets here before the group goes: a rank that destroys it while rank 0 still writes makes
        # gloo abort rank 0 at exit ("terminate called without an active exception")
        accelerator.wait_for_everyone()
    finally:
        # gloo aborts the interpreter at exit if the process group lives on
        accelerator.end_training()


if __name__ == "__main__":
    main()
