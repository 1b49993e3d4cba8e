"""Checkpoints are complete or invisible: a process killed during a save never leaves one that resume would pick."""

import json
import signal
import subprocess
import sys
import textwrap
import time

from clipalign.checkpoint import latest_checkpoint, list_checkpoints, resolve_checkpoint

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


def test_killed_during_save_leaves_only_complete_checkpoints(tmp_path):
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "saved 1"
        tmp = run / "checkpoints" / ".tmp-step_00000002"
        deadline = time.time() + 120
        while not tmp.exists() and time.time() < deadline:
            time.sleep(0.002)
        assert tmp.exists()
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert tmp.exists()  # the save was interrupted ...
    assert not (run / "checkpoints" / "step_00000002").exists()  # ... so no step_2 was published
    assert [c.name for c in list_checkpoints(run)] == ["step_00000001"]
    assert latest_checkpoint(run).name == "step_00000001"
    assert resolve_checkpoint(run).name == "step_00000001"


def test_directories_without_the_completion_marker_are_ignored(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name, complete in [("step_00000010", True), ("step_00000020", False), (".tmp-step_00000030", True),
                           ("step_0030", True), ("notes", True)]:
        (ckpts / name).mkdir(parents=True)
        if complete:
            (ckpts / name / "trainer_state.json").write_text(json.dumps({"step": 1}))
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step_00000010"]
    assert latest_checkpoint(tmp_path / "missing") is None
