"""Faults planted in real shards and sources, and the exact outcome in the training stream.

Dead sources (`pipe:` commands that fail, files that are no tar) stop the stream after `max_source_failures` failed
reads with an error naming them, in both stream modes and in a weighted mix, with and without a worker; a worker
that brings no batch stops it after `batch_timeout`; a truncated shard counts once and delivers exactly the samples
whole before the cut. Runtimes are bounded by design: small failure bounds and timeouts of a second or two.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections import Counter

import pytest
import webdataset as wds
from PIL import Image

from clipalign.data.shards import (
    DataSourceError,
    DataStallWarning,
    ShardReadError,
    ShardStream,
    make_train_loader,
    read_shard,
)
from clipalign.tokenizer import build_tokenizer

DEAD = "pipe:false"  # a command that sends nothing and fails: a bucket without access, a dead URL


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny-vit-64")


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (90, 120, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _write(path, samples) -> str:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def _good(prefix: str, n: int, jpeg: bytes) -> list[dict]:
    return [{"__key__": f"{prefix}{i:03d}", "jpg": jpeg, "txt": f"{prefix} sample {i}"} for i in range(n)]


def _loader(sources, tokenizer, workers: int, batch_size: int = 4, **args):
    return make_train_loader(sources, tokenizer, 16, batch_size, workers=workers, shuffle_buffer=0, **args)


def _run_until_error(loader, batches: int = 50) -> tuple[str, int]:
    """Read batches until the loader raises DataSourceError; its message and the batches read before it."""
    it = iter(loader)
    for n in range(batches):
        try:
            next(it)
        except DataSourceError as exn:
            return str(exn), n
    raise AssertionError(f"no DataSourceError in {batches} batches")


# ---------------------------------------------------------------------------------------------------------------
# dead sources


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("resampled", [False, True], ids=["exact", "resampled"])
def test_a_dead_source_stops_the_stream_with_its_name_and_error(tokenizer, workers, resampled):
    loader = _loader([[DEAD]], tokenizer, workers, resampled=resampled, max_source_failures=3)
    message, batches = _run_until_error(loader)
    assert batches == 0
    assert "data.train source 1 of 1 (pipe:false): 3 reads in a row failed" in message
    assert "(data.max_source_failures=3)" in message
    assert "last error: pipe:false: the command exited with status 1" in message
    assert "skipped so far by this worker (stream 0): unreadable_tar=3." in message
    # from a worker, the message comes out plain: the worker named, its traceback left behind
    assert message.startswith("DataLoader worker process 0: data.train" if workers else "data.train")
    assert "Traceback" not in message


@pytest.mark.parametrize("workers", [0, 1])
def test_a_dead_source_in_a_weighted_mix_stops_the_run_naming_it(tmp_path, tokenizer, jpeg, workers):
    good = [_write(tmp_path / f"good-{i}.tar", _good(f"g{i}", 5, jpeg)) for i in range(2)]
    sources = [good, ["pipe:cat /nonexistent/shard-0.tar", "pipe:cat /nonexistent/shard-1.tar"]]
    loader = _loader(sources, tokenizer, workers, resampled=True, weights=[3, 1], max_source_failures=4, seed=1)
    message, _ = _run_until_error(loader)
    assert "data.train source 2 of 2 (pipe:cat /nonexistent/shard-0.tar .. pipe:cat /nonexistent/shard-1.tar " \
           "(2 shards)): 4 reads in a row failed" in message, message
    assert "the command exited with status 1" in message and "unreadable_tar=4" in message
    assert "good-" not in message


@pytest.mark.parametrize("workers", [0, 1])
def test_a_dead_source_among_good_shards_of_exact_passes_stops_after_its_failures(tmp_path, tokenizer, jpeg,
                                                                                 workers):
    good = [_write(tmp_path / "good.tar", _good("g", 4, jpeg))]
    loader = _loader([good, [DEAD]], tokenizer, workers, resampled=False, max_source_failures=3)
    message, batches = _run_until_error(loader)
    # one failed read of the dead source per pass: the good shard's 4 samples (one batch) pass meanwhile
    assert batches in (2, 3), batches
    assert "data.train source 2 of 2 (pipe:false): 3 reads in a row failed" in message
    assert "unreadable_tar=3" in message


def test_a_bad_shard_of_a_live_source_is_counted_every_time_but_never_stops_it(tmp_path, tokenizer, jpeg):
    """An empty shard fails every time it is drawn; once the source's other shard gave samples, it is a bad shard,
    not a dead source: counted at each read, while the failure bound watches only reads of shards not known bad."""
    good = _write(tmp_path / "good.tar", _good("g", 2, jpeg))
    (tmp_path / "empty.tar").write_bytes(b"")
    # seed 1 draws the good shard first (seeds 0, 2, 3 draw the empty one twice before: a source that has given no
    # sample yet and fails twice in a row is dead, by the bound of 2)
    stream = ShardStream([[good, str(tmp_path / "empty.tar")]], tokenizer, 16, batch_size=2, seed=1,
                         shuffle_buffer=0, max_source_failures=2)
    it = iter(stream)
    skipped = Counter()
    for _ in range(60):
        skipped.update(next(it)["skipped"])
    assert set(skipped) == {"unreadable_tar"}
    assert skipped["unreadable_tar"] > 10  # drawn about as often as the good shard, far more than the bound


# ---------------------------------------------------------------------------------------------------------------
# no batch


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("resampled", [False, True], ids=["exact", "resampled"])
def test_a_stream_without_a_usable_sample_stops_in_seconds_saying_why(tmp_path, tokenizer, jpeg, workers,
                                                                       resampled):
    """Every sample skipped (no caption): an exact pass ends without one usable sample, or data.max_unusable rejected
    samples come in a row, and the stream stops with the counts, the likely fix and the inspector to run: long
    before the batch timeout, whose advice (raise it) would be wrong here."""
    shard = _write(tmp_path / "nocaption.tar", [{"__key__": f"n{i:03d}", "jpg": jpeg} for i in range(20)])
    loader = _loader([[shard]], tokenizer, workers, resampled=resampled, batch_timeout=600.0, max_unusable=100)
    message, batches = _run_until_error(loader)
    assert batches == 0
    if resampled:
        assert "data stream 0: 100 samples in a row were skipped or filtered out (data.max_unusable=100)" in message
    else:  # the pass of 20 samples ends first
        assert "data stream 0: a whole pass over its 1 shards gave no usable sample: skipped no_caption=20;" in message
    assert "Most likely the samples carry no caption" in message and "data.batch_timeout" not in message
    assert f"`clipalign-inspect-shards {shard}`" in message


def test_the_batch_timeout_advice_is_given_only_while_samples_do_come(tmp_path, tokenizer, jpeg):
    """Usable samples that come too slowly for a batch: the timeout says so and advises raising it; nothing usable
    coming at all: the counts and the likely fix instead."""
    shard = _write(tmp_path / "two.tar", _good("g", 2, jpeg))
    slow = f"pipe:sleep 0.7 && cat {shard}"  # 2 samples per 0.7 s: a batch of 6 takes 2.1 s
    message, _ = _run_until_error(_loader([[slow]], tokenizer, 0, batch_size=6, resampled=True, batch_timeout=1.0))
    # samples come, or (on a loaded machine, before the first one) nothing comes at all: either way, slow storage
    assert re.search(r"data stream 0 brought no batch in 1 s \(data.batch_timeout\)(, though samples were coming "
                     r"\(\d+ since the last batch\)|: no sample came from its sources in that time)", message), message
    assert "Raise data.batch_timeout if" in message and "Most likely" not in message
    empty = _write(tmp_path / "nocaption.tar", [{"__key__": f"n{i:03d}", "jpg": jpeg} for i in range(3)])
    message, _ = _run_until_error(_loader([[empty]], tokenizer, 0, resampled=True, batch_timeout=1.0,
                                          max_unusable=0))
    assert "brought no batch in 1 s (data.batch_timeout) and no usable sample since the last batch" in message
    assert "Most likely the samples carry no caption" in message and "Raise data.batch_timeout" not in message


def test_a_worker_blocked_in_a_read_stops_the_run_by_the_loader_timeout(tokenizer):
    """A `pipe:` command that neither sends data nor exits: the worker cannot count time, the DataLoader's timeout
    (batch_timeout and half of it) stops the run, naming the sources."""
    loader = _loader([["pipe:sleep 5"]], tokenizer, 1, resampled=True, batch_timeout=1.0)
    assert loader.timeout == 1.5
    message, _ = _run_until_error(loader)
    assert message.startswith("no batch from the DataLoader workers in 1.5 s (data.batch_timeout=1")
    assert "data.train sources: 1: pipe:sleep 5; skipped so far: none" in message


@pytest.mark.parametrize("workers", [0, 1])
def test_heartbeat_counts_reach_the_next_batch_exactly(tmp_path, tokenizer, jpeg, workers):
    """A heartbeat after every skipped sample: the loader absorbs them, and the batch carries every count once."""
    bad = [{"__key__": f"a{i:03d}", "jpg": jpeg} for i in range(5)]
    bad += [{"__key__": f"b{i:03d}", "txt": "no picture"} for i in range(2)]
    shard = _write(tmp_path / "mixed.tar", bad + _good("g", 4, jpeg))
    loader = _loader([[shard]], tokenizer, workers, resampled=False, heartbeat_every=0)
    with pytest.warns(DataStallWarning):
        batch = next(iter(loader))
    assert "heartbeat" not in batch and batch["keys"] == [f"g{i:03d}" for i in range(4)]
    assert batch["skipped"] == {"no_caption": 5, "no_image": 2}


def test_heartbeats_while_replaying_to_a_resume_position_leave_the_batches_as_they_were(tmp_path, tokenizer, jpeg):
    shards = [_write(tmp_path / f"r-{i}.tar", _good(f"r{i}", 7, jpeg)) for i in range(3)]
    args = dict(resampled=False, seed=5, start={0: (1, 9)})
    direct = iter(ShardStream([shards], tokenizer, 16, 4, shuffle_buffer=0, **args))
    loader = iter(_loader([shards], tokenizer, 0, heartbeat_every=0, **args))
    for _ in range(6):
        a, b = next(direct), next(loader)
        assert a["keys"] == b["keys"] and list(a["position"]) == list(b["position"])  # the loader makes it a list
        assert a["skipped"] == b["skipped"] == {}


# ---------------------------------------------------------------------------------------------------------------
# truncated shards


N = 6  # samples in the shard that gets cut


def _members(path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def _cuts(path) -> dict[str, tuple[int, int]]:
    """Where to cut the shard -> how many samples stay whole: those before the one the cut hides the end of."""
    m = _members(path)
    last = m[f"s{N - 1:03d}.txt"]
    return {
        "in sample 3's image data": (m["s003.jpg"].offset_data + 100, 3),
        "in sample 3's caption header": (m["s003.txt"].offset + 700, 3),  # sample 3 began: it goes
        "in sample 3's first header": (m["s003.jpg"].offset + 1100, 2),  # sample 2 may have had more members
        "between samples 2 and 3": (m["s003.jpg"].offset, 2),
        "in sample 0's image data": (m["s000.jpg"].offset_data + 10, 0),
        "before the end-of-archive block": (last.offset_data + 512, N - 1),
    }


@pytest.fixture(scope="module")
def whole(tmp_path_factory, jpeg) -> tuple[bytes, dict[str, tuple[int, int]]]:
    path = tmp_path_factory.mktemp("whole") / "whole.tar"
    _write(path, _good("s", N, jpeg))
    return path.read_bytes(), _cuts(path)


CUTS = ["in sample 3's image data", "in sample 3's caption header", "in sample 3's first header",
        "between samples 2 and 3", "in sample 0's image data", "before the end-of-archive block"]


@pytest.mark.parametrize("where", CUTS)
def test_read_shard_delivers_the_whole_samples_before_a_cut_and_one_error(tmp_path, whole, where):
    data, cuts = whole
    cut, kept = cuts[where]
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:cut])
    samples = []
    with pytest.raises(ShardReadError, match="ReadError: unexpected end of data"):
        for sample in read_shard(str(path)):
            samples.append(sample)
    assert [s["__key__"] for s in samples] == [f"s{i:03d}" for i in range(kept)]
    assert all(set(s) == {"__key__", "__url__", "jpg", "txt"} for s in samples)


def test_a_whole_shard_and_its_end_of_archive_padding_are_no_fault(tmp_path, whole):
    data, _ = whole
    path = tmp_path / "cut.tar"
    end = _members_end(data)
    for cut in (len(data), end + 512):  # whole; cut after the first block of zeros, which ends the archive
        path.write_bytes(data[:cut])
        assert [s["__key__"] for s in read_shard(str(path))] == [f"s{i:03d}" for i in range(N)]


def _members_end(data: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


@pytest.mark.parametrize("where", [c for c in CUTS if c != "in sample 0's image data"])
@pytest.mark.parametrize("resampled", [False, True], ids=["exact", "resampled"])
def test_a_truncated_shard_counts_once_per_read_and_nothing_else(tmp_path, tokenizer, whole, where, resampled):
    """Each read of the cut shard delivers the samples whole before the cut, and counts one `unreadable_tar`, with
    no `no_caption`/`no_image` for the sample the cut went through. A batch is one read of the shard; the failure of
    a read is counted on reaching it, so it travels with the next batch."""
    data, cuts = whole
    cut, kept = cuts[where]
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    stream = ShardStream([str(tmp_path / "cut.tar")], tokenizer, 16, batch_size=kept, resampled=resampled,
                         shuffle_buffer=0)
    it = iter(stream)
    for i in range(4):
        batch = next(it)
        assert batch["keys"] == [f"s{j:03d}" for j in range(kept)]
        assert batch["skipped"] == ({} if i == 0 else {"unreadable_tar": 1})


@pytest.mark.parametrize("resampled", [False, True], ids=["exact", "resampled"])
def test_a_shard_cut_in_its_first_sample_is_a_dead_source_alone_and_a_bad_shard_beside_good_ones(
        tmp_path, tokenizer, jpeg, whole, resampled):
    data, cuts = whole
    (tmp_path / "cut.tar").write_bytes(data[:cuts["in sample 0's image data"][0]])
    cut = str(tmp_path / "cut.tar")
    with pytest.raises(DataSourceError, match=r"2 reads in a row failed .* unexpected end of data.*unreadable_tar=2\."):
        next(iter(ShardStream([cut], tokenizer, 16, 2, resampled=resampled, max_source_failures=2)))

    # beside a good shard it fails at most twice in a row in exact passes (last of one pass, first of the next), and
    # seed 1 draws the good shard first in resampled mode
    good = _write(tmp_path / "good.tar", _good("g", 3, jpeg))
    stream = ShardStream([good, cut], tokenizer, 16, batch_size=3, resampled=resampled, shuffle_buffer=0, seed=1,
                         max_source_failures=3)
    it = iter(stream)
    skipped = Counter()
    for _ in range(20):
        batch = next(it)
        assert sorted(batch["keys"]) == ["g000", "g001", "g002"]
        skipped.update(batch["skipped"])
    assert set(skipped) == {"unreadable_tar"}
    if not resampled:  # one failed read per pass, counted with this pass's batch or the next one's
        assert skipped["unreadable_tar"] in (19, 20)


@pytest.mark.parametrize("workers", [0, 1])
def test_planted_faults_are_counted_exactly_through_the_loader(tmp_path, tokenizer, jpeg, workers):
    """Bad samples and a cut in one shard, through the DataLoader: each planted fault counted once."""
    samples = _good("s", 3, jpeg)
    samples.insert(1, {"__key__": "s001x", "jpg": jpeg})  # no caption
    samples.insert(3, {"__key__": "s002x", "jpg": b"\xff\xd8\xff not a jpeg", "txt": "broken"})  # bad image
    samples += _good("t", 2, jpeg)
    path = tmp_path / "faults.tar"
    _write(path, samples)
    cut = _members(path)["t001.jpg"].offset_data + 50  # in the last sample's image: t000 is the last whole one
    path.write_bytes(path.read_bytes()[:cut])
    loader = _loader([[str(path)]], tokenizer, workers, batch_size=4, resampled=False)
    it = iter(loader)
    first, second = next(it), next(it)
    assert first["keys"] == second["keys"] == ["s000", "s001", "s002", "t000"]
    assert first["skipped"] == {"no_caption": 1, "bad_image": 1}
    assert second["skipped"] == {"no_caption": 1, "bad_image": 1, "unreadable_tar": 1}


def test_a_second_member_of_one_name_is_left_out_and_counted(tmp_path, tokenizer, jpeg):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.jpg", jpeg), ("a.txt", b"first"), ("a.txt", b"second"), ("b.jpg", jpeg),
                           ("b.txt", b"other")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bad = []
    samples = list(read_shard(str(path), bad.append))
    assert [(s["__key__"], s["txt"]) for s in samples] == [("a", b"first"), ("b", b"other")]
    assert bad == [f"{path}: a.txt: a second .txt member in sample a, left out"]
    batch = next(iter(ShardStream([str(path)], tokenizer, 16, 2, resampled=False, shuffle_buffer=0)))
    assert batch["skipped"] == {"unreadable_tar": 1}



def test_the_inspector_and_the_tokenizer_trainer_count_a_cut_shard_as_training_does(tmp_path, whole):
    """They walk shards with the same reader: the whole samples before the cut, one error, nothing else counted."""
    from clipalign.data.inspect_shards import inspect_shards
    from clipalign.data.shards import SkipCounter
    from clipalign.train_tokenizer import _shard_captions

    data, cuts = whole
    cut, kept = cuts["in sample 3's caption header"]
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:cut])
    report = inspect_shards(str(path), progress=False)
    assert (report["samples"], report["bad_total"], len(report["tar_errors"])) == (kept, 0, 1)
    assert "unexpected end of data" in report["tar_errors"][0]["error"]
    counter = SkipCounter()
    assert len(list(_shard_captions(str(path), counter))) == kept
    assert counter.take() == {"unreadable_tar": 1}
