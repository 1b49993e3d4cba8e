"""tools/fault_matrix.py: every planted fault gets the outcome the matrix expects (real runs of the trainer)."""

import json

import pytest
from tool_module import load_tool

fm = load_tool("fault_matrix")


# Each fault's behaviour has its own test elsewhere (test_stream_faults, test_image_hardening, test_checkpoint,
# test_setup_checks, test_soak_resume); this runs the tool itself on a fault decided by an exact count and one
# decided by a one-line error and what is left on disk. The whole matrix, as measured, is in docs/reliability.md.
SAMPLE = ["truncated_tar", "disk_full"]


@pytest.mark.slow
def test_the_matrix_runs_its_faults_and_decides_on_exact_counts(tmp_path):
    out = tmp_path / "matrix.json"
    outcomes = fm.main(["--only", *SAMPLE, "--work", str(tmp_path / "work"), "--json", str(out)])
    failed = [(o.fault, o.observed) for o in outcomes if not o.passed]
    assert not failed, failed
    recorded = json.loads(out.read_text())
    assert [r["fault"] for r in recorded] == SAMPLE
    by_fault = {r["fault"]: r for r in recorded}
    # what the matrix decided on: the exact count, and the one-line error with nothing published
    assert by_fault["truncated_tar"]["count"] == "unreadable_tar=1"
    assert by_fault["disk_full"]["observed"].startswith("exit 2: saving the checkpoint of step 2 failed")
    assert by_fault["disk_full"]["observed"].endswith("checkpoints/: empty")


def test_the_matrix_table_marks_failures():
    rows = [fm.Outcome("a", "x", "ok | fine", "-", True), fm.Outcome("b", "y", "hung", "-", False)]
    table = fm.markdown(rows)
    assert "| a | x | ok \\| fine | - | pass |" in table and "| b | y | hung | - | FAIL |" in table
