"""WebDataset pipeline: shard URLs -> batches of (uint8 images, token ids), bad samples skipped and counted.

A shard holds samples `KEY.jpg|jpeg|png|webp` + `KEY.txt` (caption) and/or `KEY.json` (`{"caption": ...}` or
`{"captions": [...]}`); the caption rule and the skip reasons (`STREAM_SKIP_REASONS`) are `clipalign.data.sample`'s.
Each DataLoader worker reads its own shards, decodes and tokenizes, and yields whole batches; every batch carries the
counts of samples that worker skipped since its previous batch, by reason, so the trainer can sum them exactly.
With `decode="device"` the workers leave JPEG decoding to the training process (see `clipalign.data.device_decode`);
pass every batch through `device_images` there. An image over the pixel limit (`max_image_pixels`, from its header)
is skipped as `bad_image` without being decoded; the resize follows the model's preprocess config.

Shards are read by `read_shard`, which delivers a sample only once it is whole and counts a shard that cannot be read
to its end once (`unreadable_tar`), the sample it was reading when it broke going with it. A source whose shards keep
failing, or a worker that brings no batch for `batch_timeout` seconds, stops the run with a `DataSourceError` that
names the source, the last error and the counts so far (see `StreamGuard`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import re
import subprocess
import tarfile
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from clipalign.config import check_caption_sources
from clipalign.data.curation import SampleFilter, filter_samples
from clipalign.data.device_decode import DEFAULT_DECODE_BUDGET_MB, DeviceJpeg, budget_pixels, pack_batch, prepare_image
from clipalign.data.sample import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS  # re-exported: its former home
from clipalign.data.sample import caption_of, image_bytes
from clipalign.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, decode_image, geometry, train_transform

if TYPE_CHECKING:  # data and tokenizer sit side by side over config: the type alone, no import at run time
    from clipalign.tokenizer import Tokenizer

# salts that keep a worker's random streams apart (integers: make_seed hashes its arguments, and str hashes are
# salted per interpreter, which would break reproducibility)
_MIX = 1


def expand_sources(spec: str, key: str = "data.train") -> list[list[str]]:
    """Expand a shard spec into one URL list per source: brace patterns, sources joined by `::`.

    Local paths must exist; a local glob pattern (`dir/*.tar`, `shard-0?.tar`) expands to the files it matches,
    sorted, as a brace pattern expands. A directory is refused with the pattern of the shards in it. `pipe:` and URL
    sources (`s3://`, `https://`, ...) are passed through unchecked. `key` names the spec in the errors (`data.train`,
    `data.val`).
    """
    if not spec or not spec.strip():
        raise ValueError(f"{key} is empty: give a shard pattern such as /data/cc3m/{{00000..00331}}.tar")
    sources = []
    for source in spec.split("::"):
        source = source.strip()
        expanded = []
        for url in braceexpand.braceexpand(source):
            if _is_local(url) and glob.has_magic(_local_path(url)):
                matches = sorted(glob.glob(_local_path(url)))
                if not matches:
                    raise FileNotFoundError(f"{key} source {source!r}: the pattern {url!r} matches no file")
                expanded += matches
            elif _is_local(url) and os.path.isdir(_local_path(url)):
                raise ValueError(f"{key} source {source!r} is a directory: {_directory_pattern(_local_path(url))}")
            else:
                expanded.append(url)
        missing = [u for u in expanded if _is_local(u) and not os.path.isfile(_local_path(u))]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise FileNotFoundError(f"{key} source {source!r}: {len(missing)} of {len(expanded)} shards "
                                    f"do not exist: {shown}")
        sources.append(expanded)
    return sources


def _directory_pattern(directory: str) -> str:
    """What to write instead of a directory of shards: the brace pattern of its tars, or what it lacks."""
    tars = sorted(name for name in os.listdir(directory) if name.endswith(".tar"))
    path = directory.rstrip("/")
    if not tars:
        return f"it holds no .tar file; give a shard pattern such as {path}/{{00000..00099}}.tar"
    if len(tars) == 1:
        return f"give its shard itself: {path}/{tars[0]}"
    first, last = (re.fullmatch(r"(.*?)(\d+)\.tar", name) for name in (tars[0], tars[-1]))
    if first and last and first.group(1) == last.group(1) and len(first.group(2)) == len(last.group(2)) \
            and len(tars) == int(last.group(2)) - int(first.group(2)) + 1:
        return (f"give its shards as a pattern: {path}/{first.group(1)}{{{first.group(2)}..{last.group(2)}}}.tar "
                f"({len(tars)} shards)")
    return f"give its shards as a pattern: '{path}/*.tar' ({len(tars)} shards, read in sorted order)"


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

    def take(self) -> dict[str, int]:
        out, self.pending = dict(self.pending), Counter()
        return out


# ----------------------------------------------------------------------------------------------------------------
# reading one shard


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (`__meta__`, `__index__/...`): not sample files
_PIPE_CLOSE_WAIT = 5.0  # seconds a `pipe:` command gets to exit once its output is closed, before it is killed


class _StrictTarInfo(tarfile.TarInfo):
    """A tar member header that refuses what `tarfile` takes quietly for the archive's end: no header at all where
    one should be (a file cut between members), a header cut short, or a header that is not one (garbage). Only the
    end-of-archive block (a block of zeros) ends an archive; a cut anywhere is then a read error, like a cut inside
    a member's data."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EmptyHeaderError:
            if tarfile_.fileobj.tell() == 0:
                raise tarfile.ReadError("no data at all (an empty file or an empty command output)") from None
            raise tarfile.ReadError("unexpected end of data: the archive stops without its end-of-archive block "
                                    "(cut between members)") from None
        except tarfile.TruncatedHeaderError:
            raise tarfile.ReadError("unexpected end of data inside a member header (cut short)") from None
        except tarfile.InvalidHeaderError as exn:
            raise tarfile.ReadError(f"not a tar member header ({exn})") from None


