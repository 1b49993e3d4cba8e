"""Training throughput of clipalign against open_clip_train on the same shards, measured in the same job.

Both trainers train the same open_clip model config from scratch on the same WebDataset shards, with the same batch
size, precision, number of steps (= samples / batch), learning-rate warm-up (10 steps), one DataLoader worker and the
same thread count (`OMP_NUM_THREADS`/`MKL_NUM_THREADS` and `torch.set_num_threads`, default: the available cores).
Runs alternate, ours and the reference's, `--repeats` times per configuration (the first of each pair swaps every
repeat, so a slow spell on a shared machine does not always hit the same side).

What is measured, identically on both sides: samples/s over windows of `--log-every` steps, data loading included, as
each trainer logs it; the log lines at or before step `--drop-steps` (warm-up: first-step allocation, worker start,
caches) are dropped; a run's figure is the median of its windows, and the table gives the median over repeats.

- ours: `python -m clipalign.train recipes/quickstart.yaml ...` with `train.log_every`; `samples_per_s` of each
  `metrics.jsonl` line is `batch x steps / time` of the window since the previous line.
- reference: open_clip_train 3.3.0, in its own virtual environment (`--reference-venv`; it needs webdataset<=0.2.86
  while clipalign uses webdataset 1.x), built on first use with `python3 -m venv` and pip. A small launcher registers
  clipalign's `clipalign/model_configs` with `open_clip.add_model_config` and calls `open_clip_train.main.main`
  with `--log-every-n-steps`. Its log line `Batch (t): AVG, N/s` gives AVG, the mean step time over the window since
  the previous line, and N/s, the rate of the single step at which the line was written; the window figure is
  `batch / AVG` (the same statistic as ours), and the median of the single-step N/s is reported beside it in --json.

Precision: `bf16` is Accelerate's bf16 autocast here and `--precision amp_bf16` (torch.autocast bf16) there; `fp32`
is plain fp32 on both sides.

Shards: by default the synthetic captioned set (`clipalign.data.synthetic`) drawn once into the cache
(`--cache-dir`, default `$CLIPALIGN_CACHE` or `~/.cache/clipalign`) at `--image-size` (default: the model's input
size), exactly `--samples` of them; or `--data PATTERN` (it must hold at least `--samples` samples: the reference
walks it once, without replacement).

    python tools/benchmark_train.py                                        # tiny-vit-64, bf16, batch 128, 3 repeats
    python tools/benchmark_train.py --precision bf16 fp32 --json out.json
    python tools/benchmark_train.py --model ViT-B-32 --batch-size 16 --samples 480 --precision fp32
    python tools/benchmark_train.py --skip-reference --samples 48 --batch-size 8   # ours only (no venv needed)
    python tools/benchmark_train.py --ours-args train.compile=true                # our speed flags on
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "quickstart.yaml"
MODEL_CONFIG_DIR = REPO / "clipalign" / "model_configs"
DEFAULT_VENV = Path("~/.cache/clipalign/openclip-reference")
REFERENCE_PACKAGES = ("torch", "torchvision", "open_clip_torch==3.3.0", "webdataset==0.2.86", "pandas", "braceexpand",
                      "tensorboard")
LR_WARMUP_STEPS = 10  # both sides; short, so that the measured windows run at the peak learning rate's cost
# our train.precision -> open_clip_train --precision (its choices: amp, amp_bf16, amp_bfloat16, bf16, fp16,
# pure_bf16, pure_fp16, fp32; its "bf16"/"pure_bf16" cast the weights too, amp_bf16 is autocast like ours)
REFERENCE_PRECISION = {"bf16": "amp_bf16", "fp32": "fp32"}

# What the reference runs: register clipalign's model configs, pin the threads, hand the rest to open_clip_train.
_LAUNCHER = """\
import sys

import open_clip
import torch

