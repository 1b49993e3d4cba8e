"""Validation during training: the training loss, and image-text retrieval recall, on a fixed set of held-out pairs.

`data.val` names WebDataset shards as `data.train` does (an image and a caption per sample; the caption drawn by the
training rule, `data.captions`, with a seed of the sample's own, so always the same one). The pairs validated are the
same every time: the first `eval.val_samples` usable samples of one exact pass over the shards, in the order the
pattern lists them and each shard's own order, unshuffled, through the model's evaluation transform (resize and
centre crop, no random crop), tokenized by the model's tokenizer as in training.

They are scored in global batches of training's size (`data.batch_size` x `train.accum_steps` rows per process, x
processes), every process holding one contiguous block of rows of each batch, as in a training step; the rows that do
not fill a last global batch are left out. Per global batch the loss is the training's loss object itself
(`clipalign.loss.build_loss`: kind, mode, label smoothing, gathering across processes), under the training autocast,
in eval mode, without gradients; the validation loss is the mean over batches of each batch's global loss (the
quantity a training step's loss is). Retrieval recall@1/5/10, both ways, is `clipalign.evaluate.retrieval_metrics`
over the gathered features of all the pairs, each image's own caption its one positive.

Every process takes part (a sharded model needs all of them for each forward). Every process reads every sample's
bytes, so that all agree on which samples there are, but decodes only its own rows; an image that does not decode
(or is over the pixel limit) is found by the process holding it, and all processes then drop it alike and move the
following samples up (one all-reduce of a flag per row and batch). Which pairs are validated therefore depends on the
data only, and their global batches on the global batch size only: N processes give the loss that one process with
N times the batch gives.
"""

from __future__ import annotations

import itertools
import random
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from clipalign.config import ConfigError
from clipalign.data.sample import STREAM_SKIP_REASONS, caption_of, image_bytes
from clipalign.data.shards import expand_sources, shard_samples
from clipalign.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, decode_image
from clipalign.evaluate import retrieval_metrics
from clipalign.model import trim_padding

# why a sample of data.val is not validated, counted in the result's `skipped`: training's reasons, from the one list
VAL_SKIP_REASONS = STREAM_SKIP_REASONS


def _candidates(urls: Sequence[str], captions: Mapping[str, float] | None,
                skipped: Counter) -> Iterator[tuple[bytes, str]]:
    """(image bytes, caption) of each sample with an image and a caption, in shard order; the rest counted."""

    def unreadable(url: str, message: str) -> None:
        skipped["unreadable_tar"] += 1

    for sample in shard_samples(urls, unreadable):
        data = image_bytes(sample)
        if data is None:
            skipped["no_image"] += 1
            continue
        rng = random.Random(zlib.crc32(sample["__key__"].encode()))  # the sample's own: the same caption every time
        try:
            caption = caption_of(sample, rng, captions) if captions else caption_of(sample, rng)
        except (UnicodeDecodeError, ValueError):
            skipped["bad_text"] += 1
            continue
        if caption is None:
            skipped["no_caption"] += 1
            continue
        yield data, caption


def count_usable(urls: Sequence[str], captions: Mapping[str, float] | None = None,
                 at_most: int | None = None) -> tuple[int, Counter]:
    """How many samples of `urls` validation can use (an image and a caption; images are not decoded), counting up to
    `at_most` (None: all), and the others by reason."""
    skipped: Counter = Counter()
    found = 0
    for _ in _candidates(urls, captions, skipped):
        found += 1
        if at_most is not None and found >= at_most:
            break
    return found, skipped


