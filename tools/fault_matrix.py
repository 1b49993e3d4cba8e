"""The fault matrix: one short real training per planted fault, and whether the trainer did what it should.

Each fault is planted in real inputs (tar shards written here, a dead `pipe:` source, a recipe key, a SIGKILL, a
file-size limit that makes writes fail as on a full disk); the trainer runs as a user runs it
(`python -m clipalign.train recipes/quickstart.yaml ...`, one process, the tiny model) and the matrix compares what
it observed (exit status, the one-line error, `summary.json`'s exact skip counts, the checkpoints left, what a
resume printed) with what is expected:

- corrupt JPEG, empty caption, missing caption, truncated tar, bomb (a 100-megapixel PNG): trained, with exactly
  one count of the right reason in `summary.json`;
- 16-bit grayscale PNG: trained, not skipped, decoded to the right grey (not clipped to white);
- missing shard, bad key, bad value: exit status 2 before anything is built, one line naming the shard, key or range;
- dead `pipe:` source: the run stops (no hang) with an error naming the source;
- kill -9 during a step, during a checkpoint save: `train.resume=auto` ends at the full step and sample count, and a
  killed save is never published;
- disk full during a save: exit status 2, one line, nothing of the save published;
- resume with a changed `optim.lr`: the new rate is applied and reported.

    python tools/fault_matrix.py                      # every fault; prints the table; exit status 1 if one fails
    python tools/fault_matrix.py --only truncated_tar dead_pipe --json out.json

Takes about two minutes on 2 cores (each fault is a 2-8 step run of the tiny model on 64 px images).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "quickstart.yaml"
GOOD = 8  # good samples after the planted ones in each stream fault's shard
BATCH = 4


@dataclass
class Outcome:
    fault: str
    expected: str
    observed: str
    count: str  # the exact count that decides it ("bad_image=1"), or "-" where no count applies
    passed: bool
    seconds: float = 0.0


# ---- inputs ------------------------------------------------------------------------------------------------------


def _image_bytes(value: int, fmt: str = "JPEG", size: int = 64, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(value)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[16:48, 16:48] = value % 256
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _good(index: int) -> dict[str, bytes]:
    return {"jpg": _image_bytes(index), "txt": f"a square of grey {index} on noise".encode()}


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset tar: each (key, {extension: bytes}) as members `key.extension`, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return path


def _shard_with(work: Path, name: str, planted: list[tuple[str, dict[str, bytes]]]) -> Path:
    """The planted samples first (met in the first batch: no shuffling), then GOOD good ones."""
    return _write_shard(work / name / "shard-000.tar",
                        planted + [(f"good{i:03d}", _good(i)) for i in range(GOOD)])


def _png16(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), value, dtype=np.uint16)).save(buf, format="PNG")  # mode I;16
    return buf.getvalue()


def _bomb_png(side: int = 10_000) -> bytes:
    """A 100-megapixel PNG of one grey: a few hundred kB on disk, 100 MB (300 MB as RGB) decoded."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ---- running the trainer -------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, work: Path, cache: Path, timeout: float):
        self.work, self.cache, self.timeout = work, cache, timeout

    def env(self) -> dict:
        return dict(os.environ, CLIPALIGN_CACHE=str(self.cache), OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")

    def cmd(self, run: Path, *overrides: str) -> list[str]:
        return [sys.executable, "-m", "clipalign.train", str(RECIPE), "train.log_with=none", "export.dir=",
                "train.precision=fp32", "optim.warmup_steps=1", "train.log_every=1", f"train.output_dir={run}",
                *overrides]

    def train(self, run: Path, *overrides: str, preexec: Callable[[], None] | None = None):
        return subprocess.run(self.cmd(run, *overrides), env=self.env(), capture_output=True, text=True,
                              timeout=self.timeout, preexec_fn=preexec)

    def stream(self, shard: str, steps: int, run: Path, *overrides: str):
        return self.train(run, "data.synthetic=false", f"data.train={shard}", "data.resampled=false",
                          "data.workers=0", "data.shuffle_buffer=0", f"data.batch_size={BATCH}",
                          f"train.steps={steps}", *overrides)

    def synthetic(self, run: Path, steps: int, *overrides: str) -> list[str]:
        return self.cmd(run, "data.synthetic_samples=2000", "data.batch_size=16", "data.workers=1",
                        "data.shuffle_buffer=64", "data.resampled=false", "train.checkpoint_every=2",
                        "train.keep_checkpoints=0", "eval.zeroshot=none", "eval.retrieval=none",
                        f"train.steps={steps}", *overrides)


def _skipped(run: Path) -> dict[str, int]:
    summary = run / "summary.json"
    return json.loads(summary.read_text()).get("skipped", {}) if summary.is_file() else {}


def _counts(skipped: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"


def _error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("clipalign-train: error: ")]
    return lines[-1].removeprefix("clipalign-train: error: ") if lines else ""


def _one_line_error(proc, *needles: str) -> tuple[str, bool]:
    """(what was observed, whether it is exit 2 with one error line containing every needle and no traceback)."""
    line = _error_line(proc)
    ok = proc.returncode == 2 and "Traceback" not in proc.stderr and all(n in line for n in needles)
    return f"exit {proc.returncode}: {line[:160] or proc.stderr.strip().splitlines()[-1:]}", ok


# ---- the faults ----------------------------------------------------------------------------------------------------


def stream_fault(name: str, planted: list[tuple[str, dict[str, bytes]]], reason: str, steps: int = 2):
    def run(r: Runner) -> tuple[str, str, bool]:
        shard = _shard_with(r.work, name, planted)
        proc = r.stream(str(shard), steps, r.work / name / "run")
        skipped = _skipped(r.work / name / "run")
        ok = proc.returncode == 0 and skipped == {reason: 1}
        return f"exit {proc.returncode}, trained {steps} steps" if proc.returncode == 0 else \
            f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}", _counts(skipped), ok

    return run


