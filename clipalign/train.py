"""Contrastive image-text pretraining: one flat, step-counted loop over Accelerate.

    python -m clipalign.train RECIPE.yaml [section.key=value ...]
    accelerate launch -m clipalign.train RECIPE.yaml [section.key=value ...]
    clipalign-train RECIPE.yaml [section.key=value ...]

`_train` reads as a run does: the checks of everything the run reads (`clipalign.preflight`), the model and what
trains it (`_build`), the run directory (`_take_run_dir`), the resumed state (`_resume`), the data (`_data`), then the
loop, whose body is one step, and the end of the run (`_finish`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from clipalign.accumulate import forward_backward
from clipalign.checkpoint import (
    CheckpointError,
    CheckpointSaveError,
    load_training_state,
    read_trainer_state,
    rng_restore_error,
    save_checkpoint,
    save_sharded_state,
)
from clipalign.cli import train_parser
from clipalign.config import Config, ConfigError, load_config, shareable_config
from clipalign.data.curation import SampleFilter
from clipalign.data.device_decode import DeviceDecoder, resolve_decode
from clipalign.data.shards import DataSourceError, make_train_loader
from clipalign.data.synthetic import make_synthetic_dataset
from clipalign.hardware import cpu_native_bf16, cpu_precision, cpu_threads
from clipalign.layout import (
    METRICS_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    TOKENIZER_FILE,
    RunDirBusy,
    checkpoint_dir,
    is_sharded_checkpoint,
    keys_file,
    lock_run_dir,
    release_run_dir,
    write_atomic,
)
from clipalign.loss import build_loss
from clipalign.model import (
    CompileReport,
    DualEncoder,
    compile_blocks,
    create_model,
    trim_padding,
    use_matmul_patch_embed,
)
from clipalign.monitor import MetricsWindow, NonfiniteGuard, known_peak_tflops, sync_debug
from clipalign.optim import apply_optimizer_settings, build_optimizer, optimizer_settings
from clipalign.preflight import check_run, expand_shards, export_dir, start_over
from clipalign.sharding import clip_grad_norm, full_state_dict, is_sharded, shard_model, sync_replicated_grads
from clipalign.tokenizer import SentencePieceTokenizer, Tokenizer

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class RunEndError(RuntimeError):
    """The run trained and saved its last checkpoint, but something at its end (an evaluation, the export) failed:
    the message says what, and the command that redoes it."""


def cache_dir(cfg: Config) -> Path:
    """Where generated data goes: data.cache_dir, else $CLIPALIGN_CACHE, else ~/.cache/clipalign."""
    return Path(cfg.data.cache_dir or os.environ.get("CLIPALIGN_CACHE") or Path.home() / ".cache" / "clipalign")



def _prepare_data(cfg: Config, accelerator: Accelerator, image_size: int) -> None:
    """Fill in data.train (and eval.zeroshot, eval.retrieval) from the synthetic set when the recipe asks for it."""
    if cfg.data.train or not cfg.data.synthetic:
        return
    root = cache_dir(cfg) / "synthetic" / f"n{cfg.data.synthetic_samples}-px{image_size}"
    # one process per machine draws; the others wait and then read the finished set
    with accelerator.local_main_process_first():
        ds = make_synthetic_dataset(root, train_samples=cfg.data.synthetic_samples, image_size=image_size)
    cfg.data.train = ds.train_pattern
    if not cfg.eval.zeroshot:  # "none" turns it off
        cfg.eval.zeroshot = str(ds.heldout_dir)
    if not cfg.eval.retrieval:
        cfg.eval.retrieval = str(ds.heldout_captions)


def _eval_set(cfg: Config, kind: str) -> str:
    """eval.zeroshot or eval.retrieval, "" when there is none to run ("none" turns off the synthetic set's)."""
    value = getattr(cfg.eval, kind)
    return "" if value == "none" else value


def _evaluates(cfg: Config) -> bool:
    return bool(_eval_set(cfg, "zeroshot") or _eval_set(cfg, "retrieval"))


def _checkpoint(accelerator: Accelerator, run_dir: Path, step: int, cfg: Config, state: dict,
                tokenizer: Tokenizer, sharded: tuple | None = None) -> Path:
    """Save a checkpoint; `sharded` = (model, optimizer, scheduler) of a sharded run, whose state is written as
    torch.distributed.checkpoint shards rather than by Accelerate."""
    # a SentencePiece tokenizer travels with the weights: the checkpoint alone must rebuild the model
    files = {TOKENIZER_FILE: tokenizer.model_proto} if isinstance(tokenizer, SentencePieceTokenizer) else None
    write_state = None
    if sharded is not None:
        def write_state(directory: Path) -> None:
            save_sharded_state(directory, *sharded, process_index=accelerator.process_index)
    return save_checkpoint(accelerator, run_dir, step, cfg, state, keep=cfg.train.keep_checkpoints, files=files,
                           write_state=write_state)


def _trainer_state(accelerator: Accelerator, samples_seen: int, positions: dict[int, tuple[int, int]],
                   streams: int, sharding: str) -> dict:
    """What a checkpoint records beyond Accelerate's state: samples seen, every data stream's position, and the
    processes that wrote it (how many, and whether they sharded the model)."""
    merged: dict[str, list[int]] = {}
    for part in gather_object([positions]):  # one dict per process
        merged.update({str(stream): list(pos) for stream, pos in part.items()})
    return {"samples_seen": samples_seen, "data": {"streams": streams, "positions": merged},
            "processes": accelerator.num_processes, "sharding": sharding}


def _data_start(state: dict, streams: int) -> dict[int, tuple[int, int]]:
    """Resume positions of the exact-pass streams, if the checkpoint's streams match this run's."""
    data = state.get("data") or {}
    if not data.get("positions"):
        return {}
    if data.get("streams") != streams:
        warnings.warn(f"the checkpoint's data position covers {data.get('streams')} streams (processes x workers) "
                      f"but this run has {streams}; the exact pass restarts from its beginning", stacklevel=2)
        return {}
    return {int(k): tuple(v) for k, v in data["positions"].items()}


def _last_logged_loss(metrics: Path) -> float | None:
    """The loss of the last metrics line of a run (a launch that trained no step reports the run's), or None."""
    if not metrics.is_file():
        return None
    losses = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if "loss" in record:
            losses.append(record["loss"])
    return losses[-1] if losses else None


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: Config) -> dict:
    """Run the training described by `cfg`; returns the last logged metrics (and zero-shot results, if any)."""
    # ---- processes, precision, run directory -------------------------------------------------------------------
    if cfg.train.accum_steps < 1:
        raise ConfigError(f"train.accum_steps must be at least 1, got {cfg.train.accum_steps}")
    if cfg.train.sharding == "fsdp" and cfg.train.precision == "fp16":
        raise ConfigError("train.sharding=fsdp trains with train.precision=bf16 or fp32: fp16 needs a loss scale "
                          "that the sharded gradients do not get")
    if cfg.train.fsdp_offload and cfg.train.sharding != "fsdp":
        raise ConfigError("train.fsdp_offload=true offloads FSDP's shards: it needs train.sharding=fsdp")
    _refuse_sharded_strategies()
    if not torch.accelerator.is_available():
        precision, why = cpu_precision(cfg.train.precision, cpu_native_bf16())
        if why:
            warnings.warn(why, stacklevel=2)
            cfg.train.precision = precision  # the run's config.yaml records what it trained in
    run_dir = Path(cfg.train.output_dir)
    log_with = None if cfg.train.log_with in ("", "none") else cfg.train.log_with
    # Without an accelerator, Accelerate must be told it runs on CPU; otherwise a multi-process launch on a
    # CPU-only machine starts torch.distributed but wraps nothing in DDP and gradients are never averaged.
    accelerator = Accelerator(mixed_precision=_PRECISION[cfg.train.precision], log_with=log_with,
                              project_dir=str(run_dir), step_scheduler_with_optimizer=False,
                              cpu=not torch.accelerator.is_available())
    try:
        return _train(cfg, accelerator, run_dir, log_with)
    finally:
        # closes the process group: a gloo process that exits with it open aborts the whole launch
        accelerator.end_training()
        release_run_dir(run_dir)  # the run directory's lock, if _train took it


