"""tools/gpu_report.py: what it plans to measure on a GPU, its time limits, and a real run of its steps on CPU."""

import json
import subprocess
import sys
import time

from tool_module import load_tool

gr = load_tool("gpu_report")


def _step_names(argv: list[str], tmp_path) -> dict[str, list[str]]:
    args = gr._parse_args(["--out", str(tmp_path), *argv])
    return {s.name: s.argv for s in gr.plan(args, {224: "/data/train-{000..009}.tar", 64: "/d/x.tar"}, tmp_path)}


def test_the_gpu_plan_covers_every_figure_of_the_issue(tmp_path):
    steps = _step_names([], tmp_path)
    # correctness first; then what one call must measure (ViT-B/32 and B/16 against the reference, decode, the loss)
    assert list(steps) == ["check", "train-b32-b256", "train-b16-b256", "decode", "loss-32768", "check-triton",
                           "train-b32-b512", "train-b32-b256-notrim", "train-b32-b512-notrim", "train-b16-b256-notrim",
                           "loss-16384", "loss-65536",
                           "train-b32-b256-compile", "train-b32-b512-compile", "train-b16-b256-compile",
                           "train-b16-b256-fsdp"]
    check = steps["check"]
    assert check[check.index("--data") + 1] == "/data/train-{000..009}.tar" and "triton_configs" not in check
    assert steps["check-triton"][-1] == "triton_configs"
    b512 = steps["train-b32-b512"]
    assert b512[b512.index("--model") + 1] == "ViT-B-32" and b512[b512.index("--batch-size") + 1] == "512"
    assert b512[b512.index("--workers") + 1] == "8" and b512[b512.index("--device") + 1] == "cuda"
    assert b512[b512.index("--precision") + 1] == "bf16" and "--skip-reference" not in b512
    assert b512[b512.index("--samples") + 1] == str(512 * 40)
    notrim = steps["train-b16-b256-notrim"]
    assert "--skip-reference" in notrim and notrim[notrim.index("--ours-args") + 1] == "train.trim_text=false"
    loss = steps["loss-65536"]
    assert loss[loss.index("--sizes") + 1:loss.index("--world-sizes")] == ["65536"]
    assert loss[loss.index("--world-sizes") + 1] == "1" and loss[loss.index("--dtype") + 1] == "bf16"
    assert loss[loss.index("--tiled-kernels") + 1:loss.index("--tiled-kernels") + 3] == ["triton", "torch"]
    decode = steps["decode"]
    assert "--decode-bench" in decode and decode[decode.index("--device") + 1] == "cuda"
    # FSDP: the same training as train-b16-b256, ours only, last (the first step the budget drops)
    fsdp, b16 = steps["train-b16-b256-fsdp"], steps["train-b16-b256"]
    assert fsdp[:b16.index("--json")] == b16[:b16.index("--json")]
    assert "--skip-reference" in fsdp and fsdp[fsdp.index("--ours-args") + 1] == "train.sharding=fsdp"
    assert fsdp[fsdp.index("--json") + 1].endswith("train-b16-b256-fsdp.json")


