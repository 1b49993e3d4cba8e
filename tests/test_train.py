"""End-to-end training runs: real synthetic shards, real processes, the real recipe."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from multiproc import accelerate_launch_cmd
from safetensors import safe_open

from clipalign.checkpoint import latest_checkpoint, list_checkpoints, read_trainer_state
from clipalign.config import read_config

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
DDP_CONFIG = REPO / "recipes" / "accelerate" / "ddp.yaml"
SMALL = ["data.synthetic_samples=512", "data.batch_size=16", "data.workers=1", "data.shuffle_buffer=64",
         "optim.warmup_steps=2", "train.log_every=2", "eval.batch_size=128"]


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["CLIPALIGN_CACHE"] = str(tmp_path / "cache")
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores: one thread each
    return env


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _accelerate_launch(num_processes: int, args: list[str], env: dict,
                       config_file: Path | None = None) -> subprocess.CompletedProcess:
    cmd = accelerate_launch_cmd(num_processes, ["-m", "clipalign.train", *args], config_file)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_train_and_resume(tmp_path):
    """2 gloo processes under accelerate launch: train 4 steps, then resume from the checkpoint to step 6."""
    run = tmp_path / "run"
    common = [str(QUICKSTART), *SMALL, f"train.output_dir={run}", "export.dir=", "train.log_with=none",
              "train.checkpoint_every=2", "train.keep_checkpoints=2"]
    first = _accelerate_launch(2, [*common, "train.steps=4"], _env(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert [c.name for c in list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    steps = [m for m in _metrics(run) if "loss" in m]
    assert [m["samples"] for m in steps] == [64, 128]  # global batch = 2 processes x 16

    # the restart goes through the shipped Accelerate config file, as a user's would
    second = _accelerate_launch(2, [*common, "train.steps=6", "train.resume=auto"], _env(tmp_path), DDP_CONFIG)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    assert [c.name for c in list_checkpoints(run)] == ["step_00000004", "step_00000006"]  # keep_checkpoints=2
    steps = [m for m in _metrics(run) if "loss" in m]
    assert [m["step"] for m in steps] == [2, 4, 6]
    assert steps[-1]["samples"] == 6 * 32
    assert not list((run / "checkpoints").glob(".*.tmp-*"))  # no temporary save left behind


@pytest.mark.slow
def test_nonfinite_loss_skips_steps_then_stops_naming_the_last_checkpoint(tmp_path):
    """Weights poisoned with NaN make every loss non-finite: steps are skipped and counted, then the run stops."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    base = [sys.executable, "-m", "clipalign.train", str(QUICKSTART), *SMALL, f"train.output_dir={run}",
            "export.dir=", "eval.zeroshot=", "train.log_with=none"]
    first = subprocess.run([*base, "train.steps=2"], env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    weights = run / "checkpoints" / "step_00000002" / "model.safetensors"
    state = load_file(weights)
    state["clip.logit_scale"] = torch.full_like(state["clip.logit_scale"], float("nan"))
    save_file(state, weights)

    second = subprocess.run([*base, "train.steps=8", "train.resume=auto", "train.max_nonfinite=2"], env=_env(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert second.returncode != 0
    assert "the loss was not finite for 3 steps in a row (after step 2)" in second.stderr
    assert "Last good checkpoint: " + str(run / "checkpoints" / "step_00000002") in second.stderr
    assert [c.name for c in list_checkpoints(run)] == ["step_00000002"]  # nothing was saved from the bad steps


def test_console_script_help():
    exe = Path(sys.executable).parent / "clipalign-train"
    assert exe.exists(), "install with pip install -e . to get the console scripts"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "section.key=value" in proc.stdout


def test_every_console_script_main_returns_nothing():
    # the console script runs sys.exit(main()): a main that returns its result (a dict) exits 1 after succeeding
    import configparser
    import importlib
    import inspect

    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    scripts = [line.split("=") for line in setup["options.entry_points"]["console_scripts"].split("\n") if line]
    assert len(scripts) >= 10
    for name, target in scripts:
        module, func = target.strip().split(":")
        main = getattr(importlib.import_module(module), func)
        assert inspect.signature(main).return_annotation in (None, "None"), f"{name.strip()}: {target}"


def test_a_launch_asking_for_fsdp_or_deepspeed_stops_before_training(tmp_path):
    # on CPU Accelerate would drop an FSDP request and run DDP: the user must hear it, and learn the recipe's key
    run = tmp_path / "run"
    config = tmp_path / "fsdp.yaml"  # what `accelerate config` writes for FSDP
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\n"
                      "num_processes: 2\nmixed_precision: 'no'\nfsdp_config:\n  fsdp_version: 2\n")
    proc = _accelerate_launch(2, [str(QUICKSTART), f"train.output_dir={run}"], _env(tmp_path), config)
    assert proc.returncode != 0
    # every process stops; the launcher may end the second before it has printed the same line
    assert "clipalign-train: error: this launch asks Accelerate for FSDP (ACCELERATE_USE_FSDP=true" in proc.stderr
    assert "set train.sharding=fsdp" in proc.stderr
    env = _env(tmp_path)
    env["ACCELERATE_USE_DEEPSPEED"] = "true"
    proc = subprocess.run([sys.executable, "-m", "clipalign.train", str(QUICKSTART), f"train.output_dir={run}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true" in proc.stderr
    assert not run.exists() and not (tmp_path / "cache").exists()  # nothing was drawn, written or trained


def _val_shard(root: Path, count: int = 32) -> str:
    """A shard of `count` captioned 64-px samples for data.val."""
    from clipalign.data.synthetic import draw_sample
    from clipalign.data.writer import image_to_bytes, write_shards

    samples = []
    for i in range(count):
        image, caption, _ = draw_sample(random.Random(1000 + i))
        samples.append({"__key__": f"{i:06d}", "jpg": image_to_bytes(image), "txt": caption})
    return str(write_shards(samples, root, prefix="val", samples_per_shard=count)[0])


@pytest.mark.slow
def test_compile_and_channels_last_train_the_same_model(tmp_path):
    """train.compile (each transformer block), train.channels_last and the matmul patch embedding change how the step
    runs, not what it computes or saves. The compiled run also validates and evaluates, during training and at the
    end (eagerly, by design): it compiles a bounded handful of graphs, and nothing falls back to eager."""
    env = _env(tmp_path)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")  # where compiled kernels land: proof it compiled
    common = [str(QUICKSTART), *SMALL, "train.steps=4", "export.dir=", "train.log_with=none",
              *_tiny_eval_sets(tmp_path / "eval")]
    runs = {}
    compiled = ["train.compile=true", "train.channels_last=true", "train.patch_embed=matmul",
                f"data.val={_val_shard(tmp_path / 'val')}", "eval.val_every=2", "eval.val_samples=32", "eval.every=2"]
    for name, flags in {"eager": [], "compiled": compiled}.items():
        runs[name] = tmp_path / name
        cmd = [sys.executable, "-m", "clipalign.train", *common, f"train.output_dir={runs[name]}", *flags]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(p.is_file() for p in (tmp_path / "inductor").rglob("*"))
    losses = {name: [m["loss"] for m in _metrics(run) if "loss" in m] for name, run in runs.items()}
    assert len(losses["eager"]) == 2
    # fused kernels round differently: the same curve, not the same bits
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=2e-3)
    keys = {}
    for name, run in runs.items():
        with safe_open(str(latest_checkpoint(run) / "model.safetensors"), "pt") as f:
            keys[name] = set(f.keys())
    assert keys["compiled"] == keys["eager"] and not any("_orig_mod" in k for k in keys["compiled"])
    records = _metrics(runs["compiled"])
    assert [r["step"] for r in records if "val" in r] == [2, 4]
    assert [r["step"] for r in records if "zeroshot" in r] == [2, 4] == [r["step"] for r in records if "retrieval" in r]
    # the blocks' graphs are training's: the image tower's and the text tower's (at its first length, then with
    # dynamic length, if the length changed). Evaluation and validation run eagerly: compiled, they added 3 graphs
    # to this run's, within the limit of 8 per code object that training's graphs count against too
    summary = json.loads((runs["compiled"] / "summary.json").read_text())
    assert summary["compile"]["fallbacks"] == [] and 2 <= summary["compile"]["graphs"] <= 3
    assert "compile" not in json.loads((runs["eager"] / "summary.json").read_text())


@pytest.mark.parametrize("fused", [True, False], ids=["fused-on-device", "unfused-waits"])
def test_a_finite_loss_with_a_nonfinite_gradient_makes_no_update(fused, tmp_path):
    from clipalign.monitor import NonfiniteGuard

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    guard = NonfiniteGuard(optimizer, world=1, limit=3, run_dir=tmp_path)
    for step, bad in enumerate([False, True], start=1):
        loss = model(torch.ones(4, 3)).square().mean()
        loss.backward()
        if bad:  # a gradient that overflowed while the loss stayed finite
            model.bias.grad[1] = float("inf")
            before = {k: v.clone() for k, v in model.state_dict().items()}
            moments = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
        verdict = NonfiniteGuard.local_verdict(loss, model)
        assert float(verdict) == (0.0 if bad else 1.0) and torch.isfinite(loss)
        assert float(NonfiniteGuard.local_verdict(loss, model, grads=False)) == 1.0  # fp16: the scaler's to judge
        if guard.arm(verdict, step):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        guard.check(wait=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(moments[k], v) for k, v in optimizer.state[model.weight].items())  # step count too
    assert (guard.total, guard.run) == (1, 1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-on-device", "unfused-waits"])
def test_nonfinite_guard_skips_the_update_and_stops_after_too_many_in_a_row(fused, tmp_path):
    from clipalign.monitor import NonfiniteGuard

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=fused)
    guard = NonfiniteGuard(optimizer, world=2, limit=2, run_dir=tmp_path)
    assert guard.on_device is fused

    def step(finite_processes: int, number: int) -> None:
        weight.grad = torch.full((3,), 1.0 if finite_processes == 2 else float("nan"))
        if guard.arm(torch.tensor(float(finite_processes)), number):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        guard.check(wait=False)

    step(2, 1)
    after_good = weight.detach().clone()
    assert not torch.equal(after_good, torch.ones(3))
    step(1, 2)  # one process saw a non-finite loss: nobody updates, weights and moments stay as they were
    step(1, 3)
    assert torch.equal(weight.detach(), after_good) and optimizer.state[weight]["step"].item() == 1
    assert (guard.total, guard.run) == (2, 2)
    step(2, 4)  # a good step ends the streak and updates again
    assert (guard.total, guard.run) == (2, 0) and not torch.equal(weight.detach(), after_good)
    assert optimizer.state[weight]["step"].item() == 2
    step(0, 5)
    step(0, 6)
    with pytest.raises(FloatingPointError, match=r"not finite for 3 steps in a row \(after step 4\)"):
        step(0, 7)


def test_metrics_window_reports_a_window_then_starts_the_next():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from clipalign.config import ModelConfig
    from clipalign.model import create_model
    from clipalign.monitor import MetricsWindow

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        window = MetricsWindow(Accelerator(cpu=True), global_batch=8, peak_tflops=0.0, num_samples=32)
        model = create_model(ModelConfig(name="tiny-vit-64"))
        with window.counting_flops():
            torch.ones(4, 3) @ torch.ones(3, 5)  # 2 * 4 * 3 * 5 FLOPs, counted once
        with window.counting_flops():
            torch.ones(64, 64) @ torch.ones(64, 64)
        assert window.step_flops == 120
        window.steps, window.wait = 2, 0.0
        window.skipped.update({"bad_image": 2})
        before = window.start
        with window.paused():  # evaluation: its time moves the window's start
            time.sleep(0.05)
        assert window.start >= before + 0.05
        line = window.line(2, 16, torch.tensor(1.5), model, 1e-3, 0)
        assert (line["epoch"], line["loss"], line["lr"], line["skipped"]) == (0.5, 1.5, 1e-3, {"bad_image": 2})
        assert line["samples_per_s"] > 0 and "mfu" not in line  # no known peak on a CPU
        assert (window.steps, window.wait, window.skipped) == (0, 0.0, {})  # the next window
        window.steps = 1
        window.skipped.update({"no_caption": 1})
        line = window.line(3, 24, torch.tensor(1.0), model, 1e-3, 1)
        assert line["skipped"] == {"bad_image": 2, "no_caption": 1} and line["nonfinite_steps"] == 1
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _tiny_eval_sets(root: Path) -> list[str]:
    """Overrides pointing the end-of-run evaluations at 4 tiny images: the runs below test the run directory, not
    the model, and the synthetic held-out set (600 images) would take most of their time."""
    from PIL import Image

    rows = ["filepath,caption"]
    for i, name in enumerate(["red_square", "blue_square"]):
        (root / name).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (8, 8), (255 * (1 - i), 0, 255 * i)).save(root / name / f"{j}.jpg")
            rows.append(f"{name}/{j}.jpg,a {name.replace('_', ' ')}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return [f"eval.zeroshot={root}", f"eval.retrieval={root / 'captions.csv'}"]


@pytest.mark.slow
def test_one_live_run_per_directory_and_a_killed_run_leaves_no_lock(tmp_path):
    """A second run into a live run's directory stops naming it and the live run's pid, without touching it; once the
    live run is SIGKILLed the directory is free. A resume whose RNG state file is gone stops naming the file."""
    run = tmp_path / "run"
    common = [sys.executable, "-m", "clipalign.train", str(QUICKSTART), *SMALL, f"train.output_dir={run}",
              "export.dir=", "train.log_with=none", "train.checkpoint_every=2", *_tiny_eval_sets(tmp_path / "eval")]
    env = _env(tmp_path)
    first = subprocess.Popen([*common, "train.steps=100000"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while latest_checkpoint(run) is None and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        second = subprocess.run([*common, "train.steps=2"], env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"{run} is in use by another run (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert read_config(run / "config.yaml").train.steps == 100000  # the live run's config, not overwritten
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)

    ckpt = latest_checkpoint(run)  # the first run went on saving while the second was refused
    step = read_trainer_state(ckpt)["step"]
    rng_file = ckpt / "random_states_0.pkl"
    saved = rng_file.read_bytes()
    rng_file.unlink()
    # the next run starts (no stale lock), loads the checkpoint, and stops on the missing RNG state, naming the file
    resume = [*common, f"train.steps={step + 2}", f"train.resume={ckpt}"]
    lost = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert lost.returncode == 2, lost.stderr[-3000:]
    assert f"cannot resume from {ckpt}: {rng_file} is missing" in lost.stderr and "Traceback" not in lost.stderr
    assert read_config(run / "config.yaml").train.steps == step + 2  # it held the directory: it wrote its config

    rng_file.write_bytes(saved)
    resumed = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt} at step {step}" in resumed.stdout + resumed.stderr
    assert read_trainer_state(latest_checkpoint(run))["step"] == step + 2


@pytest.mark.slow
def test_two_processes_into_a_locked_run_directory_both_stop_before_training(tmp_path):
    """Only the main process takes the lock; the other learns that it failed and stops too, and the launch ends."""
    from clipalign.layout import lock_run_dir, release_run_dir

    run = tmp_path / "run"
    lock_run_dir(run)  # this test process plays the live run
    try:
        proc = _accelerate_launch(2, [str(QUICKSTART), *SMALL, f"train.output_dir={run}", "export.dir=",
                                      "train.log_with=none", "train.steps=2"], _env(tmp_path))
    finally:
        release_run_dir(run)
    assert proc.returncode != 0
    assert proc.stderr.count(f"{run} is in use by another run (pid {os.getpid()}") == 2, proc.stderr[-3000:]
    # both stopped on the error itself, neither with a traceback of ours (the launcher reports the exit status 2)
    assert "exitcode  : 2" in proc.stderr and "clipalign/train.py" not in proc.stderr, proc.stderr[-3000:]
    assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists()