def read_shard(url: str, bad_member: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard, in order, each delivered only once it is whole.

    A sample is whole when the header of the next sample's first member has been read, or the archive's
    end-of-archive block. Reading stops at the first error (a source that cannot be opened, a `pipe:` command that
    fails, a file cut short or corrupt anywhere, including between members): it is raised, and the sample being read
    then, whose members may be cut or missing, is dropped. So a shard cut inside sample K+1 (K samples before it)
    delivers those K samples, then one error; a cut between two samples, or inside the first header of one, drops
    the sample before it too, since nothing shows that it was complete.

    A sample as webdataset's `tarfile_to_samples` gives it: `{"__key__": ..., "__url__": url, "jpg": b"...", ...}`,
    extensions lower-cased, metadata members (`__...__`) and non-file members left out. A second member of the same
    name in a sample is left out and reported to `bad_member(message)`, the sample kept.

    Raises:
        ShardReadError: opening or reading failed; its message is the error's type and text, and for a `pipe:`
            source how the command exited (`the command exited with status 1 (...)`).
    """
    stream, closed = None, False
    try:
        stream = gopen(url)
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            sample: dict[str, Any] | None = None
            for member in tar:
                tar.members = []  # a stream is read once: keep no list of its members
                name = member.name
                if not member.isreg() or _META.match(name):
                    continue
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue
                if sample is not None and prefix != sample["__key__"]:
                    yield sample  # the next sample's header is here: the previous one is whole
                    sample = None
                data = tar.extractfile(member).read()
                if sample is None:
                    sample = {"__key__": prefix, "__url__": url}
                suffix = suffix.lower()
                if suffix in sample:
                    if bad_member is not None:
                        bad_member(f"{url}: {name}: a second .{suffix} member in sample {prefix}, left out")
                    continue
                sample[suffix] = data
            if sample is not None:
                yield sample
    except Exception as exn:
        status, closed = (_close(stream) if stream is not None else None), True
        raise ShardReadError(url, _describe_failure(exn, status)) from exn
    finally:
        if stream is not None and not closed:
            _close(stream)


def shard_samples(urls: Iterable[str], on_error: Callable[[str, str], None],
                  bad_member: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The whole samples of each shard in turn (`read_shard`); a shard that cannot be read to its end is reported
    once, as `on_error(url, message)`, and the next one read. What the tools that walk shards once (the inspector,
    the tokenizer trainer, labelled evaluation shards) share with training's count of broken shards."""
    for url in urls:
        try:
            yield from read_shard(url, bad_member)
        except ShardReadError as exn:
            on_error(url, str(exn))


class ShardReadError(Exception):
    """A shard that could not be opened or read to its end (`read_shard`): `url`, and why."""

    def __init__(self, url: str, reason: str):
        super().__init__(reason)
        self.url = url


def _close(stream: Any) -> int | None:
    """Close a shard's stream. A `pipe:` command (webdataset's `Pipe`) gets `_PIPE_CLOSE_WAIT` seconds to exit, then
    is killed (so that a hung command cannot hold the worker); its exit status is returned, else None."""
    proc = getattr(stream, "proc", None)
    if not isinstance(proc, subprocess.Popen):
        with contextlib.suppress(Exception):
            stream.close()
        return None
    with contextlib.suppress(Exception):
        stream.stream.close()  # the Pipe's own close would wait up to two hours, then raise on a non-zero status
    try:
        status = proc.wait(_PIPE_CLOSE_WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None  # killed by us: its status says nothing about the source
    stream.status = status
    return status


def _describe_failure(exn: Exception, status: int | None) -> str:
    """`ExceptionType: message` of a failed read; for a `pipe:` command that exited with an error, its status."""
    text = f"{type(exn).__name__}: {exn}"
    if not status or status in (141, -13):  # 0, or SIGPIPE: the command only stopped because we stopped reading
        return text
    if isinstance(exn, OSError) and f"exit {status}" in str(exn):  # webdataset's Pipe says only that, with its args
        return f"the command exited with status {status}"
    return f"the command exited with status {status} ({text})"


# ----------------------------------------------------------------------------------------------------------------
# a stream that cannot go on


class DataSourceError(RuntimeError):
    """The training stream cannot go on: a source keeps failing (`data.max_source_failures`), or no batch comes
    (`data.batch_timeout`). Raised in a DataLoader worker, it stops the run with its message (see `TrainLoader`)."""


class DataStallWarning(UserWarning):
    """Batches have not come for a while, and the workers report skipped samples meanwhile (`TrainLoader`)."""


def describe_source(urls: list[str]) -> str:
    """A source's shards in a few words: its one URL, or the first and last and how many."""
    return urls[0] if len(urls) == 1 else f"{urls[0]} .. {urls[-1]} ({len(urls)} shards)"


def _counts(counts: dict[str, int]) -> str:
    shown = ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items()) if n)
    return shown or "none"


