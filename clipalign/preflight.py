"""What a run will read and write, opened and checked before the model is built: a mistake costs seconds, not a run.

`check_run(cfg, world)` raises a `ConfigError` (one line; the trainer exits with status 2) at the first problem and
returns the warnings to print. In order:

    train.output_dir   a directory holding another run's outputs is written into only when train.resume continues
                       it, or train.overwrite=true clears them first (the run's own files: checkpoints, metrics,
                       summary, logs, its export; nothing else of the directory)
    model, optim       fine-tuning keys that fit together and fit the run (`clipalign.finetune.check_run_keys`);
                       a warning when optim.warmup_steps exceeds train.steps
    train.resume       a checkpoint of the same model and optimizer groups (`check_resumable`)
    data.train/.val    the shards exist: brace and glob patterns, `::` sources; a directory gets its pattern
    data.val           at least one global batch of usable samples (image and caption), and eval.val_samples too
    eval.zeroshot      an ImageFolder with class folders of images, labelled shards or a labelled table, with
                       eval.classnames (one per class folder; a warning for numbered folders) and eval.templates
                       (each with "{}"), read as the evaluation will read them
    eval.retrieval     a table whose columns, separator, captions and images are there, or captioned shards
    export.dir         resolved inside the run directory when relative; free, empty or an earlier export; the
                       packages export.onnx and export.format=transformers need are installed

`export_dir(cfg)` is where the run exports: a relative export.dir lies inside the run directory, so that two runs of
one recipe never share an export.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import braceexpand

from clipalign.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, resolve_checkpoint
from clipalign.config import Config, ConfigError, read_config
from clipalign.data.shards import expand_sources
from clipalign.finetune import check_run_keys
from clipalign.layout import (
    CHECKPOINTS_DIR,
    CURVES_FILE,
    KEYS_DIR,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    is_export,
)

# what a run writes into its directory besides checkpoints (TensorBoard's events go to this folder of it)
TENSORBOARD_DIR = "tensorboard"
_RUN_OUTPUTS = (RUN_CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINTS_DIR, KEYS_DIR, CURVES_FILE, TENSORBOARD_DIR)
# model keys that may change between a checkpoint and the run resuming from it: they change no parameter
RESUMABLE_MODEL_KEYS = ("grad_checkpointing", "patch_dropout", "pretrained", "pretrained_image", "lora_dropout")


def check_run(cfg: Config, world: int) -> tuple[Path | None, list[str]]:
    """Check everything the run of `cfg` on `world` processes reads and writes (ConfigError at the first problem);
    returns the checkpoint it resumes from (None: a fresh start) and warnings to show."""
    run_dir = Path(cfg.train.output_dir)
    check_run_keys(cfg)
    check_output_dir(cfg, run_dir)
    resume = resume_checkpoint(cfg, run_dir)
    if resume is not None:
        check_resumable(cfg, resume)
    if cfg.data.train or not cfg.data.synthetic:
        expand_shards(cfg.data.train)
    check_val(cfg, world)
    check_distill(cfg)
    warnings = check_schedule(cfg) + check_evaluation(cfg)
    if cfg.export.dir:
        from clipalign.export import check_export_target, onnx_missing

        # the packages the export at the end needs, looked for now
        if cfg.export.onnx and (missing := onnx_missing()):
            raise ConfigError(f"export.onnx=true: {missing}; or set export.onnx=false")
        if cfg.export.format == "transformers" and importlib.util.find_spec("transformers") is None:
            raise ConfigError("export.format=transformers needs the transformers package: pip install "
                              "'clipalign[transformers]'; or set export.format=open_clip")
        target = export_dir(cfg)
        if not (cfg.train.overwrite and _inside(run_dir, target)):  # the run's own export goes with it
            try:
                check_export_target(target, "export.dir")
            except FileExistsError as e:
                raise ConfigError(str(e)) from None
    return resume, warnings


def check_schedule(cfg: Config) -> list[str]:
    """A warmup longer than the run: the learning rate never reaches optim.lr (a warning, not an error)."""
    warmup, steps = cfg.optim.warmup_steps, cfg.train.steps
    if warmup <= steps:
        return []
    return [f"optim.warmup_steps={warmup} is more than train.steps={steps}: the learning rate only climbs, ending at "
            f"{steps / warmup:.2g} x optim.lr={cfg.optim.lr:g} and never decaying; set optim.warmup_steps to 1-5 % "
            f"of the steps (e.g. optim.warmup_steps={max(1, round(steps * 0.03))})"]


# ---- the run directory ----------------------------------------------------------------------------------------


def run_outputs(run_dir: str | os.PathLike) -> list[str]:
    """The outputs of a run already in `run_dir` (its own file names; a folder with a slash), sorted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for name in _RUN_OUTPUTS:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def check_output_dir(cfg: Config, run_dir: Path) -> None:
    """A run writes into a directory holding another run's outputs only to continue it (train.resume) or when told
    to start over (train.overwrite); anything else is a ConfigError saying how to do either."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.output_dir {run_dir} is a file; the run directory must be a directory")
    outputs = run_outputs(run_dir)
    if not outputs or cfg.train.overwrite:
        return
    if cfg.train.resume == "auto" or (cfg.train.resume and _inside(run_dir, Path(cfg.train.resume))):
        return  # continued (with resume=auto and no checkpoint yet, from step 0, its logs appended to)
    steps = list_checkpoints(run_dir)
    held = ", ".join(outputs) + (f"; checkpoints up to {steps[-1].name}" if steps else "")
    raise ConfigError(f"train.output_dir {run_dir} holds another run ({held}): continue it with train.resume=auto, "
                      f"start over with train.overwrite=true (which deletes its checkpoints, metrics, summary, logs "
                      f"and export), or give another train.output_dir")


def _inside(run_dir: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(run_dir.resolve())
        return True
    except ValueError:
        return False


def start_over(cfg: Config, run_dir: Path) -> list[str]:
    """Delete the outputs of the run in `run_dir` (its own files only) when train.overwrite asks for it; returns what
    was deleted. Call it on one process, holding the run directory's lock. (A run continued with train.resume appends
    to its logs, as after any resume: the records of steps it trains again come later, and readers keep the last.)"""
    outputs = run_outputs(run_dir)
    if not outputs or not cfg.train.overwrite:
        return []
    export = export_dir(cfg) if cfg.export.dir else None
    for name in outputs:
        path = run_dir / name.rstrip("/")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if cfg.train.overwrite and export is not None and _inside(run_dir, export) and is_export(export):
        shutil.rmtree(export)
        outputs.append(str(export.relative_to(run_dir)) + "/")
    return outputs


def resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint train.resume names (a checkpoint or run directory, or auto: the run's latest, None on a fresh
    run); None without train.resume."""
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "auto":
        return latest_checkpoint(run_dir)
    try:
        return resolve_checkpoint(cfg.train.resume)
    except FileNotFoundError as e:
        raise ConfigError(f"train.resume: {e}") from None


