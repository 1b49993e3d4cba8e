"""tools/soak_resume.py: its readers of a run directory, and a short soak with the real trainer."""

import json

import pytest
from tool_module import load_tool

soak = load_tool("soak_resume")


def test_checkpoint_scan_tells_complete_temporary_and_incomplete_saves_apart(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name in ("step_00000004", "step_00000008", "step_00000012", ".step_00000016.tmp-123-0a1b2c3d", "other"):
        (ckpts / name).mkdir(parents=True)
    for name in ("step_00000004", "step_00000008"):
        (ckpts / name / "trainer_state.json").write_text("{}")
    complete, temps, incomplete = soak.scan_checkpoints(tmp_path)
    assert complete == [4, 8] and temps == [".step_00000016.tmp-123-0a1b2c3d"] and incomplete == ["step_00000012"]
    assert soak.temp_saves(tmp_path) == temps
    assert soak.scan_checkpoints(tmp_path / "nothing") == ([], [], [])


def test_keys_and_metrics_readers_keep_a_retrained_steps_last_record_and_count_torn_lines(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "rank0.jsonl").write_text(
        '{"step": 1, "keys": ["a"]}\n{"step": 2, "keys": ["b"]}\n{"step": 2, "keys": ["c"]}\n')
    assert soak.keys_by_step(tmp_path) == {1: ["a"], 2: ["c"]}
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "loss": 3.0}\n{"step": 2, "lo\n{"step": 2, "loss": 2.5}\n'
                                            '{"step": 2, "zeroshot": {}}\n')
    assert soak.losses_by_step(tmp_path) == {2: 2.5} and soak.final_loss(tmp_path) == 2.5
    assert soak.read_jsonl(tmp_path / "metrics.jsonl")[1] == 1
    assert soak.resumed_step("x\nresumed from /r/checkpoints/step_00000008 at step 8 (ddp checkpoint, ddp run)\n") == 8
    assert soak.resumed_step("no resume") is None
    assert soak.relative_diff(2.02, 2.0) == pytest.approx(0.01) and soak.relative_diff(None, 2.0) == float("inf")


def test_keys_tail_reads_only_what_a_launch_appends_and_waits_for_whole_lines(tmp_path):
    path = tmp_path / "keys.jsonl"
    path.write_text('{"step": 7, "keys": []}\n')  # an earlier launch's
    tail = soak.KeysTail(path)
    assert tail.poll() is None
    with open(path, "a") as f:
        f.write('{"step": 5, "keys": []}\n{"step": 6, "ke')
    assert tail.poll() == 5
    with open(path, "a") as f:
        f.write('ys": []}\n')
    assert tail.poll() == 6


@pytest.mark.slow
def test_killed_and_resumed_run_ends_as_the_uninterrupted_one(tmp_path):
    """3 SIGKILLs in 12 steps (seed 4 draws: the first save, so no checkpoint is left and the run restarts from
    scratch; step 5; the final save) end at the uninterrupted run's loss, keys and samples."""
    out = tmp_path / "soak.json"
    result = soak.main(["--kills", "3", "--steps", "12", "--checkpoint-every", "4", "--seed", "4",
                        "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"),
                        "--json", str(out), "--timeout", "300"])
    assert result["verdict"] == "PASS", result["reasons"]
    record = json.loads(out.read_text())
    assert record["verdict"] == "PASS" and all(c["ok"] for c in record["checks"])
    kills = record["kills"]
    assert [k["kind"] for k in kills] == ["save", "step", "save"]
    assert all(k["outcome"] == "killed" for k in kills)
    # a kill inside a save: the killed process's temporary directory was there when it died
    during = [k for k in kills if k["during_save"]]
    assert during and all(".tmp-" in t for k in during for t in k["temp_at_kill"])
    # every relaunch resumed from the newest complete checkpoint at its kill (0: none, from scratch)
    assert all(k["resumed_from"] == (k["latest_checkpoint"] or 0) for k in kills)
    launches = record["launches"]
    assert len(launches) == 4 and launches[-1]["rc"] == 0
    assert [r["rc"] for r in launches[:-1]] == [-9, -9, -9]
    assert [r["resumed_from"] for r in launches[1:]] == [k["resumed_from"] for k in kills]
    assert not soak.temp_saves(tmp_path / "work" / "victim")