# What most often makes a stream reject every sample, by the reason that rejected most of them
_LIKELY_FIX = {
    "no_caption": "the samples carry no caption: no .txt and no caption/captions field in a .json (data.captions can "
                  "name other .json fields)",
    "no_image": "the samples carry no image member (.jpg, .jpeg, .png or .webp)",
    "bad_image": "the images do not decode (corrupt, truncated, or over data.max_image_pixels)",
    "bad_text": "the .txt or .json members cannot be read (not UTF-8, not JSON)",
    "unreadable_tar": "the shards cannot be read as tar files",
    "no_id": "no sample has the id data.keep looks up: with data.keep_id=uid each needs a .json with a DataComp uid; "
             "a keep-list of sample keys needs data.keep_id=key",
    "not_in_keep_list": "no sample is on the data.keep list: check data.keep_id (uid or key) and that the list was "
                        "made for these shards",
    "no_score": "no sample has the field data.min_score names",
    "below_min_score": "every sample is below data.min_score",
    "no_probability": "no sample has a keep probability (data.keep_probability)",
    "dropped_by_probability": "data.keep_probability dropped every sample",
}


def unusable_stream_message(what: str, skipped: dict[str, int], filtered: dict[str, int], sources: list[str]) -> str:
    """Why a stream yields nothing: the counts by reason, the likely fix for the commonest one, and where to look."""
    reasons = {**skipped, **filtered}
    top = max(reasons, key=reasons.get) if reasons else ""
    fix = _LIKELY_FIX.get(top, "")
    pattern = sources[0].split(" ")[0] if sources else "SHARDS"
    return (f"{what}: skipped {_counts(skipped)}; filtered out {_counts(filtered)}."
            f"{f' Most likely {fix}.' if fix else ''} Look at what the shards hold with "
            f"`clipalign-inspect-shards {pattern}`; sources: {'; '.join(sources)}")


