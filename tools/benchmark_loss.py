"""Peak memory and time of ContrastiveLoss's modes against open_clip's ClipLoss, measured in the same run.

For every global batch size and world size, one group of fresh processes (`accelerate launch`, gloo on CPU; CUDA when
every process can have a GPU) makes L2-normalised random features, (B_local, dim) per tower and process, and runs the
loss forward and backward for each mode and for the reference `open_clip.loss.ClipLoss(local_loss=True,
gather_with_grad=True, rank=..., world_size=...)` (open_clip's memory-saving setting). It prints, per process:

- peak memory of one loss forward+backward beyond what was allocated before it (the features and logit scale).
  CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`. CPU: torch's CPU allocator is invisible to
  tracemalloc and RSS keeps freed pages in glibc's arenas, so the step runs once under
  `torch.profiler.profile(profile_memory=True)`, whose allocator events (address, bytes) are replayed in order; the peak
  is the largest sum of bytes allocated inside the step and not yet freed. Like the CUDA figure, it counts tensor
  memory only (not gloo's internal buffers nor allocator slack); the largest over processes is reported.
- the median over `--repeats` of the wall time of one forward+backward, from a barrier to the last process's end.
  Modes take turns within each repeat, so a slow spell on a shared machine hits them alike. The profiled step and a
  warm-up step are not timed.
- the ratio of both to the reference's.

A configuration whose estimated memory over all its processes exceeds `--max-gib` is skipped with the estimate (CPU).

`tiled` runs once per `--tiled-kernels` entry: `auto` (named `tiled T=SIZE`: the fused Triton kernels on CUDA when
triton imports, else pure torch), `torch` (`tiled-torch T=SIZE`, pure torch on any device) and `triton`
(`tiled-triton`: the kernels, which have no tiles; CUDA only). `--tile-size 0` sizes the torch path's tiles from its
memory budget (`clipalign.loss.auto_tile_size`). `--dtype` is the features' dtype (bf16 on a CPU without native
bf16 runs a reference GEMM, hundreds of times slower: keep fp32 there).

    python tools/benchmark_loss.py                                   # B_global 4k..32k, 1 and 4 processes
    python tools/benchmark_loss.py --sizes 4096 --world-sizes 2 --modes tiled --repeats 3 --tile-size 1024
    python tools/benchmark_loss.py --sizes 16384 --world-sizes 4 --modes tiled --tile-size 512 1024 2048 4096
    # one GPU, bf16: open_clip's local loss against the fused kernels and the pure-torch tiles
    python tools/benchmark_loss.py --device cuda --world-sizes 1 --sizes 16384 32768 65536 --dim 512 \
        --dtype bf16 --modes tiled --tiled-kernels triton torch --tile-size 0 4096 --repeats 10 --json loss.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clipalign.config import TILED_KERNELS

REPO = Path(__file__).resolve().parent.parent
MODES = ("dense", "local", "tiled")
DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}  # name -> bytes per element
REFERENCE = "open_clip"  # open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True)
GIB = 2**30
MIB = 2**20
# Peak bytes of the (B_local, B_global) logit matrices, in matrices, as measured at small sizes (fp32 CPU, 4 bytes per
# element): a matrix, its log-softmax and their gradients live at once in each direction. dense builds one
# (B_global, B_global) matrix for both directions; the reference and local build two per process (local with one
# process takes the dense path).
_MATRICES = {"dense": 5.0, "local": 6.0, REFERENCE: 6.0}
_PROCESS_OVERHEAD = 0.5 * GIB  # interpreter, torch, open_clip, gloo


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="global batch sizes")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 4], help="processes per configuration")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="the reference always runs too")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per mode (>= 3 for a median)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension")
    p.add_argument("--tile-size", type=int, nargs="+", default=[1024],
                   help="tiled mode's columns per tile (0: from a memory budget); several values measure tiled once "
                        "per value (not for the Triton kernels, which have no tiles)")
    p.add_argument("--tiled-kernels", nargs="+", choices=TILED_KERNELS, default=["auto"],
                   help="tiled mode's kernels, each measured: auto, torch (pure torch), triton (fused, CUDA)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the features (and logits)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process; 0 = cores / processes")
    p.add_argument("--max-gib", type=float, default=14.0,
                   help="skip a mode whose estimated memory over all processes of a configuration exceeds this")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when there is a GPU for every process, else CPU")
    p.add_argument("--json", help="also write every measured row to this file")
    # internal: one process of a configuration, started by the parent
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-modes", nargs="+", help=argparse.SUPPRESS)  # names as _variants gives them
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if any(t < 0 for t in args.tile_size):
        p.error("--tile-size values must be positive, or 0 for the memory budget")
    return args


def _variants(modes: list[str], tile_sizes: list[int], kernels: tuple[str, ...] = ("auto",)) -> list[str]:
    """The reference first, then each mode; tiled once per kernel and tile size: `tiled:SIZE` (auto),
    `tiled-torch:SIZE`, `tiled-triton`."""
    out = [REFERENCE]
    for mode in modes:
        if mode != "tiled":
            out.append(mode)
            continue
        for kernel in kernels:
            if kernel == "triton":
                out.append("tiled-triton")
            else:
                out += [f"tiled{'' if kernel == 'auto' else '-' + kernel}:{t}" for t in tile_sizes]
    return out


def _split(variant: str) -> tuple[str, int]:
    """(mode, tile size) of a variant name."""
    mode, _, tile = variant.partition(":")
    return mode.partition("-")[0], int(tile or 0)


def _kernel(variant: str) -> str:
    """The `tiled_kernel` of a variant name (auto for every other mode)."""
    _, dash, kernel = variant.partition(":")[0].partition("-")
    return kernel if dash else "auto"


def _display_name(variant: str) -> str:
    if variant == REFERENCE:
        return "open_clip ClipLoss (ref)"
    name, _, tile = variant.partition(":")
    return f"{name} T={'auto' if tile == '0' else tile}" if tile else name


# ---- estimates and launching (the parent) ----------------------------------------------------------------------------


def _estimated_bytes(variant: str, size: int, world: int, dim: int, element: int = 4) -> int:
    """Rough peak of one configuration over all its processes: logits, features and their gradients, overhead."""
    mode, tile_size = _split(variant)
    local = size // world
    features = 6 * size * dim * element  # gathered features of both towers, their gradient, the gather's buffer
    if mode == "tiled":
        logits = 3 * local * min(tile_size or 4096, size) * 4  # fp32 blocks in every dtype
    elif mode == "dense" or (mode == "local" and world == 1):
        logits = _MATRICES["dense"] * size * size * element
    else:
        logits = _MATRICES[mode] * local * size * element
    return int(world * (logits + features + _PROCESS_OVERHEAD))


def _device_for(world: int, choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.device_count() >= world else "cpu"
    return choice


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_configuration(args: argparse.Namespace, size: int, world: int, modes: list[str], device: str) -> dict:
    """Start `world` fresh processes for one global batch size; return what rank 0 measured."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        worker = [str(Path(__file__).resolve()), "--worker", "--size", str(size), "--run-modes", *modes,
                  "--repeats", str(args.repeats), "--dim", str(args.dim), "--threads", str(args.threads),
                  "--device", device, "--dtype", args.dtype, "--out", str(out)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        if device == "cpu":
            env["ACCELERATE_USE_CPU"] = "true"  # gloo and a real process group on CPU
        if world == 1:
            cmd = [sys.executable, *worker]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(world),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), *worker]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-5000:]}")
        return json.loads(out.read_text())


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.3f}" if value is not None and reference else "n/a"


