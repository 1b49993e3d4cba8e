"""Kill-and-resume soak: a run SIGKILLed N times, some during checkpoint saves, ends as an uninterrupted one.

That is: at the uninterrupted run's final loss within 1 %, with the same samples seen at every step.

Two runs of the same configuration, with the real trainer (`python -m clipalign.train recipes/quickstart.yaml`) in
subprocesses: synthetic captioned shards (`--samples`, drawn once into the cache), batch `--batch-size`, `--workers`
DataLoader workers, exact passes (`data.resampled=false`) with `data.log_keys=true`, `train.checkpoint_every`,
`train.keep_checkpoints`, `train.log_every=1`, no tracker, no export, `--steps` steps.

1. the reference: one uninterrupted launch.
2. the victim: launched in its own run directory and killed with SIGKILL `--kills` times, each relaunch with
   `train.resume=auto`, until a launch completes. Kills alternate, the first during a save:
   - save: the checkpoints/ folder is polled in a tight loop (about every millisecond) for the temporary directory
     of a save (`.step_XXXXXXXX.tmp-PID-HEX`, clipalign.layout.temp_name) and the launch is killed as soon as the
     one of a drawn save step appears (any save's, if that one was missed), `--save-jitter` ms later at most;
   - step: a step drawn between the resumed step and the last, and a drawn fraction of a step (the launch's last
     interval between two steps) after the launch logged that step's sample keys; when the newest checkpoint is
     already the last step's (a kill after the final save), a drawn moment of the launch's start-up instead.
   After each kill the launch's processes (its DataLoader workers) are killed too and the tool records: seconds into
   the launch, the kind, the step the launch had reached, whether a temporary save directory of the killed process
   was there when it died (and what it held), the newest complete checkpoint then, and the step the next launch
   resumed from (its "resumed from ... at step N" line; 0 when it started from scratch). A launch that ends before
   its kill fires is reported as "finished first" and ends the soak; one that runs past `--timeout` is killed and
   the soak fails.
3. the comparison, each a PASS/FAIL check: the final launch exits 0; the final loss (last metrics line with a loss) is
   within `--tolerance` (relative) of the reference's, and so is every logged step's; every step 1..steps has the
   reference's sample keys (a step trained twice keeps its last record) and no sample is seen twice; summary.json has
   the reference's step, samples and loss; every launch after a kill resumed from the newest complete checkpoint at the
   kill; checkpoints/ holds no temporary directory and only complete checkpoints, the reference's ones, the last of
   which records the reference's samples seen and data positions; no metrics or keys line is torn.

It prints a table of the kills and the verdict (PASS, or FAIL with the reasons), and exits 1 on FAIL. The run
directories, and each launch's log, are kept under `--work-dir` (default: a temporary directory, removed after a PASS
unless `--keep`). Threads: OMP_NUM_THREADS=`--threads` for the trainer. `--eval` keeps the quickstart's own
synthetic set and end-of-run evaluation (slower: kills may then also land during the evaluation).

    python tools/soak_resume.py                                    # 5 kills in 24 steps, checkpoint every 4
    python tools/soak_resume.py --kills 3 --steps 12 --seed 7 --json soak.json
    python tools/soak_resume.py --kills 6 --save-jitter 150 --keep   # kills up to 150 ms into the saves, runs kept
    python tools/soak_resume.py --eval --train-args optim.lr=5e-4        # with the end-of-run evaluation
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "quickstart.yaml"
IMAGE_SIZE = 64  # tiny-vit-64, the quickstart's model

# the layout's names, repeated here so that the tool imports no torch (see clipalign/layout.py, checkpoint.py)
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
KEYS_FILE = Path("keys") / "rank0.jsonl"
_CHECKPOINT = re.compile(r"^step_(\d{8,})$")
_TEMP_SAVE = re.compile(r"^\.step_(\d{8,})\.tmp-(\d+)-[0-9a-f]+$")
_RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")

SAVE, STEP = "save", "step"


# ---- the run directory, read from outside ---------------------------------------------------------------------------


def scan_checkpoints(run: Path) -> tuple[list[int], list[str], list[str]]:
    """(steps of the complete checkpoints, oldest first; temporary save directories; step_* directories without a
    trainer state, i.e. incomplete ones) in `run`/checkpoints."""
    complete, temps, incomplete = [], [], []
    try:
        entries = os.listdir(run / CHECKPOINTS_DIR)
    except FileNotFoundError:
        return [], [], []
    for name in entries:
        if _TEMP_SAVE.match(name):
            temps.append(name)
        else:
            m = _CHECKPOINT.match(name)
            if m:
                if (run / CHECKPOINTS_DIR / name / TRAINER_STATE_FILE).is_file():
                    complete.append(int(m.group(1)))
                else:
                    incomplete.append(name)
    return sorted(complete), sorted(temps), sorted(incomplete)


def temp_saves(run: Path) -> list[str]:
    """The temporary save directories in `run`/checkpoints, fast (one listdir, for the tight loop)."""
    try:
        return [n for n in os.listdir(run / CHECKPOINTS_DIR) if n.startswith(".step_") and _TEMP_SAVE.match(n)]
    except FileNotFoundError:
        return []


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records of a JSON-lines file and the number of lines that are not JSON (torn by a kill)."""
    records, torn = [], 0
    if not path.is_file():
        return records, torn
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
    return records, torn


