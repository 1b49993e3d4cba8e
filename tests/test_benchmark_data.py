"""tools/benchmark_data.py on a tiny configuration: real shards, both pipelines, table and JSON; no timing checks."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "benchmark_data.py"


@pytest.fixture(scope="module")
def tool():
    return runpy.run_path(str(TOOL))  # its globals; run_name is not "__main__", so nothing runs


@pytest.fixture(scope="module")
def run(tool, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    argv = ["--sizes", "256", "512", "--images", "8", "--repeats", "1", "--batch-size", "4",
            "--cache", str(tmp / "cache"), "--json", str(tmp / "out.json")]
    results = tool["main"](argv)
    return tmp, argv, results


def test_table_and_json(run):
    tmp, argv, results = run
    on_disk = json.loads((tmp / "out.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["config"]["images"] == 8 and on_disk["config"]["sizes"] == [256, 512]
    assert [r["size"] for r in on_disk["sizes"]] == [256, 512]
    for r in on_disk["sizes"]:
        assert r["images"] == 8 and r["bits_per_pixel"] > 0
        for name in ("reference", "ours", "ours_cpu_normalise"):
            assert len(r["throughput"][name]["runs"]) == 1 and r["throughput"][name]["median"] > 0
        assert set(r["ratio"]) == {"ours", "ours_cpu_normalise"}
        assert r["loader"]["throughput"]["ours"]["median"] > 0 and r["loader"]["ratio"] > 0
    # shards stored at 512 px (shorter side) are decoded at half scale; at 256 px the draft cannot engage
    by_size = {r["size"]: r for r in on_disk["sizes"]}
    assert by_size[256]["draft_scales"] == {"1/1": 8}
    assert by_size[512]["draft_scales"] == {"1/2": 8}


def test_quality_is_close_to_the_reference(run):
    _, _, results = run
    for r in results["sizes"]:
        q = r["quality"]
        if q["psnr_db"] is None:  # no draft decode: our output is the reference's, bit for bit
            assert q["identical_images"] == r["images"] and q["mean_abs_diff"] == 0
        else:
            assert math.isfinite(q["psnr_db"]) and q["psnr_db"] > 30 and q["psnr_min_db"] > 30
            assert q["mean_abs_diff"] < 5
    assert results["sizes"][1]["quality"]["psnr_db"] is not None  # at 512 px the outputs do differ


def test_printed_table(run, tool):
    _, _, results = run
    table = tool["format_table"](results)
    rows = [line for line in table.splitlines() if line.startswith("| short side")]
    assert len(rows) == 4  # two sizes, in-memory and full-pipeline tables
    assert all(row.count("|") in (11, 5) for row in rows)


def test_cached_shards_are_reused(run, tool):
    tmp, _, _ = run
    cache = tmp / "cache"
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.tar")}
    shards = tool["ensure_shards"](cache, 256, 8, "short")
    assert shards and all(before[p] == p.stat().st_mtime_ns for p in shards)


def test_stored_geometry(tool):
    geometry = tool["stored_geometry"]
    assert geometry(512, 4 / 3, "short") == (683, 512)
    assert geometry(512, 3 / 4, "short") == (512, 683)
    assert geometry(512, 4 / 3, "long") == (512, 384)
    assert geometry(512, 3 / 4, "long") == (384, 512)


def test_decode_bench_on_cpu(run, tool):
    """--decode-bench: the workers' PIL path against batched decode on the device (here the CPU), same JPEGs."""
    tmp, _, _ = run
    argv = ["--decode-bench", "--device", "cpu", "--sizes", "256", "512", "--images", "8", "--repeats", "1",
            "--decode-batch-size", "3", "--cache", str(tmp / "cache"), "--json", str(tmp / "decode.json")]
    results = tool["main"](argv)
    on_disk = json.loads((tmp / "decode.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["config"]["mode"] == "decode" and on_disk["config"]["device"] == "cpu"
    for r in on_disk["sizes"]:
        assert r["images"] == 8 and r["device_rows"] == 8  # every synthetic JPEG went to the device decoder
        for name in ("workers", "device", "prepare"):
            assert len(r["throughput"][name]["runs"]) == 1 and r["throughput"][name]["median"] > 0
        assert r["ratio"] > 0
        assert r["quality"]["psnr_min_db"] > 40  # the same crops; drafted (512) or not (256)
    assert [r["draft_scales"] for r in on_disk["sizes"]] == [{"1/1": 8}, {"1/2": 8}]
    rows = [line for line in tool["format_decode_table"](results).splitlines() if line.startswith("| short side")]
    assert len(rows) == 2 and all(row.count("|") == 8 for row in rows)