def truncated_tar(r: Runner) -> tuple[str, str, bool]:
    """GOOD good samples, then a ninth cut inside its image: one pass delivers the GOOD, the cut counts once."""
    shard = _write_shard(r.work / "truncated_tar" / "shard-000.tar",
                         [(f"good{i:03d}", _good(i)) for i in range(GOOD + 1)])
    data = shard.read_bytes()
    last_image = data.rfind(b"good008.jpg")  # the header of the ninth sample's image member
    shard.write_bytes(data[:last_image + 512 + 300])  # its header and 300 bytes of its data
    steps = GOOD // BATCH + 1  # the last batch comes from the second pass: the cut is met (and counted) once
    proc = r.stream(str(shard), steps, r.work / "truncated_tar" / "run")
    skipped = _skipped(r.work / "truncated_tar" / "run")
    ok = proc.returncode == 0 and sum(skipped.values()) == 1 and list(skipped) in (["unreadable_tar"],
                                                                                   ["truncated_tar"])
    return f"exit {proc.returncode}, trained {steps} steps", _counts(skipped), ok


def png16(r: Runner) -> tuple[str, str, bool]:
    from clipalign.data.transforms import decode_image

    value = 30000  # 16-bit grey: 30000 / 65535 of white = 117 in 8 bits
    decoded = np.asarray(decode_image(_png16(value))).astype(float)
    grey = float(decoded.mean())
    shard = _shard_with(r.work, "png16", [("grey16", {"png": _png16(value), "txt": b"a grey square"})])
    proc = r.stream(str(shard), 2, r.work / "png16" / "run")
    skipped = _skipped(r.work / "png16" / "run")
    ok = proc.returncode == 0 and skipped == {} and abs(grey - value / 65535 * 255) <= 1
    return f"exit {proc.returncode}; decoded grey {grey:.1f} (expected {value / 65535 * 255:.1f})", \
        _counts(skipped), ok


def missing_shard(r: Runner) -> tuple[str, str, bool]:
    shard = _shard_with(r.work, "missing_shard", [])
    pattern = str(shard.parent / "shard-{000..001}.tar")  # shard-001.tar was never written
    run = r.work / "missing_shard" / "run"
    proc = r.stream(pattern, 2, run)
    observed, ok = _one_line_error(proc, "1 of 2 shards do not exist", "shard-001.tar")
    return observed, "-", ok and not run.exists()