def val_batches(urls: Sequence[str], transform: Callable, tokenizer: Callable, batch_size: int, samples: int,
                rank: int = 0, world: int = 1, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, captions: Mapping[str, float] | None = None,
                skipped: Counter | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's (images, token ids) of each global batch of the first `samples` usable samples of `urls`.

    A global batch is `batch_size * world` consecutive usable samples; this process holds rows
    `[rank * batch_size, (rank + 1) * batch_size)` of it. Only as many whole global batches as fit in `samples` (and
    in the shards) come out. Images are `transform(decode_image(bytes))` (the model's evaluation transform); token ids
    are `tokenizer(captions)`.

    Args:
        urls: the shards, read in this order.
        transform: PIL image -> image tensor.
        tokenizer: list of captions -> (B, context_length) token ids.
        batch_size: rows per process of a global batch.
        samples: the most samples to deliver, over all processes.
        rank, world: this process and the number of processes; every process must iterate in step with the others.
        reduce_sum: with `world > 1`, the sum over processes of a CPU tensor (an all-reduce), to agree on the rows
            whose image did not decode.
        max_pixels: images with more pixels (header size) are skipped as `bad_image` unread; 0: no limit.
        captions: caption sources and weights (`data.captions`); None: the default caption rule.
        skipped: counts of skipped samples by reason are added here (the same on every process).
    """
    if world > 1 and reduce_sum is None:
        raise ValueError("val_batches with world > 1 needs reduce_sum, to agree on images that do not decode")
    skipped = Counter() if skipped is None else skipped
    global_batch = batch_size * world
    mine = range(rank * batch_size, (rank + 1) * batch_size)
    candidates = zip(itertools.count(), _candidates(urls, captions, skipped))  # (serial, (image bytes, caption))
    for _ in range(samples // global_batch):
        window: list = []  # the global batch's samples, alike on every process
        decoded: dict[int, torch.Tensor] = {}  # this process's images, by serial
        while True:
            window += itertools.islice(candidates, global_batch - len(window))
            if len(window) < global_batch:
                return  # the shards ran out: at the same sample on every process
            bad = torch.zeros(global_batch, dtype=torch.int64)
            for i in mine:
                serial, (data, _) = window[i]
                if serial not in decoded:
                    try:
                        decoded[serial] = transform(decode_image(data, max_pixels=max_pixels))
                    except Exception:  # PIL raises many types for corrupt data; ours: ImageTooLarge
                        bad[i] = 1
            if world > 1:
                bad = reduce_sum(bad)
            if not bad.any():
                break
            skipped["bad_image"] += int((bad > 0).sum())
            window = [sample for sample, b in zip(window, bad.tolist()) if not b]  # the rest move up
        rows = [window[i] for i in mine]
        yield (torch.stack([decoded[serial] for serial, _ in rows]),
               tokenizer([caption for _, (_, caption) in rows]))


def validate(model: nn.Module, loss_fn: nn.Module, accelerator, spec: str, batch_size: int, samples: int, *,
             forward_size: int | None = None, trim_text: bool = True,
             max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, captions: Mapping[str, float] | None = None,
             memory_format: torch.memory_format = torch.contiguous_format,
             ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """The validation loss and retrieval recall of `model` on the first `samples` samples of the shards `spec`.

    Every process must call it (the loss gathers across processes, a sharded model gathers its weights). The model
    is put in eval mode and its mode restored afterwards.

    Args:
        model: the dual encoder, unwrapped (a `fully_shard`-ed one works: every process runs the same forwards).
        loss_fn: the training's loss (`build_loss(cfg.loss)`), called per global batch on this process's features.
        accelerator: the run's Accelerator: its autocast, device and processes.
        spec: shard pattern(s), as `data.val`.
        batch_size: rows per process of a global batch, training's (`data.batch_size * train.accum_steps`).
        samples: `eval.val_samples`; rounded down to whole global batches.
        forward_size: rows per forward pass (training's micro-batch, `data.batch_size`); None: `batch_size`.
        trim_text: cut token ids after each forward's longest caption where the text tower allows it, as training.
        max_image_pixels: `data.max_image_pixels`.
        captions: `data.captions`: the caption sources and weights; None: the default caption rule.
        memory_format: of the image batches (`torch.channels_last` with `train.channels_last`).
        ks: the recall@k to report.

    Returns:
        `loss` (the mean over batches of each global batch's loss), `samples`, `batches`, `global_batch`,
        `image_retrieval_recall@k` and `text_retrieval_recall@k` for each k with their chance levels (on the main
        process only), `skipped` (reason -> count) and `seconds`.

    Raises:
        ConfigError: `samples`, or the usable samples of the shards, are fewer than one global batch.
    """
    start = time.perf_counter()
    world, device = accelerator.num_processes, accelerator.device
    global_batch = batch_size * world
    if samples < global_batch:
        raise ConfigError(f"eval.val_samples={samples} is less than one global batch of validation "
                          f"({batch_size} rows x {world} processes = {global_batch})")
    urls = [url for source in expand_sources(spec, "data.val") for url in source]
    forward_size = forward_size or batch_size
    trim = trim_text and getattr(model, "trims_text", False)

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t.to(device), reduction="sum").cpu()

    skipped: Counter = Counter()
    losses, image_parts, text_parts = [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, texts in val_batches(urls, model.preprocess, model.tokenizer, batch_size, samples,
                                             accelerator.process_index, world, reduce_sum, max_image_pixels,
                                             captions, skipped):
                outs = []
                for i in range(0, batch_size, forward_size):  # training's micro-batches, scored together
                    ids = texts[i:i + forward_size]
                    ids = trim_padding(ids) if trim else ids
                    pixels = images[i:i + forward_size].to(device, non_blocking=True, memory_format=memory_format)
                    with accelerator.autocast():
                        outs.append(model(pixels, ids.to(device, non_blocking=True)))
                image = torch.cat([out["image_features"] for out in outs])  # (batch_size, D)
                text = torch.cat([out["text_features"] for out in outs])  # (batch_size, D)
                with accelerator.autocast():
                    loss = loss_fn(image, text, outs[-1]["logit_scale"], outs[-1].get("logit_bias"))
                losses.append(accelerator.reduce(loss.detach().float(), reduction="mean"))  # the global loss
                image_parts.append(accelerator.gather(image.float().contiguous()).cpu())  # (global_batch, D)
                text_parts.append(accelerator.gather(text.float().contiguous()).cpu())
    finally:
        model.train(was_training)
    if not losses:
        raise ConfigError(f"data.val: fewer usable samples than one global batch of validation ({global_batch}); "
                          f"skipped: {dict(skipped) or 'none'}")
    validated = len(losses) * global_batch
    if validated < samples - samples % global_batch:
        warnings.warn(f"data.val holds {validated} usable samples in whole global batches of {global_batch}, fewer "
                      f"than eval.val_samples={samples}: validating on those", stacklevel=2)
    result: dict[str, Any] = {"loss": torch.stack(losses).double().mean().item(), "samples": validated,
                              "batches": len(losses), "global_batch": global_batch}
    if accelerator.is_main_process:
        # rows of the gathered features are the samples in order: caption i belongs to image i
        recall = retrieval_metrics(torch.cat(text_parts) @ torch.cat(image_parts).T, torch.arange(validated), ks)
        result.update({k: v for k, v in recall.items() if k not in ("num_images", "num_texts")})
    result.update(skipped=dict(skipped), seconds=round(time.perf_counter() - start, 3))
    return result
