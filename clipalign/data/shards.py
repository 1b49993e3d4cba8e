"""WebDataset pipeline: shard URLs -> batches of (uint8 images, token ids), bad samples skipped and counted.

A shard holds samples `KEY.jpg|jpeg|png|webp` + `KEY.txt` (caption) and/or `KEY.json` (`{"caption": ...}` or
`{"captions": [...]}`); the caption rule and the skip reasons (`STREAM_SKIP_REASONS`) are `clipalign.data.sample`'s.
Each DataLoader worker reads its own shards, decodes and tokenizes, and yields whole batches; every batch carries the
counts of samples that worker skipped since its previous batch, by reason, so the trainer can sum them exactly.
With `decode="device"` the workers leave JPEG decoding to the training process (see `clipalign.data.device_decode`);
pass every batch through `device_images` there. An image over the pixel limit (`max_image_pixels`, from its header)
is skipped as `bad_image` without being decoded; the resize follows the model's preprocess config.
"""

from __future__ import annotations

import contextlib
import os
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from clipalign.data.device_decode import DeviceJpeg, pack_batch, prepare_image
from clipalign.data.sample import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS  # re-exported: its former home
from clipalign.data.sample import caption_of, image_bytes
from clipalign.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, decode_image, geometry, train_transform

if TYPE_CHECKING:  # data and tokenizer sit side by side over config: the type alone, no import at run time
    from clipalign.tokenizer import Tokenizer

# salts that keep a worker's random streams apart (integers: make_seed hashes its arguments, and str hashes are
# salted per interpreter, which would break reproducibility)
_MIX = 1


def expand_sources(spec: str) -> list[list[str]]:
    """Expand a shard spec into one URL list per source: brace patterns, sources joined by `::`.

    Local paths must exist; `pipe:` and URL sources (`s3://`, `https://`, ...) are passed through unchecked.
    """
    if not spec or not spec.strip():
        raise ValueError("data.train is empty: give a shard pattern such as /data/cc3m/{00000..00331}.tar")
    sources = []
    for source in spec.split("::"):
        source = source.strip()
        expanded = list(braceexpand.braceexpand(source))
        missing = [u for u in expanded if _is_local(u) and not os.path.isfile(_local_path(u))]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise FileNotFoundError(f"data.train source {source!r}: {len(missing)} of {len(expanded)} shards "
                                    f"do not exist: {shown}")
        sources.append(expanded)
    return sources


def expand_urls(spec: str) -> list[str]:
    """All shard URLs of a spec, sources concatenated (see `expand_sources`)."""
    return [url for source in expand_sources(spec) for url in source]


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


def decode_samples(samples, transform: Callable, image_size: int, counter: SkipCounter,
                   sample_seed: Callable[[str], int], image_fn: Callable[[bytes], Any] | None = None,
                   max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[tuple[str, Any, str]]:
    """Raw tar samples -> (key, uint8 image, caption); a sample that cannot be used is skipped and counted.

    `sample_seed(key)` seeds the sample's random choices (which caption of several, the random crop), so they depend
    on the sample and the pass, not on which worker met it when: a resumed run draws the same ones. `image_fn(data)`,
    if given, replaces `transform(decode_image(data, image_size, max_pixels))` and runs under the same seeded RNG.
    An image over `max_pixels` (0: no limit) counts as `bad_image`, refused from its header.
    """
    if image_fn is None:
        def image_fn(data: bytes) -> torch.Tensor:
            return transform(decode_image(data, image_size, max_pixels))

    for sample in samples:
        data = image_bytes(sample)
        if data is None:
            counter.skip("no_image")
            continue
        seed = sample_seed(sample["__key__"])
        try:
            caption = caption_of(sample, random.Random(seed))
        except (UnicodeDecodeError, ValueError):
            counter.skip("bad_text")
            continue
        if caption is None:
            counter.skip("no_caption")
            continue
        try:
            with _seeded_cpu_rng(seed):
                image = image_fn(data)
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError); ours: ImageTooLarge
            counter.skip("bad_image")
            continue
        yield sample["__key__"], image, caption


