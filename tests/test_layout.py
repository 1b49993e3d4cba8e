"""The directory layouts: one name per file, and the helpers that read and write run, checkpoint and export files."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clipalign import layout


def test_every_file_has_its_own_name():
    names = {k: v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)}
    # transformers' weights in an export and Accelerate's in a checkpoint are both model.safetensors, the name each
    # library loads; they never share a directory
    del names["TRANSFORMERS_WEIGHTS_FILE"]
    assert len(set(names.values())) == len(names), names
    # the checkpoint's weights (Accelerate's name) and the export's (open_clip's) are different files
    assert layout.CHECKPOINT_WEIGHTS_FILE != layout.EXPORT_WEIGHTS_FILE


def test_checkpoint_names_round_trip(tmp_path):
    ckpt = layout.checkpoint_dir(tmp_path / "run", 42)
    assert ckpt == tmp_path / "run" / layout.CHECKPOINTS_DIR / "step_00000042"
    assert layout.checkpoint_step(ckpt) == 42 and layout.checkpoint_run_dir(ckpt) == tmp_path / "run"
    for name in ("step_0042", ".tmp-step_00000042", "notes"):
        assert layout.checkpoint_step(tmp_path / name) is None
    assert layout.keys_file(tmp_path, 3) == tmp_path / layout.KEYS_DIR / "rank3.jsonl"


def test_export_files_round_trip(tmp_path):
    assert not layout.is_export(tmp_path)
    config = {"model_cfg": {"embed_dim": 8}, "preprocess_cfg": {}, "model_name": "m"}
    layout.write_json(tmp_path / layout.EXPORT_CONFIG_FILE, config)
    assert layout.is_export(tmp_path) and layout.read_export_config(tmp_path) == config
    assert (tmp_path / layout.EXPORT_CONFIG_FILE).read_text().endswith("}\n")
    base = torch.arange(12.0).view(3, 4)
    layout.write_weights(tmp_path / layout.TEXT_ENCODER_WEIGHTS, {"a": base, "b": base, "t": base.t()})
    with pytest.raises(FileNotFoundError, match=rf"{layout.TEXT_ENCODER_CONFIG} does not exist; export the model"):
        layout.read_tower(tmp_path, "text")
    layout.write_json(tmp_path / layout.TEXT_ENCODER_CONFIG, {"tower": "text"})
    cfg, weights = layout.read_tower(tmp_path, "text")
    assert cfg == {"tower": "text"} and torch.equal(weights["t"], base.t()) and torch.equal(weights["b"], base)
    assert load_file(str(tmp_path / layout.TEXT_ENCODER_WEIGHTS)).keys() == {"a", "b", "t"}


def test_checkpoint_without_weights_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{layout.CHECKPOINT_WEIGHTS_FILE}: no model weights"):
        layout.read_checkpoint_weights(tmp_path)


# ---- atomic writes ----------------------------------------------------------------------------------------------


def test_a_write_that_fails_midway_leaves_the_old_content_and_no_partial_file(tmp_path):
    path = tmp_path / "summary.json"
    layout.write_atomic(path, '{"step": 1}\n')
    with pytest.raises(RuntimeError, match="disk full"):
        with layout.atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write('{"step": 2, "loss"')  # half of the new content ...
            raise RuntimeError("disk full")  # ... then the writer fails
    assert path.read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # the temporary file is gone too
    layout.write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_process_killed_midway_leaves_the_old_content_under_the_final_name(tmp_path):
    """A real crash: SIGKILL after half the new content was written and flushed."""
    path = tmp_path / "classnames.txt"
    layout.write_atomic(path, "cat\ndog\n")
    child = textwrap.dedent("""
        import os, signal, sys
        from clipalign.layout import atomic_path
        with atomic_path(sys.argv[1]) as tmp:
            with open(tmp, "w") as f:
                f.write("bird\\n")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", child, str(path)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_text() == "cat\ndog\n"
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".classnames.txt.tmp-")  # hidden, never the final name


def test_temporary_names_are_unique_per_process_and_call(tmp_path):
    names = {layout.temp_name(tmp_path / "config.yaml") for _ in range(100)}
    assert len(names) == 100
    assert all(n.parent == tmp_path and n.name.startswith(f".config.yaml.tmp-{os.getpid()}-") for n in names)


_SAVE_LOOP = textwrap.dedent("""
    import sys
    from clipalign.config import Config
    cfg = Config()
    cfg.train.steps = int(sys.argv[2])
    for _ in range(300):
        cfg.save(sys.argv[1])
""")


@pytest.mark.slow
def test_concurrent_config_saves_do_not_collide(tmp_path):
    """Two processes saving one config.yaml at once: with a shared temporary name, one would rename the other's file
    away (FileNotFoundError) or publish a mix; with unique names both succeed and the file is always whole."""
    path = tmp_path / "config.yaml"
    procs = [subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(path), str(steps)], stderr=subprocess.PIPE,
                              text=True) for steps in (111, 222)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    assert yaml.safe_load(path.read_text())["train"]["steps"] in (111, 222)
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# ---- run directory lock -----------------------------------------------------------------------------------------

_TRY_LOCK = textwrap.dedent("""
    import sys, time
    from clipalign.layout import RunDirBusy, lock_run_dir
    try:
        lock_run_dir(sys.argv[1])
    except RunDirBusy as e:
        print(e, flush=True)
        sys.exit(3)
    print("locked", flush=True)
    if len(sys.argv) > 2:
        time.sleep(600)  # hold it until killed
""")


def test_a_run_directory_is_locked_by_one_live_process_and_freed_when_it_dies(tmp_path):
    run = tmp_path / "run"
    lock = layout.lock_run_dir(run)
    try:
        other = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(run)], capture_output=True, text=True, timeout=60)
        assert other.returncode == 3
        assert str(run) in other.stdout and f"pid {os.getpid()}" in other.stdout
        # this process's own next run in the directory takes it over (an earlier run here has ended)
        assert layout.lock_run_dir(run) is not lock
    finally:
        layout.release_run_dir(run)
    holder = subprocess.Popen([sys.executable, "-c", _TRY_LOCK, str(run), "hold"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(layout.RunDirBusy, match=f"pid {holder.pid}"):
            layout.lock_run_dir(run)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    layout.lock_run_dir(run)  # a killed holder leaves no stale lock
    layout.release_run_dir(run)


_HOLD_AND_FORK = textwrap.dedent("""
    import os, sys, time
    from clipalign.layout import lock_run_dir
    lock_run_dir(sys.argv[1])
    if os.fork() == 0:  # a child that outlives its parent, as a DataLoader worker does for a while
        time.sleep(30)
        os._exit(0)
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_forked_child_does_not_keep_a_killed_runs_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_AND_FORK, str(run)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.kill()
        holder.wait(timeout=60)
        layout.lock_run_dir(run)  # the child still runs, and the directory is free
        layout.release_run_dir(run)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the orphaned child, in the holder's session