def _refuse_sharded_strategies() -> None:
    """Stop a launch that asks Accelerate for FSDP or DeepSpeed before it starts. Sharding is the recipe's choice
    (`train.sharding=fsdp`, PyTorch's FSDP2, the same on CPU and GPU); Accelerate's own FSDP would drop the request
    without a word on CPU, and DeepSpeed is not supported. `accelerate launch` passes both requests (config file or
    flags) to the processes as these variables."""
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        raise ConfigError("this launch asks Accelerate for FSDP (ACCELERATE_USE_FSDP=true, from `accelerate config` "
                          "or the launcher's flags); clipalign shards the model itself: launch with --multi_gpu and "
                          "set train.sharding=fsdp (see docs/scaling.md)")
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError("this launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true, from `accelerate config` "
                          "or the launcher's flags), which clipalign does not support: launch with --multi_gpu, and "
                          "for models that do not fit one device set train.sharding=fsdp (see docs/scaling.md)")


@dataclass
class _Run:
    """The model and what trains it (`_build`)."""

    model: torch.nn.Module  # as the step calls it: wrapped for DDP by Accelerate, or the FSDP-sharded model itself
    raw: DualEncoder  # the model, unwrapped
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    memory_format: torch.memory_format
    sharded_state: tuple | None  # (model, optimizer, scheduler) of a sharded run: what its checkpoints save
    compile_report: CompileReport | None
    teacher: Callable[..., dict] | None = None  # distillation: a micro-batch -> the teacher's features (no gradients)
    teacher_tokenizer: Tokenizer | None = None  # what the data workers tokenize for a teacher of another tokenizer


