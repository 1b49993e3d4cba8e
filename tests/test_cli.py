"""Every console script answers --help without importing torch or the other heavy libraries (`clipalign.cli`)."""

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "open_clip", "webdataset", "accelerate")


def _console_scripts() -> list[tuple[str, str]]:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    lines = setup["options.entry_points"]["console_scripts"].split("\n")
    return [tuple(part.strip() for part in line.split("=")) for line in lines if line.strip()]


def test_every_console_script_is_checked():
    assert len(_console_scripts()) >= 11


@pytest.mark.parametrize(("name", "target"), _console_scripts())
def test_console_script_help_imports_nothing_heavy(name, target):
    module, func = target.split(":")
    # what the console script's wrapper does, then the heavy modules imported by then, on the last line
    code = (f"import sys\n"
            f"sys.argv = [{name!r}, '--help']\n"
            f"from {module} import {func}\n"
            f"try:\n"
            f"    {func}()\n"
            f"    status = 0\n"
            f"except SystemExit as e:\n"
            f"    status = e.code\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
            f"sys.exit(status)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: "), proc.stdout[:500]
    assert proc.stdout.splitlines()[-1] == "[]", f"{name} --help imported {proc.stdout.splitlines()[-1]}"