def check_resumable(cfg: Config, ckpt: Path) -> None:
    """Refuse a checkpoint of another model (or loss kind, or optimizer groups) before building anything, naming what
    differs."""
    saved_path = ckpt / RUN_CONFIG_FILE
    if not saved_path.is_file():
        return  # an old checkpoint without its config: the weights' shapes are the only check
    saved = read_config(saved_path)
    ours, theirs = cfg.to_dict(), saved.to_dict()
    differing = [f"model.{key} ({theirs['model'][key]!r} in the checkpoint, {ours['model'][key]!r} here)"
                 for key in ours["model"] if key not in RESUMABLE_MODEL_KEYS and ours["model"][key] !=
                 theirs["model"].get(key)]
    if ours["loss"]["kind"] != theirs["loss"]["kind"]:
        differing.append(f"loss.kind ({theirs['loss']['kind']!r} in the checkpoint, {ours['loss']['kind']!r} here)")
    # they decide the optimizer's parameter groups, whose state the checkpoint holds group by group (the value of a
    # layer decay that stays on may change: it only scales the groups' learning rates)
    if ours["optim"]["no_decay"] != theirs["optim"]["no_decay"]:
        differing.append(f"optim.no_decay ({theirs['optim']['no_decay']!r} in the checkpoint, "
                         f"{ours['optim']['no_decay']!r} here)")
    if (ours["optim"]["layer_decay"] == 1.0) != (theirs["optim"]["layer_decay"] == 1.0):
        differing.append(f"optim.layer_decay on or off ({theirs['optim']['layer_decay']!r} in the checkpoint, "
                         f"{ours['optim']['layer_decay']!r} here)")
    if differing:
        what = "other optimizer groups" if all(d.startswith("optim.") for d in differing) else "another model"
        raise CheckpointError(f"cannot resume from {ckpt}: it is a checkpoint of {what}: "
                              f"{'; '.join(differing)}. Resume with the checkpoint's settings, or start a new run "
                              f"(another train.output_dir, or train.overwrite=true to replace this one)")


# ---- data -------------------------------------------------------------------------------------------------------


def expand_shards(spec: str, key: str = "data.train") -> list[list[str]]:
    """`expand_sources`, with a missing shard, an empty pattern or a directory reported as the recipe error it is."""
    try:
        return expand_sources(spec, key)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