@dataclass
class _Data:
    """The training stream (`_data`) and where its sub-streams stand, for the checkpoints."""

    batches: object  # an iterator of batches
    positions: dict[int, tuple[int, int]]  # stream -> (epoch, emitted) of its last batch (exact passes)
    streams: int  # processes x workers


def _train(cfg: Config, accelerator: Accelerator, run_dir: Path, log_with: str | None) -> dict:
    set_seed(cfg.train.seed)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.train.cpu_threads))
    is_main, world, sharded = accelerator.is_main_process, accelerator.num_processes, cfg.train.sharding == "fsdp"
    resume, sample_filter, to_device = _check(cfg, accelerator)  # everything the run reads: a typo costs seconds
    run = _build(cfg, accelerator)
    model, raw_model, loss_fn, optimizer, scheduler = run.model, run.raw, run.loss_fn, run.optimizer, run.scheduler
    _prepare_data(cfg, accelerator, raw_model.image_size)  # the synthetic set, drawn once, into the config
    _take_run_dir(cfg, accelerator, run_dir)
    step, samples_seen, state = _resume(cfg, accelerator, run, resume)
    data = _data(cfg, accelerator, run, state, step, sample_filter, to_device)
    batches, positions = data.batches, data.positions

    # ---- logging -----------------------------------------------------------------------------------------------
    if log_with:
        # trackers are shared: pipe: commands and URL query strings (credentials) are redacted there
        accelerator.init_trackers("tensorboard", config=_flat(shareable_config(cfg)))
    metrics_path = run_dir / METRICS_FILE
    global_batch = cfg.data.batch_size * world * cfg.train.accum_steps  # samples per optimizer step
    peak_tflops = cfg.train.peak_tflops or known_peak_tflops(accelerator.device, cfg.train.precision)
    window = MetricsWindow(accelerator, global_batch, peak_tflops, cfg.data.num_samples, to_device)
    nonfinite = NonfiniteGuard(optimizer, world, cfg.train.max_nonfinite, run_dir)
    last: dict = {}
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not is_main, dynamic_ncols=True, desc="train")

    # ---- the loop ----------------------------------------------------------------------------------------------
    # padding after every caption's end is cut per batch where the text tower cannot see it (causal, EOT-pooled)
    trim_text = cfg.train.trim_text and raw_model.trims_text
    model.train()
    first_step = step
    try:
        while step < cfg.train.steps:
            sync_debug(cfg.train.sync_debug and step > first_step)  # the first step syncs (autotuning, FLOP count)
            t0, decoding = time.perf_counter(), to_device.seconds
            micro_batches, step_keys = [], []
            for _ in range(cfg.train.accum_steps):
                batch = next(batches)
                texts = trim_padding(batch["texts"]) if trim_text else batch["texts"]
                # data.decode=device: JPEG rows are decoded here; rows nothing decodes are counted like the workers'
                # skips
                images, decode_skipped = to_device(batch, run.memory_format)
                micro_batches.append((images, texts.to(accelerator.device, non_blocking=True), batch))
                window.skipped.update(batch["skipped"])
                window.skipped.update(decode_skipped)
                window.filtered.update(batch.get("filtered", {}))
                stream, epoch, emitted = batch["position"]
                positions[stream] = (epoch, emitted)
                step_keys.extend(batch["keys"])
            window.decode += to_device.seconds - decoding  # decoding is work, not waiting: its own figure
            window.wait += time.perf_counter() - t0 - (to_device.seconds - decoding)

            # accumulated micro-batches are scored together: negatives come from the whole accumulated batch;
            # the first step also counts the FLOPs of a step, for the MFU estimate
            with window.counting_flops():
                loss = forward_backward(model, loss_fn, micro_batches, accelerator, run.teacher)
            if sharded:
                sync_replicated_grads(raw_model)  # the temperature (and bias): whole on every process, outside FSDP
            samples_seen += global_batch

            # a non-finite loss or gradient on any process makes no update anywhere, decided on the device: no wait for
            # the GPU here (under fp16 the loss scaler skips steps with non-finite gradients itself)
            finite = nonfinite.local_verdict(loss, raw_model, grads=cfg.train.precision != "fp16")
            update = nonfinite.arm(accelerator.reduce(finite, reduction="sum"), step + 1)
            if cfg.optim.grad_clip > 0:
                if sharded:  # the norm of the whole gradient, over every shard
                    clip_grad_norm(raw_model, cfg.optim.grad_clip)
                else:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            if update:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            raw_model.clamp_logit_scale()
            step += 1
            nonfinite.check(wait=False)  # the previous step's verdict, long since computed: counts, or stops the run
            sync_debug(False)  # logging, evaluation and checkpoints wait for the device on purpose
            if cfg.data.log_keys:
                _append_jsonl(keys_file(run_dir, accelerator.process_index), {"step": step, "keys": step_keys})
            window.steps += 1
            bar.update(1)

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                nonfinite.check(wait=True)
                last = window.line(step, samples_seen, loss, raw_model, scheduler.get_last_lr()[0], nonfinite.total)
                if is_main:
                    _append_jsonl(metrics_path, last)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", scale=f"{last['logit_scale']:.1f}",
                                    sps=f"{last['samples_per_s']:.0f}")
                if log_with:
                    accelerator.log({k: v for k, v in last.items() if k not in ("skipped", "filtered")}, step=step)

            if _evaluates(cfg) and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                with window.paused():  # evaluation time is not training time
                    # every process: a sharded model gathers its weights
                    eval_model = _whole_model(cfg, raw_model, accelerator.device)
                    if is_main:
                        results = _evaluate(cfg, eval_model)
                        _append_jsonl(metrics_path, {"step": step, **results})
                        if log_with:
                            accelerator.log({f"{kind}/{k}": v for kind, result in results.items()
                                             for k, v in result.items() if isinstance(v, (int, float))}, step=step)
                    accelerator.wait_for_everyone()

            if cfg.data.val and cfg.eval.val_every and step % cfg.eval.val_every == 0 and step < cfg.train.steps:
                with window.paused():  # validation time is not training time
                    _validate(cfg, accelerator, raw_model, loss_fn, run.memory_format, step, metrics_path, log_with)

            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
                _checkpoint(accelerator, run_dir, step, cfg,
                            _trainer_state(accelerator, samples_seen, positions, data.streams, cfg.train.sharding),
                            raw_model.tokenizer, run.sharded_state)
    finally:  # before an error is printed: the message starts its own line
        bar.close()
    nonfinite.check(wait=True)
    return _finish(cfg, accelerator, run, run_dir, resume, step,
                   _trainer_state(accelerator, samples_seen, positions, data.streams, cfg.train.sharding),
                   window, last.get("loss", _last_logged_loss(metrics_path)), log_with)


