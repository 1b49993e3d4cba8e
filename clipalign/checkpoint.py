"""Checkpoint directories: written whole or not at all, found again by step.

A checkpoint is `RUN/checkpoints/step_XXXXXXXX/` holding Accelerate's state (model, optimizer, scheduler, RNG
states), the resolved config and the trainer state (file names in `clipalign.layout`). A run with
`train.sharding=fsdp` writes the model and optimizer as torch.distributed.checkpoint shards instead (one file per
process, `save_sharded_state`); `load_training_state` restores either kind into either kind of run, on any number of
processes. It is written under a
temporary name (unique to the saving process) and renamed into place only when complete, so a crash during the save
never leaves a directory that looks like a checkpoint.
"""

from __future__ import annotations

import codecs
import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import RNG_STATE_NAME, broadcast_object_list

from clipalign.config import ConfigError
from clipalign.layout import (
    CHECKPOINTS_DIR,
    OPTIMIZER_FILE,
    RUN_CONFIG_FILE,
    SHARDED_STATE_DIR,
    TRAINER_STATE_FILE,
    checkpoint_dir,
    checkpoint_step,
    is_sharded_checkpoint,
    read_checkpoint_weights,
    temp_name,
    write_atomic,
)
from clipalign.layout import checkpoint_name as checkpoint_name  # re-exported: it lived here

STATE_FILE = TRAINER_STATE_FILE  # this module's old name for it, kept for callers
_TMP_CHECKPOINT = re.compile(r"^\.(step_\d{8,})\.tmp-(\d+)-[0-9a-f]+$")  # layout.temp_name of a checkpoint


class CheckpointError(ConfigError):
    """A checkpoint given to resume from cannot be restored whole (a bad `train.resume`, reported like one)."""


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


def rng_state_file(ckpt: str | os.PathLike, process_index: int) -> Path:
    """The file holding process `process_index`'s RNG states in a checkpoint (Accelerate's name for it)."""
    return Path(ckpt) / f"{RNG_STATE_NAME}_{process_index}.pkl"


def rng_restore_error(ckpt: str | os.PathLike, process_index: int) -> str | None:
    """Why this process's RNG state was not restored from `ckpt` by `load_state`, or None when it was.

    Accelerate catches any failure to load the RNG states and logs it at info level only; this reads the file again
    (weights_only) and compares torch's CPU generator with it. Call it right after `load_state`, before drawing.
    """
    path = rng_state_file(ckpt, process_index)
    if not path.is_file():
        return f"{path} is missing: the checkpoint holds no RNG state for process {process_index}"
    try:
        with torch.serialization.safe_globals(_RNG_SAFE_GLOBALS):
            states = torch.load(path, map_location="cpu", weights_only=True)
        saved = states["torch_manual_seed"]
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same verdict, named with its cause
        return f"{path} cannot be read as an RNG state file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if not torch.equal(torch.get_rng_state(), saved):
        return (f"{path} was not restored by accelerate's load_state (it logs such failures at info level only); "
                f"accelerate>=1.1.0 loads it under torch>=2.6")
    return None


_NP_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
# what Accelerate's RNG state file pickles besides tensors: numpy's generator state and Python's bytes
_RNG_SAFE_GLOBALS = [_NP_CORE.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), codecs.encode]


