"""tools/fault_matrix.py: every planted fault gets the outcome the matrix expects (real runs of the trainer)."""

import json

import pytest
from tool_module import load_tool

fm = load_tool("fault_matrix")


# Each fault's behaviour has its own test elsewhere (test_stream_faults, test_image_hardening, test_checkpoint,
# test_setup_checks, test_soak_resume); this runs the tool itself on one fault of each kind of check it makes (a
# count, a one-line error, a failed save). The whole matrix, as measured, is in docs/reliability.md.
SAMPLE = ["corrupt_jpeg", "truncated_tar", "bad_value", "disk_full"]


@pytest.mark.slow
def test_the_matrix_runs_its_faults_and_decides_on_exact_counts(tmp_path):
    out = tmp_path / "matrix.json"
    outcomes = fm.main(["--only", *SAMPLE, "--work", str(tmp_path / "work"), "--json", str(out)])
    failed = [(o.fault, o.observed) for o in outcomes if not o.passed]
    assert not failed, failed
    recorded = json.loads(out.read_text())
    assert [r["fault"] for r in recorded] == SAMPLE
    by_fault = {r["fault"]: r for r in recorded}
    # the exact counts the matrix decided on
    assert by_fault["corrupt_jpeg"]["count"] == "bad_image=1"
    assert by_fault["truncated_tar"]["count"] == "unreadable_tar=1"
    assert by_fault["bad_value"]["observed"].startswith("exit 2: ")


def test_the_matrix_table_marks_failures():
    rows = [fm.Outcome("a", "x", "ok | fine", "-", True), fm.Outcome("b", "y", "hung", "-", False)]
    table = fm.markdown(rows)
    assert "| a | x | ok \\| fine | - | pass |" in table and "| b | y | hung | - | FAIL |" in table
