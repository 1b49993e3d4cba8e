"""Checkpoints are complete or invisible: a process killed during a save never leaves one that resume would pick."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from clipalign.checkpoint import _remove_dead_saves, latest_checkpoint, list_checkpoints, resolve_checkpoint

# A child that saves real Accelerate checkpoints of the tiny model with its AdamW state: step 1 completes, then it
# starts step 2 and is killed by the test as soon as the temporary directory of that save appears.
_CHILD = textwrap.dedent("""
    import sys, torch
    from accelerate import Accelerator
    from clipalign.checkpoint import save_checkpoint
    from clipalign.config import Config
    from clipalign.model import create_model
    cfg = Config()
    cfg.model.name = "tiny-vit-64"
    acc = Accelerator(cpu=True)
    model = create_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    model, opt = acc.prepare(model, opt)
    save_checkpoint(acc, sys.argv[1], 1, cfg, {"samples_seen": 1})
    print("saved 1", flush=True)
    for _ in range(50):  # keep saving step 2 until killed
        save_checkpoint(acc, sys.argv[1], 2, cfg, {"samples_seen": 2})
""")


def _temporary_saves(run, step: int) -> list:
    """The temporary directories of saves of `step` (named `.step_N.tmp-PID-RANDOM`)."""
    return sorted((run / "checkpoints").glob(f".step_{step:08d}.tmp-*"))


def test_killed_during_save_leaves_only_complete_checkpoints(tmp_path):
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "saved 1"
        deadline = time.time() + 120
        while not (tmps := _temporary_saves(run, 2)) and time.time() < deadline:
            time.sleep(0.002)
        assert tmps
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert _temporary_saves(run, 2)  # the save was interrupted ...
    assert not (run / "checkpoints" / "step_00000002").exists()  # ... so no step_2 was published
    assert [c.name for c in list_checkpoints(run)] == ["step_00000001"]
    assert latest_checkpoint(run).name == "step_00000001"
    assert resolve_checkpoint(run).name == "step_00000001"
    _remove_dead_saves(run / "checkpoints")  # what the next save does first: the dead save's directory goes
    assert not _temporary_saves(run, 2)


def test_directories_without_the_completion_marker_are_ignored(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name, complete in [("step_00000010", True), ("step_00000020", False), (".step_00000030.tmp-123-ab12cd34", True),
                           ("step_0030", True), ("notes", True)]:
        (ckpts / name).mkdir(parents=True)
        if complete:
            (ckpts / name / "trainer_state.json").write_text(json.dumps({"step": 1}))
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step_00000010"]
    assert latest_checkpoint(tmp_path / "missing") is None


# Saves steps 1 and 2 of a small model into RUN, as a second run into the same directory would at the same time.
_SAVER = textwrap.dedent("""
    import sys, torch
    from accelerate import Accelerator
    from clipalign.checkpoint import save_checkpoint
    from clipalign.config import Config
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(torch.nn.Linear(64, 64), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]))
    for step in (1, 2):
        for _ in range(3):
            save_checkpoint(acc, sys.argv[1], step, Config(), {"samples_seen": step})
""")


@pytest.mark.slow
def test_concurrent_saves_into_one_run_directory_do_not_collide(tmp_path):
    """Two processes saving the same steps at once: each writes its own temporary directory (a shared fixed name
    would be removed or renamed away under the other's feet)."""
    run = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-c", _SAVER, str(run)], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert [c.name for c in list_checkpoints(run)] == ["step_00000001", "step_00000002"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [c.name for c in list_checkpoints(run)]


# For each kind of damage: saves Accelerate state, damages its RNG file, loads it back, and prints what
# rng_restore_error finds.
_RNG_CHILD = textwrap.dedent("""
    import json, pathlib, sys, torch
    from accelerate import Accelerator
    from clipalign.checkpoint import rng_restore_error, rng_state_file
    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(2, 2))
    found = {}
    for damage in ("intact", "missing", "corrupt", "unloadable"):
        ckpt = pathlib.Path(sys.argv[1]) / damage
        torch.manual_seed(7)
        acc.save_state(str(ckpt))
        rng = rng_state_file(ckpt, acc.process_index)
        if damage == "missing":
            rng.unlink()
        elif damage == "corrupt":
            rng.write_bytes(rng.read_bytes()[:40])
        elif damage == "unloadable":  # readable, but Accelerate fails on it and only logs that
            states = torch.load(rng, weights_only=False)
            del states["random_state"]
            torch.save(states, rng)
        torch.manual_seed(8)
        acc.load_state(str(ckpt))
        found[damage] = {"file": str(rng), "error": rng_restore_error(ckpt, acc.process_index)}
    print(json.dumps(found))
""")


@pytest.mark.slow
def test_a_lost_rng_state_is_reported_naming_its_file(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _RNG_CHILD, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found.pop("intact")["error"] is None
    expected_errors = {"missing": "is missing", "corrupt": "cannot be read", "unloadable": "was not restored"}
    for damage, expected in expected_errors.items():
        file, error = found[damage]["file"], found[damage]["error"]
        assert file.endswith("random_states_0.pkl") and file in error and expected in error, (damage, error)


# A child that saves step 1, then can write no file larger than 64 kB (as on a full disk: writes fail with EFBIG,
# which Python gets as an error because it ignores SIGXFSZ) and tries to save step 2.
_FULL_DISK_CHILD = textwrap.dedent("""
    import resource, sys, torch
    from accelerate import Accelerator
    from clipalign.checkpoint import CheckpointSaveError, save_checkpoint
    from clipalign.config import Config
    from clipalign.model import create_model
    cfg = Config()
    cfg.model.name = "tiny-vit-64"
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(create_model(cfg.model), torch.optim.AdamW(create_model(cfg.model).parameters()))
    save_checkpoint(acc, sys.argv[1], 1, cfg, {"samples_seen": 1})
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    try:
        save_checkpoint(acc, sys.argv[1], 2, cfg, {"samples_seen": 2})
    except CheckpointSaveError as e:
        print(e)
""")


def test_a_save_that_cannot_be_written_publishes_nothing_and_says_what_is_left(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(run)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message = proc.stdout.strip()
    assert message.startswith("saving the checkpoint of step 2 failed (") and "nothing of it was published" in message
    assert "File too large" in message and f"newest complete checkpoint is {run / 'checkpoints' / 'step_00000001'}" \
        in message
    assert [c.name for c in list_checkpoints(run)] == ["step_00000001"]
    assert not _temporary_saves(run, 2)  # the partial save was removed