def save_checkpoint(accelerator, run_dir: str | os.PathLike, step: int, config, state: dict[str, Any],
                    keep: int = 0, files: dict[str, bytes] | None = None,
                    write_state: Callable[[Path], None] | None = None) -> Path:
    """Save Accelerate state + config + trainer state atomically; every process must call this.

    Args:
        accelerator: the run's `accelerate.Accelerator`.
        run_dir: the run directory; the checkpoint goes to `run_dir/checkpoints/step_XXXXXXXX`.
        step: the optimizer step just completed.
        config: the resolved `Config` (written as `config.yaml` beside the weights).
        state: JSON-serialisable trainer state (step, samples seen, ...).
        keep: keep only the newest `keep` checkpoints (0 keeps all).
        files: more files to write into the checkpoint, name -> contents (e.g. the tokenizer model).
        write_state: writes this process's part of the training state into the directory it is given; by default
            Accelerate's `save_state` (a sharded run passes `save_sharded_state`).
    """
    final = checkpoint_dir(run_dir, step)
    tmp = None
    if accelerator.is_main_process:
        _remove_dead_saves(final.parent)
        tmp = temp_name(final)  # unique: two saves into one run directory never share it
        tmp.mkdir(parents=True)
    if accelerator.num_processes > 1:
        tmp = broadcast_object_list([tmp])[0]  # every process saves its part into the main process's directory
    try:
        if write_state is None:
            accelerator.save_state(str(tmp))
        else:
            write_state(tmp)
    except Exception as e:  # noqa: BLE001 -- a full disk, a quota, a dead mount: whatever stopped the write
        raise _save_failed(step, tmp, run_dir, e) from e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            config.save(tmp / RUN_CONFIG_FILE)
            write_atomic(tmp / TRAINER_STATE_FILE, json.dumps({"step": step, **state}, indent=2))
            for name, contents in (files or {}).items():
                write_atomic(tmp / name, contents)
            _publish(tmp, final)
        except Exception as e:  # noqa: BLE001
            raise _save_failed(step, tmp, run_dir, e) from e
        if keep > 0:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); nothing of it was published."""


def _save_failed(step: int, tmp: Path, run_dir, error: Exception) -> CheckpointSaveError:
    """The error of a failed save, after removing its partial directory: what failed, and what is left to resume."""
    shutil.rmtree(tmp, ignore_errors=True)
    cause = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    latest = latest_checkpoint(run_dir)
    return CheckpointSaveError(
        f"saving the checkpoint of step {step} failed ({cause}); nothing of it was published. The newest complete "
        f"checkpoint is {latest or 'none yet'}: free space under {Path(run_dir) / CHECKPOINTS_DIR} and resume with "
        f"train.resume=auto")


def _publish(tmp: Path, final: Path) -> None:
    """Rename a complete save over `final`, replacing an older save of the same step (another writer's too)."""
    for _ in range(3):
        shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # else another save of this step just landed
                raise
    os.replace(tmp, final)


def _remove_dead_saves(root: Path) -> None:
    """Remove temporary checkpoint directories left by saves whose process has died (a crash during a save)."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        match = _TMP_CHECKPOINT.match(path.name)
        if match and not _alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process saves one checkpoint at a time: a leftover of its own is from a failed save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


# ---- the training state of sharded runs, and across the two kinds ---------------------------------------------------


def save_sharded_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                       process_index: int) -> None:
    """Write a sharded run's state into `directory`; every process calls it with its own part.

    Model and optimizer go to `SHARDED_STATE_DIR` through torch.distributed.checkpoint (each process writes its
    shards, process 0 the metadata; keys are parameter names, so any number of processes, sharded or not, can read
    them back); the schedule and this process's RNG states go where Accelerate's `save_state` puts them.
    """
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import save_accelerator_state
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / SHARDED_STATE_DIR))
    save_accelerator_state(str(directory), [], [], [scheduler], [], process_index, step=0)


def load_training_state(ckpt: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler, process_index: int) -> None:
    """Restore model, optimizer, schedule and this process's RNG states from a checkpoint of either kind.

    `model` is the unwrapped model, sharded by FSDP or not; `optimizer` the torch optimizer itself. A sharded
    checkpoint is read through torch.distributed.checkpoint, which reshards it for this run's processes (however many
    wrote it); a DDP checkpoint's whole weights and optimizer state are read by every process and sharded, if the
    model is, as they load. Every process must call it.

    Raises:
        CheckpointError: the optimizer state does not fit this run's parameters.
    """
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import load_accelerator_state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    ckpt = Path(ckpt)
    if is_sharded_checkpoint(ckpt):
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(ckpt / SHARDED_STATE_DIR))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        saved = torch.load(ckpt / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        set_state_dict(model, optimizer, model_state_dict=read_checkpoint_weights(ckpt),
                       optim_state_dict=_named_optimizer_state(saved, model, optimizer, ckpt),
                       options=StateDictOptions(full_state_dict=True))
    load_accelerator_state(str(ckpt), [], [], [scheduler], [], process_index)


def _named_optimizer_state(saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           ckpt: Path) -> dict:
    """A torch optimizer state dict (parameters numbered in group order) keyed by parameter names instead.

    The numbering is that of `optimizer`'s groups, which this run builds the way the saving run did."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    if [len(g) for g in groups] != [len(g["params"]) for g in saved["param_groups"]]:
        raise CheckpointError(f"{ckpt / OPTIMIZER_FILE}: its parameter groups hold "
                              f"{[len(g['params']) for g in saved['param_groups']]} parameters, this model's "
                              f"{[len(g) for g in groups]}: the checkpoint is of another model")
    by_index = {index: name for group, names_ in zip(saved["param_groups"], groups)
                for index, name in zip(group["params"], names_)}
    return {"state": {by_index[index]: value for index, value in saved["state"].items()},
            "param_groups": [{**group, "params": names_} for group, names_ in zip(saved["param_groups"], groups)]}