class StreamGuard(SkipCounter):
    """One worker's skip counts, and the two bounds that stop a stream which cannot go on (`DataSourceError`).

    Failing sources: a read of a shard fails when it raises before the shard gave a sample. Each source (a `::`
    group of `data.train`) keeps the failed reads since it last gave a sample; at `max_failures` the stream stops,
    naming the source, the shards that failed and the last error. A shard that failed while other shards of its
    source still gave samples is a bad shard, not a dead source: it is counted (`unreadable_tar`) every time it is
    read, but no longer adds to its source's failures.

    No usable sample: the stream stops, with the counts by reason and the likely fix, after `max_unusable` samples in
    a row were skipped or filtered out (0: no bound), and at the end of a whole pass over its shards (exact passes)
    that gave no usable sample: within seconds, not at the batch timeout.

    No batch: `tick()`, called for every sample read, skipped or replayed and every shard read, stops the stream when
    no batch has left it for `batch_timeout` seconds of its own running time (0: never). Time the consumer holds a
    batch (a training step, an evaluation) does not count, nor does replaying a pass up to an exact resume position.
    """

    def __init__(self, sources: list[list[str]], stream: int, max_failures: int = 10, batch_timeout: float = 0.0,
                 heartbeat_every: float = 60.0, max_unusable: int = 0):
        super().__init__()
        self.names = [describe_source(urls) for urls in sources]
        self.stream = stream
        self.max_failures, self.batch_timeout, self.heartbeat_every = max_failures, batch_timeout, heartbeat_every
        self.total: Counter[str] = Counter()  # skipped by this worker since it started
        # filtered out by the curation settings (data.keep, ...; `clipalign.data.curation`): since the last item, and
        # since the worker started
        self.filtered: Counter[str] = Counter()
        self.filtered_total: Counter[str] = Counter()
        self.failures = [Counter() for _ in sources]  # per source: url -> failed reads since it last gave a sample
        self.bad_shards: list[set[str]] = [set() for _ in sources]
        self.last_error = ""
        self.waiting_since = self.last_item = time.monotonic()
        self.max_unusable = max_unusable
        self.usable = 0  # samples that reached a batch
        self.seen = 0  # samples that reached a batch, were skipped or filtered out
        self.usable_since_batch = 0
        self.seen_at_batch = 0
        self.unusable_in_a_row = 0

    # -- counts

    def skip(self, reason: str) -> None:
        self.count(reason)
        self._unusable()
        self.tick()

    def use(self) -> None:
        """A sample that made it into a batch."""
        self.usable += 1
        self.seen += 1
        self.usable_since_batch += 1
        self.unusable_in_a_row = 0

    def _unusable(self) -> None:
        self.seen += 1
        self.unusable_in_a_row += 1
        if self.max_unusable and self.unusable_in_a_row >= self.max_unusable:
            raise DataSourceError(unusable_stream_message(
                f"data stream {self.stream}: {self.unusable_in_a_row} samples in a row were skipped or filtered out "
                f"(data.max_unusable={self.max_unusable}), none usable since {self.usable} earlier ones",
                dict(self.total), dict(self.filtered_total), self.names))

    def pass_ended(self, before: tuple[int, int], shards: int) -> None:
        """A whole pass over this stream's `shards` ended (exact passes; `before`: (usable, seen) at its start): it
        must have given a usable sample. A pass that read no sample at all is the failing sources' bound's to judge
        (`data.max_source_failures`), which names the shards and their errors."""
        if self.usable == before[0] and self.seen > before[1]:
            raise DataSourceError(unusable_stream_message(
                f"data stream {self.stream}: a whole pass over its {shards} shards gave no usable sample",
                dict(self.total), dict(self.filtered_total), self.names))

    def count(self, reason: str) -> None:
        self.pending[reason] += 1
        self.total[reason] += 1

    def filter(self, reason: str) -> None:
        """A sample the curation settings filtered out (`clipalign.data.curation.FILTER_REASONS`)."""
        self.filtered[reason] += 1
        self.filtered_total[reason] += 1
        self._unusable()
        self.tick()

    def take_filtered(self) -> dict[str, int]:
        out, self.filtered = dict(self.filtered), Counter()
        return out

    def bad_member(self, message: str) -> None:
        """A member left out of its sample (`read_shard`): counted as `unreadable_tar`, the shard read on. No `tick`
        here: raised inside `read_shard`, a stall would pass for the shard's own read error."""
        self.last_error = message
        self.count("unreadable_tar")

    # -- failing sources

    def read_ok(self, source: int) -> None:
        """The source gave a sample: the shards that failed since are bad shards, not a sign of a dead source."""
        if self.failures[source]:
            self.bad_shards[source].update(self.failures[source])
            self.failures[source].clear()

    def read_failed(self, source: int, url: str, error: str, samples: int) -> None:
        """A shard could not be read to its end (after `samples` samples): counted once, as `unreadable_tar`."""
        self.last_error = f"{url}: {error}"
        self.count("unreadable_tar")
        if samples == 0 and url not in self.bad_shards[source]:
            self.failures[source][url] += 1
            failed = sum(self.failures[source].values())
            if failed >= self.max_failures:
                shards = ", ".join(f"{u} ({n}x)" for u, n in self.failures[source].most_common(3))
                more = len(self.failures[source]) - 3
                raise DataSourceError(
                    f"data.train source {source + 1} of {len(self.names)} ({self.names[source]}): {failed} reads in "
                    f"a row failed with no sample between (data.max_source_failures={self.max_failures}): "
                    f"{shards}{f' and {more} more shards' if more > 0 else ''}; last error: {self.last_error}; "
                    f"skipped so far by this worker (stream {self.stream}): {_counts(self.total)}. Check that the "
                    f"source can be read (run a pipe: command by hand), or leave it out of data.train")
        self.tick()

    # -- no batch

    def tick(self) -> None:
        if self.batch_timeout and time.monotonic() - self.waiting_since > self.batch_timeout:
            last = f"; last error: {self.last_error}" if self.last_error else ""
            what = f"data stream {self.stream} brought no batch in {self.batch_timeout:g} s (data.batch_timeout)"
            if self.seen == self.seen_at_batch:  # no sample at all: a read this slow, or stuck
                raise DataSourceError(
                    f"{what}: no sample came from its sources in that time{last}; sources: {'; '.join(self.names)}. "
                    f"Raise data.batch_timeout if the storage is this slow (0 = wait forever)")
            if not self.usable_since_batch:  # samples came, none usable: the batch timeout is not what to change
                raise DataSourceError(unusable_stream_message(f"{what} and no usable sample since the last batch"
                                                              f"{last}", dict(self.total), dict(self.filtered_total),
                                                              self.names))
            filtered = (f"; filtered out by data.keep/keep_probability/min_score: {_counts(self.filtered_total)}"
                        if self.filtered_total else "")
            raise DataSourceError(
                f"{what}, though samples were coming ({self.usable_since_batch} since the last batch): skipped so far "
                f"by this worker: {_counts(self.total)}{filtered}{last}; sources: {'; '.join(self.names)}. "
                f"Raise data.batch_timeout if batches are this slow to come (0 = wait forever)")

    def progress(self) -> None:
        """Work that is not a batch but is no stall either (replaying a pass up to a resume position)."""
        self.waiting_since = time.monotonic()

    def heartbeat_due(self) -> bool:
        return time.monotonic() - self.last_item >= self.heartbeat_every

    def resumed(self, paused_at: float, batch: bool) -> None:
        """The consumer asked for the next item, after the stream yielded one at `paused_at`."""
        now = time.monotonic()
        self.last_item = now
        if batch:
            self.waiting_since = now
            self.usable_since_batch, self.seen_at_batch = 0, self.seen
        else:  # a heartbeat: the time the consumer held it is not the stream's
            self.waiting_since += now - paused_at

    def heartbeat(self) -> dict[str, Any]:
        return {"heartbeat": True, "stream": self.stream, "skipped": self.take(), "filtered": self.take_filtered(),
                "last_error": self.last_error}


