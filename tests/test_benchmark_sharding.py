"""tools/benchmark_sharding.py: its memory prediction and fit check, and a real DDP and FSDP run of the tiny model."""

import json

import pytest
from tool_module import load_tool

bs = load_tool("benchmark_sharding")
GIB = 2**30
VIT_L = 427_419_905  # ViT-L-14 at 112 px


def test_the_prediction_follows_the_documented_formula():
    ddp = bs.predict_memory("ddp", 4, VIT_L)
    assert ddp["per_process"] == int(1.2 * 20 * VIT_L) + bs.PROCESS_BASE
    assert ddp["total"] == 4 * ddp["per_process"] + bs.LAUNCHER
    fsdp = bs.predict_memory("fsdp", 4, VIT_L, unit_params=65_000_000)
    assert fsdp["per_process"] == int(1.2 * max(4 * VIT_L * 1.25, 4 * VIT_L + 8 * 65_000_000)) + bs.PROCESS_BASE
    # glibc's own threshold: FSDP's heap keeps freed unit buffers, counted as whole models
    glibc = bs.predict_memory("fsdp", 4, VIT_L, unit_params=65_000_000, heap_retention=True)
    assert glibc["per_process"] == fsdp["per_process"] + bs.RETAINED_MODELS * 4 * VIT_L
    assert bs.predict_memory("ddp", 4, VIT_L, heap_retention=True) == ddp  # DDP's buffers are not freed per step
    with pytest.raises(ValueError):
        bs.predict_memory("zero3", 4, VIT_L)


def test_a_configuration_that_cannot_fit_is_refused_with_the_arithmetic():
    available = 22 * GIB
    ddp4 = bs.predict_memory("ddp", 4, VIT_L)
    verdict = bs.fit_verdict(ddp4, available)
    assert verdict == f"does not fit: needs ~{ddp4['total'] / GIB:.1f} GiB of 22.0 GiB available"
    assert ddp4["total"] > 40 * GIB and ddp4["formula"].startswith("4 x (1.2 x 20 x 427.4M params")
    assert bs.fit_verdict(bs.predict_memory("fsdp", 4, VIT_L, unit_params=65_000_000), available) is None
    # the same configuration fits where the memory is there
    assert bs.fit_verdict(ddp4, ddp4["total"]) is None
    assert bs.fit_verdict(ddp4, ddp4["total"] - 1) is not None


def test_a_refused_row_shows_ddps_computed_state_and_the_reason():
    counts = {"params": 1_000_000, "tensors": 10}
    rows = [{"sharding": "ddp", "processes": 4, "status": "does not fit: needs ~41.2 GiB of 21.9 GiB available"},
            {"sharding": "fsdp", "processes": 4, "status": "ok",
             "summary": {"state_bytes": 4_000_010, "comm_bytes": None, "comm_source": None, "peak_rss": GIB,
                         "rss_hwm_build": GIB, "rss_hwm_train": GIB // 2, "sum_peak_rss": 4 * GIB, "step_s": 1.5}}]
    bs.add_ratios(rows, counts)
    assert rows[1]["ddp_state_source"] == "computed" and rows[1]["ddp_state_bytes"] == 16_000_040
    assert rows[1]["state_ratio"] == pytest.approx(0.25)
    table = bs.format_table(rows, counts).splitlines()
    assert "| DDP | 4 | 0.01 (computed) |" in table[2] and "does not fit: needs ~41.2 GiB" in table[2]
    assert table[3].endswith("| 1.00 (1.00, 0.50) | 4.00 | 1.50 | 0.250x (vs computed DDP) |")


def test_ddp_and_fsdp_run_on_two_processes_and_fsdp_holds_half_the_state(tmp_path, capsys):
    out = tmp_path / "sharding.json"
    bs.main(["--model", "tiny-vit-64", "--image-size", "64", "--processes", "2", "--steps", "2",
             "--json", str(out)])
    saved = json.loads(out.read_text())
    rows = {row["sharding"]: row for row in saved["rows"]}
    assert set(rows) == {"ddp", "fsdp"} and all(r["status"] == "ok" for r in rows.values()), \
        [r.get("log_tail") for r in rows.values()]
    for row in rows.values():
        assert row["processes"] == 2 and len(row["per_process"]) == 2
        s = row["summary"]
        for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "state_bytes", "peak_rss", "sum_peak_rss",
                    "rss_hwm_build", "rss_hwm_train", "step_s"):
            assert s[key] > 0, key
        assert s["state_bytes"] == s["params_bytes"] + s["grads_bytes"] + s["optimizer_bytes"]
        assert len(s["step_times_s"]) == 2 and all(loss > 0 for loss in s["losses"])
    ddp, fsdp = rows["ddp"]["summary"], rows["fsdp"]["summary"]
    # DDP: whole fp32 params, grads and two AdamW moments (+ the step scalars) on each process, and its buckets
    assert ddp["state_bytes"] == 16 * saved["counts"]["params"] + 4 * saved["counts"]["tensors"]
    assert ddp["comm_bytes"] == ddp["grads_bytes"] and ddp["comm_source"] == "ddp"
    # FSDP: each process holds about half (padding of the shards, the replicated temperature)
    assert fsdp["state_bytes"] < ddp["state_bytes"]
    assert rows["fsdp"]["state_ratio"] == pytest.approx(0.5, abs=0.01)
    assert rows["fsdp"]["ddp_state_source"] == "measured"
    assert "| FSDP | 2 |" in capsys.readouterr().out
