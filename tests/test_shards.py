import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from clipalign.data.shards import ShardStream, caption_of, expand_sources, expand_urls, make_train_loader
from clipalign.tokenizer import build_tokenizer


def _image_bytes(fmt: str, size=(80, 60), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


def _write(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny-vit-64")


def _good(i, fmt="jpg"):
    return {"__key__": f"good{i:04d}", fmt: _image_bytes(fmt), "txt": f"a red square number {i}"}


def test_expand_urls_patterns_sources_and_missing(tmp_path):
    for i in range(3):
        _write(tmp_path / f"a-{i}.tar", [_good(i)])
    _write(tmp_path / "b-0.tar", [_good(9)])
    urls = expand_urls(f"{tmp_path}/a-{{0..2}}.tar::{tmp_path}/b-0.tar")
    assert urls == [f"{tmp_path}/a-{i}.tar" for i in range(3)] + [f"{tmp_path}/b-0.tar"]
    with pytest.raises(FileNotFoundError, match=r"2 of 5 shards do not exist: .*a-3.tar"):
        expand_urls(f"{tmp_path}/a-{{0..4}}.tar")
    with pytest.raises(ValueError, match="data.train is empty"):
        expand_urls("")
    assert expand_urls("pipe:cat /nowhere.tar") == ["pipe:cat /nowhere.tar"]  # remote sources are not checked


def test_globs_expand_sorted_and_a_directory_gets_its_pattern(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in (10, 2, 0, 1, 11, 3, 4, 5, 6, 7, 8, 9):
        _write(shards / f"train-{i:06d}.tar", [_good(i)])
    assert expand_urls(f"{shards}/*.tar") == [f"{shards}/train-{i:06d}.tar" for i in range(12)]
    two = expand_sources(f"{shards}/train-00000?.tar::{shards}/train-00001[01].tar")
    assert [len(source) for source in two] == [10, 2]
    with pytest.raises(FileNotFoundError, match=r"the pattern '.*/nope-\*.tar' matches no file"):
        expand_urls(f"{shards}/nope-*.tar")
    with pytest.raises(ValueError, match=r"data.train source '.*shards' is a directory: give its shards as a "
                                         r"pattern: .*/shards/train-\{000000..000011\}.tar \(12 shards\)"):
        expand_urls(str(shards))
    (shards / "extra.tar").write_bytes(b"")  # not numbered like the others: the glob instead
    with pytest.raises(ValueError, match=r"is a directory: give its shards as a pattern: '.*/shards/\*.tar' "
                                         r"\(13 shards, read in sorted order\)"):
        expand_urls(f"{shards}/")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="it holds no .tar file"):
        expand_sources(str(tmp_path / "empty"), key="data.val")


def test_caption_sources():
    import random

    rng = random.Random(0)
    assert caption_of({"txt": b"  hello \n"}, rng) == "hello"
    assert caption_of({"json": json.dumps({"caption": "from json"}).encode()}, rng) == "from json"
    assert caption_of({"json": json.dumps({"captions": ["", "one", "two"]}).encode()}, rng) in ("one", "two")
    assert caption_of({"txt": b"   ", "json": b'{"caption": "fallback"}'}, rng) == "fallback"
    assert caption_of({"json": b'{"label": 3}'}, rng) is None
    with pytest.raises(UnicodeDecodeError):
        caption_of({"txt": b"\xff\xfe bad"}, rng)


def test_bad_samples_are_skipped_and_counted(tmp_path, tokenizer):
    good = [_good(i, fmt) for i, fmt in enumerate(["jpg", "png", "webp", "jpg", "jpg", "png"])]
    good.append({"__key__": "good_json", "jpeg": _image_bytes("jpg"), "json": json.dumps({"caption": "blue"}).encode()})
    bad = [
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff not a jpeg at all", "txt": "broken image"},
        {"__key__": "truncated", "jpg": _image_bytes("jpg", size=(300, 300))[:400], "txt": "cut short"},
        {"__key__": "nocaption", "jpg": _image_bytes("jpg")},
        {"__key__": "emptycaption", "jpg": _image_bytes("jpg"), "txt": "   "},
        {"__key__": "badutf8", "jpg": _image_bytes("jpg"), "txt": b"\xff\xfe\xfa"},
        {"__key__": "noimage", "txt": "a caption with no picture"},
    ]
    # interleave so bad samples sit between good ones inside one shard
    samples = [s for pair in zip(good, bad) for s in pair] + good[len(bad):]
    _write(tmp_path / "mixed.tar", samples)
    stream = ShardStream([str(tmp_path / "mixed.tar")], tokenizer, image_size=32, batch_size=7, resampled=False,
                         shuffle_buffer=0)
    batch = next(iter(stream))
    assert sorted(batch["keys"]) == sorted(s["__key__"] for s in good)
    assert batch["images"].shape == (7, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["texts"].shape == (7, 32) and batch["texts"].dtype == torch.int64
    assert batch["skipped"] == {"bad_image": 2, "no_caption": 2, "bad_text": 1, "no_image": 1}


def test_truncated_tar_does_not_stop_the_stream(tmp_path, tokenizer):
    _write(tmp_path / "ok.tar", [_good(i) for i in range(4)])
    _write(tmp_path / "cut.tar", [_good(i + 10) for i in range(4)])
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 3])
    stream = ShardStream([str(tmp_path / "ok.tar"), str(tmp_path / "cut.tar")], tokenizer, image_size=32,
                         batch_size=4, resampled=False, shuffle_buffer=0)
    it = iter(stream)
    keys, skipped = set(), {}
    for _ in range(3):  # passes repeat forever; three batches cover both shards more than once
        batch = next(it)
        keys.update(batch["keys"])
        for k, v in batch["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    assert {f"good{i:04d}" for i in range(4)} <= keys
    assert skipped.get("unreadable_tar", 0) >= 1


def test_pipe_sources_stream_like_local_files(tmp_path, tokenizer):
    """A `pipe:` URL (how object storage is read: `pipe:aws s3 cp s3://... -`) mixed with a local path."""
    _write(tmp_path / "a.tar", [_good(i) for i in range(3)])
    _write(tmp_path / "b.tar", [_good(i + 10) for i in range(3)])
    stream = ShardStream([str(tmp_path / "a.tar"), f"pipe:cat {tmp_path / 'b.tar'}"], tokenizer, image_size=32,
                         batch_size=6, resampled=False, shuffle_buffer=0)
    batch = next(iter(stream))
    assert sorted(batch["keys"]) == sorted([f"good{i:04d}" for i in (0, 1, 2, 10, 11, 12)])
    assert batch["skipped"] == {}


def test_images_keep_content_and_geometry(tmp_path, tokenizer):
    _write(tmp_path / "one.tar", [{"__key__": "k", "png": _image_bytes("png", (64, 48), (10, 200, 40)), "txt": "g"}])
    stream = ShardStream([str(tmp_path / "one.tar")], tokenizer, image_size=16, batch_size=1, resampled=False,
                         shuffle_buffer=0, crop_scale=1.0)
    img = next(iter(stream))["images"][0].numpy()
    assert img.shape == (3, 16, 16)
    assert np.abs(img.reshape(3, -1).mean(1) - np.array([10, 200, 40])).max() < 2


def test_loader_with_workers_resampled_is_reproducible(tmp_path, tokenizer):
    for s in range(4):
        _write(tmp_path / f"s-{s}.tar", [_good(s * 10 + i) for i in range(10)])
    urls = expand_urls(f"{tmp_path}/s-{{0..3}}.tar")

    def first_keys(seed):
        loader = make_train_loader(urls, tokenizer, image_size=32, batch_size=8, workers=2, seed=seed,
                                   resampled=True, shuffle_buffer=20)
        it = iter(loader)
        return [tuple(next(it)["keys"]) for _ in range(4)]

    a, b, c = first_keys(1), first_keys(1), first_keys(2)
    assert a == b
    assert a != c
    # the two workers draw different shard sequences
    assert len({k for batch in a for k in batch}) > 8
