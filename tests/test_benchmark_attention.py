"""tools/benchmark_attention.py: it times both kernels on real tensors and reports what `auto` picks."""

import argparse
import json

import pytest
from tool_module import load_tool

from clipalign.model import CPU_MATH_ATTENTION_MAX_TOKENS

ba = load_tool("benchmark_attention")


def test_shapes_parse_and_bad_ones_name_the_expected_form():
    assert ba.parse_shape("128x4x65x48") == (128, 4, 65, 48, False)
    assert ba.parse_shape("2x1x24x8c") == (2, 1, 24, 8, True)
    with pytest.raises(argparse.ArgumentTypeError, match=r"shape '2x4x65': expected BATCHxHEADSxPOSITIONSxHEAD_WIDTH"):
        ba.parse_shape("2x4x65")


def test_benchmark_times_both_kernels_and_reports_what_auto_runs(tmp_path, capsys):
    long = CPU_MATH_ATTENTION_MAX_TOKENS + 1
    out = tmp_path / "attention.json"
    assert ba.main(["--shapes", "2x2x9x8c", f"1x1x{long}x8", "--precision", "bf16", "fp32", "--repeats", "2",
                    "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["shape"], r["precision"], r["auto_runs"]) for r in rows] == [
        ("2x2x9x8c", "bf16", "math"), ("2x2x9x8c", "fp32", "reference"),
        (f"1x1x{long}x8", "bf16", "reference"), (f"1x1x{long}x8", "fp32", "reference")]
    for r in rows:
        assert r["pass"] == "forward+backward" and len(r["times_ms"]["math"]) == 2
        assert r["reference_over_math"] == pytest.approx(r["reference_ms"] / r["math_ms"])
    assert "| 2x2x9x8c | bf16 | forward+backward |" in capsys.readouterr().out
    ba.main(["--shapes", "2x2x9x8", "--precision", "bf16", "--repeats", "1", "--forward-only", "--json", str(out)])
    assert json.loads(out.read_text())[0]["auto_runs"] == "reference"  # evaluation keeps PyTorch's choice
