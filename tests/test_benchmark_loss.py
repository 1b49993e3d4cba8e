"""tools/benchmark_loss.py on a tiny configuration: real processes, every mode and the reference; no timing checks."""

import json
import runpy
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "benchmark_loss.py"


@pytest.mark.slow
def test_every_mode_and_the_reference_measured_in_one_run(tmp_path, capsys):
    tool = runpy.run_path(str(TOOL))  # its globals; run_name is not "__main__", so nothing runs yet
    out = tmp_path / "rows.json"
    tool["main"](["--sizes", "256", "--world-sizes", "1", "2", "--repeats", "1", "--dim", "32",
                  "--tile-size", "48", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert {(r["world"], r["mode"]) for r in rows} == {
        (w, m) for w in (1, 2) for m in ("open_clip", "dense", "local", "tiled:48")}
    for r in rows:
        assert r["peak_bytes"] > 0 and len(r["times_s"]) == 1 and r["median_s"] > 0
    by = {(r["world"], r["mode"]): r for r in rows}
    for world in (1, 2):
        # every mode scores the same features: the global loss must be the reference's
        ref = by[(world, "open_clip")]["global_loss"]
        for mode in ("dense", "local", "tiled:48"):
            assert by[(world, mode)]["global_loss"] == pytest.approx(ref, rel=1e-5), (world, mode)
    # a 48-column tile keeps fewer logits than 128 x 256 rows x columns per process
    assert by[(2, "tiled:48")]["peak_bytes"] < by[(2, "open_clip")]["peak_bytes"]
    printed = capsys.readouterr().out
    assert "open_clip ClipLoss (ref)" in printed and "tiled T=48" in printed and "warning" not in printed