def keys_by_step(run: Path) -> dict[int, list[str]]:
    """Each step's sample keys; a step logged twice (trained, lost to a kill, trained again) keeps its last record."""
    return {r["step"]: r["keys"] for r in read_jsonl(run / KEYS_FILE)[0]}


def losses_by_step(run: Path) -> dict[int, float]:
    """Each logged step's loss, the last record of a step winning."""
    return {r["step"]: r["loss"] for r in read_jsonl(run / METRICS_FILE)[0] if "loss" in r}


def final_loss(run: Path) -> float | None:
    """The loss of the last metrics line that has one."""
    losses = [r["loss"] for r in read_jsonl(run / METRICS_FILE)[0] if "loss" in r]
    return losses[-1] if losses else None


def resumed_step(log_text: str) -> int | None:
    m = _RESUMED.search(log_text)
    return int(m.group(2)) if m else None


def relative_diff(a: float | None, b: float | None) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(b), 1e-12)


class KeysTail:
    """The newest step in a keys file, read incrementally (only the bytes appended since the last call)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial, self.step = path, 0, b"", None
        try:
            self.offset = path.stat().st_size  # what earlier launches wrote is not this launch's progress
        except FileNotFoundError:
            pass

    def poll(self) -> int | None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return self.step
        if size > self.offset:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = self.partial + f.read(size - self.offset)
            self.offset = size
            *lines, self.partial = data.split(b"\n")
            for line in lines:
                try:
                    self.step = json.loads(line)["step"]
                except (ValueError, KeyError):
                    pass
        return self.step


# ---- launches -------------------------------------------------------------------------------------------------------


@dataclass
class Kill:
    index: int
    kind: str  # save | step
    launch: int
    target: str = ""  # what it waited for: "save of step 8", "step 13 + 0.42 step"
    outcome: str = "pending"  # killed | finished first | timeout
    at_s: float | None = None  # seconds into the launch
    reached_step: int | None = None  # the last step the launch had logged keys for (None: no step in this launch)
    temp_at_kill: list[str] = field(default_factory=list)  # temporary save dirs of the killed process when it died
    temp_files: list[str] = field(default_factory=list)  # what the first of them held
    latest_checkpoint: int | None = None  # newest complete checkpoint when it died (None: none)
    resumed_from: int | None = None  # the step the next launch started from (0: from scratch; None: unknown)

    @property
    def during_save(self) -> bool:
        return bool(self.temp_at_kill)


@dataclass
class Launch:
    index: int
    cmd: list[str]
    log: str
    rc: int | str | None = None  # exit status (-9: killed), or "timeout"
    seconds: float = 0.0
    resumed_from: int | None = None  # "resumed from ... at step N"; 0 when it logged steps without resuming
    first_step: int | None = None  # the first step it logged keys for
    first_step_s: float | None = None  # seconds into the launch when it did
    step_times: list[float] = field(default_factory=list, repr=False)  # when it logged each step (monotonic)


def trainer_args(args: argparse.Namespace, data: str | None) -> list[str]:
    """The recipe and overrides both runs share (the run directory and resume come on top)."""
    over = [f"data.synthetic_samples={args.samples}", f"data.batch_size={args.batch_size}",
            f"data.workers={args.workers}", "data.shuffle_buffer=64", "data.resampled=false", "data.log_keys=true",
            "optim.warmup_steps=2", "train.log_every=1", f"train.checkpoint_every={args.checkpoint_every}",
            f"train.keep_checkpoints={args.keep_checkpoints}", "train.log_with=none", "export.dir=",
            f"train.steps={args.steps}"]
    if data:
        over.append(f"data.train={data}")  # given, the synthetic set's evaluation is not filled in: no evaluation
    return [str(args.recipe), *over, *args.train_args]


def launch(args: argparse.Namespace, common: list[str], run: Path, index: int, resume: bool,
           env: dict) -> tuple[subprocess.Popen, Launch, object]:
    cmd = [sys.executable, "-m", "clipalign.train", *common, f"train.output_dir={run}"]
    if resume:
        cmd.append("train.resume=auto")
    log_path = run.parent / f"{run.name}.launch{index}.log"
    log = open(log_path, "w")
    # its own process group: the DataLoader workers are killed with it after the main process
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, Launch(index=index, cmd=cmd, log=str(log_path)), log


def _finish_launch(proc: subprocess.Popen, record: Launch, log, t0: float, timed_out: bool = False) -> None:
    record.rc = "timeout" if timed_out else proc.returncode
    record.seconds = round(time.monotonic() - t0, 2)
    log.close()
    text = Path(record.log).read_text(errors="replace")
    record.resumed_from = resumed_step(text)
    if record.resumed_from is None and record.first_step is not None:
        record.resumed_from = record.first_step - 1  # it trained without resuming: from scratch (0)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launch's main process, reap it (a zombie would look alive to the next save's clean-up), then the
    rest of its process group (DataLoader workers), which this tool started with it."""
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _watch(record: Launch, keys: KeysTail, t0: float) -> None:
    """Note when the launch logs a step (its first, and the interval between steps)."""
    before = keys.step
    step = keys.poll()
    if step is not None and step != before:
        now = time.monotonic()
        record.step_times.append(now)
        if record.first_step is None:
            record.first_step, record.first_step_s = step, round(now - t0, 2)