# ---- the phases of a run --------------------------------------------------------------------------------------


def _check(cfg: Config, accelerator: Accelerator) -> tuple[Path | None, SampleFilter | None, DeviceDecoder]:
    """Everything the run reads and writes, checked before anything is built (`clipalign.preflight`); the
    checkpoint to resume from, the curation filter and the decoder that takes batches to the device."""
    resume, notes = check_run(cfg, accelerator.num_processes)
    if accelerator.is_main_process:
        for note in notes:
            warnings.warn(note, stacklevel=3)
    # data.keep, keep_probability, min_score: their files read (and checked) now; None when none is set
    sample_filter = SampleFilter.from_config(cfg.data)
    if sample_filter is not None:
        accelerator.print(f"curating at load time: {sample_filter.describe()}")
    # batches to the device; data.decode=device: its decoder library is looked for now, not at the first batch
    decode = resolve_decode(cfg.data.decode, accelerator.device)
    to_device = DeviceDecoder(accelerator.device, cfg.data.decode_backend if decode == "device" else None,
                              budget_bytes=int(cfg.data.decode_budget_mb * 2**20))
    return resume, sample_filter, to_device


def _build(cfg: Config, accelerator: Accelerator) -> _Run:
    """The model, its loss, optimizer and schedule, set up for the processes (DDP through Accelerate, or FSDP2)."""
    sharded = cfg.train.sharding == "fsdp"
    model = create_model(cfg.model, cfg.loss.kind)
    if cfg.export.dir and cfg.export.format == "transformers":  # refused now, not after the training
        from clipalign.hf_export import NotExportable, convert

        try:
            convert(model, model.open_clip_config())
        except NotExportable as e:
            raise ConfigError(f"export.format=transformers: {e}") from None
    model.attention = cfg.train.attention
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    if cfg.train.channels_last:
        model.clip.visual.to(memory_format=torch.channels_last)
    if cfg.train.patch_embed == "matmul":  # auto: the convolution until the matmul has been measured on a GPU
        use_matmul_patch_embed(model)
    if cfg.train.compile:
        # in place: the modules keep their parameter names, so checkpoints and exports are unchanged
        model.compile() if cfg.train.compile_scope == "model" else compile_blocks(model)
    compile_report = CompileReport() if cfg.train.compile else None  # warns if a function falls back to eager
    if sharded:  # after compiling the blocks, before the optimizer: it must hold the shards
        shard_model(model, accelerator.device, cfg.train.precision, offload=cfg.train.fsdp_offload)
    optimizer, scheduler = build_optimizer(cfg, model)
    prepared = model
    if not sharded:  # DDP through Accelerate; a sharded model, its optimizer and schedule are used as they are
        prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw = accelerator.unwrap_model(prepared)
    loss_fn = build_loss(cfg.loss)
    teacher, teacher_tokenizer = _teacher(cfg, accelerator, raw)
    if teacher is not None:
        from clipalign.distill import DistillationLoss

        loss_fn = DistillationLoss(loss_fn, cfg.distill.weight)
    return _Run(prepared, raw, loss_fn, optimizer, scheduler, memory_format,
                (raw, optimizer, scheduler) if sharded else None, compile_report, teacher, teacher_tokenizer)