def decode_samples(samples: Iterable[dict | None], transform: Callable, image_size: int, counter: SkipCounter,
                   sample_seed: Callable[[str], int], image_fn: Callable[[bytes], Any] | None = None,
                   max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                   ticks: bool = False,
                   captions: dict[str, float] | None = None) -> Iterator[tuple[str, Any, str] | None]:
    """Raw tar samples -> (key, uint8 image, caption); a sample that cannot be used is skipped and counted.

    `sample_seed(key)` seeds the sample's random choices (which caption of several, the random crop), so they depend
    on the sample and the pass, not on which worker met it when: a resumed run draws the same ones. `captions`: the
    caption sources and weights (`data.captions`, see `caption_of`); None: the default caption rule. `image_fn(data)`,
    if given, replaces `transform(decode_image(data, image_size, max_pixels))` and runs under the same seeded RNG.
    An image over `max_pixels` (0: no limit) counts as `bad_image`, refused from its header.

    With `ticks`, a skipped sample yields None, and so does a None in `samples`: the consumer gets a turn while no
    sample comes (`ShardStream` sends its heartbeats then).
    """
    if image_fn is None:
        def image_fn(data: bytes) -> torch.Tensor:
            return transform(decode_image(data, image_size, max_pixels))

    def decode(sample: dict) -> tuple[str, Any, str] | str:
        """The sample decoded, or the reason it is skipped."""
        data = image_bytes(sample)
        if data is None:
            return "no_image"
        seed = sample_seed(sample["__key__"])
        try:
            caption = caption_of(sample, random.Random(seed), captions)
        except (UnicodeDecodeError, ValueError):
            return "bad_text"
        if caption is None:
            return "no_caption"
        try:
            with _seeded_cpu_rng(seed):
                return sample["__key__"], image_fn(data), caption
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError); ours: ImageTooLarge
            return "bad_image"

    for sample in samples:
        out = None if sample is None else decode(sample)
        if isinstance(out, str):
            counter.skip(out)
            out = None
        if out is not None or ticks:
            yield out


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



