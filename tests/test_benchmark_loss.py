"""tools/benchmark_loss.py on a tiny configuration: real processes, every mode and the reference; no timing checks."""

import json
import runpy
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "benchmark_loss.py"
TILED = ("tiled:48", "tiled:0", "tiled-torch:48", "tiled-torch:0")


def test_variant_names():
    tool = runpy.run_path(str(TOOL))
    variants = tool["_variants"](["local", "tiled"], [0, 4096], ("auto", "torch", "triton"))
    assert variants == ["open_clip", "local", "tiled:0", "tiled:4096", "tiled-torch:0", "tiled-torch:4096",
                        "tiled-triton"]
    assert [tool["_split"](v) for v in variants[1:4]] == [("local", 0), ("tiled", 0), ("tiled", 4096)]
    assert [tool["_kernel"](v) for v in variants] == ["auto", "auto", "auto", "auto", "torch", "torch", "triton"]
    assert [tool["_display_name"](v) for v in ("open_clip", "tiled:0", "tiled-torch:48", "tiled-triton")] == [
        "open_clip ClipLoss (ref)", "tiled T=auto", "tiled-torch T=48", "tiled-triton"]


@pytest.mark.slow
def test_every_mode_and_the_reference_measured_in_one_run(tmp_path, capsys):
    tool = runpy.run_path(str(TOOL))  # its globals; run_name is not "__main__", so nothing runs yet
    out = tmp_path / "rows.json"
    tool["main"](["--sizes", "256", "--world-sizes", "1", "2", "--repeats", "1", "--dim", "32",
                  "--tile-size", "48", "0", "--tiled-kernels", "auto", "torch", "triton", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert {(r["world"], r["mode"]) for r in rows} == {
        (w, m) for w in (1, 2) for m in ("open_clip", "dense", "local", *TILED)}  # no CUDA here: no tiled-triton
    for r in rows:
        assert r["peak_bytes"] > 0 and len(r["times_s"]) == 1 and r["median_s"] > 0 and r["dtype"] == "fp32"
        assert r["memory_ratio"] > 0 and r["time_ratio"] > 0
    by = {(r["world"], r["mode"]): r for r in rows}
    for world in (1, 2):
        # every mode scores the same features: the global loss must be the reference's
        ref = by[(world, "open_clip")]
        assert ref["memory_ratio"] == ref["time_ratio"] == 1
        for mode in ("dense", "local", *TILED):
            assert by[(world, mode)]["global_loss"] == pytest.approx(ref["global_loss"], rel=1e-5), (world, mode)
        # tile_size 0: a quarter of the 256 columns (clipalign.loss.auto_tile_size)
        assert by[(world, "tiled:0")]["tile_size"] == by[(world, "tiled-torch:0")]["tile_size"] == 64
    # a 48-column tile keeps fewer logits than 128 x 256 rows x columns per process
    assert by[(2, "tiled:48")]["peak_bytes"] < by[(2, "open_clip")]["peak_bytes"]
    printed = capsys.readouterr().out
    assert "open_clip ClipLoss (ref)" in printed and "tiled T=48" in printed and "warning" not in printed
    assert "tiled T=auto" in printed and "tiled-torch T=48" in printed
    assert "tiled-triton: skipped (needs CUDA)" in printed
