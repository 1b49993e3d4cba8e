"""tools/fault_matrix.py: every planted fault gets the outcome the matrix expects (real runs of the trainer)."""

import json

import pytest
from tool_module import load_tool

fm = load_tool("fault_matrix")


@pytest.mark.slow
def test_every_planted_fault_is_handled_as_expected(tmp_path):
    out = tmp_path / "matrix.json"
    outcomes = fm.main(["--work", str(tmp_path / "work"), "--json", str(out)])
    failed = [(o.fault, o.observed) for o in outcomes if not o.passed]
    assert not failed, failed
    recorded = json.loads(out.read_text())
    assert [r["fault"] for r in recorded] == list(fm.FAULTS)
    by_fault = {r["fault"]: r for r in recorded}
    # the exact counts the matrix decided on
    assert by_fault["corrupt_jpeg"]["count"] == "bad_image=1"
    assert by_fault["truncated_tar"]["count"] == "unreadable_tar=1"
    assert by_fault["png16"]["count"] == "none"
    assert by_fault["kill_save"]["observed"].startswith("killed: True during a save")


def test_the_matrix_table_marks_failures():
    rows = [fm.Outcome("a", "x", "ok | fine", "-", True), fm.Outcome("b", "y", "hung", "-", False)]
    table = fm.markdown(rows)
    assert "| a | x | ok \\| fine | - | pass |" in table and "| b | y | hung | - | FAIL |" in table