def _read_shards(shards: Iterable[tuple[int, str]], guard: StreamGuard) -> Iterator[dict]:
    """The samples of a sequence of (source index, url) shards, read with `read_shard`; a shard that fails is counted
    once and the next one read, until `guard` stops the stream."""
    for source, url in shards:
        samples = 0
        try:
            for sample in read_shard(url, guard.bad_member):
                if samples == 0:
                    guard.read_ok(source)
                samples += 1
                yield sample
        except ShardReadError as exn:
            guard.read_failed(source, url, str(exn), samples)
        guard.tick()


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

    Every batch also carries `skipped`, the samples (and unreadable shards) this worker skipped since its previous
    item, by reason. With `heartbeats`, a worker that has yielded nothing for `heartbeat_every` seconds while it
    skips samples or replays a pass yields `{"heartbeat": True, "skipped": ..., "stream": ..., "last_error": ...}`
    instead of a batch: its counts so far, and a sign of life for the DataLoader's timeout (`TrainLoader` absorbs
    them). A source that keeps failing or a stream that brings no batch stops with a `DataSourceError`
    (`StreamGuard`).

    With a `sample_filter` (the curation settings, `clipalign.data.curation.SampleFilter`), each raw sample is judged
    right after the cursor counted it and before anything is decoded, with the sample's own seed; one that is
    filtered out is counted in `filtered` (batches and heartbeats, by reason), apart from `skipped`. Positions stay
    in raw samples, so an exact resume filters the same samples.

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
        decode: `workers` (PIL in the workers) or `device`: JPEGs travel as bytes with their crop boxes, for a
            `DeviceDecoder` in the training process (other images are still decoded in the workers).
        decode_budget_mb: with `device`, the decoded size (MiB of RGB) of one batch's device rows at most; the largest
            JPEGs past it are decoded in the workers.
        teacher_tokenizer: distillation from a teacher with its own tokenizer: each batch also carries the captions'
            ids for it, `teacher_texts`.
        max_image_pixels: images with more pixels (header size) are skipped as `bad_image`, never decoded; 0: no
            limit (`data.max_image_pixels`).
        preprocess_cfg: the model's preprocess config (`open_clip.get_model_preprocess_cfg`): its `interpolation`
            and `resize_mode` (and `fill_color`) shape the resize; None: bicubic, shortest side.
        max_source_failures: failed shard reads of one source in a row, with no sample between, that stop the
            stream (`data.max_source_failures`).
        max_unusable: samples in a row skipped or filtered out that stop the stream, saying why
            (`data.max_unusable`; 0: no bound). A whole exact pass without a usable sample stops it too.
        batch_timeout: seconds a worker may run without bringing a batch before it stops the stream; 0: no limit
            (`data.batch_timeout`).
        heartbeats: yield heartbeat items (see above); `make_train_loader` asks for them.
        heartbeat_every: seconds between heartbeats; None: a quarter of `batch_timeout`, at most 60.
        captions: caption sources and weights (`data.captions`: {`txt` | `json.FIELD`: weight}); each sample draws
            one of those it has with its own seed (`clipalign.data.sample.draw_caption`). None or {}: the default
            caption rule.
        sample_filter: the curation settings (`SampleFilter.from_config`: data.keep, keep_probability, min_score);
            None: every sample goes on to decoding.
    """

    def __init__(self, sources: list[list[str]], tokenizer: Tokenizer, image_size: int, batch_size: int,
                 seed: int = 0, resampled: bool = True, weights: list[float] | None = None, shuffle_buffer: int = 1000,
                 crop_scale: float = 0.9, start: dict[int, tuple[int, int]] | None = None, decode: str = "workers",
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, preprocess_cfg: dict[str, Any] | None = None,
                 max_source_failures: int = 10, batch_timeout: float = 600.0, heartbeats: bool = False,
                 max_unusable: int = 20_000,
                 heartbeat_every: float | None = None, captions: dict[str, float] | None = None,
                 sample_filter: SampleFilter | None = None, decode_budget_mb: float = DEFAULT_DECODE_BUDGET_MB,
                 teacher_tokenizer: Tokenizer | None = None):
        super().__init__()
        self.teacher_tokenizer = teacher_tokenizer
        self.sample_filter = sample_filter
        # the sources' names and weights, checked as data.captions is (ValueError naming the bad entry)
        self.caption_sources = check_caption_sources(captions) if captions else None
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
        if decode_budget_mb <= 0:
            raise ValueError(f"decode_budget_mb must be > 0, got {decode_budget_mb}")
        self.decode_budget = budget_pixels(decode_budget_mb)
        self.crop_scale = crop_scale
        if max_image_pixels < 0:
            raise ValueError(f"max_image_pixels must be >= 0 (0: no limit), got {max_image_pixels}")
        self.max_image_pixels = max_image_pixels
        if max_source_failures < 1:
            raise ValueError(f"max_source_failures must be >= 1, got {max_source_failures}")
        if batch_timeout < 0:
            raise ValueError(f"batch_timeout must be >= 0 (0: no limit), got {batch_timeout}")
        self.max_source_failures, self.batch_timeout = max_source_failures, batch_timeout
        if max_unusable < 0:
            raise ValueError(f"max_unusable must be >= 0 (0: no bound), got {max_unusable}")
        self.max_unusable = max_unusable
        self.heartbeats = heartbeats
        if heartbeat_every is None:
            heartbeat_every = min(60.0, batch_timeout / 4) if batch_timeout else 60.0
        self.heartbeat_every = heartbeat_every
        self.interpolation, self.resize_mode = geometry(preprocess_cfg)
        self.transform = train_transform(image_size, crop_scale, self.interpolation, self.resize_mode,
                                         int((preprocess_cfg or {}).get("fill_color", 0)))

    def _shuffled(self, samples: Iterator[dict], seed: int) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            return samples
        rng = random.Random(seed)
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2, rng=rng)(samples)

    def _resampled(self, rank: int, worker: int, guard: StreamGuard, cursor: _Cursor) -> Iterator[dict]:
        streams = [_read_shards(
            # webdataset mixes its worker seed (process, worker) into `seed`; the source index keeps sources apart
            ((i, shard["url"]) for shard in wds.ResampledShards(urls, seed=wds.utils.make_seed(self.seed, i),
                                                                 deterministic=True)), guard)
            for i, urls in enumerate(self.sources)]
        mixed = _mix(streams, self.weights, random.Random(wds.utils.make_seed(self.seed, rank, worker, _MIX)))
        for sample in self._shuffled(mixed, wds.utils.make_seed(self.seed, rank, worker)):
            cursor.emitted += 1
            yield sample

    def _exact_passes(self, stream: int, streams: int, guard: StreamGuard, cursor: _Cursor) -> Iterator[dict | None]:
        shards = [(i, u) for i, source in enumerate(self.sources) for u in source]
        if len(shards) < streams:
            raise ValueError(f"{len(shards)} shards cannot feed {streams} streams (processes x workers) in "
                             f"exact-pass mode; use data.resampled=true or fewer workers")
        epoch, skip = self.start.get(stream, (0, 0))
        while True:
            order = sorted(shards, key=lambda shard: shard[1])
            random.Random(wds.utils.make_seed(self.seed, epoch)).shuffle(order)  # alike on every process
            mine = order[stream::streams]
            before, whole = (guard.usable, guard.seen), skip == 0  # a resumed pass is judged from its next one on
            samples = _read_shards(mine, guard)
            for i, sample in enumerate(self._shuffled(samples, wds.utils.make_seed(self.seed, epoch, stream))):
                if i < skip:  # replaying a pass up to the resume point: read, never decoded; no stall
                    guard.progress()
                    if guard.heartbeat_due():
                        yield None
                    continue
                cursor.epoch, cursor.emitted = epoch, i + 1
                yield sample
            if whole:
                guard.pass_ended(before, len(mine))
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        stream = rank * workers + worker
        guard = StreamGuard(self.sources, stream, self.max_source_failures, self.batch_timeout, self.heartbeat_every,
                            self.max_unusable)
        cursor = _Cursor()
        if self.resampled:
            samples = self._resampled(rank, worker, guard, cursor)
        else:
            samples = self._exact_passes(stream, world * workers, guard, cursor)

        def sample_seed(key: str) -> int:
            return wds.utils.make_seed(self.seed, cursor.epoch, zlib.crc32(key.encode()))

        if self.sample_filter is not None:  # curation: each sample the cursor counted, judged before decoding
            samples = filter_samples(samples, self.sample_filter, guard.filter, sample_seed)

        image_fn = None
        if self.decode == "device":
            def image_fn(data: bytes) -> torch.Tensor | DeviceJpeg:
                return prepare_image(data, self.image_size, self.crop_scale, self.transform, self.max_image_pixels,
                                     self.resize_mode, self.decode_budget)

        keys, images, captions = [], [], []
        for item in decode_samples(samples, self.transform, self.image_size, guard, sample_seed, image_fn,
                                   self.max_image_pixels, ticks=self.heartbeats, captions=self.caption_sources):
            guard.tick()
            if item is None:  # a skipped or replayed sample: time for a heartbeat?
                if guard.heartbeat_due():
                    paused_at = time.monotonic()
                    yield guard.heartbeat()
                    guard.resumed(paused_at, batch=False)
                continue
            key, image, caption = item
            guard.use()
            keys.append(key)
            images.append(image)
            captions.append(caption)
            if len(keys) == self.batch_size:
                pixels = (pack_batch(images, self.image_size, self.interpolation, self.decode_budget)
                          if self.decode == "device"
                          else {"images": torch.stack(images)})
                paused_at = time.monotonic()
                if self.teacher_tokenizer is not None:  # distillation from a teacher with a tokenizer of its own
                    pixels["teacher_texts"] = self.teacher_tokenizer(captions)
                yield {**pixels, "texts": self.tokenizer(captions), "keys": keys, "skipped": guard.take(),
                       "filtered": guard.take_filtered(), "position": (stream, cursor.epoch, cursor.emitted)}
                guard.resumed(paused_at, batch=True)
                keys, images, captions = [], [], []


class TrainLoader(DataLoader):
    """The DataLoader of `make_train_loader`: it yields the stream's batches only. Heartbeats are absorbed (their
    skip and filter counts are added to the next batch's `skipped` and `filtered`, and reported by a
    `DataStallWarning` while batches do not come), and the errors that stop the stream come out as one
    `DataSourceError` with a plain message: a worker's (without the worker's traceback around it), or the
    DataLoader's own timeout (a worker blocked in a read)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return _Batches(super().__iter__(), self.dataset, self.timeout)