def check_val(cfg: Config, world: int) -> None:
    """data.val's shards exist and hold at least one global batch of usable samples (image and caption, as
    validation reads them), and eval.val_samples asks for one at least."""
    if not cfg.data.val:
        if cfg.eval.val_every:
            raise ConfigError(f"eval.val_every={cfg.eval.val_every} validates on data.val, which is not set")
        return
    sources = expand_shards(cfg.data.val, "data.val")
    val_batch = cfg.data.batch_size * cfg.train.accum_steps * world  # the rows a training loss is computed over
    need = (f"one global batch of validation, the training's: data.batch_size x train.accum_steps x {world} "
            f"processes = {val_batch}")
    if cfg.eval.val_samples < val_batch:
        raise ConfigError(f"eval.val_samples={cfg.eval.val_samples} is less than {need}")
    urls = [url for source in sources for url in source]
    if any(url.startswith("pipe:") or "://" in url for url in urls):
        return  # remote: counted when validation reads it
    from clipalign.validate import count_usable

    found, skipped = count_usable(urls, cfg.data.captions or None, at_most=val_batch)
    if found < val_batch:
        why = f" (skipped: {', '.join(f'{k}={v}' for k, v in sorted(skipped.items()))})" if skipped else ""
        raise ConfigError(f"data.val holds {found} usable samples{why}, fewer than {need}: give it more samples or "
                          f"use a smaller data.batch_size")


def check_distill(cfg: Config) -> None:
    """distill.*: a teacher that is a directory or an open_clip model name with weights, embeddings that exist. (The
    teacher itself is loaded with the model, and embeddings' keys are checked against the first shard then.)"""
    teacher, pretrained, embeddings = cfg.distill.teacher, cfg.distill.teacher_pretrained, cfg.distill.embeddings
    if embeddings and not os.path.isdir(embeddings):
        raise ConfigError(f"distill.embeddings: {embeddings!r} is not a directory (make one with clipalign-embed)")
    if pretrained and not teacher:
        raise ConfigError(f"distill.teacher_pretrained={pretrained!r} without distill.teacher: name the open_clip "
                          f"model those weights are of")
    if teacher and not embeddings and not os.path.exists(teacher):
        import open_clip

        if open_clip.get_model_config(teacher) is None:
            raise ConfigError(f"distill.teacher: {teacher!r} is neither a directory (a clipalign export, checkpoint or "
                              f"run) nor an open_clip model name")
        if not pretrained:
            raise ConfigError(f"distill.teacher={teacher!r} is a model name without weights: set "
                              f"distill.teacher_pretrained to a pretrained tag or a local weights file")
        if os.sep in pretrained and not os.path.isfile(pretrained):
            raise ConfigError(f"distill.teacher_pretrained: {pretrained!r} does not exist")


# ---- evaluation and export ------------------------------------------------------------------------------------


def _local(value: str) -> bool:
    return bool(value) and value != "none" and "://" not in value and not value.startswith("pipe:")


def check_evaluation(cfg: Config) -> list[str]:
    """The evaluation sets exist and have the shape their evaluation reads (see `clipalign.evaluate`'s checks);
    returns warnings. The synthetic set's, drawn later, is the trainer's own and not checked here."""
    from clipalign.data.sample import BUILTIN_SETS, resolve_lines
    from clipalign.evaluate import check_classification_source, check_retrieval_source, check_templates

    table_format = None if cfg.eval.table_format == "auto" else cfg.eval.table_format
    lines = {}
    for key in ("classnames", "templates"):
        value = getattr(cfg.eval, key)
        if not value:
            continue
        if value not in BUILTIN_SETS and not os.path.isfile(value):
            raise ConfigError(f"eval.{key}: {value!r} is neither a file nor a built-in set ({', '.join(BUILTIN_SETS)})")
        lines[key] = resolve_lines(value, key)
    zeroshot, retrieval = _local(cfg.eval.zeroshot), _local(cfg.eval.retrieval)
    for key, value in (("zeroshot", zeroshot and cfg.eval.zeroshot), ("retrieval", retrieval and cfg.eval.retrieval)):
        if value:
            _must_exist(value, f"eval.{key}")
    warnings = []
    try:
        if zeroshot:
            _, warnings = check_classification_source(
                cfg.eval.zeroshot, lines.get("classnames"), lines.get("templates"), table_format=table_format,
                given_as=("eval.zeroshot", "eval.classnames", "eval.templates"))
        elif "templates" in lines:
            check_templates(lines["templates"], "eval.templates")
        if retrieval:
            check_retrieval_source(cfg.eval.retrieval, table_format=table_format, what="eval.retrieval")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(_named(str(e), cfg)) from None
    return warnings


def _must_exist(value: str, key: str) -> None:
    missing = [p for p in braceexpand.braceexpand(value) if not os.path.exists(p)]
    if missing:
        raise ConfigError(f"{key}: {value!r} does not exist" + (f" ({len(missing)} paths, e.g. {missing[0]})"
                                                                 if missing != [value] else ""))


def _named(message: str, cfg: Config) -> str:
    """A reader's message, with the recipe key that names its source in front when the message does not have one."""
    if message.startswith("eval."):
        return message
    for key in ("zeroshot", "retrieval"):
        value = getattr(cfg.eval, key)
        if value and value in message:
            return f"eval.{key}: {message}"
    return message


def export_dir(cfg: Config) -> Path:
    """Where the run exports: export.dir, inside the run directory when it is relative."""
    path = Path(cfg.export.dir).expanduser()
    return path if path.is_absolute() else Path(cfg.train.output_dir) / path
