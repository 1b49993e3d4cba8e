"""Shard writing on real files: ShardWriter output read back by webdataset, brace patterns, image encoding."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from clipalign.data.writer import brace_pattern, image_to_bytes, write_shards


def _samples(n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        img = Image.new("RGB", (8, 8), (i % 256, 10, 200))
        out.append({"__key__": f"{i:09d}", "jpg": image_to_bytes(img), "txt": f"caption {i}", "json": {"i": i}})
    return out


def _read(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False))


def test_write_shards_splits_by_count_and_reads_back(tmp_path: Path) -> None:
    shards = write_shards(_samples(25), tmp_path / "out", samples_per_shard=10)
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert all(p.is_file() for p in shards)
    pattern = brace_pattern(shards)
    assert pattern == str(tmp_path / "out" / "train-{000000..000002}.tar")
    rows = _read(pattern)
    assert [r["__key__"] for r in rows] == [f"{i:09d}" for i in range(25)]
    assert rows[7]["txt"].decode() == "caption 7"
    assert rows[7]["json"] == b'{"i": 7}'
    assert Image.open(io.BytesIO(rows[7]["jpg"])).size == (8, 8)
    # per shard: 10, 10, 5
    assert [len(_read(str(p))) for p in shards] == [10, 10, 5]


def test_write_shards_printf_pattern_and_prefix(tmp_path: Path) -> None:
    shards = write_shards(_samples(3), str(tmp_path / "deep" / "cc-%04d.tar"), samples_per_shard=2)
    assert shards == [tmp_path / "deep" / "cc-0000.tar", tmp_path / "deep" / "cc-0001.tar"]
    shards = write_shards(_samples(3), tmp_path, prefix="val", samples_per_shard=5)
    assert shards == [tmp_path / "val-000000.tar"]
    assert brace_pattern(shards) == str(tmp_path / "val-000000.tar")
    assert len(_read(brace_pattern(shards))) == 3


def test_write_shards_splits_by_bytes(tmp_path: Path) -> None:
    big = [{"__key__": f"k{i}", "bin": bytes(3000), "txt": "x"} for i in range(6)]
    shards = write_shards(big, tmp_path, samples_per_shard=100, max_bytes=5000)
    assert len(shards) == 3  # a shard closes once it has reached 5000 bytes: two 3 kB samples each
    assert [len(_read(str(p))) for p in shards] == [2, 2, 2]


def test_write_shards_fixed_mtime_is_byte_reproducible(tmp_path: Path) -> None:
    a = write_shards(_samples(5), tmp_path / "a", mtime=1_700_000_000)
    b = write_shards(_samples(5), tmp_path / "b", mtime=1_700_000_000)
    assert a[0].read_bytes() == b[0].read_bytes()


def test_write_shards_empty_input_writes_nothing(tmp_path: Path) -> None:
    assert write_shards([], tmp_path / "none") == []
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"txt": "no key"}, "__key__"),
        ({"__key__": "a.b", "txt": "dotted"}, "contains '.'"),
    ],
)
def test_write_shards_rejects_bad_keys(tmp_path: Path, bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_shards([{"__key__": "ok", "txt": "fine"}, bad], tmp_path)


def test_write_shards_rejects_repeated_adjacent_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repeats"):
        write_shards([{"__key__": "k", "txt": "1"}, {"__key__": "k", "txt": "2"}], tmp_path)


def test_brace_pattern_expands_to_exactly_the_shards(tmp_path: Path) -> None:
    shards = write_shards(_samples(8), tmp_path, samples_per_shard=1)
    pattern = brace_pattern(list(reversed(shards)))  # order of the input does not matter
    assert pattern == str(tmp_path / "train-{000000..000007}.tar")
    assert list(braceexpand(pattern)) == [str(p) for p in shards]
    assert len(_read(pattern)) == 8


def test_brace_pattern_beyond_the_padding_width(tmp_path: Path) -> None:
    paths = [tmp_path / f"s-{n:02d}.tar" for n in range(98, 102)]  # s-98, s-99, s-100, s-101
    pattern = brace_pattern(paths)
    assert list(braceexpand(pattern)) == [str(p) for p in paths]


@pytest.mark.parametrize(
    "names, message",
    [
        (["t-000000.tar", "t-000002.tar"], "not consecutive"),
        (["t-000000.tar", "u-000001.tar"], "differ"),
        (["t-000000.tar", "t-a.tar"], "no number"),
        (["t-000000.tar", "t-000000.tar"], "not consecutive"),
    ],
)
def test_brace_pattern_rejects_what_is_not_one_series(tmp_path: Path, names: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        brace_pattern([tmp_path / n for n in names])


def test_brace_pattern_rejects_empty() -> None:
    with pytest.raises(ValueError):
        brace_pattern([])


@pytest.mark.parametrize("fmt", ["jpg", "jpeg", "png", "webp"])
def test_image_to_bytes_round_trips(fmt: str) -> None:
    img = Image.new("RGBA", (16, 12), (200, 30, 30, 255))
    data = image_to_bytes(img, fmt, quality=95)
    back = Image.open(io.BytesIO(data))
    assert back.size == (16, 12)
    assert back.format == {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    r, g, b = back.convert("RGB").getpixel((8, 6))
    assert abs(r - 200) < 10 and abs(g - 30) < 10 and abs(b - 30) < 10


def test_image_to_bytes_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="bmp"):
        image_to_bytes(Image.new("RGB", (4, 4)), "bmp")


def test_write_shards_leaves_no_partial_shard_behind(tmp_path: Path) -> None:
    samples = [*_samples(3), {"__key__": "bad.key", "txt": "x"}]
    with pytest.raises(ValueError, match="contains '.'"):
        write_shards(samples, tmp_path, samples_per_shard=2)
    # the complete first shard stays; the second, half-written when the bad sample came, is gone, temporary and all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]