def dead_pipe(r: Runner) -> tuple[str, str, bool]:
    source = "pipe:cat /nonexistent/bucket/shard-000.tar"
    start = time.time()
    try:
        proc = r.stream(source, 2, r.work / "dead_pipe" / "run")
    except subprocess.TimeoutExpired:
        return f"no end after {r.timeout:.0f} s (a hang)", "-", False
    text = proc.stderr.strip().splitlines()
    named = [line for line in text if "/nonexistent/bucket/shard-000.tar" in line and "pipe:" in line]
    return f"exit {proc.returncode} after {time.time() - start:.0f} s: {(named or text or [''])[-1][:160]}", "-", \
        proc.returncode != 0 and bool(named)


def bad_key(r: Runner) -> tuple[str, str, bool]:
    proc = r.train(r.work / "bad_key" / "run", "train.stepz=3")
    observed, ok = _one_line_error(proc, "unknown key train.stepz")
    return observed, "-", ok


def bad_value(r: Runner) -> tuple[str, str, bool]:
    proc = r.train(r.work / "bad_value" / "run", "data.batch_size=0")
    observed, ok = _one_line_error(proc, "data.batch_size", "0")
    return observed, "-", ok and ">= 1" in _error_line(proc)


def _kill_and_resume(r: Runner, name: str, when: str) -> tuple[str, str, bool]:
    """Kill a run (SIGKILL) during a step after its first checkpoint, or as soon as a save is in progress; resume."""
    run = r.work / name / "run"
    checkpoints = run / "checkpoints"
    victim = subprocess.Popen(r.synthetic(run, 8), env=r.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    deadline, during_save = time.time() + r.timeout, False
    try:
        while victim.poll() is None and time.time() < deadline:
            if when == "save":
                saves = list(checkpoints.glob(".step_*.tmp-*")) if checkpoints.is_dir() else []
                if saves and any(not (checkpoints / p.name.split(".tmp-")[0][1:]).exists() for p in saves):
                    victim.send_signal(signal.SIGKILL)
                    during_save = True
                    break
                time.sleep(0.0005)
            else:
                metrics = run / "metrics.jsonl"
                if metrics.is_file() and '"step": 3' in metrics.read_text():
                    victim.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.01)
    finally:
        victim.wait(timeout=60)
    killed = victim.returncode == -signal.SIGKILL
    published = sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) \
        if checkpoints.is_dir() else []
    leftovers = sorted(p.name for p in checkpoints.glob(".step_*.tmp-*")) if checkpoints.is_dir() else []
    proc = subprocess.run(r.synthetic(run, 8, "train.resume=auto"), env=r.env(), capture_output=True, text=True,
                          timeout=r.timeout)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    resumed = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("resumed from")]
    at = resumed[0].split(" at step ")[1].split()[0] if resumed else "scratch"
    ok = killed and proc.returncode == 0 and summary.get("step") == 8 and summary.get("samples") == 8 * 16
    if when == "save":
        # the interrupted save left a temporary directory and published nothing of its step
        ok = ok and during_save and bool(leftovers)
    observed = (f"killed: {killed}{' during a save' if during_save else ''}; published then: {published or 'none'}"
                f"{'; unpublished save: ' + leftovers[0] if leftovers else ''}; resumed at step {at}; "
                f"ended at step {summary.get('step')} with {summary.get('samples')} samples")
    return observed, f"samples={summary.get('samples')}", ok


def kill_step(r: Runner) -> tuple[str, str, bool]:
    return _kill_and_resume(r, "kill_step", "step")


def kill_save(r: Runner) -> tuple[str, str, bool]:
    return _kill_and_resume(r, "kill_save", "save")


def disk_full(r: Runner) -> tuple[str, str, bool]:
    """Writes fail beyond 256 kB per file (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC), so the first
    checkpoint save fails; the synthetic shards were drawn by an earlier run."""
    run = r.work / "disk_full" / "run"
    if not (r.cache / "synthetic").is_dir():  # draw the shards first, without the limit
        subprocess.run(r.synthetic(r.work / "disk_full" / "draw", 1), env=r.env(), capture_output=True,
                       timeout=r.timeout)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))

    proc = subprocess.run(r.synthetic(run, 4), env=r.env(), capture_output=True, text=True, timeout=r.timeout,
                          preexec_fn=limit)
    observed, ok = _one_line_error(proc, "saving the checkpoint of step 2 failed", "nothing of it was published")
    checkpoints = run / "checkpoints"
    left = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
    return observed + f"; checkpoints/: {left or 'empty'}", "-", ok and not left