def _teacher(cfg: Config, accelerator: Accelerator, student: DualEncoder) -> tuple[Callable | None, Tokenizer | None]:
    """distill.*: the teacher's view of a micro-batch, `(images, token ids, batch) -> its features and scale`, and the
    tokenizer the data workers run for it (None where the student's ids serve). (None, None) without a teacher."""
    if not (cfg.distill.teacher or cfg.distill.embeddings):
        return None, None
    from clipalign.distill import Teacher, TeacherEmbeddings, load_teacher, same_tokenizer, shard_keys

    device = accelerator.device
    if cfg.distill.embeddings:  # precomputed: looked up by sample key, no teacher forward
        table = TeacherEmbeddings(cfg.distill.embeddings, cfg.distill.teacher_logit_scale or None)
        first = expand_shards(cfg.data.train)[0][0] if cfg.data.train else ""
        if first and os.path.isfile(first):  # the run refuses embeddings that are not of its shards
            table.check_keys(shard_keys(first), first)
        return (lambda images, texts, batch: table(batch["keys"], device)), None
    model = load_teacher(cfg.distill)
    own_tokens = not same_tokenizer(model.tokenizer, student.tokenizer)
    if cfg.train.sharding == "fsdp":  # sharded like the student, so that a teacher larger than a device fits
        shard_model(model, device, cfg.train.precision, offload=cfg.train.fsdp_offload)
    else:
        model.to(device)
    teacher = Teacher(model, student.image_size, own_tokens)

    def view(images: torch.Tensor, texts: torch.Tensor, batch: dict) -> dict:
        ids = batch["teacher_texts"] if own_tokens else batch["texts"]  # full length: the teacher trims its own
        ids = trim_padding(ids) if model.trims_text and cfg.train.trim_text else ids
        return teacher(images, ids.to(device, non_blocking=True))

    accelerator.print(f"distilling from {cfg.distill.teacher} (weight {cfg.distill.weight}"
                      f"{', its own tokenizer' if own_tokens else ''}; image size {model.image_size})")
    return view, (model.tokenizer if own_tokens else None)


