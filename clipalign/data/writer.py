"""Writing WebDataset shards: samples (dicts of `__key__` plus extension -> value) in, numbered tar files out.

A sample is what `webdataset.ShardWriter` accepts, e.g. `{"__key__": "000000123", "jpg": b"...", "txt": "a caption",
"json": {"caption": "a caption"}}`: bytes are stored as they are, `str` as UTF-8, dicts under `json` as JSON.
"""

from __future__ import annotations

import io
import itertools
import math
import re
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
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
    """Write samples into numbered tar shards with `webdataset.ShardWriter`.

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
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
    pattern = _shard_pattern(pattern_or_dir, prefix)
    it = iter(samples)
    first = next(it, None)
    if first is None:
        return []  # ShardWriter opens its first shard eagerly; an empty input must leave no empty tar behind
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    writer = wds.ShardWriter(
        pattern,
        maxcount=samples_per_shard,
        maxsize=math.inf if max_bytes is None else max_bytes,
        post=lambda fname: written.append(Path(fname)),
        verbose=0,
        mtime=mtime,
    )
    with writer:
        previous = None
        for index, sample in enumerate(itertools.chain([first], it)):
            key = _checked_key(sample, index, previous)
            writer.write(sample)
            previous = key
    return written


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