def step_interval(record: Launch, default: float) -> float:
    """The launch's last interval between two logged steps (the machine's speed now), or `default`."""
    times = record.step_times
    return times[-1] - times[-2] if len(times) >= 2 else default


def run_reference(args: argparse.Namespace, common: list[str], run: Path, env: dict) -> Launch:
    proc, record, log = launch(args, common, run, 0, resume=False, env=env)
    keys, t0, timed_out = KeysTail(run / KEYS_FILE), time.monotonic(), False
    while proc.poll() is None:
        if time.monotonic() - t0 > args.timeout:
            _kill_group(proc)
            timed_out = True
            break
        _watch(record, keys, t0)
        time.sleep(0.05)
    _finish_launch(proc, record, log, t0, timed_out)
    return record


def run_victim(args: argparse.Namespace, common: list[str], run: Path, env: dict, step_time: float,
               startup: float, rng: random.Random) -> tuple[list[Kill], list[Launch]]:
    """Launch, kill and relaunch `run` until a launch completes; `step_time` and `startup` (seconds to the first
    step) are the reference's, for the step kills' moments."""
    kills: list[Kill] = []
    launches: list[Launch] = []
    saves = [s for s in range(args.checkpoint_every, args.steps, args.checkpoint_every)] if args.checkpoint_every \
        else []
    saves.append(args.steps)  # the final checkpoint is a save too
    index = 0
    while True:
        complete, _, _ = scan_checkpoints(run)
        start = complete[-1] if complete else 0
        kill, save_step, jitter, target_step, fraction = None, 0, 0.0, None, 0.0
        if len(kills) < args.kills:
            kind = SAVE if len(kills) % 2 == 0 else STEP
            kill = Kill(index=len(kills) + 1, kind=kind, launch=index)
            if kind == SAVE:
                ahead = [s for s in saves if s > start] or [args.steps]
                save_step = rng.choice(ahead)
                jitter = rng.uniform(0, args.save_jitter / 1000) if args.save_jitter > 0 else 0.0
                kill.target = f"save of step {save_step}" + (f" + {jitter * 1000:.0f} ms" if jitter else "")
            else:
                target_step = rng.randint(start + 1, args.steps - 1) if start + 1 <= args.steps - 1 else None
                fraction = rng.random()
                kill.target = (f"step {target_step} + {fraction:.2f} step" if target_step is not None
                               else f"{fraction * startup:.1f} s after the start")  # no step left to train
            kills.append(kill)
        proc, record, log = launch(args, common, run, index, resume=index > 0, env=env)
        launches.append(record)
        keys = KeysTail(run / KEYS_FILE)
        t0 = time.monotonic()
        fire_at = None  # monotonic time at which a step kill fires
        missed_target = timed_out = False
        prefix = f".step_{save_step:08d}.tmp-{proc.pid}-" if kill and kill.kind == SAVE else ""
        while proc.poll() is None:
            now = time.monotonic()
            if now - t0 > args.timeout:
                _kill_group(proc)
                timed_out = True
                if kill:
                    kill.outcome = "timeout"
                break
            _watch(record, keys, t0)
            step = keys.step
            if kill is not None:
                fire = False
                if kill.kind == SAVE:
                    temps = temp_saves(run)
                    mine = [t for t in temps if f".tmp-{proc.pid}-" in t]
                    if any(t.startswith(prefix) for t in mine) or (missed_target and mine):
                        if jitter:
                            time.sleep(jitter)
                        fire = True
                    elif not missed_target and (run / CHECKPOINTS_DIR / f"step_{save_step:08d}" /
                                                TRAINER_STATE_FILE).is_file() and save_step > start:
                        # the save came and went between two looks (a loaded machine): take the next one
                        missed_target = True
                        kill.target += " (missed: the next save)"
                else:
                    if fire_at is None:
                        if target_step is None:
                            fire_at = t0 + fraction * startup
                        elif step is not None and step >= target_step:
                            fire_at = now + fraction * step_interval(record, step_time)
                    fire = fire_at is not None and now >= fire_at
                if fire:
                    _kill_group(proc)
                    if proc.returncode != -signal.SIGKILL:  # it ended on its own between the last look and the kill
                        kill.outcome = "finished first"
                        break
                    kill.outcome = "killed"
                    kill.at_s = round(time.monotonic() - t0, 3)
                    kill.reached_step = keys.poll()
                    complete, temps, _ = scan_checkpoints(run)
                    kill.temp_at_kill = [t for t in temps if f".tmp-{proc.pid}-" in t]
                    if kill.temp_at_kill:
                        kill.temp_files = sorted(os.listdir(run / CHECKPOINTS_DIR / kill.temp_at_kill[0]))
                    kill.latest_checkpoint = complete[-1] if complete else None
                    break
                time.sleep(0.001 if kill.kind == SAVE else 0.005)
            else:
                time.sleep(0.05)
        else:
            if kill is not None:
                kill.outcome = "finished first"
        _finish_launch(proc, record, log, t0, timed_out)
        for previous in kills:
            if previous.launch == index - 1 and previous.outcome == "killed":
                previous.resumed_from = record.resumed_from
        print(f"launch {index}: {_launch_line(record, kill)}", flush=True)
        index += 1
        if kill is None or kill.outcome != "killed":
            return kills, launches


