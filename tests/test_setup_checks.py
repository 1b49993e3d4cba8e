"""What a run checks before it trains, and what it lets out: bf16 on CPUs without it, missing sources and
checkpoints named in one line before the model is built, resuming with changed optimizer settings or another model,
and credentials in data sources kept out of trackers and model cards. Real runs of the trainer, no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipalign.config import load_config, redact_source, shareable_config
from clipalign.train import cpu_native_bf16, cpu_precision

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
# no evaluation: these runs test what happens before and between training steps
SMALL = ["data.synthetic_samples=512", "data.batch_size=16", "data.workers=1", "data.shuffle_buffer=64",
         "optim.warmup_steps=2", "train.log_every=2", "eval.zeroshot=none", "eval.retrieval=none", "export.dir="]
SECRET = "tok3n-s3cr3t"


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, CLIPALIGN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")


def _train(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "clipalign.train", str(QUICKSTART), *SMALL, *args],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The run stopped with exit status 2 and one line on stderr: `clipalign-train: error: ...`, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clipalign-train: error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


# ---- bf16 on a CPU without native bf16 ----------------------------------------------------------------------------


def test_bf16_on_a_cpu_without_native_bf16_trains_in_fp32_and_says_why():
    precision, why = cpu_precision("bf16", native_bf16=False)
    assert precision == "fp32" and "without native bf16" in why and "train.precision=fp32" in why
    assert cpu_precision("bf16", native_bf16=True) == ("bf16", "")
    assert cpu_precision("bf16", native_bf16=None) == ("bf16", "")  # cannot tell (not x86): the recipe's choice
    assert cpu_precision("fp32", native_bf16=False) == ("fp32", "")


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU flags from /proc/cpuinfo")
def test_native_bf16_detection_agrees_with_the_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text()
    if cpu_native_bf16() is None:
        pytest.skip("not an x86 CPU")
    assert cpu_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


# ---- set-up errors: before the model is built, one line ------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["data.synthetic=false", "data.train=/nonexistent/shard-{000..003}.tar"],
     "data.train source '/nonexistent/shard-{000..003}.tar': 4 of 4 shards do not exist"),
    (["data.synthetic=false", "data.train="], "data.train is empty"),
    (["train.resume=/nonexistent/run"], "train.resume: /nonexistent/run: neither a checkpoint"),
    (["eval.zeroshot=/nonexistent/imagenet/val"], "eval.zeroshot: '/nonexistent/imagenet/val' does not exist"),
])
def test_a_missing_source_stops_the_run_in_one_line_before_anything_is_built(tmp_path, args, expected):
    run = tmp_path / "run"
    proc = _train(tmp_path, *args, f"train.output_dir={run}", check=False)
    assert expected in _one_line_error(proc)
    assert not run.exists() and not (tmp_path / "cache").exists()  # no data drawn, no run directory written


# ---- resume: changed optimizer settings apply, another model is refused ---------------------------------------------


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Two steps of the quickstart (checkpoint at step 2); a copy of the run is resumed by each test."""
    tmp = tmp_path_factory.mktemp("first")
    run = tmp / "run"
    _train(tmp, "train.steps=2", "train.log_with=none", f"train.output_dir={run}")
    return tmp, run


def _copy_run(first_run, tmp_path: Path) -> Path:
    import shutil

    _, run = first_run
    shutil.copytree(run, tmp_path / "run")
    shutil.copytree(run.parent / "cache", tmp_path / "cache")
    return tmp_path / "run"


def _lr_at(run: Path, step: int) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in records if r.get("step") == step and "lr" in r][-1]


