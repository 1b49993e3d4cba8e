"""tools/benchmark_train.py: its log parsers, and its own side on real shards (the reference needs its venv)."""

import json

import pytest
from tool_module import load_tool

bt = load_tool("benchmark_train")

# as open_clip_train 3.3.0 writes them (--log-every-n-steps 2, batch 8, 6 steps)
REFERENCE_LOG = """\
2026-11-24,20:08:15 | INFO | Running with a single process. Device cpu.
2026-11-24,20:08:22 | INFO | Train Epoch: 0 [ 8/48 (17%)] Data (t): 0.225 Batch (t): 3.783, 2.11497/s, 2.11497/s/gpu \
LR: 0.000050 Logit Scale: 14.286 Contrastive_loss: 2.1004 (2.1004) Loss: 2.1004 (2.1004)
2026-11-24,20:08:23 | INFO | Train Epoch: 0 [24/48 (50%)] Data (t): 0.002 Batch (t): 0.250, 50.7016/s, 50.7016/s/gpu \
LR: 0.000150 Logit Scale: 14.284 Contrastive_loss: 2.3953 (2.2479) Loss: 2.3953 (2.2479)
2026-11-24,20:08:25 | INFO | Train Epoch: 0 [40/48 (83%)] Data (t): 0.003 Batch (t): 0.800, 4.90984/s, 4.90984/s/gpu \
LR: 0.000250 Logit Scale: 14.280 Contrastive_loss: 2.0463 (2.1807) Loss: 2.0463 (2.1807)
2026-11-24,20:08:25 | INFO | Train Epoch: 0 [48/48 (100%)] Data (t): 0.002 Batch (t): 0.160, 52.9802/s, 52.9802/s/gpu \
LR: 0.000300 Logit Scale: 14.277 Contrastive_loss: 2.0925 (2.1586) Loss: 2.0925 (2.1586)
"""


def test_reference_log_parser_reads_step_window_and_single_step_rates():
    rows = bt.reference_rates(REFERENCE_LOG, batch_size=8)
    assert [r["step"] for r in rows] == [1, 3, 5, 6]
    assert [r["window"] for r in rows] == pytest.approx([8 / 3.783, 8 / 0.25, 8 / 0.8, 8 / 0.16])
    assert [r["step_rate"] for r in rows] == pytest.approx([2.11497, 50.7016, 4.90984, 52.9802])
    # warm-up: lines at or before step 2 are dropped
    assert bt.steady_median(rows, drop_steps=2) == pytest.approx(32.0)
    assert bt.steady_median(rows, drop_steps=2, key="step_rate") == pytest.approx(50.7016)
    # nothing after the warm-up: every line counts rather than none
    assert bt.steady_median(rows, drop_steps=100) == pytest.approx((8 / 0.8 + 8 / 0.25) / 2)


def test_ours_metrics_parser_skips_zero_shot_lines():
    lines = [{"step": 5, "samples": 40, "loss": 2.3, "samples_per_s": 10.0},
             {"step": 10, "samples": 80, "loss": 2.2, "samples_per_s": 30.0},
             {"step": 15, "samples": 120, "loss": 2.1, "samples_per_s": 20.0},
             {"step": 15, "zeroshot": {"top1": 0.5}}]
    rows = bt.ours_rates("\n".join(json.dumps(line) for line in lines) + "\n")
    assert rows == [{"step": 5, "window": 10.0}, {"step": 10, "window": 30.0}, {"step": 15, "window": 20.0}]
    assert bt.steady_median(rows, drop_steps=5) == 25.0
    # MFU and data wait come along where the line has them
    gpu = bt.ours_rates(json.dumps({"step": 5, "samples_per_s": 9.0, "mfu": 0.25, "data_wait": 0.01}))
    assert gpu == [{"step": 5, "window": 9.0, "mfu": 0.25, "data_wait": 0.01}]
    with pytest.raises(ValueError):
        bt.steady_median([], drop_steps=0)


def test_table_has_ratio_and_marks_a_missing_reference():
    rows = [{"model": "tiny-vit-64", "image_size": 64, "precision": "bf16", "batch_size": 128, "steps": 50,
             "ours": 300.0, "reference": 150.0},
            {"model": "tiny-vit-64", "image_size": 64, "precision": "fp32", "batch_size": 128, "steps": 50,
             "ours": 100.0, "reference": None}]
    table = bt.format_table(rows).splitlines()
    assert table[2].endswith("| 300.0 | 150.0 | 2.00x |")
    assert table[3].endswith("| 100.0 | not run | n/a |")


def test_ours_side_runs_on_real_shards_and_reports_a_rate(tmp_path, capsys):
    rows = bt.main(["--skip-reference", "--samples", "48", "--batch-size", "8", "--log-every", "2",
                    "--drop-steps", "2", "--repeats", "1", "--precision", "fp32", "--cache-dir", str(tmp_path),
                    "--json", str(tmp_path / "out.json")])
    assert len(rows) == 1 and rows[0]["steps"] == 6 and rows[0]["reference"] is None
    assert rows[0]["ours"] > 0
    assert 0 <= rows[0]["ours_data_wait"] < 1 and "ours_mfu" not in rows[0]  # no known peak on a CPU
    assert list((tmp_path / "bench-synthetic" / "n48-px64").glob("train-*.tar"))
    saved = json.loads((tmp_path / "out.json").read_text())
    windows = saved["runs"]["fp32"]["ours"][0]["windows"]
    assert [w["step"] for w in windows] == [2, 4, 6] and all(w["window"] > 0 for w in windows)
    out = capsys.readouterr().out
    assert "threads on both sides" in out
    assert "| tiny-vit-64 (64 px) | fp32 | 8 | 6 |" in out


def test_bf16_is_compared_only_where_the_cpu_has_it():
    kept, notice = bt.cpu_precisions(["bf16", "fp32"], "cpu", native_bf16=False)
    assert kept == ["fp32"] and "no native bf16" in notice
    assert bt.cpu_precisions(["bf16"], "cpu", native_bf16=True) == (["bf16"], "")
    assert bt.cpu_precisions(["bf16"], "cuda", native_bf16=False) == (["bf16"], "")
    assert bt.cpu_precisions(["fp32"], "cpu", native_bf16=False) == (["fp32"], "")