def _launch_line(record: Launch, kill: Kill | None) -> str:
    start = "scratch" if record.resumed_from == 0 else (
        f"resumed at step {record.resumed_from}" if record.resumed_from is not None else "no step")
    what = f"rc {record.rc}, {record.seconds:.1f} s, {start}"
    if kill is not None:
        what += f"; kill {kill.index} ({kill.kind}, {kill.target}): {kill.outcome}"
        if kill.outcome == "killed":
            what += f" at {kill.at_s:.2f} s" + (f", during {kill.temp_at_kill[0]}" if kill.temp_at_kill else "")
    return what


# ---- comparison -----------------------------------------------------------------------------------------------------


def compare(args: argparse.Namespace, reference: Path, victim: Path, kills: list[Kill],
            launches: list[Launch]) -> list[dict]:
    """The checks, each {"name", "ok", "detail"}."""
    checks = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    last = launches[-1]
    check("final launch completed", last.rc == 0, f"exit status {last.rc} (log: {last.log})")
    timeouts = [r.index for r in launches if r.rc == "timeout"]
    check("no launch timed out", not timeouts, f"launches past --timeout {args.timeout:g} s: {timeouts or 'none'}")
    others = [(r.index, r.rc) for r in launches[:-1] if r.rc not in (-signal.SIGKILL, "timeout")]
    check("every other launch ended by its kill", not others, f"other exits: {others or 'none'}")

    ref_loss, got_loss = final_loss(reference), final_loss(victim)
    diff = relative_diff(got_loss, ref_loss)
    check("final loss", diff <= args.tolerance,
          f"{got_loss} vs reference {ref_loss}: {diff:.2e} relative (tolerance {args.tolerance:g})")
    ref_steps, got_steps = losses_by_step(reference), losses_by_step(victim)
    worst = max(((relative_diff(got_steps.get(s), ref_steps[s]), s) for s in ref_steps), default=(math.inf, None))
    check("every step's loss", set(got_steps) == set(ref_steps) and worst[0] <= args.tolerance,
          f"{len(got_steps)} of {len(ref_steps)} steps logged; largest difference {worst[0]:.2e} (step {worst[1]})")

    ref_keys, got_keys = keys_by_step(reference), keys_by_step(victim)
    expected = list(range(1, args.steps + 1))
    differ = [s for s in expected if got_keys.get(s) != ref_keys.get(s)]
    check("sample keys of every step", sorted(ref_keys) == expected and sorted(got_keys) == expected and not differ,
          f"steps logged {len(got_keys)}/{args.steps}; differing from the reference: {differ or 'none'}")
    seen = [k for s in sorted(got_keys) for k in got_keys[s]]
    twice = len(seen) - len(set(seen))
    check("no sample twice, none skipped", twice == 0 and len(seen) == args.steps * args.batch_size,
          f"{len(seen)} samples in the steps' final records, {twice} seen twice")

    summaries = {}
    for name, run in (("reference", reference), ("victim", victim)):
        path = run / SUMMARY_FILE
        summaries[name] = json.loads(path.read_text()) if path.is_file() else {}
    ref_sum, got_sum = summaries["reference"], summaries["victim"]
    check("summary.json step and samples", got_sum and (got_sum.get("step"), got_sum.get("samples")) ==
          (ref_sum.get("step"), ref_sum.get("samples")),
          f"step {got_sum.get('step')} samples {got_sum.get('samples')} vs reference step {ref_sum.get('step')} "
          f"samples {ref_sum.get('samples')}")
    check("summary.json loss", got_sum.get("loss") == ref_sum.get("loss") or
          relative_diff(got_sum.get("loss"), ref_sum.get("loss")) <= args.tolerance,
          f"{got_sum.get('loss')} vs reference {ref_sum.get('loss')}")

    wrong = [(k.index, k.latest_checkpoint or 0, k.resumed_from) for k in kills
             if k.outcome == "killed" and k.resumed_from is not None and k.resumed_from != (k.latest_checkpoint or 0)]
    check("each resume from the newest complete checkpoint", not wrong,
          "every relaunch started from the newest complete checkpoint at the kill" if not wrong else
          "; ".join(f"kill {i}: newest {c}, resumed from {r}" for i, c, r in wrong))

    complete, temps, incomplete = scan_checkpoints(victim)
    ref_complete, _, _ = scan_checkpoints(reference)
    check("no temporary save left", not temps, f"in {victim / CHECKPOINTS_DIR}: {temps or 'none'}")
    check("complete checkpoints only, the reference's", not incomplete and complete == ref_complete,
          f"{complete} vs reference {ref_complete}" + (f"; without {TRAINER_STATE_FILE}: {incomplete}"
                                                         if incomplete else ""))
    if complete and ref_complete:
        got_state = _trainer_state(victim, complete[-1])
        ref_state = _trainer_state(reference, ref_complete[-1])
        same = {k: got_state.get(k) == ref_state.get(k) for k in ("step", "samples_seen", "data")}
        check("last checkpoint's trainer state", all(same.values()),
              "step, samples seen and data positions as the reference's" if all(same.values()) else
              "differs in " + ", ".join(k for k, ok in same.items() if not ok) +
              f": {_brief(got_state)} vs reference {_brief(ref_state)}")

    torn = {f"{run.name}/{name}": read_jsonl(run / name)[1] for run in (reference, victim)
            for name in (METRICS_FILE, str(KEYS_FILE))}
    torn = {k: v for k, v in torn.items() if v}
    check("no torn metrics or keys lines", not torn, f"lines that are not JSON: {torn or 'none'}")
    return checks