def _take_run_dir(cfg: Config, accelerator: Accelerator, run_dir: Path) -> None:
    """Lock the run directory for this run (one live run per directory; every process learns the verdict, so none
    starts training into a directory in use), clear an earlier run's outputs where train.overwrite asks for it, and
    write the resolved config."""
    busy = None
    if accelerator.is_main_process:
        try:
            lock_run_dir(run_dir)  # released by train() when the run ends; the OS drops it when the process dies
        except RunDirBusy as e:
            busy = str(e)
    if accelerator.num_processes > 1:
        busy = broadcast_object_list([busy])[0]
    if busy:
        raise ConfigError(busy)
    if accelerator.is_main_process:
        cleared = start_over(cfg, run_dir)
        if cleared:
            accelerator.print(f"starting {run_dir} over (train.overwrite=true): removed {', '.join(cleared)}")
        cfg.save(run_dir / RUN_CONFIG_FILE)
    accelerator.wait_for_everyone()


def _resume(cfg: Config, accelerator: Accelerator, run: _Run, resume: Path | None) -> tuple[int, int, dict]:
    """(step, samples seen, trainer state) to go on from: the checkpoint's, loaded into the model, optimizer and
    schedule (either kind of checkpoint into either kind of run), with the recipe's optimizer settings kept."""
    if resume is None:
        return 0, 0, {}
    world, optimizer, scheduler = accelerator.num_processes, run.optimizer, run.scheduler
    recipe_optim = optimizer_settings(optimizer, scheduler)  # this run's, before the checkpoint's replace them
    state = read_trainer_state(resume)
    step, samples_seen = state["step"], state.get("samples_seen", 0)
    if run.sharded_state or is_sharded_checkpoint(resume):  # resharded for these processes
        load_training_state(resume, run.raw, getattr(optimizer, "optimizer", optimizer), scheduler,
                            accelerator.process_index)
    else:
        accelerator.load_state(str(resume))
    if state.get("processes", world) == world:
        # accelerate swallows a failed RNG restore (an info log): check each process's; all stop if one failed
        rng_errors = [e for e in gather_object([rng_restore_error(resume, accelerator.process_index)]) if e]
        if rng_errors:
            raise CheckpointError(f"cannot resume from {resume}: {'; '.join(rng_errors)}")
    else:
        warnings.warn(f"{resume} was written by {state['processes']} processes and this run has {world}: the "
                      f"weights, optimizer state and schedule resume exactly; the random streams (augmentation, "
                      f"dropout) and the data order start afresh, seeded by the step", stacklevel=3)
        set_seed(cfg.train.seed + step, device_specific=True)
    changed = apply_optimizer_settings(optimizer, scheduler, recipe_optim, resume)
    if changed:
        accelerator.print(f"optimizer settings changed since {resume.name}, applied from step {step}: {changed}")
    accelerator.print(f"resumed from {resume} at step {step} ({state.get('sharding', 'ddp')} checkpoint, "
                      f"{cfg.train.sharding} run)")
    return step, samples_seen, state