@pytest.mark.slow
def test_resuming_with_a_changed_learning_rate_applies_it(first_run, tmp_path):
    run = _copy_run(first_run, tmp_path)
    proc = _train(tmp_path, "train.steps=6", "optim.lr=5e-4", "optim.weight_decay=0.05", "train.resume=auto",
                  "train.log_with=none", f"train.output_dir={run}")
    out = proc.stdout + proc.stderr
    assert "optimizer settings changed since step_00000002, applied from step 2" in out
    assert "optim.lr 0.001 -> 0.0005" in out and "optim.weight_decay 0.1 -> 0.05" in out
    # step 4 of 6 with 2 warm-up steps: half way down the cosine, so half of the new base rate
    assert _lr_at(run, 4) == pytest.approx(0.5 * 5e-4)


@pytest.mark.slow
def test_resuming_a_checkpoint_of_another_model_is_refused_before_building(first_run, tmp_path):
    run = _copy_run(first_run, tmp_path)
    proc = _train(tmp_path, "train.steps=4", "model.embed_dim=48", "train.resume=auto", f"train.output_dir={run}",
                  check=False)
    line = _one_line_error(proc)
    assert "it is a checkpoint of another model: model.embed_dim (0 in the checkpoint, 48 here)" in line
    # gradient checkpointing changes no parameter: allowed
    proc = _train(tmp_path, "train.steps=4", "model.grad_checkpointing=true", "train.resume=auto",
                  "train.log_with=none", f"train.output_dir={run}")
    assert "resumed from" in proc.stdout + proc.stderr


# ---- credentials in data sources stay in the run's own config.yaml --------------------------------------------------


def test_redaction_of_pipe_commands_and_url_credentials():
    assert redact_source(f"pipe:AWS_SESSION_TOKEN={SECRET} aws s3 cp s3://b/{{0..9}}.tar -") == \
        "pipe:<command redacted>"
    assert redact_source(f"https://user:{SECRET}@host/x/{{0..9}}.tar?X-Amz-Signature={SECRET}") == \
        "https://<user redacted>@host/x/{0..9}.tar?<query redacted>"
    assert redact_source("/data/a/{0..3}.tar :: s3://bucket/b.tar") == "/data/a/{0..3}.tar::s3://bucket/b.tar"
    cfg = load_config(QUICKSTART, [f"data.train=pipe:curl -H 'Authorization: {SECRET}' https://h/x.tar",
                                   f"eval.retrieval=https://h/captions.csv?sig={SECRET}"])
    shared = shareable_config(cfg)
    assert SECRET not in json.dumps(shared) and shared["data"]["train"] == "pipe:<command redacted>"
    assert SECRET in cfg.data.train  # the config itself is untouched


@pytest.mark.slow
def test_a_pipe_source_with_a_credential_reaches_neither_trackers_nor_the_model_card(first_run, tmp_path):
    from clipalign.config import read_config
    from clipalign.export import export_model

    tmp, first = first_run
    shard = read_config(first / "config.yaml").data.train  # the synthetic set's shard, drawn by the first run
    source = f"pipe:TOKEN={SECRET} cat {shard}"
    run = tmp_path / "run"
    _train(tmp, "data.synthetic=false", f"data.train={source}", f"eval.zeroshot={Path(shard).parent / 'heldout'}",
           "train.steps=2", "train.log_with=tensorboard", f"train.output_dir={run}")
    assert read_config(run / "config.yaml").data.train == source  # the run's own record is exact
    events = list(run.rglob("events.out.tfevents.*"))
    assert events and not any(SECRET.encode() in path.read_bytes() for path in events)
    assert any(b"pipe:<command redacted>" in path.read_bytes() for path in events)
    card = (export_model(run, tmp_path / "export") / "README.md").read_text()
    assert SECRET not in card and "pipe:<command redacted>" in card