def _trainer_state(run: Path, step: int) -> dict:
    return json.loads((run / CHECKPOINTS_DIR / f"step_{step:08d}" / TRAINER_STATE_FILE).read_text())


def _brief(state: dict) -> str:
    return json.dumps({k: state.get(k) for k in ("step", "samples_seen", "data")})


# ---- the table ------------------------------------------------------------------------------------------------------


def kill_table(kills: list[Kill]) -> str:
    head = ["kill", "kind", "launch", "target", "outcome", "at (s)", "step", "temp save at kill", "newest ckpt",
            "resumed"]
    rows = [head]
    for k in kills:
        temp = "-"
        if k.temp_at_kill:
            temp = f"yes: {_TEMP_SAVE.match(k.temp_at_kill[0]).group(0)[1:14]} ({len(k.temp_files)} files)"
        elif k.outcome == "killed":
            temp = "no"
        rows.append([str(k.index), k.kind, str(k.launch), k.target, k.outcome,
                     f"{k.at_s:.2f}" if k.at_s is not None else "-",
                     str(k.reached_step) if k.reached_step is not None else "-", temp,
                     "-" if k.outcome != "killed" else str(k.latest_checkpoint or "none"),
                     "scratch" if k.resumed_from == 0 else str(k.resumed_from) if k.resumed_from is not None else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------------------------


def synthetic_shards(cache: Path, samples: int) -> str:
    """Brace pattern of the synthetic training set, drawn once into `cache` (a one-image-per-class held-out split:
    nothing evaluates it)."""
    from clipalign.data.synthetic import make_synthetic_dataset

    root = cache / "soak-synthetic" / f"n{samples}-px{IMAGE_SIZE}"
    if not root.exists():
        print(f"drawing {samples} synthetic samples into {root}", flush=True)
    return make_synthetic_dataset(root, train_samples=samples, heldout_per_class=1, image_size=IMAGE_SIZE).train_pattern


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs of the victim run (alternating: save, step)")
    p.add_argument("--steps", type=int, default=24, help="train.steps of both runs")
    p.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    p.add_argument("--tolerance", type=float, default=0.01, help="relative loss difference allowed")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one launch may run before it is killed")
    p.add_argument("--checkpoint-every", type=int, default=4, help="train.checkpoint_every")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="train.keep_checkpoints")
    p.add_argument("--samples", type=int, default=2000, help="synthetic training samples")
    p.add_argument("--batch-size", type=int, default=16, help="data.batch_size")
    p.add_argument("--workers", type=int, default=2, help="data.workers")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the trainer")
    p.add_argument("--save-jitter", type=float, default=0.0,
                   help="kill a save up to this many ms (drawn) after its temporary directory appears; 0 = at once")
    p.add_argument("--eval", action="store_true",
                   help="train on the quickstart's synthetic set with its end-of-run evaluation (slower)")
    p.add_argument("--recipe", type=Path, default=RECIPE)
    p.add_argument("--train-args", nargs="*", default=[], metavar="KEY=VALUE", help="more trainer overrides, both runs")
    p.add_argument("--cache-dir", default="", help="CLIPALIGN_CACHE of the runs and the synthetic set; default "
                                                   "$CLIPALIGN_CACHE, else a folder in the work directory")
    p.add_argument("--work-dir", default="", help="where the runs go (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory after a PASS (it is kept on FAIL)")
    p.add_argument("--json", help="write the configuration, launches, kills, checks and verdict here")
    args = p.parse_args(argv)
    if args.kills < 0 or args.steps < 2 or args.checkpoint_every < 0:
        p.error("--kills >= 0, --steps >= 2 and --checkpoint-every >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    started = time.monotonic()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="soak_resume-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir or os.environ.get("CLIPALIGN_CACHE") or work / "cache").expanduser().resolve()
    # unbuffered: a killed launch's log still holds its "resumed from" line
    env = dict(os.environ, CLIPALIGN_CACHE=str(cache), OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    reference, victim = work / "reference", work / "victim"
    for run in (reference, victim):
        if run.exists():
            shutil.rmtree(run)
    print(f"work directory {work}; cache {cache}", flush=True)
    common = trainer_args(args, None if args.eval else synthetic_shards(cache, args.samples))

    ref_launch = run_reference(args, common, reference, env)
    print(f"reference: rc {ref_launch.rc}, {ref_launch.seconds:.1f} s, first step after {ref_launch.first_step_s} s",
          flush=True)
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "work_dir": str(work), "cache_dir": str(cache), "trainer_args": common,
                    "reference": _launch_dict(ref_launch)}
    if ref_launch.rc != 0:
        tail = Path(ref_launch.log).read_text(errors="replace")[-3000:]
        result.update(verdict="FAIL", reasons=[f"the reference run failed (exit {ref_launch.rc}): {tail}"])
        return _report(args, result, work, started)
    rates = [r["samples_per_s"] for r in read_jsonl(reference / METRICS_FILE)[0] if r.get("samples_per_s")]
    step_time = args.batch_size / sorted(rates)[len(rates) // 2] if rates else 1.0
    result["reference"].update(final_loss=final_loss(reference), step_time_s=round(step_time, 3))

    startup = ref_launch.first_step_s or 10.0
    kills, launches = run_victim(args, common, victim, env, step_time, startup, random.Random(args.seed))
    checks = compare(args, reference, victim, kills, launches)
    failed = [c for c in checks if not c["ok"]]
    result.update(kills=[{**asdict(k), "during_save": k.during_save} for k in kills],
                  launches=[_launch_dict(r) for r in launches], checks=checks,
                  verdict="FAIL" if failed else "PASS", reasons=[f"{c['name']}: {c['detail']}" for c in failed])
    print()
    print(kill_table(kills))
    print()
    for c in checks:
        print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}")
    return _report(args, result, work, started)


def _launch_dict(record: Launch) -> dict:
    return {k: v for k, v in asdict(record).items() if k != "step_times"}


def _report(args: argparse.Namespace, result: dict, work: Path, started: float) -> dict:
    result["seconds"] = round(time.monotonic() - started, 1)
    kills = result.get("kills", [])
    during = sum(k["during_save"] for k in kills)
    fired = sum(k["outcome"] == "killed" for k in kills)
    print()
    print(f"{result['verdict']}: {fired} of {args.kills} kills fired, {during} during a save; "
          f"{len(result.get('launches', []))} launches; {result['seconds']:.0f} s")
    for reason in result["reasons"]:
        print(f"  - {reason}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if result["verdict"] == "PASS" and not args.keep and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"runs and launch logs kept in {work}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["verdict"] == "FAIL" else 0)
