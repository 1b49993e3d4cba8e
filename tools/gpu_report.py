"""Every GPU figure of docs/benchmarks.md from one run on a fresh GPU machine: JSON plus Markdown rows.

On the GPU machine (see the GPU notes beside the project: `preamble.sh` installs open_clip and webdataset and makes
`/tmp/refvenv`, a python with open_clip_train 3.3.0 for the reference):

    source .gpu/preamble.sh && python3 tools/gpu_report.py --out $OUT --reference-venv /tmp/refvenv

It runs the project's own check and benchmark scripts, each in a subprocess with a time limit, inside one time budget
(`--budget-s`, default 450 s, so that the whole report fits a device session with room for start-up). Correctness
comes before speed: the first step is the GPU check, and a report whose check failed says so above every figure.

1. data: synthetic 224 px training shards, drawn by `--draw-processes` processes at once.
   check: `tools/gpu_check.py` on those shards (stream order of the device decoder, its pixels, 200 steps with
   device decode against the workers, a training step with no host wait, the non-finite guard); `check-triton`, its
   launch of every Triton configuration, runs after the training and loss figures below.
2. training throughput, ours against open_clip_train in the same run (`tools/benchmark_train.py`, bf16, 1 repeat):
   ViT-B/32 at batch 256 and 512, ViT-B/16 at batch 256, `--workers` DataLoader workers on both sides; with our
   MFU and the fraction of time spent waiting for data (`data_wait`), medians over the logged windows; then ours
   with `train.trim_text=false` on the same configurations (the reference is the same as there).
3. the InfoNCE loss on one GPU (`tools/benchmark_loss.py`): open_clip's local `ClipLoss` against `tiled` (the fused
   Triton kernels, and pure torch with budget-sized and 4096-column tiles) at B = 16k, 32k, 64k, bf16 features,
   D = 512: median time of forward + backward over 10 repeats and peak memory, and their ratios to the reference.
4. decoding: images/s of PIL in the DataLoader workers' path against the device path (`data.decode=device`) on
   photo-like 512 px JPEGs (`tools/benchmark_data.py --decode-bench`).
5. ours with `train.compile=true` (regional compile of the transformer blocks), if time remains.
6. ours with `train.sharding=fsdp` (FSDP2 over one process) on ViT-B/16 at batch 256, beside the DDP row's figure
   (ratio FSDP / DDP), last: the first step the budget drops. One GPU means one process, so the step gets the
   variables `torchrun --nproc_per_node 1` sets (`one_process_group`), from which Accelerate starts the process
   group that FSDP's device mesh needs.

A step that would not fit the remaining budget is skipped and reported as such; a step that fails or times out is
reported with the tail of its log, and the next step runs. Steps left out can be run in a second call with
`--only NAME ...` (the names the report prints). Files written:

    OUT/gpu_report.json    every figure, per step: command, status, seconds, result
    OUT/gpu_report.md      the Markdown rows for docs/benchmarks.md
    OUT/logs/STEP.log      each step's output

`--smoke` runs the same steps at toy sizes on any device (tiny model, a few steps, B = 256 losses, 16 images):
a check of the plumbing, not a measurement; the tests run it on CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"


@dataclass
class Step:
    """One measurement: a command run with a time limit, whose JSON output is read back."""

    name: str
    title: str
    argv: list[str]
    limit_s: float
    json_path: Path
    result: object = None
    status: str = "not run"  # ok | failed | timed out | skipped (budget)
    seconds: float = 0.0
    log_tail: str = ""
    meta: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # set in the step's environment, over the report's own


# ---- data ------------------------------------------------------------------------------------------------------------


def _draw_part(args: tuple[str, int, int, int]) -> list[str]:
    from clipalign.data.synthetic import make_synthetic_dataset

    root, samples, image_size, seed = args
    make_synthetic_dataset(root, train_samples=samples, heldout_per_class=1, image_size=image_size,
                           samples_per_shard=256, seed=seed)
    return sorted(str(p) for p in Path(root).glob("train-*.tar"))


def draw_shards(root: Path, samples: int, image_size: int, processes: int) -> str:
    """A brace pattern over at least `samples` synthetic training samples, drawn by `processes` processes at once
    (one data set per process, different seeds) and linked into one numbered sequence of shards."""
    combined = root / f"n{samples}-px{image_size}"
    marker = combined / "complete.json"
    if not marker.exists():
        per = -(-samples // processes)
        parts = [(str(root / "parts" / f"n{per}-px{image_size}-s{i}"), per, image_size, i) for i in range(processes)]
        # spawned, not forked: the parent may already hold a CUDA context, which a forked child must not touch
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            shards = [s for part in pool.map(_draw_part, parts) for s in part]
        shutil.rmtree(combined, ignore_errors=True)
        combined.mkdir(parents=True)
        for i, shard in enumerate(shards):
            os.symlink(shard, combined / f"train-{i:06d}.tar")
        marker.write_text(json.dumps({"shards": len(shards), "samples": per * processes}))
    count = json.loads(marker.read_text())["shards"]
    return str(combined / f"train-{{000000..{count - 1:06d}}}.tar")


# ---- the plan --------------------------------------------------------------------------------------------------------


def _train_configs(args: argparse.Namespace) -> list[dict]:
    if args.smoke:
        return [{"key": "tiny-b16", "model": "tiny-vit-64", "batch": 16}]
    return [{"key": "b32-b256", "model": "ViT-B-32", "batch": 256},
            {"key": "b32-b512", "model": "ViT-B-32", "batch": 512},
            {"key": "b16-b256", "model": "ViT-B-16", "batch": 256}]


def _check_steps(args: argparse.Namespace, data: dict[int, str], out: Path) -> tuple[Step, Step]:
    """The GPU check, first (all but the Triton configurations), and its launch of every Triton configuration."""
    size = 64 if args.smoke else 224
    check = [sys.executable, str(TOOLS / "gpu_check.py"), "--device", args.device, "--workers", str(args.workers),
             "--precision", args.precision, "--work", str(args.cache / "check")]
    if args.smoke:
        check.append("--smoke")
    first = Step("check", "GPU check: correctness of the fast paths",
                 [*check, "--data", data.get(size, ""), "--out", str(out / "check"), "--only", "stream_order",
                  "decode_pixels", "decode_training", "sync_free", "nonfinite"],
                 120 if args.smoke else 240, out / "check" / "gpu_check.json")
    triton = Step("check-triton", "GPU check: every Triton configuration launched once",
                  [*check, "--out", str(out / "check-triton"), "--only", "triton_configs"],
                  60 if args.smoke else 150, out / "check-triton" / "gpu_check.json")
    return first, triton


def plan(args: argparse.Namespace, data: dict[int, str], out: Path) -> list[Step]:
    """The steps in the order they run: the check, then the figures the issue asks for first (ViT-B/32 and ViT-B/16
    against open_clip_train, decode, the loss at 32k), then the rest."""
    py = [sys.executable]
    steps_per_run = args.train_steps
    common = ["--precision", args.precision, "--repeats", "1", "--workers", str(args.workers), "--threads",
              str(args.threads), "--device", args.device, "--log-every", str(args.log_every), "--drop-steps",
              str(args.drop_steps), "--reference-venv", args.reference_venv]
    if args.skip_reference:
        common.append("--skip-reference")
    limit = 60 if args.smoke else 240
    out_steps = []
    for cfg in _train_configs(args):
        size = 64 if args.smoke else 224
        train = [*py, str(TOOLS / "benchmark_train.py"), "--model", cfg["model"], "--batch-size", str(cfg["batch"]),
                 "--samples", str(cfg["batch"] * steps_per_run), "--data", data[size], *common]
        out_steps.append(Step(f"train-{cfg['key']}", f"{cfg['model']} batch {cfg['batch']}",
                              [*train, "--json", str(out / f"train-{cfg['key']}.json")], limit,
                              out / f"train-{cfg['key']}.json", meta=cfg))
    trainings = [s for s in out_steps if s.name.startswith("train-")]

    def variant(flag: str, key: str) -> list[Step]:
        out_variants = []
        for step in trainings:  # ours only: the reference's figure is the one measured beside ours above
            cut = step.argv.index("--json")
            argv = [*step.argv[:cut], "--skip-reference", "--ours-args", flag, "--json",
                    str(out / f"{step.name}-{key}.json")]
            out_variants.append(Step(f"{step.name}-{key}", f"{step.title}, {flag}", argv, step.limit_s,
                                     out / f"{step.name}-{key}.json", meta={**step.meta, "flag": flag}))
        return out_variants

    out_steps += variant("train.trim_text=false", "notrim")
    sizes = ["256", "512"] if args.smoke else ["16384", "32768", "65536"]
    # the fused kernels, and the pure-torch path with the budget-sized tiles and with 4096 columns; one step per size,
    # so that running out of memory at the largest loses only its own figures
    for size in sizes:
        loss = [*py, str(TOOLS / "benchmark_loss.py"), "--sizes", size, "--world-sizes", "1", "--modes", "tiled",
                "--tiled-kernels", "triton", "torch", "--tile-size", "0", "4096", "--dtype", "bf16",
                "--repeats", "3" if args.smoke else "10", "--dim", "512", "--device", args.device, *args.loss_args]
        out_steps.append(Step(f"loss-{size}", f"InfoNCE on one device, B = {size}",
                              [*loss, "--json", str(out / f"loss-{size}.json")], 60 if args.smoke else 90,
                              out / f"loss-{size}.json"))
    images = "16" if args.smoke else str(args.decode_images)
    decode = [*py, str(TOOLS / "benchmark_data.py"), "--decode-bench", "--device", args.device, "--sizes", "512",
              "--images", images, "--repeats", "3", "--cache", str(args.cache / "decode")]
    out_steps.append(Step("decode", "JPEG decode + crop + resize", [*decode, "--json", str(out / "decode.json")],
                          60 if args.smoke else 120, out / "decode.json"))
    out_steps += variant("train.compile=true", "compile")
    check, check_triton = _check_steps(args, data, out)
    first = ["train-b32-b256", "train-b16-b256", "train-tiny-b16", "decode", "loss-32768", "loss-512"]
    ranked = sorted(out_steps, key=lambda s: first.index(s.name) if s.name in first else len(first))
    at = max(i for i, s in enumerate(ranked) if s.name in first) + 1
    out_steps = [check, *ranked[:at], check_triton, *ranked[at:]]
    # FSDP beside DDP on the largest model only, last (the first step dropped when the budget runs short)
    fsdp_base = next((s for s in trainings if s.name == "train-b16-b256"), trainings[-1])
    cut = fsdp_base.argv.index("--json")
    out_steps.append(Step(f"{fsdp_base.name}-fsdp", f"{fsdp_base.title}, train.sharding=fsdp",
                          [*fsdp_base.argv[:cut], "--skip-reference", "--ours-args", "train.sharding=fsdp", "--json",
                           str(out / f"{fsdp_base.name}-fsdp.json")], fsdp_base.limit_s,
                          out / f"{fsdp_base.name}-fsdp.json", meta={**fsdp_base.meta, "flag": "train.sharding=fsdp"},
                          env=one_process_group()))
    return out_steps


def one_process_group() -> dict[str, str]:
    """What `torchrun --nproc_per_node 1` sets: with them, Accelerate starts a process group of one process (NCCL on
    a GPU, gloo on CPU), which `train.sharding=fsdp` needs, for a plain `python -m clipalign.train`. Port 0: the
    store of the only process listens on any free port."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "0"}