open_clip.add_model_config(sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
from open_clip_train.main import main  # noqa: E402

main(sys.argv[3:])
"""

# open_clip_train: "Train Epoch: 0 [ 640/6400 (10%)] Data (t): 0.004 Batch (t): 1.234, 103.7/s, 103.7/s/gpu LR: ..."
_REFERENCE_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ \([^)]*\)\].*?Batch \(t\): ([\d.]+), ([\d.]+)/s,")


# ---- log parsing ---------------------------------------------------------------------------------------------------


def reference_rates(log_text: str, batch_size: int) -> list[dict]:
    """Per log line of open_clip_train: `step`, `window` (batch / mean step time of the window) and `step_rate`."""
    rows = []
    for m in _REFERENCE_LINE.finditer(log_text):
        samples, avg, step_rate = int(m.group(1)), float(m.group(2)), float(m.group(3))
        rows.append({"step": samples // batch_size, "window": batch_size / avg if avg > 0 else float("inf"),
                     "step_rate": step_rate})
    return rows


def ours_rates(metrics_text: str) -> list[dict]:
    """Per training line of clipalign's metrics.jsonl: `step`, `window` (its samples_per_s), and `mfu` and
    `data_wait` where the line has them (MFU needs a known device peak)."""
    rows = []
    for line in metrics_text.splitlines():
        if line.strip():
            record = json.loads(line)
            if "samples_per_s" in record:
                rows.append({"step": record["step"], "window": record["samples_per_s"],
                             **{k: record[k] for k in ("mfu", "data_wait") if k in record}})
    return rows


def steady_median(rows: list[dict], drop_steps: int, key: str = "window") -> float:
    """Median of `key` over the lines after step `drop_steps` (all lines if none is that late)."""
    kept = [r[key] for r in rows if r["step"] > drop_steps] or [r[key] for r in rows]
    if not kept:
        raise ValueError("no throughput lines in the log")
    return statistics.median(kept)


# ---- environment and data ------------------------------------------------------------------------------------------


def ensure_reference_venv(venv: Path) -> Path:
    """The python of the reference environment, creating the environment first if it has none."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    print(f"reference environment: creating {venv} (python3 -m venv, then pip install "
          f"{' '.join(REFERENCE_PACKAGES)}); this takes a few minutes and a few GB", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True, env=_clean_env())
    subprocess.run([str(venv / "bin" / "pip"), "install", *REFERENCE_PACKAGES], check=True, env=_clean_env())
    print("reference environment: ready", flush=True)
    return python


def _clean_env() -> dict:
    """The environment without this interpreter's virtual environment and paths, for the reference's processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bin = os.environ.get("VIRTUAL_ENV")
    if venv_bin:
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if p != str(Path(venv_bin) / "bin"))
    env["PYTHONNOUSERSITE"] = "1"
    return env


def model_image_size(model: str) -> int:
    """The input side of an open_clip model config (clipalign's own configs included)."""
    from clipalign.model import _as_int_size, model_config

    return _as_int_size(model_config(model)["vision_cfg"]["image_size"])


def synthetic_shards(cache: Path, samples: int, image_size: int) -> str:
    """Brace pattern of a synthetic training set of exactly `samples` samples, drawn once into `cache`."""
    from clipalign.data.synthetic import make_synthetic_dataset

    root = cache / "bench-synthetic" / f"n{samples}-px{image_size}"
    if not root.exists():
        print(f"drawing {samples} synthetic samples at {image_size} px into {root}", flush=True)
    return make_synthetic_dataset(root, train_samples=samples, heldout_per_class=1, image_size=image_size).train_pattern


def wait_for_load(threshold: float, timeout_s: float, poll_s: float = 30.0) -> dict:
    """Wait until the 1-minute load average is below `threshold` (at most `timeout_s`); say how it went."""
    start = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        waited = time.monotonic() - start
        if load < threshold:
            print(f"load average {load:.2f} < {threshold} after {waited:.0f} s of waiting", flush=True)
            return {"threshold": threshold, "reached": True, "waited_s": round(waited), "load": load}
        if waited >= timeout_s:
            print(f"load average still {load:.2f} >= {threshold} after {waited:.0f} s: measuring anyway", flush=True)
            return {"threshold": threshold, "reached": False, "waited_s": round(waited), "load": load}
        print(f"load average {load:.2f} >= {threshold}; waiting ({waited:.0f}/{timeout_s:.0f} s)", flush=True)
        time.sleep(poll_s)


# ---- one run of each side ------------------------------------------------------------------------------------------


def _thread_env(env: dict, threads: int, device: str) -> dict:
    env = dict(env)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both sides on the CPU even on a GPU machine
    return env


def _run_logged(cmd: list[str], env: dict, log: Path, cwd: Path) -> float:
    """Run `cmd` with its output in `log`; returns the wall time; raises with the log's tail on failure."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{tail}")
    return wall


def run_ours(args: argparse.Namespace, data: str, precision: str, steps: int, work: Path) -> dict:
    """Train with clipalign once; returns the median window samples/s and the lines it came from."""
    out = work / "ours"
    cmd = [sys.executable, "-m", "clipalign.train", str(RECIPE), f"data.train={data}", "data.synthetic=false",
           f"model.name={args.model}", f"data.batch_size={args.batch_size}", f"data.workers={args.workers}",
           f"train.precision={precision}", f"train.steps={steps}", f"train.log_every={args.log_every}",
           f"train.output_dir={out}", "export.dir=", "eval.zeroshot=", "train.log_with=none",
           f"optim.warmup_steps={LR_WARMUP_STEPS}", f"train.cpu_threads={args.threads}", *args.ours_args]
    env = _thread_env(os.environ, args.threads, args.device)
    load = os.getloadavg()[0]
    wall = _run_logged(cmd, env, work / "ours.log", REPO)
    from clipalign.layout import METRICS_FILE

    rows = ours_rates((out / METRICS_FILE).read_text())
    if not rows or rows[-1]["step"] != steps:
        raise RuntimeError(f"clipalign stopped at step {rows[-1]['step'] if rows else 0} of {steps}")
    extra = {k: steady_median(rows, args.drop_steps, key=k) for k in ("mfu", "data_wait") if all(k in r for r in rows)}
    return {"samples_per_s": steady_median(rows, args.drop_steps), **extra, "windows": rows, "wall_s": round(wall, 1),
            "load_before": load, "load_after": os.getloadavg()[0], "command": cmd}


def run_reference(args: argparse.Namespace, python: Path, data: str, precision: str, steps: int,
                  work: Path) -> dict:
    """Train with open_clip_train once; returns the median window samples/s and the lines it came from."""
    launcher = work / "openclip_launcher.py"
    launcher.write_text(_LAUNCHER)
    logs, name = work / "reference-logs", "ref"
    ref_args = ["--dataset-type", "webdataset", "--device", args.device, "--workers", str(args.workers),
                "--zeroshot-frequency", "0", "--save-frequency", "0", "--log-every-n-steps", str(args.log_every),
                "--warmup", str(LR_WARMUP_STEPS), "--train-data", data,
                "--train-num-samples", str(steps * args.batch_size), "--model", args.model,
                "--batch-size", str(args.batch_size), "--epochs", "1", "--precision", REFERENCE_PRECISION[precision],
                "--logs", str(logs), "--name", name]
    cmd = [str(python), str(launcher), str(MODEL_CONFIG_DIR), str(args.threads), *ref_args]
    env = _thread_env(_clean_env(), args.threads, args.device)
    load = os.getloadavg()[0]
    wall = _run_logged(cmd, env, work / "reference.log", work)
    rows = reference_rates((logs / name / "out.log").read_text(), args.batch_size)
    if not rows or rows[-1]["step"] != steps:
        raise RuntimeError(f"open_clip_train stopped at step {rows[-1]['step'] if rows else 0} of {steps}; "
                           f"see {logs / name / 'out.log'}")
    return {"samples_per_s": steady_median(rows, args.drop_steps),
            "step_rate_median": steady_median(rows, args.drop_steps, key="step_rate"),
            "windows": rows, "wall_s": round(wall, 1), "load_before": load, "load_after": os.getloadavg()[0],
            "command": cmd}


# ---- the benchmark -------------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-vit-64", help="open_clip model config (clipalign's own ones included)")
    p.add_argument("--precision", nargs="+", choices=sorted(REFERENCE_PRECISION), default=["bf16"],
                   help="one table row per precision")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=0,
                   help="samples per run, rounded down to whole batches; default 50 batches")
    p.add_argument("--image-size", type=int, default=0,
                   help="side of the drawn synthetic images; default the model's input size")
    p.add_argument("--data", default="", help="shard pattern to train on instead of the synthetic set")
    p.add_argument("--cache-dir", default="", help="where the synthetic set is drawn; default $CLIPALIGN_CACHE, "
                                                   "else ~/.cache/clipalign")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side per configuration")
    p.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads on both sides; 0 = available cores")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers on both sides")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--log-every", type=int, default=5, help="steps per logged throughput window, both sides")
    p.add_argument("--drop-steps", type=int, default=10, help="log lines at or before this step are warm-up")
    p.add_argument("--reference-venv", default=str(DEFAULT_VENV),
                   help="virtual environment with open_clip_train 3.3.0 (created when it has no python)")
    p.add_argument("--ours-args", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra recipe overrides for our trainer only, e.g. train.compile=true (printed with the table)")
    p.add_argument("--skip-reference", action="store_true", help="measure only ours (no reference environment)")
    p.add_argument("--wait-load", type=float, default=0.0,
                   help="before measuring, wait until the 1-minute load average is below this (0 = do not wait)")
    p.add_argument("--wait-timeout", type=float, default=900.0, help="give up waiting for the load after this (s)")
    p.add_argument("--keep", action="store_true", help="keep run directories and logs (printed) for inspection")
    p.add_argument("--json", help="also write the table and every run's windows to this file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or args.log_every < 1:
        p.error("--repeats, --batch-size and --log-every must be at least 1")
    args.samples = args.samples or 50 * args.batch_size
    if args.samples < args.batch_size:
        p.error(f"--samples {args.samples} is less than one batch of {args.batch_size}")
    if args.threads <= 0:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return args


def _ratio(ours: float | None, reference: float | None) -> str:
    return f"{ours / reference:.2f}x" if ours and reference else "n/a"


def format_table(rows: list[dict]) -> str:
    """A Markdown table: config, precision, batch, ours and reference medians, ratio."""
    lines = ["| config | precision | batch | steps | ours samples/s (median) | open_clip_train samples/s (median) "
             "| ours / reference |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ref = f"{r['reference']:.1f}" if r.get("reference") else "not run"
        lines.append(f"| {r['model']} ({r['image_size']} px) | {r['precision']} | {r['batch_size']} | {r['steps']} "
                     f"| {r['ours']:.1f} | {ref} | {_ratio(r['ours'], r.get('reference'))} |")
    return "\n".join(lines)


def cpu_precisions(precisions: list[str], device: str, native_bf16: bool | None) -> tuple[list[str], str]:
    """The precisions to compare on this device, and a notice when bf16 was dropped ("" otherwise).

    On a CPU without native bf16 (no AVX-512 BF16 or AMX), bf16 matrix products run through PyTorch's reference kernel
    at about 1/250 of fp32, and clipalign trains a bf16 recipe in fp32 there: a bf16 comparison would time that
    fallback, not the trainers. Such a run compares fp32 instead and says so.
    """
    if device != "cpu" or native_bf16 is not False or "bf16" not in precisions:
        return precisions, ""
    kept = list(dict.fromkeys("fp32" if p == "bf16" else p for p in precisions))
    return kept, ("bf16 dropped: this CPU has no native bf16 (AVX-512 BF16 or AMX), where bf16 runs through "
                  "PyTorch's reference GEMM at about 1/250 of fp32 speed; comparing fp32 instead")


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parse_args(argv)
    from clipalign.train import cpu_native_bf16

    args.precision, notice = cpu_precisions(args.precision, args.device, cpu_native_bf16())
    if notice:
        print(notice, flush=True)
    steps = args.samples // args.batch_size
    image_size = args.image_size or model_image_size(args.model)
    python = None if args.skip_reference else ensure_reference_venv(Path(args.reference_venv).expanduser())
    if args.data:
        data = args.data
    else:
        cache = Path(args.cache_dir or os.environ.get("CLIPALIGN_CACHE") or Path.home() / ".cache" / "clipalign")
        data = synthetic_shards(cache.expanduser(), steps * args.batch_size, image_size)
    if steps <= args.drop_steps:
        print(f"warning: {steps} steps leave no window after the {args.drop_steps} warm-up steps; all are counted",
              flush=True)
    load_wait = wait_for_load(args.wait_load, args.wait_timeout) if args.wait_load > 0 else None

    print(f"{args.model}, {image_size} px shards, batch {args.batch_size}, {steps} steps per run, "
          f"{args.repeats} repeats; {args.threads} threads on both sides (OMP_NUM_THREADS, MKL_NUM_THREADS, "
          f"torch.set_num_threads), {args.workers} data worker(s), device {args.device}; windows of {args.log_every} "
          f"steps, lines up to step {args.drop_steps} dropped", flush=True)
    if args.ours_args:
        print(f"ours with: {' '.join(args.ours_args)}", flush=True)
    runs: dict[str, dict[str, list[dict]]] = {p: {"ours": [], "reference": []} for p in args.precision}
    for repeat in range(args.repeats):
        for precision in args.precision:
            sides = ["ours"] if args.skip_reference else ["ours", "reference"]
            if repeat % 2:
                sides.reverse()
            for side in sides:
                work = Path(tempfile.mkdtemp(prefix=f"bench-train-{side}-"))
                try:
                    if side == "ours":
                        result = run_ours(args, data, precision, steps, work)
                    else:
                        result = run_reference(args, python, data, precision, steps, work)
                finally:
                    if args.keep:
                        print(f"  kept {work}", flush=True)
                    else:
                        shutil.rmtree(work, ignore_errors=True)
                runs[precision][side].append(result)
                print(f"  repeat {repeat + 1}/{args.repeats} {precision} {side:9s}: "
                      f"{result['samples_per_s']:8.1f} samples/s (median of windows), run {result['wall_s']:.0f} s, "
                      f"load {result['load_before']:.2f} -> {result['load_after']:.2f}", flush=True)

    rows = []
    for precision in args.precision:
        ours = statistics.median(r["samples_per_s"] for r in runs[precision]["ours"])
        ref_runs = runs[precision]["reference"]
        reference = statistics.median(r["samples_per_s"] for r in ref_runs) if ref_runs else None
        rows.append({"model": args.model, "image_size": image_size, "precision": precision,
                     "batch_size": args.batch_size, "steps": steps, "ours": ours, "reference": reference,
                     "ratio": ours / reference if reference else None,
                     **{f"ours_{k}": statistics.median(r[k] for r in runs[precision]["ours"])
                        for k in ("mfu", "data_wait") if all(k in r for r in runs[precision]["ours"])},
                     "ours_runs": [r["samples_per_s"] for r in runs[precision]["ours"]],
                     "reference_runs": [r["samples_per_s"] for r in ref_runs],
                     "reference_step_rate_runs": [r["step_rate_median"] for r in ref_runs]})
    print()
    print(format_table(rows))
    for row in rows:
        print(f"{row['precision']}: ours per run {_fmt(row['ours_runs'])}; reference per run "
              f"{_fmt(row['reference_runs'])} (single-step N/s medians {_fmt(row['reference_step_rate_runs'])})")
        if "ours_data_wait" in row:
            mfu = f"MFU {row['ours_mfu']:.1%}, " if "ours_mfu" in row else ""
            print(f"{row['precision']}: ours {mfu}data wait {row['ours_data_wait']:.1%} (medians)")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv if argv is None else argv, "threads": args.threads,
                                               "ours_args": args.ours_args,
                                               "cores": os.cpu_count(), "load_wait": load_wait, "rows": rows,
                                               "runs": runs}, indent=1))
    return rows


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values) or "-"


if __name__ == "__main__":
    main()
