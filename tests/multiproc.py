"""Starting real multi-process jobs for the tests: `accelerate launch --multi_gpu` with gloo processes on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nothing listens on now, for the rendezvous of one launch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch_cmd(num_processes: int, target: list[str], config_file: Path | None = None) -> list[str]:
    """`accelerate launch` of `target` (a script and its arguments, or `-m module ...`) on `num_processes` processes.

    `--multi_gpu` is what starts several processes; without GPUs the script must pass `Accelerator(cpu=True)` (or the
    environment must set ACCELERATE_USE_CPU=true) for gloo and DDP. With `config_file`, the launch takes its setup
    from that Accelerate config file instead, as a user's `accelerate launch --config_file` does.
    """
    setup = (["--config_file", str(config_file)] if config_file is not None else
             ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    return [sys.executable, "-m", "accelerate.commands.launch", *setup, "--num_processes", str(num_processes),
            "--main_process_port", str(free_port()), *target]


def run_check_script(script: Path, num_processes: int, args: list[str], out: Path) -> dict:
    """Run a check script under `accelerate launch` on CPU and return the JSON its rank 0 wrote to `out`."""
    env = dict(os.environ)
    env["ACCELERATE_USE_CPU"] = "true"  # gloo on CPU even where GPUs exist; --multi_gpu alone gives no backend on CPU
    env["OMP_NUM_THREADS"] = "1"  # N processes share the cores; also keeps torchrun from warning
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = accelerate_launch_cmd(num_processes, [str(script), *args, "--out", str(out)])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def check_runner(script: Path, runs: dict[str, tuple[int, list[str]]], tmp_path_factory):
    """A function name -> JSON that runs each of `runs` (name -> (processes, arguments)) once and caches the result."""
    results: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in results:
            num_processes, args = runs[name]
            results[name] = run_check_script(script, num_processes, args, tmp_path_factory.mktemp(name) / "out.json")
        return results[name]

    return run