@pytest.mark.slow
def test_relaunching_a_finished_run_keeps_its_last_checkpoint_and_data_position(tmp_path):
    """A run killed after its last save (while ending) and relaunched with resume=auto trains nothing: its final
    checkpoint must stay as it was (data positions included), and the summary still reports the run's loss."""
    run = tmp_path / "run"
    args = ["data.resampled=false", "train.steps=2", "train.log_with=none", f"train.output_dir={run}"]
    _train(tmp_path, *args)
    state_file = run / "checkpoints" / "step_00000002" / "trainer_state.json"
    before = state_file.read_text()
    assert json.loads(before)["data"]["positions"]  # exact passes record where each stream stands
    summary_before = json.loads((run / "summary.json").read_text())
    proc = _train(tmp_path, *args, "train.resume=auto")
    assert "resumed from" in proc.stdout + proc.stderr
    assert state_file.read_text() == before
    summary = json.loads((run / "summary.json").read_text())
    assert summary["loss"] == summary_before["loss"] is not None and summary["step"] == 2


# ---- the run directory: continued or started over, never mixed; the end of a run costs only itself ----------------


@pytest.mark.slow
def test_a_rerun_into_a_finished_run_is_refused_unless_it_continues_or_starts_over(first_run, tmp_path):
    run = _copy_run(first_run, tmp_path)
    metrics = (run / "metrics.jsonl").read_text()
    line = _one_line_error(_train(tmp_path, "train.resume=", "train.log_with=none", f"train.output_dir={run}",
                                  check=False))
    assert f"train.output_dir {run} holds another run (" in line and "continue it with train.resume=auto" in line
    assert (run / "metrics.jsonl").read_text() == metrics  # untouched
    proc = _train(tmp_path, "train.resume=", "train.overwrite=true", "train.steps=2", "train.log_with=none",
                  "export.dir=export", f"train.output_dir={run}")
    assert f"starting {run} over (train.overwrite=true): removed config.yaml, metrics.jsonl" in proc.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2] and (run / "export" / "open_clip_config.json").is_file()  # the export inside the run


@pytest.mark.slow
def test_an_evaluation_that_fails_at_the_end_keeps_the_checkpoint_summary_and_export(first_run, tmp_path):
    import shutil

    tmp, first = first_run
    from clipalign.config import read_config

    heldout = Path(read_config(first / "config.yaml").data.train).parent / "heldout"
    broken = tmp_path / "heldout"
    shutil.copytree(heldout, broken)
    victim = sorted(broken.rglob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")  # found only when the evaluation reads it, after the training
    run = tmp_path / "run"
    proc = _train(tmp, "train.steps=2", "train.log_with=none", f"eval.zeroshot={broken}", "export.dir=export",
                  f"train.output_dir={run}", check=False)
    line = _one_line_error(proc)
    ckpt = run / "checkpoints" / "step_00000002"
    assert f"the run trained to its end and saved {ckpt}, but at its end zeroshot: ValueError: evaluation image" in line
    assert f"redo it with: clipalign-zeroshot --model {ckpt} --data {broken}" in line
    summary = json.loads((run / "summary.json").read_text())
    assert "evaluation image" in summary["errors"]["zeroshot"] and summary["export"] == str(run / "export")
    assert (ckpt / "trainer_state.json").is_file() and (run / "export" / "open_clip_config.json").is_file()


@pytest.mark.slow
def test_shards_without_captions_stop_the_run_in_seconds_saying_why(tmp_path):
    import random

    from clipalign.data.synthetic import draw_sample
    from clipalign.data.writer import image_to_bytes, write_shards

    rng = random.Random(0)
    samples = [{"__key__": f"{i:04d}", "jpg": image_to_bytes(draw_sample(rng, 64)[0], "jpg")} for i in range(24)]
    write_shards(samples, tmp_path / "shards", samples_per_shard=12)
    proc = _train(tmp_path, "data.synthetic=false", f"data.train={tmp_path}/shards/train-{{000000..000001}}.tar",
                  "data.resampled=false", f"train.output_dir={tmp_path / 'run'}", check=False)
    line = _one_line_error(proc)
    assert "a whole pass over its 2 shards gave no usable sample: skipped no_caption=24" in line
    assert "Most likely the samples carry no caption" in line and "clipalign-inspect-shards" in line
    assert "data.batch_timeout" not in line
