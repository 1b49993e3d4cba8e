"""Shard streams: weighted sources, splitting over processes x workers, exact resume positions."""

import io
import os
from collections import Counter

import pytest
import webdataset as wds
from PIL import Image

from clipalign.data.shards import ShardStream, expand_sources, make_train_loader
from clipalign.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny-vit-64")


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (90, 120, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _shards(root, prefix: str, shards: int, per_shard: int) -> str:
    root.mkdir(parents=True, exist_ok=True)
    image = _jpeg()
    for s in range(shards):
        with wds.TarWriter(str(root / f"{prefix}-{s}.tar")) as sink:
            for i in range(per_shard):
                sink.write({"__key__": f"{prefix}{s:02d}{i:03d}", "jpg": image, "txt": f"{prefix} sample {s} {i}"})
    return f"{root}/{prefix}-{{0..{shards - 1}}}.tar"


def test_expand_sources_keeps_sources_apart(tmp_path):
    a, b = _shards(tmp_path, "a", 3, 2), _shards(tmp_path, "b", 2, 2)
    sources = expand_sources(f"{a}::{b}")
    assert [len(s) for s in sources] == [3, 2]


def test_weighted_sources_give_the_asked_proportions(tmp_path, tokenizer):
    sources = expand_sources(_shards(tmp_path, "a", 4, 25) + "::" + _shards(tmp_path, "b", 4, 25))
    stream = ShardStream(sources, tokenizer, image_size=16, batch_size=50, seed=3, weights=[3, 1], shuffle_buffer=0)
    it = iter(stream)
    keys = [k for _ in range(40) for k in next(it)["keys"]]  # 2000 samples
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert abs(share_a - 0.75) < 0.04, share_a  # binomial sd at n=2000 is ~0.01


def test_weights_need_resampling_and_one_per_source(tmp_path, tokenizer):
    sources = expand_sources(_shards(tmp_path, "a", 2, 2))
    with pytest.raises(ValueError, match="1 sources"):
        ShardStream(sources, tokenizer, 16, 2, weights=[1, 2])
    with pytest.raises(ValueError, match="needs data.resampled=true"):
        ShardStream(sources, tokenizer, 16, 2, weights=[1], resampled=False)


def _epoch_keys(pattern, tokenizer, rank: int, world: int, batches: int) -> list[str]:
    """Keys of the first `batches` batches of one process (2 workers) in exact-pass mode."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))  # how webdataset learns the process, as under torchrun
    try:
        loader = make_train_loader(expand_sources(pattern), tokenizer, 16, batch_size=5, workers=2, seed=11,
                                   resampled=False, shuffle_buffer=8)
        it = iter(loader)
        return [k for _ in range(batches) for k in next(it)["keys"]]
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]


def test_exact_pass_over_2_processes_x_2_workers_sees_every_sample_once(tmp_path, tokenizer):
    pattern = _shards(tmp_path, "s", 8, 10)  # 80 samples; each of 4 streams gets 2 shards = 4 batches of 5
    keys = _epoch_keys(pattern, tokenizer, 0, 2, 8) + _epoch_keys(pattern, tokenizer, 1, 2, 8)
    counts = Counter(keys)
    assert len(counts) == 80 and max(counts.values()) == 1


def test_exact_resume_continues_each_stream_where_it_stopped(tmp_path, tokenizer):
    sources = expand_sources(_shards(tmp_path, "r", 3, 7))  # 21 samples: batches straddle shard ends and passes

    def batches(start, n):
        stream = ShardStream(sources, tokenizer, 16, batch_size=4, seed=5, resampled=False, shuffle_buffer=6,
                             start=start)
        it = iter(stream)
        return [next(it) for _ in range(n)]

    full = batches(None, 12)  # more than two passes
    for cut in (1, 4, 7):
        stream, epoch, emitted = full[cut - 1]["position"]
        resumed = batches({stream: (epoch, emitted)}, 12 - cut)
        assert [b["keys"] for b in resumed] == [b["keys"] for b in full[cut:]]
        # the same crops too: augmentation is seeded by sample and pass, not by the worker's history
        assert all((a["images"] == b["images"]).all() for a, b in zip(resumed, full[cut:]))
    assert full[-1]["position"][1] >= 2  # the stream did run into its third pass