# ---- running ---------------------------------------------------------------------------------------------------------


def run_step(step: Step, logs: Path, remaining_s: float) -> None:
    """Run one step within its limit and the remaining budget; fill in status, seconds, result and log tail."""
    if remaining_s < min(step.limit_s, 30):
        step.status = "skipped (budget)"
        return
    limit = min(step.limit_s, remaining_s)
    log = logs / f"{step.name}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(step.env)
    start = time.monotonic()
    with open(log, "w") as f:
        # a session of its own: on a time-out the whole group goes (trainers, their DataLoader workers, launchers)
        proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
            step.status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            step.status = f"timed out ({limit:.0f} s)"
    step.seconds = round(time.monotonic() - start, 1)
    step.log_tail = log.read_text(errors="replace")[-2000:]
    if step.json_path.exists() and not step.status.startswith("timed out"):
        step.result = json.loads(step.json_path.read_text())  # a check that failed has its findings written too
    elif step.status == "ok":
        step.status = "failed (no JSON)"


# ---- the report ------------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if isinstance(x, (int, float)) else "–"


def _num(x: float | None, fmt: str = "{:.0f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "–"


def markdown(steps: list[Step], env: dict) -> str:
    """The rows for docs/benchmarks.md: training, loss and decode tables, and what was not measured."""
    by_name = {s.name: s for s in steps}
    lines = _check_lines(steps)
    lines += [f"Measured with `python3 tools/gpu_report.py` on {env.get('device_name', '?')} "
             f"(torch {env.get('torch', '?')}, {env.get('cpus', '?')} CPU cores), {env.get('date', '?')}; "
             f"one repeat per configuration, medians over logged windows.", "",
             "| configuration | ours samples/s | open_clip_train samples/s | ratio | ours MFU | ours data wait "
             "| ours, trim_text=false | ratio | ours, compile | ratio | ours, FSDP | FSDP / DDP |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for step in steps:
        if not step.name.startswith("train-") or "flag" in step.meta:
            continue
        row = (step.result or {}).get("rows", [{}])[0] if step.result else {}
        ref = row.get("reference")
        cells = [step.title, _num(row.get("ours")), _num(ref), _ratio(row.get("ours"), ref), _pct(row.get("ours_mfu")),
                 _pct(row.get("ours_data_wait"))]
        for key in ("notrim", "compile"):
            variant = by_name.get(f"{step.name}-{key}")
            vrow = (variant.result or {}).get("rows", [{}])[0] if variant and variant.result else {}
            cells += [_num(vrow.get("ours")), _ratio(vrow.get("ours"), ref)]
        fsdp = by_name.get(f"{step.name}-fsdp")  # its ratio is to ours under DDP (the reference has no FSDP run)
        frow = (fsdp.result or {}).get("rows", [{}])[0] if fsdp and fsdp.result else {}
        cells += [_num(frow.get("ours")), _ratio(frow.get("ours"), row.get("ours"))]
        if step.status != "ok":
            cells[0] += f" ({step.status})"
        lines.append("| " + " | ".join(cells) + " |")
    loss_rows = [row for s in steps if s.name.startswith("loss-") and isinstance(s.result, list) for row in s.result]
    lines += ["", "| B (1 process) | loss | median time | peak memory | time / reference | memory / reference |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in loss_rows:
        name = row["mode"] + (f" ({row['kernel']} kernel)" if row.get("kernel") else "")
        if row.get("skipped"):
            lines.append(f"| {row['size']} | {name} | skipped: {row['skipped']} | | | |")
            continue
        time_ms = row["median_s"] * 1e3 if "median_s" in row else None
        peak_mib = row["peak_bytes"] / 2**20 if "peak_bytes" in row else None
        lines.append(f"| {row['size']} | {name} | {_num(time_ms, '{:.1f} ms')} | {_num(peak_mib, '{:.0f} MiB')} "
                     f"| {_num(row.get('time_ratio'), '{:.2f}x')} | {_num(row.get('memory_ratio'), '{:.3f}x')} |")
    decode = by_name.get("decode")
    if decode and isinstance(decode.result, dict):
        lines += ["", "Decode (JSON of `tools/benchmark_data.py --decode-bench`):", "",
                  "```json", json.dumps(decode.result.get("summary", decode.result), indent=1)[:3000], "```"]
    missing = [f"{s.name}: {s.status}" for s in steps if s.status != "ok"]
    if missing:
        lines += ["", "Not measured in this run: " + "; ".join(missing) + "."]
        rest = [s.name for s in steps if s.status != "ok"]
        lines += ["", "To measure what is missing: `source .gpu/preamble.sh && python3 tools/gpu_report.py --out $OUT "
                  f"--reference-venv /tmp/refvenv --only {' '.join(rest)}`"]
    return "\n".join(lines) + "\n"


def _check_lines(steps: list[Step]) -> list[str]:
    """The GPU check's table, ahead of every figure, and a warning if it failed or did not run."""
    checks = [s for s in steps if s.name.startswith("check")]
    lines = []
    for step in checks:
        if isinstance(step.result, dict) and "checks" in step.result:
            for name, r in step.result["checks"].items():
                lines.append(f"| {name} | {r.get('status', '?')} | {r.get('seconds', '–')} s |")
    if lines:
        lines = ["| GPU check | status | time |", "| --- | --- | --- |", *lines, ""]
    failed = [f"{s.name}: {s.status}" for s in checks if s.status != "ok"]
    if failed:
        lines = [f"**The GPU check did not pass ({'; '.join(failed)}): the figures below are not trusted until it "
                 f"does.**", "", *lines]
    return lines


def _ratio(ours: float | None, ref: float | None) -> str:
    return f"{ours / ref:.2f}x" if isinstance(ours, (int, float)) and isinstance(ref, (int, float)) and ref else "–"


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d"), "device": device}
    if device == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
    return env


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_report.json, gpu_report.md and logs/")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--budget-s", type=float, default=450.0, help="total time for all steps (data drawing included)")
    p.add_argument("--reference-venv", default="/tmp/refvenv", help="python environment with open_clip_train")
    p.add_argument("--skip-reference", action="store_true", help="measure ours only")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers on both sides")
    p.add_argument("--threads", type=int, default=8, help="torch threads per trainer")
    p.add_argument("--train-steps", type=int, default=40, help="steps per training run")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--drop-steps", type=int, default=10)
    p.add_argument("--draw-processes", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--decode-images", type=int, default=1024)
    p.add_argument("--loss-args", nargs="*", default=[], help="extra arguments for tools/benchmark_loss.py")
    p.add_argument("--cache", default="/tmp/clipalign-gpu-report", help="where the drawn shards go")
    p.add_argument("--smoke", action="store_true", help="toy sizes: checks the plumbing, measures nothing")
    p.add_argument("--only", nargs="*", default=[], metavar="STEP",
                   help="run only these steps (names as the report prints them, e.g. loss-32768 decode train-b32-b512)")
    args = p.parse_args(argv)
    args.cache = Path(args.cache)
    if args.smoke:
        args.train_steps, args.log_every, args.drop_steps = 4, 2, 0
        args.workers, args.threads = min(args.workers, 1), min(args.threads, 2)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    start = time.monotonic()
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    print(f"gpu report on {env['device_name']}: budget {args.budget_s:.0f} s", flush=True)

    samples = max(c["batch"] for c in _train_configs(args)) * args.train_steps
    size = 64 if args.smoke else 224
    if args.only and not any(name.startswith("train-") or name == "check" for name in args.only):
        data = {size: ""}  # no training step: no shards to draw
    else:
        data = {size: draw_shards(args.cache / "shards", samples, size, args.draw_processes)}
        env["data_s"] = round(time.monotonic() - start, 1)
        print(f"data: {samples} samples at {size} px in {env['data_s']} s -> {data[size]}", flush=True)

    steps = [s for s in plan(args, data, out) if not args.only or s.name in args.only]
    for step in steps:
        run_step(step, logs, args.budget_s - (time.monotonic() - start))
        print(f"{step.name:22s} {step.status:18s} {step.seconds:6.1f} s", flush=True)

    report = {"environment": env, "argv": sys.argv if argv is None else argv,
              "total_s": round(time.monotonic() - start, 1),
              "steps": [{"name": s.name, "title": s.title, "status": s.status, "seconds": s.seconds,
                         "command": s.argv, "result": s.result, "log_tail": s.log_tail if s.status != "ok" else ""}
                        for s in steps]}
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1))
    md = markdown(steps, env)
    (out / "gpu_report.md").write_text(md)
    print(md, flush=True)
    return report


if __name__ == "__main__":
    main()