class _Batches:
    def __init__(self, batches: Iterator[dict[str, Any]], stream: ShardStream, timeout: float):
        self.batches, self.stream, self.timeout = batches, stream, timeout
        self.skipped: Counter[str] = Counter()  # everything the workers reported, for the error messages
        self.pending: Counter[str] = Counter()  # reported by heartbeats, not yet handed on with a batch
        self.pending_filtered: Counter[str] = Counter()  # the same for the samples filtered out (data.keep, ...)
        self.last_batch = self.last_warning = time.monotonic()

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            item = self._next()
            self.skipped.update(item["skipped"])
            if not item.get("heartbeat"):
                break
            self.pending.update(item["skipped"])
            self.pending_filtered.update(item.get("filtered", {}))
            now = time.monotonic()
            waited = now - self.last_batch
            if (self.pending or self.pending_filtered) and \
                    min(waited, now - self.last_warning) >= self.stream.heartbeat_every:
                self.last_warning = now
                last = f"; last error: {item['last_error']}" if item["last_error"] else ""
                filtered = (f" and filtered out {_counts(self.pending_filtered)} (data.keep, keep_probability, "
                            f"min_score)" if self.pending_filtered else "")
                warnings.warn(f"no batch for {waited:.0f} s: the data workers skipped {_counts(self.pending)}"
                              f"{filtered} meanwhile (stream {item['stream']}{last})", DataStallWarning, stacklevel=2)
        if self.pending:
            item["skipped"] = dict(Counter(item["skipped"]) + self.pending)
            self.pending = Counter()
        if self.pending_filtered:
            item["filtered"] = dict(Counter(item.get("filtered", {})) + self.pending_filtered)
            self.pending_filtered = Counter()
        self.last_batch = time.monotonic()
        return item

    def _next(self) -> dict[str, Any]:
        try:
            return next(self.batches)
        except DataSourceError as exn:
            text = str(exn)
            if not text.startswith("Caught "):  # raised in this process (no workers): as it is
                raise
            # a worker's, re-raised with its traceback as the message: keep the worker and the message
            where = text.split(".", 1)[0].removeprefix("Caught DataSourceError in ")
            raise DataSourceError(f"{where}: {text.rsplit('DataSourceError: ', 1)[-1].strip()}") from None
        except RuntimeError as exn:
            if not str(exn).startswith("DataLoader timed out"):
                raise
            names = "; ".join(f"{i + 1}: {describe_source(urls)}" for i, urls in enumerate(self.stream.sources))
            raise DataSourceError(
                f"no batch from the DataLoader workers in {self.timeout:g} s (data.batch_timeout="
                f"{self.stream.batch_timeout:g}, and a worker that can still count time stops itself before that): "
                f"a worker is stuck, most likely reading a shard that never comes (a pipe: command that neither "
                f"sends data nor exits, a stalled mount); data.train sources: {names}; skipped so far: "
                f"{_counts(self.skipped)}. Raise data.batch_timeout for storage this slow (0 = wait forever)"
            ) from None


def make_train_loader(sources: list[list[str]], tokenizer: Tokenizer, image_size: int, batch_size: int, workers: int,
                      pin_memory: bool = False, **stream_args) -> TrainLoader:
    """A `TrainLoader` over `ShardStream` (keyword arguments go to it: `decode`, `max_image_pixels`,
    `preprocess_cfg`, `max_source_failures`, `batch_timeout`, ...); the workers batch, so `batch_size=None` here.

    With workers, the DataLoader itself gives up after `batch_timeout` plus half of it (at most 60 s more) without
    any item from the workers: a worker blocked in a read cannot stop itself.
    """
    stream = ShardStream(sources, tokenizer, image_size, batch_size, heartbeats=True, **stream_args)
    timeout = stream.batch_timeout + min(60.0, stream.batch_timeout / 2) if workers > 0 else 0
    return TrainLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                       persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None, timeout=timeout)