def test_the_fsdp_step_gets_a_process_group_of_one_process(tmp_path):
    args = gr._parse_args(["--out", str(tmp_path)])
    steps = {s.name: s for s in gr.plan(args, {224: "/data/train-{000..009}.tar"}, tmp_path)}
    assert steps["train-b16-b256-fsdp"].env == gr.one_process_group()
    assert {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items() <= gr.one_process_group().items()
    assert not any(s.env for name, s in steps.items() if name != "train-b16-b256-fsdp")
    # the step's variables reach its process
    probe = gr.Step("env", "prints", [sys.executable, "-c", "import os; print('rank', os.environ['LOCAL_RANK'])"],
                    10, tmp_path / "none.json", env=gr.one_process_group())
    gr.run_step(probe, tmp_path, remaining_s=100)
    assert "rank 0" in probe.log_tail


def test_a_step_past_its_limit_is_killed_with_its_children_and_the_budget_skips_the_rest(tmp_path):
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"]
    slow = gr.Step("slow", "sleeps", sleeper, limit_s=2, json_path=tmp_path / "none.json")
    start = time.monotonic()
    gr.run_step(slow, tmp_path, remaining_s=100)
    assert slow.status == "timed out (2 s)" and time.monotonic() - start < 30
    failing = gr.Step("bad", "fails", [sys.executable, "-c", "raise SystemExit('no GPU here')"], 10, tmp_path / "x")
    gr.run_step(failing, tmp_path, remaining_s=100)
    assert failing.status == "failed (exit 1)" and "no GPU here" in failing.log_tail
    late = gr.Step("late", "no time left", [sys.executable, "-c", "pass"], 60, tmp_path / "y")
    gr.run_step(late, tmp_path, remaining_s=5)
    assert late.status == "skipped (budget)"
    steps = [slow, failing, late]
    assert "Not measured in this run: slow: timed out (2 s); bad: failed (exit 1); late: skipped (budget)." in \
        gr.markdown(steps, gr.environment("cpu"))


def test_training_rows_combine_ours_the_reference_and_the_variants(tmp_path):
    def step(name, result, meta):
        s = gr.Step(name, "ViT-B-32 batch 512", [], 1, tmp_path / "x", meta=meta)
        s.status, s.result = "ok", result
        return s

    base = step("train-b32-b512", {"rows": [{"ours": 6000.0, "reference": 2800.0, "ours_mfu": 0.25,
                                             "ours_data_wait": 0.015}]}, {})
    notrim = step("train-b32-b512-notrim", {"rows": [{"ours": 5000.0, "reference": None}]}, {"flag": "x"})
    fsdp = step("train-b32-b512-fsdp", {"rows": [{"ours": 4500.0, "reference": None}]}, {"flag": "y"})
    md = gr.markdown([base, notrim], gr.environment("cpu"))
    assert "| ViT-B-32 batch 512 | 6000 | 2800 | 2.14x | 25.0% | 1.5% | 5000 | 1.79x | – | – | – | – |" in md
    # FSDP's ratio is to ours under DDP, not to the reference
    md = gr.markdown([base, notrim, fsdp], gr.environment("cpu"))
    assert "| ViT-B-32 batch 512 | 6000 | 2800 | 2.14x | 25.0% | 1.5% | 5000 | 1.79x | – | – | 4500 | 0.75x |" in md


def test_the_loss_and_decode_steps_run_for_real_on_cpu(tmp_path):
    """The smoke sizes through the real benchmark scripts: the report reads what they write."""
    report = gr.main(["--out", str(tmp_path / "out"), "--device", "cpu", "--smoke", "--skip-reference",
                      "--only", "loss-256", "loss-512", "decode", "--cache", str(tmp_path / "cache")])
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert status == {"loss-256": "ok", "loss-512": "ok", "decode": "ok"}, [s["log_tail"] for s in report["steps"]]
    saved = json.loads((tmp_path / "out" / "gpu_report.json").read_text())
    loss_rows = [row for s in saved["steps"] if s["name"].startswith("loss-") for row in s["result"]]
    assert {r["size"] for r in loss_rows} == {256, 512} and any(r["mode"].startswith("tiled") for r in loss_rows)
    md = (tmp_path / "out" / "gpu_report.md").read_text()
    assert "| 512 | open_clip |" in md and "Decode" in md and "Not measured" not in md


def test_the_check_runs_first_and_the_fsdp_step_runs_for_real_on_cpu(tmp_path):
    """The GPU check through the report, at smoke sizes on CPU: its CUDA-only parts say why they were skipped, the
    rest pass, and the report puts the check's table above every figure. In the same call (one launch, one drawing
    of the shards), `train.sharding=fsdp` from a plain `python -m clipalign.train`: the step's variables make its
    process group."""
    # a subprocess: drawing the shards spawns processes, which import the script by its path, not as `gpu_report`
    proc = subprocess.run([sys.executable, str(gr.TOOLS / "gpu_report.py"), "--out", str(tmp_path / "out"),
                           "--device", "cpu", "--smoke", "--skip-reference", "--only", "check",
                           "train-tiny-b16-fsdp", "--cache", str(tmp_path / "cache")], cwd=gr.REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = {s["name"]: s for s in json.loads((tmp_path / "out" / "gpu_report.json").read_text())["steps"]}
    assert list(steps) == ["check", "train-tiny-b16-fsdp"]  # the check first
    step = steps["check"]
    assert step["status"] == "ok", step["log_tail"]
    checks = step["result"]["checks"]
    assert {name: r["status"] for name, r in checks.items()} == {
        "stream_order": "skipped", "decode_pixels": "pass", "decode_training": "pass", "sync_free": "skipped",
        "nonfinite": "pass"}
    assert checks["stream_order"]["reason"].startswith("needs CUDA")
    assert checks["decode_training"]["steps"] == 6 and checks["decode_training"]["nonfinite_steps"] == {
        "workers": 0, "device": 0}
    assert checks["nonfinite"]["changed_by_skipped_steps"] == [] and checks["nonfinite"]["skipped_steps_counted"] == 2
    md = (tmp_path / "out" / "gpu_report.md").read_text()
    assert md.startswith("| GPU check | status | time |") and "| decode_training | pass |" in md
    fsdp = steps["train-tiny-b16-fsdp"]
    assert fsdp["status"] == "ok", fsdp["log_tail"]
    assert fsdp["result"]["ours_args"] == ["train.sharding=fsdp"] and fsdp["result"]["rows"][0]["ours"] > 0


def test_synchronising_lines_are_read_from_a_runs_warnings():
    gc = load_tool("gpu_check")
    stderr = ("/x/clipalign/data/device_decode.py:412: UserWarning: called a synchronizing CUDA operation "
              "(Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:151.)\n  self.stream.synchronize()\n"
              "/x/clipalign/train.py:700: UserWarning: called a synchronizing CUDA operation\n"
              "/x/clipalign/data/device_decode.py:412: UserWarning: called a synchronizing CUDA operation\n"
              "/x/other.py:3: UserWarning: something else\n")
    assert gc.sync_sites(stderr) == ["/x/clipalign/data/device_decode.py:412", "/x/clipalign/train.py:700"]