@contextlib.contextmanager
def _seeded_cpu_rng(seed: int):
    """Run with torch's CPU generator seeded by `seed`, then give the process its own RNG state back.

    Not `torch.manual_seed` under `fork_rng`: on a CUDA build `manual_seed` also queues a lazy CUDA seeding call,
    capturing a stack trace each time, which cost more per sample than decoding a small image.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class _Cursor:
    """Where a worker's stream stands: the pass (epoch) and how many raw samples of it have left the shuffle buffer."""

    def __init__(self, epoch: int = 0, emitted: int = 0):
        self.epoch, self.emitted = epoch, emitted


def _mix(sources: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Endless samples drawn from `sources` with probabilities proportional to `weights` (sample-level mixing)."""
    indices = range(len(sources))
    while True:
        yield next(sources[rng.choices(indices, weights)[0]])


class ShardStream(IterableDataset):
    """An endless stream of training batches from WebDataset shards.

    Two ways to walk the shards:
      resampled (default): each worker draws shards with replacement from every source and mixes the sources'
        samples in proportion to `weights`; no epochs. Seeded per (seed, process, worker): reproducible.
      exact passes: the shards are shuffled alike on every process (one permutation per pass) and dealt out to the
        processes x workers, each of which shuffles its samples within the pass. Every sample is seen once per
        pass, and a stream can resume exactly where it stopped (see `start`).

    Every batch carries `position` = (stream, epoch, emitted): the worker's stream index (process x workers +
    worker) and how many raw samples of that pass it had consumed at the batch's last sample. Handing the latest
    consumed position of each stream back as `start` resumes an exact pass with no sample seen twice or skipped.

    Args:
        sources: expanded shard URLs, one list per source (see `expand_sources`).
        tokenizer: callable mapping a list of captions to a (B, context_length) tensor.
        image_size: side of the square training images.
        batch_size: samples per batch (per process).
        seed: base seed; each process and worker derives its own from it.
        resampled: draw shards with replacement instead of exact passes.
        weights: sampling weight per source (resampled only); default equal.
        shuffle_buffer: samples kept in each worker's shuffle buffer.
        crop_scale: lower scale bound of the random resized crop.
        start: exact passes only: {stream: (epoch, emitted)} to resume from.
        decode: `workers` (PIL in the workers) or `device`: JPEGs travel as bytes with their crop boxes, for
            `device_images` in the training process (other images are still decoded in the workers).
        max_image_pixels: images with more pixels (header size) are skipped as `bad_image`, never decoded; 0: no
            limit (`data.max_image_pixels`).
        preprocess_cfg: the model's preprocess config (`open_clip.get_model_preprocess_cfg`): its `interpolation`
            and `resize_mode` (and `fill_color`) shape the resize; None: bicubic, shortest side.
    """

    def __init__(self, sources: list[list[str]], tokenizer: Tokenizer, image_size: int, batch_size: int,
                 seed: int = 0, resampled: bool = True, weights: list[float] | None = None, shuffle_buffer: int = 1000,
                 crop_scale: float = 0.9, start: dict[int, tuple[int, int]] | None = None, decode: str = "workers",
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, preprocess_cfg: dict[str, Any] | None = None):
        super().__init__()
        if sources and isinstance(sources[0], str):
            sources = [list(sources)]  # a flat list of URLs is one source
        self.sources = [list(s) for s in sources]
        if weights and len(weights) != len(self.sources):
            raise ValueError(f"data.weights has {len(weights)} values for {len(self.sources)} sources")
        if weights and not resampled:
            raise ValueError("data.weights needs data.resampled=true: an exact pass visits every sample once")
        if weights and (min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"data.weights must be non-negative with a positive sum, got {weights}")
        if start and resampled:
            raise ValueError("an exact resume position applies to exact passes (data.resampled=false)")
        self.weights = list(weights) if weights else [1.0] * len(self.sources)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.start = dict(start or {})
        if decode not in ("workers", "device"):
            raise ValueError(f"decode must be workers or device (resolve data.decode=auto first), got {decode!r}")
        self.decode = decode
        self.crop_scale = crop_scale
        if max_image_pixels < 0:
            raise ValueError(f"max_image_pixels must be >= 0 (0: no limit), got {max_image_pixels}")
        self.max_image_pixels = max_image_pixels
        self.interpolation, self.resize_mode = geometry(preprocess_cfg)
        self.transform = train_transform(image_size, crop_scale, self.interpolation, self.resize_mode,
                                         int((preprocess_cfg or {}).get("fill_color", 0)))

    def _shuffled(self, samples: Iterator[dict], seed: int) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            return samples
        rng = random.Random(seed)
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2, rng=rng)(samples)

    def _resampled(self, rank: int, worker: int, counter: SkipCounter, cursor: _Cursor) -> Iterator[dict]:
        streams = [wds.tarfile_to_samples(handler=counter.tar_error)(
            # webdataset mixes its worker seed (process, worker) into `seed`; the source index keeps sources apart
            iter(wds.ResampledShards(urls, seed=wds.utils.make_seed(self.seed, i), deterministic=True)))
            for i, urls in enumerate(self.sources)]
        mixed = _mix(streams, self.weights, random.Random(wds.utils.make_seed(self.seed, rank, worker, _MIX)))
        for sample in self._shuffled(mixed, wds.utils.make_seed(self.seed, rank, worker)):
            cursor.emitted += 1
            yield sample

    def _exact_passes(self, stream: int, streams: int, counter: SkipCounter, cursor: _Cursor) -> Iterator[dict]:
        urls = [u for source in self.sources for u in source]
        if len(urls) < streams:
            raise ValueError(f"{len(urls)} shards cannot feed {streams} streams (processes x workers) in "
                             f"exact-pass mode; use data.resampled=true or fewer workers")
        epoch, skip = self.start.get(stream, (0, 0))
        while True:
            order = sorted(urls)
            random.Random(wds.utils.make_seed(self.seed, epoch)).shuffle(order)  # alike on every process
            mine = ({"url": u} for u in order[stream::streams])
            samples = wds.tarfile_to_samples(handler=counter.tar_error)(mine)
            for i, sample in enumerate(self._shuffled(samples, wds.utils.make_seed(self.seed, epoch, stream))):
                if i < skip:  # replaying a pass up to the resume point: read, never decoded
                    continue
                cursor.epoch, cursor.emitted = epoch, i + 1
                yield sample
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        stream = rank * workers + worker
        counter, cursor = SkipCounter(), _Cursor()
        if self.resampled:
            samples = self._resampled(rank, worker, counter, cursor)
        else:
            samples = self._exact_passes(stream, world * workers, counter, cursor)

        def sample_seed(key: str) -> int:
            return wds.utils.make_seed(self.seed, cursor.epoch, zlib.crc32(key.encode()))

        image_fn = None
        if self.decode == "device":
            def image_fn(data: bytes) -> torch.Tensor | DeviceJpeg:
                return prepare_image(data, self.image_size, self.crop_scale, self.transform, self.max_image_pixels,
                                     self.resize_mode)

        keys, images, captions = [], [], []
        for key, image, caption in decode_samples(samples, self.transform, self.image_size, counter, sample_seed,
                                                  image_fn, self.max_image_pixels):
            keys.append(key)
            images.append(image)
            captions.append(caption)
            if len(keys) == self.batch_size:
                pixels = (pack_batch(images, self.image_size, self.interpolation) if self.decode == "device"
                          else {"images": torch.stack(images)})
                yield {**pixels, "texts": self.tokenizer(captions), "keys": keys, "skipped": counter.take(),
                       "position": (stream, cursor.epoch, cursor.emitted)}
                keys, images, captions = [], [], []


def make_train_loader(sources: list[list[str]], tokenizer: Tokenizer, image_size: int, batch_size: int, workers: int,
                      pin_memory: bool = False, **stream_args) -> DataLoader:
    """A DataLoader over `ShardStream` (keyword arguments go to it: `decode`, `max_image_pixels`, `preprocess_cfg`,
    ...); the workers batch, so `batch_size=None` here."""
    stream = ShardStream(sources, tokenizer, image_size, batch_size, **stream_args)
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
