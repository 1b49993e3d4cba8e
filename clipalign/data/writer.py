"""Writing WebDataset shards: samples (dicts of `__key__` plus extension -> value) in, numbered tar files out.

`ShardSink` is the one shard writer: `write_shards` (synthetic data, benchmarks) and make_shards both write through
it, each shard under a temporary name until it is complete.

A sample is what `webdataset.ShardWriter` accepts, e.g. `{"__key__": "000000123", "jpg": b"...", "txt": "a caption",
"json": {"caption": "a caption"}}`: bytes are stored as they are, `str` as UTF-8, dicts under `json` as JSON.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from clipalign.layout import commit_temp, temp_name

_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_TAR_BLOCK = tarfile.BLOCKSIZE
_NUMBERED = re.compile(r"^(?P<head>.*?)(?P<num>\d+)(?P<tail>\.[^/\\]*)$")


def image_to_bytes(img: Image.Image, fmt: str = "jpg", quality: int = 90) -> bytes:
    """Encode a PIL image as `jpg`/`jpeg`, `png` or `webp` bytes (`quality` applies to the lossy formats)."""
    pil_format = _PIL_FORMATS.get(fmt.lower().lstrip("."))
    if pil_format is None:
        raise ValueError(f"image format {fmt!r} not supported; expected one of {sorted(_PIL_FORMATS)}")
    if pil_format == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # JPEG has no alpha or palette
    buf = io.BytesIO()
    if pil_format == "PNG":
        img.save(buf, format=pil_format)
    else:
        img.save(buf, format=pil_format, quality=quality)
    return buf.getvalue()


def write_shards(
    samples: Iterable[dict],
    pattern_or_dir: str | Path,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    max_bytes: int | None = None,
    *,
    mtime: float | None = None,
) -> list[Path]:
    """Write samples into numbered tar shards (see `ShardSink`).

    Args:
        samples: dicts with a `__key__` (unique, no `.` in it) and one entry per file extension.
        pattern_or_dir: a directory (shards are named `{prefix}-000000.tar`, `{prefix}-000001.tar`, ...; it is
            created if missing) or a printf pattern with one integer field, e.g. `"out/cc3m-%05d.tar"`.
        prefix: shard name prefix when `pattern_or_dir` is a directory.
        samples_per_shard: the most samples one shard holds.
        max_bytes: start a new shard once a shard has reached this many bytes (a shard may overshoot by one
            sample); None: split by count only.
        mtime: modification time stored for every tar member; a fixed value makes the shards byte-reproducible.
            None: the current time.

    Returns:
        The shard paths written, in order; empty (and nothing created) when `samples` is empty.
    """
    with ShardSink(_shard_pattern(pattern_or_dir, prefix), samples_per_shard, max_bytes, mtime=mtime) as sink:
        for sample in samples:
            sink.write(sample)
    return sink.paths


class ShardSink:
    """The one shard writer: numbered tar shards written one sample at a time, split by samples and by bytes.

    A shard is written as a hidden `.NAME.tmp-PID-RANDOM` beside its final name and renamed (after an fsync) when
    complete, so a crash never leaves a truncated shard under a shard name. Nothing is created until the first sample
    comes.

    Args:
        pattern: a printf pattern with one integer field, e.g. `"out/train-%06d.tar"`; its folder is created.
        samples_per_shard: the most samples one shard holds.
        max_bytes: None: split by count only. Else, with `exact_bytes`, the largest shard file, tar headers and
            padding included: a sample that would take a shard past it starts the next one, and a sample larger
            than that alone gets a shard of its own (counted in `oversized`). Without `exact_bytes`, as webdataset's
            ShardWriter: a new shard starts once a shard's member data has reached it (it may overshoot by one
            sample).
        exact_bytes: hold `max_bytes` as a hard limit on the file size (see above).
        mtime: modification time stored for every tar member; a fixed value makes the shards byte-reproducible.
            None: the current time.
    """

    def __init__(self, pattern: str, samples_per_shard: int = 1000, max_bytes: int | None = None, *,
                 exact_bytes: bool = False, mtime: float | None = None):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        self.pattern, self.max_count, self.max_bytes = pattern, samples_per_shard, max_bytes
        self.exact_bytes, self.mtime = exact_bytes, mtime
        self.paths: list[Path] = []  # the shards completed so far
        self.oversized = 0  # with exact_bytes: samples larger than max_bytes alone, each written alone into a shard
        self._writer: wds.TarWriter | None = None
        self._tmp: Path | None = None  # the open shard's temporary name
        self._count = self._size = self._written = 0
        self._previous: str | None = None

    def write(self, sample: dict) -> None:
        """Add one sample (`__key__` plus one value per extension: bytes, str, or what webdataset encodes)."""
        key = _checked_key(sample, self._written, self._previous)
        sample = wds.writer.encode_based_on_extension(sample, wds.writer.default_handlers)  # the bytes to be stored
        size = _members_size(sample) if self.exact_bytes else _data_size(sample)
        if self._writer is not None and (self._count >= self.max_count or self._full(size)):
            self._finish()
        if self._writer is None:
            self._open()
        if self.exact_bytes and self.max_bytes is not None and _tar_file_size(size) > self.max_bytes:
            self.oversized += 1
        self._writer.write(sample)
        self._count += 1
        self._size += size
        self._written += 1
        self._previous = key

    def close(self) -> list[Path]:
        """Complete the last shard; the shard paths written, in order."""
        if self._writer is not None:
            self._finish()
        return self.paths

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:  # a half-written shard is no shard: drop it
            self._writer.close()
            self._writer = None
            self._tmp.unlink(missing_ok=True)

    def _full(self, size: int) -> bool:
        """Whether the open shard must be closed before a sample of `size` bytes."""
        if self.max_bytes is None:
            return False
        if self.exact_bytes:
            return _tar_file_size(self._size + size) > self.max_bytes
        return self._size >= self.max_bytes

    def _final_path(self) -> Path:
        return Path(self.pattern % len(self.paths))

    def _open(self) -> None:
        final = self._final_path()
        final.parent.mkdir(parents=True, exist_ok=True)
        # compression follows the final name, which the temporary name hides from webdataset
        compress = next((c for c in ("gz", "bz2", "xz") if final.name.endswith(c)), False)
        self._tmp = temp_name(final)  # unique: two writers of one pattern never write into one file
        self._writer = wds.TarWriter(str(self._tmp), compress=compress, mtime=self.mtime)
        self._count = self._size = 0

    def _finish(self) -> None:
        self._writer.close()
        self._writer = None
        final = self._final_path()
        commit_temp(self._tmp, final)
        self.paths.append(final)


def _data_size(sample: dict) -> int:
    """Bytes of the members' data, as webdataset's ShardWriter counts them."""
    return sum(len(v) for k, v in sample.items() if not k.startswith("_"))


def _members_size(sample: dict) -> int:
    """Bytes the members take in a ustar archive: a header block each plus data padded to whole blocks."""
    return sum(_TAR_BLOCK + _round_up(len(v), _TAR_BLOCK) for k, v in sample.items() if not k.startswith("_"))


def _tar_file_size(payload: int) -> int:
    """Size of a tar file holding `payload` bytes of members: two zero blocks, then padding to a whole record."""
    return _round_up(payload + 2 * _TAR_BLOCK, tarfile.RECORDSIZE)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def brace_pattern(paths: list[Path]) -> str:
    """One brace pattern for consecutively numbered shards, e.g. `dir/train-{000000..000007}.tar`.

    One shard gives its plain path. The pattern is checked to expand (with `braceexpand`, as webdataset does) to
    exactly the given shards in numeric order; shards that are not one consecutive run in one directory with one
    name prefix and suffix raise ValueError.
    """
    if not paths:
        raise ValueError("brace_pattern needs at least one shard path")
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        return str(paths[0])
    numbered = []
    for path in paths:
        m = _NUMBERED.match(path.name)
        if m is None:
            raise ValueError(f"shard {path} has no number before its extension; cannot make a brace pattern")
        numbered.append((int(m["num"]), path, m))
    numbered.sort(key=lambda t: t[0])
    first_num, first_path, first_match = numbered[0]
    last_num = numbered[-1][0]
    for expected, (num, path, m) in enumerate(numbered, start=first_num):
        if (path.parent, m["head"], m["tail"]) != (first_path.parent, first_match["head"], first_match["tail"]):
            raise ValueError(f"shards {first_path} and {path} differ in directory or name; expected one series")
        if num != expected:
            raise ValueError(f"shard numbers are not consecutive: {expected} is missing before {path}")
    last_digits = numbered[-1][2]["num"]
    name = f"{first_match['head']}{{{first_match['num']}..{last_digits}}}{first_match['tail']}"
    pattern = str(first_path.parent / name)
    expected_paths = [str(p) for _, p, _ in numbered]
    if list(braceexpand(pattern)) != expected_paths:
        raise ValueError(
            f"shards {first_path} .. {numbered[-1][1]} ({last_num - first_num + 1} files) cannot be written as one "
            f"brace pattern (mixed zero padding, or braces in the directory name?): {pattern}"
        )
    return pattern


def _shard_pattern(pattern_or_dir: str | Path, prefix: str) -> str:
    """A printf pattern for ShardWriter from a directory or a pattern."""
    text = str(pattern_or_dir)
    if "%" in text:
        try:
            text % 0
        except (TypeError, ValueError) as e:
            raise ValueError(f"shard pattern {text!r} must hold exactly one integer field such as %06d") from e
        return text
    if not prefix or "/" in prefix or "%" in prefix:
        raise ValueError(f"shard prefix {prefix!r} must be a non-empty file name part without '/' or '%'")
    return str(Path(text) / f"{prefix}-%06d.tar")


def _checked_key(sample: dict, index: int, previous: str | None) -> str:
    """The sample's key, or a ValueError naming the sample when webdataset would misread it."""
    key = sample.get("__key__") if isinstance(sample, dict) else None
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample {index} needs a non-empty string '__key__'; got {type(sample).__name__} {key!r}")
    if "." in key.rsplit("/", 1)[-1]:
        # webdataset splits a member name at the first '.' of its base name: "a.b.jpg" would become key "a"
        raise ValueError(f"sample {index}: key {key!r} contains '.', which webdataset reads as an extension")
    if key == previous:
        # adjacent members with one key are merged into one sample on reading
        raise ValueError(f"sample {index}: key {key!r} repeats the previous sample's key")
    return key