def _data(cfg: Config, accelerator: Accelerator, run: _Run, state: dict, step: int,
          sample_filter: SampleFilter | None, to_device: DeviceDecoder) -> _Data:
    """The training stream from where the checkpoint left it: exact passes continue each worker's position, a
    resampled stream draws afresh, seeded by the step."""
    sources = expand_shards(cfg.data.train)
    workers = max(1, cfg.data.workers)
    streams = accelerator.num_processes * workers
    if cfg.data.resampled:
        # an endless random stream has no position to return to: a resumed run draws a fresh one, seeded by the step
        stream_args = {"seed": cfg.train.seed * 1_000_003 + step, "weights": cfg.data.weights}
        positions = {}
    else:
        # exact passes replay the same shard permutations and continue each worker where it stopped
        stream_args = {"seed": cfg.train.seed, "start": _data_start(state, streams)}
        # where this process's streams stand: a launch that trains no step (resumed at its last step) saves them again
        positions = {s: p for s, p in stream_args["start"].items() if s // workers == accelerator.process_index}
    loader = make_train_loader(sources, run.raw.tokenizer, run.raw.image_size, cfg.data.batch_size, cfg.data.workers,
                               resampled=cfg.data.resampled, shuffle_buffer=cfg.data.shuffle_buffer,
                               crop_scale=cfg.data.train_crop_scale, pin_memory=accelerator.device.type == "cuda",
                               decode="device" if to_device.backend else "workers",
                               decode_budget_mb=cfg.data.decode_budget_mb,
                               max_image_pixels=cfg.data.max_image_pixels,
                               # a dead source or a stalled worker stops the run with a DataSourceError naming it
                               max_source_failures=cfg.data.max_source_failures,
                               batch_timeout=cfg.data.batch_timeout, max_unusable=cfg.data.max_unusable,
                               captions=cfg.data.captions,  # caption sources and weights; {} = the default rule
                               sample_filter=sample_filter,  # curation: before decoding, counted as `filtered`
                               # the model's resize (interpolation, resize mode), the one its evaluation uses
                               preprocess_cfg=getattr(run.raw.clip.visual, "preprocess_cfg", None),
                               teacher_tokenizer=run.teacher_tokenizer, **stream_args)
    # starting the loader draws its seed from torch's generator: on a fork of it, so that the training steps draw
    # (dropout) from where a checkpoint's saved state left it, resumed or not
    with torch.random.fork_rng(devices=[]):
        batches = iter(loader)
    return _Data(batches, dict(positions), streams)


def _finish(cfg: Config, accelerator: Accelerator, run: _Run, run_dir: Path, resume: Path | None, step: int,
            trainer_state: dict, window: MetricsWindow, loss: float | None, log_with: str | None) -> dict:
    """The end of a run: the last checkpoint, validation, evaluation and export, and summary.json.

    What fails at the end (an evaluation set, the export) costs only itself: the checkpoint is kept, the other parts
    still run, summary.json records the error, and a RunEndError names the command that redoes the failed part.
    """
    if resume is not None and resume.resolve() == checkpoint_dir(run_dir, step).resolve():
        final = resume  # relaunched after its last checkpoint (killed while ending): nothing new to save
    else:
        final = _checkpoint(accelerator, run_dir, step, cfg, trainer_state, run.raw.tokenizer, run.sharded_state)
    summary = {"step": step, "samples": trainer_state["samples_seen"], "checkpoint": str(final),
               "skipped": dict(window.skipped_total), "filtered": dict(window.filtered_total), "loss": loss}
    metrics_path = run_dir / METRICS_FILE
    if cfg.data.val:  # every process, on the model as it trains (a sharded one stays sharded)
        summary["val"] = _validate(cfg, accelerator, run.raw, run.loss_fn, run.memory_format, step, metrics_path,
                                   log_with)
    eval_model = _whole_model(cfg, run.raw, accelerator.device) if _evaluates(cfg) else run.raw
    failed: dict[str, str] = {}
    if accelerator.is_main_process:
        results, failed = _evaluate_and_export(cfg, eval_model, final, metrics_path)
        summary.update(results)
        if failed:
            summary["errors"] = failed
        if run.compile_report is not None:
            summary["compile"] = run.compile_report.summary()
        accelerator.print(json.dumps(summary, indent=2))
        write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    if failed:
        raise RunEndError(_rerun_message(cfg, final, failed))
    return summary


def _evaluate_and_export(cfg: Config, model, checkpoint: Path, metrics_path: Path) -> tuple[dict, dict[str, str]]:
    """The final evaluations and the export, each on its own: (results, {part: its error} for the parts that
    failed)."""
    from clipalign.export import export_model

    out: dict = {}
    failed: dict[str, str] = {}
    for kind in ("zeroshot", "retrieval"):
        if _eval_set(cfg, kind):
            try:
                out.update(_evaluate(cfg, model, kinds=(kind,)))
            except Exception as e:  # an evaluation set that breaks at the end: its own error, the rest goes on
                failed[kind] = _one_line(e)
    if out:
        _append_jsonl(metrics_path, {"step": read_trainer_state(checkpoint)["step"], **out})
    if cfg.export.dir:
        try:
            out["export"] = str(export_model(checkpoint, export_dir(cfg), onnx=cfg.export.onnx,
                                             export_format=cfg.export.format))
        except Exception as e:  # a full disk, an ONNX exporter that fails: the checkpoint is there to export from
            failed["export"] = _one_line(e)
    return out, failed


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or traceback.format_exception_only(error)[-1].strip()
    return f"{type(error).__name__}: {text}"[:1000]


def _rerun_message(cfg: Config, checkpoint: Path, failed: dict[str, str]) -> str:
    """What failed at the end of a run, and the commands that redo it from the saved checkpoint."""
    commands = []
    if "zeroshot" in failed:
        extra = "".join(f" --{key} {value}" for key, value in (("classnames", cfg.eval.classnames),
                                                                ("templates", cfg.eval.templates)) if value)
        commands.append(f"clipalign-zeroshot --model {checkpoint} --data {cfg.eval.zeroshot}{extra}")
    if "retrieval" in failed:
        commands.append(f"clipalign-zeroshot --model {checkpoint} --retrieval {cfg.eval.retrieval}")
    if "export" in failed:
        onnx = " --onnx" if cfg.export.onnx else ""
        commands.append(f"clipalign-export --checkpoint {checkpoint} --out {export_dir(cfg)}{onnx} "
                        f"--format {cfg.export.format}")
    what = "; ".join(f"{part}: {error}" for part, error in failed.items())
    return (f"the run trained to its end and saved {checkpoint}, but at its end {what}. summary.json records the "
            f"rest. Once fixed, redo it with: {' && '.join(commands)}")


def _whole_model(cfg: Config, model, device: torch.device):
    """The model to evaluate: `model` itself, or for a sharded one a whole copy on process 0 (None on the others),
    built from the gathered weights. Every process must call it."""
    if not is_sharded(model):
        return model
    state = full_state_dict(model)  # gathers every shard; process 0 receives them
    if not state:
        return None
    whole = create_model(cfg.model, cfg.loss.kind, load_pretrained=False)
    whole.load_state_dict(state)
    whole.tokenizer, whole.attention = model.tokenizer, model.attention
    return whole.to(device)


@torch.compiler.set_stance("force_eager")  # as _evaluate
def _validate(cfg: Config, accelerator: Accelerator, model, loss_fn, memory_format: torch.memory_format, step: int,
              metrics_path: Path, log_with: str | None) -> dict:
    """Validate on data.val with the training's loss and batches (every process; see clipalign.validate), log the
    result to the metrics file (main process) and the tracker (`val/...`), and return it."""
    from clipalign.validate import validate

    result = validate(model, loss_fn, accelerator, cfg.data.val, cfg.data.batch_size * cfg.train.accum_steps,
                      cfg.eval.val_samples, forward_size=cfg.data.batch_size, trim_text=cfg.train.trim_text,
                      max_image_pixels=cfg.data.max_image_pixels, captions=cfg.data.captions or None,
                      memory_format=memory_format)
    if accelerator.is_main_process:
        _append_jsonl(metrics_path, {"step": step, "val": result})
    if log_with:
        accelerator.log({f"val/{k}": v for k, v in result.items() if isinstance(v, (int, float))}, step=step)
    return result


# eagerly under train.compile: these no-grad, eval-mode passes, at batch sizes and text lengths of their own, would
# need graphs beside training's within each compiled block's recompile limit (compile_blocks counts training's), to
# speed up passes that spend their time decoding images
@torch.compiler.set_stance("force_eager")
def _evaluate(cfg: Config, model, kinds: tuple[str, ...] = ("zeroshot", "retrieval")) -> dict:
    """The configured evaluations of `kinds`: {"zeroshot": classification results, "retrieval": retrieval results}."""
    from clipalign.evaluate import resolve_lines, zero_shot_classification, zero_shot_retrieval

    results = {}
    if "zeroshot" in kinds and _eval_set(cfg, "zeroshot"):
        classnames = resolve_lines(cfg.eval.classnames, "classnames") if cfg.eval.classnames else None
        templates = resolve_lines(cfg.eval.templates, "templates") if cfg.eval.templates else None
        results["zeroshot"] = zero_shot_classification(model, _eval_set(cfg, "zeroshot"), classnames=classnames,
                                                       templates=templates, batch_size=cfg.eval.batch_size,
                                                       progress=False, precision=cfg.eval.precision,
                                                       max_image_pixels=cfg.data.max_image_pixels,
                                                       table_format=_table_format(cfg))
    if "retrieval" in kinds and _eval_set(cfg, "retrieval"):
        results["retrieval"] = zero_shot_retrieval(model, _eval_set(cfg, "retrieval"), batch_size=cfg.eval.batch_size,
                                                   progress=False, precision=cfg.eval.precision,
                                                   max_image_pixels=cfg.data.max_image_pixels,
                                                   table_format=_table_format(cfg))
    return results


def _table_format(cfg: Config) -> str | None:
    """eval.table_format for the evaluation readers: None (from the extension) for auto."""
    return None if cfg.eval.table_format == "auto" else cfg.eval.table_format


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = train_parser()
    args = parser.parse_args(argv)
    try:
        train(load_config(args.recipe, args.overrides))
    # a bad recipe or launch, a full disk, a data source that cannot be read: say what, not where
    except (ConfigError, CheckpointSaveError, DataSourceError, RunEndError) as e:
        parser.exit(2, f"clipalign-train: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