def _table(rows: list[dict]) -> str:
    header = ("| B_global | processes | B_local | device | mode | peak MiB / process | × ref | median s | × ref | "
              "times s |")
    lines = [header, "| " + " | ".join("---" for _ in range(header.count("|") - 1)) + " |"]
    by_config: dict[tuple, dict] = {}
    for row in rows:
        by_config.setdefault((row["size"], row["world"]), {})[row["mode"]] = row
    for (size, world), modes in by_config.items():
        ref = modes.get(REFERENCE, {})
        for mode, row in modes.items():
            name = _display_name(mode)
            if row.get("skipped"):
                lines.append(f"| {size} | {world} | {size // world} | | {name} | {row['skipped']} | | | | |")
                continue
            times = ", ".join(f"{t:.4g}" for t in row["times_s"])
            lines.append(f"| {size} | {world} | {size // world} | {row['device']} | {name} "
                         f"| {row['peak_bytes'] / MIB:.1f} | {_ratio(row['peak_bytes'], ref.get('peak_bytes'))} "
                         f"| {row['median_s']:.4g} | {_ratio(row['median_s'], ref.get('median_s'))} | {times} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.worker:
        _worker(args)
        return
    rows = []
    for world in args.world_sizes:
        device = _device_for(world, args.device)
        for size in args.sizes:
            if size % world:
                print(f"B_global {size} over {world} processes: not divisible, skipped", flush=True)
                continue
            run = []
            for mode in _variants(args.modes, args.tile_size, args.tiled_kernels):
                if mode == "tiled-triton" and device != "cuda":
                    print(f"B_global {size}, {world} processes, {mode}: skipped (needs CUDA)", flush=True)
                    continue
                need = _estimated_bytes(mode, size, world, args.dim, DTYPES[args.dtype])
                if device == "cpu" and need > args.max_gib * GIB:
                    skipped = f"skipped: would need ~{need / GIB:.0f} GiB"
                    rows.append({"size": size, "world": world, "mode": mode, "skipped": skipped})
                    print(f"B_global {size}, {world} processes, {mode}: {skipped} (--max-gib {args.max_gib})",
                          flush=True)
                else:
                    run.append(mode)
            if not run:
                continue
            start = time.perf_counter()
            result = _run_configuration(args, size, world, run, device)
            for mode, row in result["modes"].items():
                rows.append({"size": size, "world": world, "mode": mode, "device": result["device"], **row})
            print(f"B_global {size}, {world} processes: {', '.join(run)} measured in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            _check_losses(result, args.dtype)
    print()
    threads = args.threads or "cores / processes"
    print(f"dim {args.dim}, {args.dtype}, repeats {args.repeats}, torch threads per process: {threads}, "
          f"{len(os.sched_getaffinity(0))} cores")
    print(_table(rows))
    _add_ratios(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _add_ratios(rows: list[dict]) -> None:
    """Give every measured row `memory_ratio` and `time_ratio`: its peak and median over the reference's."""
    refs = {(r["size"], r["world"]): r for r in rows if r["mode"] == REFERENCE and not r.get("skipped")}
    for row in rows:
        ref = refs.get((row["size"], row["world"]))
        if ref is not None and not row.get("skipped"):
            row["memory_ratio"] = row["peak_bytes"] / ref["peak_bytes"] if ref["peak_bytes"] else None
            row["time_ratio"] = row["median_s"] / ref["median_s"] if ref["median_s"] else None


def _check_losses(result: dict, dtype: str = "fp32") -> None:
    """Every mode scores the same features: their global losses must agree (a benchmark of a wrong loss is moot)."""
    values = {mode: row["global_loss"] for mode, row in result["modes"].items()}
    ref = values.get(REFERENCE, next(iter(values.values())))
    tolerance = 1e-4 if dtype == "fp32" else 2e-2  # open_clip's, dense's and local's logits are bf16/fp16 there
    for mode, value in values.items():
        if abs(value - ref) > tolerance * abs(ref):
            print(f"warning: {mode} gives global loss {value}, the reference {ref}", flush=True)


# ---- one process of a configuration ----------------------------------------------------------------------------------


def _cpu_peak_bytes(step) -> int:
    """Peak bytes allocated by torch's CPU allocator during `step()` and not freed before that point."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    memory.sort(key=lambda a: a["Ev Idx"])
    live: dict[int, int] = {}
    current = peak = 0
    for event in memory:
        if event["Bytes"] > 0:
            live[event["Addr"]] = event["Bytes"]
            current += event["Bytes"]
            peak = max(peak, current)
        elif event["Addr"] in live:  # a block from before the step does not lower the count
            current -= live.pop(event["Addr"])
    return peak


def _cuda_peak_bytes(step) -> int:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _worker(args: argparse.Namespace) -> None:
    import open_clip
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from clipalign.loss import ContrastiveLoss, auto_tile_size

    accelerator = Accelerator(cpu=args.device == "cpu")
    try:
        world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
        if device.type == "cpu":
            torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0)) // world))
        local = args.size // world
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        g = torch.Generator().manual_seed(rank)
        image = F.normalize(torch.randn(local, args.dim, generator=g), dim=-1).to(device, dtype).requires_grad_()
        text = F.normalize(torch.randn(local, args.dim, generator=g), dim=-1).to(device, dtype).requires_grad_()
        scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)

        losses, tiles = {}, {}
        for mode in args.run_modes:
            if mode == REFERENCE:
                losses[mode] = open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                                       world_size=world)
            else:
                name, tile_size = _split(mode)
                losses[mode] = ContrastiveLoss(name, tile_size=tile_size, tiled_kernel=_kernel(mode))
                if name == "tiled" and mode != "tiled-triton":
                    tiles[mode] = tile_size or auto_tile_size(local, args.size)

        def step(mode: str) -> float:
            image.grad = text.grad = scale.grad = None
            loss = losses[mode](image, text, scale)
            loss.backward()
            return loss.item()

        def timed(mode: str) -> float:
            accelerator.wait_for_everyone()
            start = time.perf_counter()
            step(mode)
            if device.type == "cuda":
                torch.cuda.synchronize()
            accelerator.wait_for_everyone()  # the step ends when the last process is done
            return time.perf_counter() - start

        measure_peak = _cuda_peak_bytes if device.type == "cuda" else _cpu_peak_bytes
        value, peak, times = {}, {}, {mode: [] for mode in args.run_modes}
        for mode in args.run_modes:
            value[mode] = step(mode)  # warm-up
            peak[mode] = measure_peak(lambda mode=mode: step(mode))
        for _ in range(args.repeats):
            for mode in args.run_modes:  # modes take turns, so that load from elsewhere hits them alike
                times[mode].append(timed(mode))

        modes = {}
        for mode in args.run_modes:
            stats = torch.tensor([peak[mode], value[mode], *times[mode]], dtype=torch.float64, device=device)
            stats = accelerator.gather(stats[None]).cpu()  # (world, 2 + repeats)
            # dense returns the global loss on every process; the others a share whose mean is the global loss
            global_loss = stats[0, 1].item() if mode == "dense" else stats[:, 1].mean().item()
            step_times = stats[:, 2:].amax(dim=0).tolist()
            modes[mode] = {"peak_bytes": int(stats[:, 0].max().item()), "global_loss": global_loss,
                           "times_s": step_times, "median_s": statistics.median(step_times), "dtype": args.dtype,
                           "dim": args.dim, "kernel": _kernel(mode) if mode != REFERENCE else "",
                           "tile_size": tiles.get(mode, 0)}
        if accelerator.is_main_process:
            Path(args.out).write_text(json.dumps({"device": device.type, "world": world, "modes": modes}))
    finally:
        accelerator.end_training()


if __name__ == "__main__":
    main()
