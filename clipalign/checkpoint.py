"""Checkpoint directories: written whole or not at all, found again by step.

A checkpoint is `RUN/checkpoints/step_XXXXXXXX/` holding Accelerate's state (model, optimizer, scheduler, RNG
states), the resolved config and the trainer state (file names in `clipalign.layout`). It is written under a
temporary name and renamed into place only when complete, so a crash during the save never leaves a directory that
looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from clipalign.layout import CHECKPOINTS_DIR, RUN_CONFIG_FILE, TRAINER_STATE_FILE, checkpoint_dir, checkpoint_step
from clipalign.layout import checkpoint_name as checkpoint_name  # re-exported: it lived here

STATE_FILE = TRAINER_STATE_FILE  # this module's old name for it, kept for callers


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and (p / TRAINER_STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory given itself or its run directory (then the latest complete one)."""
    path = Path(path)
    if (path / TRAINER_STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise FileNotFoundError(f"{path}: neither a checkpoint (no {TRAINER_STATE_FILE}) nor a run directory with "
                            f"checkpoints")


def read_trainer_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(ckpt) / TRAINER_STATE_FILE).read_text())


def save_checkpoint(accelerator, run_dir: str | os.PathLike, step: int, config, state: dict[str, Any],
                    keep: int = 0, files: dict[str, bytes] | None = None) -> Path:
    """Save Accelerate state + config + trainer state atomically; every process must call this.

    Args:
        accelerator: the run's `accelerate.Accelerator`.
        run_dir: the run directory; the checkpoint goes to `run_dir/checkpoints/step_XXXXXXXX`.
        step: the optimizer step just completed.
        config: the resolved `Config` (written as `config.yaml` beside the weights).
        state: JSON-serialisable trainer state (step, samples seen, ...).
        keep: keep only the newest `keep` checkpoints (0 keeps all).
        files: more files to write into the checkpoint, name -> contents (e.g. the tokenizer model).
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        config.save(tmp / RUN_CONFIG_FILE)
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        for name, contents in (files or {}).items():
            (tmp / name).write_bytes(contents)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