def resume_changed_lr(r: Runner) -> tuple[str, str, bool]:
    run = r.work / "kill_step" / "run"  # the 8 steps of kill_step, resumed to 10 with another rate
    if not (run / "summary.json").is_file():
        subprocess.run(r.synthetic(run, 8), env=r.env(), capture_output=True, timeout=r.timeout)
    proc = subprocess.run(r.synthetic(run, 10, "train.resume=auto", "optim.lr=5e-4"), env=r.env(),
                          capture_output=True, text=True, timeout=r.timeout)
    out = proc.stdout + proc.stderr
    changed = [line for line in out.splitlines() if line.startswith("optimizer settings changed")]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lr9 = [m["lr"] for m in records if m.get("step") == 9 and "lr" in m]
    ok = proc.returncode == 0 and bool(changed) and "optim.lr 0.001 -> 0.0005" in changed[0] and bool(lr9) \
        and lr9[-1] <= 5e-4
    return f"exit {proc.returncode}: {(changed or ['no change reported'])[0][:160]}", \
        f"lr@9={lr9[-1] if lr9 else None}", ok


FAULTS: dict[str, tuple[str, Callable[[Runner], tuple[str, str, bool]]]] = {
    "corrupt_jpeg": ("trained; bad_image=1", stream_fault(
        "corrupt_jpeg", [("corrupt", {"jpg": b"\xff\xd8\xff\xe0 not a JPEG at all", "txt": b"a broken file"})],
        "bad_image")),
    "empty_caption": ("trained; no_caption=1", stream_fault(
        "empty_caption", [("blank", {"jpg": _image_bytes(900), "txt": b"   \n"})], "no_caption")),
    "missing_caption": ("trained; no_caption=1", stream_fault(
        "missing_caption", [("nocap", {"jpg": _image_bytes(901)})], "no_caption")),
    "truncated_tar": ("trained; the cut counted once, nothing else", truncated_tar),
    "missing_shard": ("exit 2 before building; one line naming the shard", missing_shard),
    "dead_pipe": ("stops (no hang); the error names the source", dead_pipe),
    "png16": ("trained; not skipped; grey 117 not 255", png16),
    "bomb": ("trained; bad_image=1 (100 MP over the 89.5 MP limit)", lambda r: stream_fault(
        "bomb", [("bomb", {"png": _bomb_png(), "txt": b"a huge grey field"})], "bad_image")(r)),
    "bad_key": ("exit 2; one line naming the key", bad_key),
    "bad_value": ("exit 2; one line naming key and range", bad_value),
    "kill_step": ("resume=auto ends at step 8 with 128 samples", kill_step),
    "kill_save": ("killed save unpublished; resume ends at step 8 with 128 samples", kill_save),
    "disk_full": ("exit 2; one line; no checkpoint published", disk_full),
    "resume_changed_lr": ("the new optim.lr applied and reported", resume_changed_lr),
}


def markdown(outcomes: list[Outcome]) -> str:
    lines = ["| fault | expected | observed | count | result |", "|---|---|---|---|---|"]
    for o in outcomes:
        observed = o.observed.replace("|", "\\|")
        lines.append(f"| {o.fault} | {o.expected} | {observed} | {o.count} | {'pass' if o.passed else 'FAIL'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Outcome]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(FAULTS), help="run only these faults")
    p.add_argument("--work", help="where inputs and runs go (default: a temporary directory, removed after)")
    p.add_argument("--timeout", type=float, default=300, help="seconds a run may take before it counts as a hang")
    p.add_argument("--json", help="write the outcomes here")
    args = p.parse_args(argv)
    names = args.only or list(FAULTS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        runner = Runner(work, work / "cache", args.timeout)
        outcomes = []
        for name in names:
            expected, check = FAULTS[name]
            start = time.time()
            try:
                observed, count, passed = check(runner)
            except subprocess.TimeoutExpired as e:
                observed, count, passed = f"no end after {e.timeout:.0f} s (a hang)", "-", False
            outcomes.append(Outcome(name, expected, observed, count, passed, round(time.time() - start, 1)))
            print(f"{name}: {'pass' if passed else 'FAIL'} ({outcomes[-1].seconds} s): {observed}", flush=True)
    print()
    print(markdown(outcomes))
    failed = [o.fault for o in outcomes if not o.passed]
    print(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} faults handled as expected"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    return outcomes


if __name__ == "__main__":
    sys.exit(1 if any(not o.passed for o in main()) else 0)
