"""WebDataset pipeline: shard URLs -> batches of (uint8 images, token ids), bad samples skipped and counted.

A shard holds samples `KEY.jpg|jpeg|png|webp` + `KEY.txt` (caption) and/or `KEY.json` (`{"caption": ...}` or
`{"captions": [...]}`). Each DataLoader worker reads its own shards, decodes and tokenizes, and yields whole
batches; every batch carries the counts of samples that worker skipped since its previous batch, by reason, so the
trainer can sum them exactly.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from clipalign.data.transforms import decode_image, train_transform

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_urls(spec: str) -> list[str]:
    """Expand a shard spec: brace patterns, several sources joined by `::`; local paths must exist.

    `pipe:` and URL sources (`s3://`, `https://`, ...) are passed through unchecked.
    """
    if not spec or not spec.strip():
        raise ValueError("data.train is empty: give a shard pattern such as /data/cc3m/{00000..00331}.tar")
    urls: list[str] = []
    for source in spec.split("::"):
        source = source.strip()
        expanded = list(braceexpand.braceexpand(source))
        missing = [u for u in expanded if _is_local(u) and not os.path.isfile(_local_path(u))]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise FileNotFoundError(f"data.train source {source!r}: {len(missing)} of {len(expanded)} shards "
                                    f"do not exist: {shown}")
        urls.extend(expanded)
    return urls


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


class SkipCounter:
    """Counts skipped samples by reason inside one worker; `take()` hands over what was counted since last time."""

    def __init__(self):
        self.pending: Counter[str] = Counter()

    def skip(self, reason: str) -> None:
        self.pending[reason] += 1

    def tar_error(self, exn: Exception) -> bool:
        """webdataset handler for unreadable shards and tar members: count and go on."""
        self.skip("unreadable_tar")
        return True

    def take(self) -> dict[str, int]:
        out, self.pending = dict(self.pending), Counter()
        return out


def caption_of(sample: dict[str, Any], rng: random.Random) -> str | None:
    """The caption of a raw sample (bytes values), from `.txt`, else `.json` caption(s); None when absent or empty.

    Raises UnicodeDecodeError / ValueError for undecodable text or JSON.
    """
    if "txt" in sample:
        text = sample["txt"].decode("utf-8").strip()
        if text:
            return text
    if "json" in sample:
        meta = json.loads(sample["json"].decode("utf-8"))
        if isinstance(meta, dict):
            captions = meta.get("captions")
            if isinstance(captions, list):
                captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
                if captions:
                    return rng.choice(captions)
            caption = meta.get("caption")
            if isinstance(caption, str) and caption.strip():
                return caption.strip()
    return None


def _image_bytes(sample: dict[str, Any]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None


def decode_samples(samples, transform: Callable, image_size: int, counter: SkipCounter,
                   rng: random.Random) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Raw tar samples -> (key, uint8 image, caption); a sample that cannot be used is skipped and counted."""
    for sample in samples:
        data = _image_bytes(sample)
        if data is None:
            counter.skip("no_image")
            continue
        try:
            caption = caption_of(sample, rng)
        except (UnicodeDecodeError, ValueError):
            counter.skip("bad_text")
            continue
        if caption is None:
            counter.skip("no_caption")
            continue
        try:
            image = transform(decode_image(data, image_size))
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
            counter.skip("bad_image")
            continue
        yield sample["__key__"], image, caption


class ShardStream(IterableDataset):
    """An endless stream of training batches from WebDataset shards.

    Args:
        urls: expanded shard URLs (see `expand_urls`).
        tokenizer: callable mapping a list of captions to a (B, context_length) tensor.
        image_size: side of the square training images.
        batch_size: samples per batch (per process).
        seed: base seed; each process and worker derives its own from it.
        resampled: draw shards with replacement (no epochs) instead of repeated shuffled passes.
        shuffle_buffer: samples kept in each worker's shuffle buffer.
        crop_scale: lower scale bound of the random resized crop.
    """

    def __init__(self, urls: list[str], tokenizer: Callable, image_size: int, batch_size: int, seed: int = 0,
                 resampled: bool = True, shuffle_buffer: int = 1000, crop_scale: float = 0.9):
        super().__init__()
        self.urls = list(urls)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.transform = train_transform(image_size, crop_scale)

    def _shard_urls(self, rank: int, world: int, worker: int, workers: int, seed: int) -> Iterator[dict[str, str]]:
        if self.resampled:
            # seeded per (rank, worker) by webdataset's worker_seed and by our seed, reproducibly
            yield from wds.ResampledShards(self.urls, seed=seed, deterministic=True)
            return
        streams = world * workers
        if len(self.urls) < streams:
            raise ValueError(f"{len(self.urls)} shards cannot feed {world} processes x {workers} workers in "
                             f"exact-pass mode; use data.resampled=true or fewer workers")
        rng = random.Random(seed)
        while True:  # one shuffled pass after another, each stream taking every `streams`-th shard
            order = list(self.urls)
            rng.shuffle(order)
            for url in order[rank * workers + worker::streams]:
                yield {"url": url}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        stream_seed = wds.utils.make_seed(self.seed, rank, worker)
        counter = SkipCounter()
        rng = random.Random(stream_seed)
        # the shard order is seeded alike on every process (exact passes slice one shared permutation)
        shard_urls = self._shard_urls(rank, world, worker, workers, self.seed)
        samples = wds.tarfile_to_samples(handler=counter.tar_error)(shard_urls)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2, rng=rng)(samples)
        keys, images, captions = [], [], []
        for key, image, caption in decode_samples(samples, self.transform, self.image_size, counter, rng):
            keys.append(key)
            images.append(image)
            captions.append(caption)
            if len(keys) == self.batch_size:
                yield {"images": torch.stack(images), "texts": self.tokenizer(captions), "keys": keys,
                       "skipped": counter.take()}
                keys, images, captions = [], [], []


def make_train_loader(urls: list[str], tokenizer: Callable, image_size: int, batch_size: int, workers: int,
                      seed: int = 0, resampled: bool = True, shuffle_buffer: int = 1000, crop_scale: float = 0.9,
                      pin_memory: bool = False) -> DataLoader:
    """A DataLoader over `ShardStream`; batching happens in the workers, so `batch_size=None` here."""
    stream = ShardStream(urls, tokenizer, image_size, batch_size, seed=seed, resampled=resampled,
                         shuffle_buffer=shuffle_buffer, crop_scale=crop_scale)
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
