"""Curating at load time (data.keep, keep_id, keep_probability, min_score): real shards, real files, real processes.

Keep-lists (DataComp `.npy` of uids, text, CSV and parquet lists of keys or uids) and probability files keep exactly
the expected samples through the training stream, before decoding, counted as `filtered`; the same after an exact
resume; another seed or pass draws anew; over 2 processes x 2 workers every kept sample is seen once per pass; bad
files stop a run in one line before the model is built; membership of 10^6 uids is exact.
"""

from __future__ import annotations

import csv
import io
import json
import mmap
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from multiproc import run_check_script
from PIL import Image

from clipalign.config import ConfigError, load_config
from clipalign.data.curation import (
    FILTER_REASON_NAMES,
    UID_DTYPE,
    SampleFilter,
    keep_draw,
    key_hash,
    load_ids,
    stream_sample_seed,
    uid_array,
    uid_pair,
)
from clipalign.data.shards import (
    DataStallWarning,
    ShardStream,
    expand_sources,
    expand_urls,
    make_train_loader,
    shard_samples,
)
from clipalign.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "tests" / "dist_curation_check.py"
SHARDS, PER_SHARD = 8, 15


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny-vit-64")


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (90, 120, 30)).save(buf, format="JPEG")
    return buf.getvalue()


class Corpus:
    """8 shards of 15 samples, each with a DataComp-style .json: a random 128-bit `uid`, a `score` (missing in every
    7th sample) and a `p` (keep probability, missing in every 11th)."""

    KEYS = [f"c{s:02d}{i:03d}" for s in range(SHARDS) for i in range(PER_SHARD)]

    def __init__(self, root: Path):
        self.root = root
        rng = random.Random(1234)
        self.uids: dict[str, str] = {}  # key -> uid
        self.meta: dict[str, dict] = {}
        root.mkdir(parents=True, exist_ok=True)
        image = _jpeg()
        n = 0
        for s in range(SHARDS):
            with wds.TarWriter(str(root / f"c-{s}.tar")) as sink:
                for i in range(PER_SHARD):
                    key = f"c{s:02d}{i:03d}"
                    uid = f"{rng.getrandbits(128):032x}"
                    meta = {"uid": uid}
                    if n % 7:
                        meta["score"] = round(rng.random(), 4)
                    if n % 11:
                        meta["p"] = round(rng.random(), 4)
                    self.uids[key], self.meta[key] = uid, meta
                    sink.write({"__key__": key, "jpg": image, "txt": f"sample {key}", "json": json.dumps(meta)})
                    n += 1
        self.pattern = f"{root}/c-{{0..{SHARDS - 1}}}.tar"
        self.keys = sorted(self.uids)
        assert self.keys == self.KEYS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("curation") / "shards")


def _save_uids(path: Path, uids: list[str], form: str = "structured") -> str:
    pairs = [uid_pair(u) for u in uids]
    if form == "structured":  # DataComp's own: np.array([(int(u[:16], 16), int(u[16:], 16))], np.dtype("u8,u8"))
        arr = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], np.dtype("u8,u8"))
        arr.sort()
    elif form == "pairs-unsorted":  # (N, 2) uint64, in no order
        arr = np.array(pairs[::-1], np.uint64)
    else:
        raise ValueError(form)
    np.save(path, arr)
    return str(path)


def _passes(stream: ShardStream, passes: int, expected: list[dict] | None = None) -> dict[int, list[str]]:
    """Keys per pass of a one-stream exact-pass stream read in batches of one, up to the first batch of pass
    `passes`. Checks every batch: kept + filtered so far = the raw samples consumed so far (120 a pass). With
    `expected` (the filtered counts of each pass, by reason), checks the counts too: a batch carries the samples
    filtered since the previous one, so the first batch of a pass carries the end of the last pass and the
    samples of its own pass before it, all filtered."""
    keys: dict[int, list[str]] = {}
    total = Counter()
    kept = 0
    for batch in stream:
        _, epoch, emitted = batch["position"]
        total.update(batch["filtered"])
        kept += 1
        assert kept + sum(total.values()) == len(Corpus.KEYS) * epoch + emitted
        if epoch >= passes:
            break
        keys.setdefault(epoch, []).append(batch["keys"][0])
    if expected is not None:
        head = Counter(total)
        head.subtract(sum((Counter(e) for e in expected[:passes]), Counter()))
        assert min(head.values(), default=0) >= 0 and sum(head.values()) == emitted - 1, (total, expected)
    return keys


def _stream(corpus: Corpus, tokenizer, sample_filter: SampleFilter, seed: int = 0, **kwargs) -> ShardStream:
    return ShardStream(expand_sources(corpus.pattern), tokenizer, 16, batch_size=1, seed=seed, resampled=False,
                       shuffle_buffer=kwargs.pop("shuffle_buffer", 6), sample_filter=sample_filter, **kwargs)


def _drawn(corpus: Corpus, seed: int, epoch: int, probability: dict[str, float]) -> set[str]:
    """The keys kept by a keep probability (key -> p), by the documented rule: the stream's seed of the sample,
    through `keep_draw`, against p."""
    return {k for k, p in probability.items() if keep_draw(stream_sample_seed(seed, epoch, k)) < p}


def _mapped(arr: np.ndarray) -> bool:
    """Whether an array's memory is a memory-mapped file (somewhere down its chain of bases)."""
    while arr is not None:
        if isinstance(arr, (np.memmap, mmap.mmap)):
            return True
        arr = getattr(arr, "base", None)
    return False


# ---- membership ------------------------------------------------------------------------------------------------


def test_membership_of_a_million_uids_finds_every_member_and_no_other(tmp_path):
    rng = np.random.default_rng(7)
    members = np.empty(1_000_000, UID_DTYPE)
    members["f0"], members["f1"] = (rng.integers(0, 2 ** 64, 1_000_000, dtype=np.uint64, endpoint=False)
                                    for _ in range(2))
    np.save(tmp_path / "uids.npy", np.sort(members))
    index = load_ids(tmp_path / "uids.npy", "uid")
    assert len(index) == 1_000_000 and index.nbytes == 16 * 1_000_000  # 16 bytes per uid
    assert _mapped(index.ids)  # the file's pages, not a copy: forked workers share them
    assert index.contains(members).all()
    # non-members: random ones, and near misses sharing the high or the low half of a member
    strangers = np.empty(1_000_000, UID_DTYPE)
    strangers["f0"], strangers["f1"] = (rng.integers(0, 2 ** 64, 1_000_000, dtype=np.uint64, endpoint=False)
                                        for _ in range(2))
    near = members[:200_000].copy()
    near["f1"][:100_000] ^= np.uint64(1)
    near["f0"][100_000:] ^= np.uint64(1 << 63)
    assert not index.contains(strangers).any() and not index.contains(near).any()
    # the per-sample path the stream takes: (high, low) of a uid string
    for row in members[::100]:
        assert (int(row["f0"]), int(row["f1"])) in index
    for row in np.concatenate([strangers[::200], near[::40]]):
        assert (int(row["f0"]), int(row["f1"])) not in index
    text = f"{int(members[5]['f0']):016x}{int(members[5]['f1']):016x}"
    assert (uid_array((int(r["f0"]), int(r["f1"])) for r in members[:1000]) == np.sort(members[:1000])).all()
    assert uid_pair(text) in index and uid_pair(text.upper()) in index


def test_key_hashes_find_every_member_and_no_other(tmp_path):
    keys = [f"{i:09d}" for i in range(0, 200_000, 2)]
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    index = load_ids(tmp_path / "keys.txt", "key")
    assert len(index) == 100_000 and index.nbytes == 8 * 100_000  # 8 bytes per key hash
    assert all(key_hash(k) in index for k in keys[::10])
    assert not any(key_hash(f"{i:09d}") in index for i in range(1, 200_000, 20))
    hashes = np.array([key_hash(f"{i:09d}") for i in range(200_000)], np.uint64)
    assert (index.contains(hashes) == (np.arange(200_000) % 2 == 0)).all()


def test_the_keep_draw_is_uniform_and_independent_of_the_caption_draw():
    seeds = [stream_sample_seed(0, 0, f"{i:06d}") for i in range(20_000)]
    draws = np.array([keep_draw(s) for s in seeds])
    assert draws.min() >= 0 and draws.max() < 1 and abs(draws.mean() - 0.5) < 0.01
    kept = draws < 0.5
    # the caption of two is drawn with random.Random(seed) (decode_samples): kept samples draw either equally
    first = np.array([random.Random(s).choice([0, 1]) for s in seeds])
    assert abs(first[kept].mean() - 0.5) < 0.02 and abs(first[~kept].mean() - 0.5) < 0.02


# ---- keep-lists through the stream --------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["structured", "pairs-unsorted"])
def test_a_datacomp_uid_list_keeps_exactly_its_samples_every_pass(corpus, tokenizer, tmp_path, form):
    listed = corpus.keys[::3] + corpus.keys[1::7]
    path = _save_uids(tmp_path / "keep.npy", [corpus.uids[k] for k in listed] + [f"{i:032x}" for i in range(50)],
                      form)
    per_pass = {"not_in_keep_list": len(corpus.keys) - len(set(listed))}
    keys = _passes(_stream(corpus, tokenizer, SampleFilter(keep=path)), passes=2, expected=[per_pass] * 2)
    for epoch in (0, 1):
        assert sorted(keys[epoch]) == sorted(set(listed))
    assert keys[0] != keys[1]  # each pass shuffles anew


@pytest.mark.parametrize("form", ["txt-key", "csv-key", "txt-uid", "csv-uid", "parquet-uid", "npy-key"])
def test_text_csv_and_parquet_lists_keep_exactly_their_samples(corpus, tokenizer, tmp_path, form):
    listed = corpus.keys[2::4]
    kind = form.split("-")[1]
    ids = listed if kind == "key" else [corpus.uids[k] for k in listed]
    if form.startswith("txt"):
        path = tmp_path / "keep.txt"
        path.write_text("\ufeff" + "\n".join(ids) + "\n\n", encoding="utf-8")  # a BOM and a blank line are fine
    elif form.startswith("csv"):
        path = tmp_path / "keep.csv"
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([["n", kind], *[[i, x] for i, x in enumerate(ids)]])
    elif form.startswith("npy"):
        path = tmp_path / "keep.npy"
        np.save(path, np.array(ids))
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        path = tmp_path / "keep.parquet"
        pq.write_table(pa.table({kind: ids, "other": list(range(len(ids)))}), path)
    keys = _passes(_stream(corpus, tokenizer, SampleFilter(keep=str(path), keep_id=kind)), passes=1,
                   expected=[{"not_in_keep_list": len(corpus.keys) - len(listed)}])
    assert sorted(keys[0]) == listed


def test_samples_without_a_uid_are_filtered_as_no_id(tmp_path, tokenizer):
    image = _jpeg()
    with wds.TarWriter(str(tmp_path / "m-0.tar")) as sink:
        sink.write({"__key__": "a", "jpg": image, "txt": "no json"})
        sink.write({"__key__": "b", "jpg": image, "txt": "bad uid", "json": json.dumps({"uid": "xyz"})})
        sink.write({"__key__": "c", "jpg": image, "txt": "bad json", "json": b"{not json"})
        sink.write({"__key__": "d", "jpg": image, "txt": "good", "json": json.dumps({"uid": "ab" * 16})})
    path = _save_uids(tmp_path / "keep.npy", ["ab" * 16])
    stream = ShardStream([str(tmp_path / "m-0.tar")], tokenizer, 16, batch_size=1, resampled=False,
                         shuffle_buffer=0, sample_filter=SampleFilter(keep=path))
    batch = next(iter(stream))
    assert batch["keys"] == ["d"] and batch["filtered"] == {"no_id": 3} and batch["skipped"] == {}


# ---- keep probabilities and score thresholds ------------------------------------------------------------------


def _probability_file(corpus: Corpus, tmp_path: Path, form: str) -> tuple[str, str, dict[str, float]]:
    """A probability file over all samples but every 9th (those are missing from it); some p are 0 and 1."""
    probability = {}
    for i, k in enumerate(corpus.keys):
        if i % 9 == 4:
            continue
        probability[k] = 0.0 if i % 13 == 0 else 1.0 if i % 17 == 1 else round((i * 0.37) % 1, 3)
    if form == "npy-uid":
        arr = np.empty(len(probability), [("uid", "u8,u8"), ("probability", "f4")])
        arr["uid"] = [uid_pair(corpus.uids[k]) for k in probability]
        arr["probability"] = list(probability.values())
        path = tmp_path / "p.npy"
        np.save(path, arr)
        return str(path), "uid", {k: float(np.float32(p)) for k, p in probability.items()}
    path = tmp_path / "p.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["key", "probability"], *[[k, p] for k, p in probability.items()]])
    return str(path), "key", {k: float(np.float32(p)) for k, p in probability.items()}


@pytest.mark.parametrize("form", ["npy-uid", "csv-key"])
def test_a_probability_file_keeps_the_drawn_samples_and_another_seed_or_pass_draws_anew(corpus, tokenizer, tmp_path,
                                                                                          form):
    path, kind, probability = _probability_file(corpus, tmp_path, form)
    sample_filter = SampleFilter(keep_id=kind, keep_probability=path)
    runs = {}
    for seed in (0, 1):
        drawn = [_drawn(corpus, seed, epoch, probability) for epoch in (0, 1)]
        missing = len(corpus.keys) - len(probability)
        keys = _passes(_stream(corpus, tokenizer, sample_filter, seed=seed), passes=2,
                       expected=[{"no_probability": missing, "dropped_by_probability": len(probability) - len(d)}
                                 for d in drawn])
        for epoch in (0, 1):
            assert sorted(keys[epoch]) == sorted(drawn[epoch])
        runs[seed] = keys
    assert set(runs[0][0]) != set(runs[1][0])  # another seed, another draw
    assert set(runs[0][0]) != set(runs[0][1])  # another pass, another draw
    certain = {k for k, p in probability.items() if p == 1.0}
    never = {k for k, p in probability.items() if p == 0.0}
    assert certain and never
    for keys in runs.values():
        for epoch_keys in keys.values():
            assert certain <= set(epoch_keys) and not never & set(epoch_keys)


def test_a_json_probability_and_a_min_score_filter_by_the_sample_json(corpus, tokenizer):
    sample_filter = SampleFilter(keep_probability="json:p", min_score="score >= 0.3")
    meta = corpus.meta
    no_score = {k for k in corpus.keys if "score" not in meta[k]}
    below = {k for k in corpus.keys if k not in no_score and meta[k]["score"] < 0.3}
    passed = [k for k in corpus.keys if k not in no_score | below]
    no_probability = {k for k in passed if "p" not in meta[k]}
    expected = _drawn(corpus, 3, 0, {k: meta[k]["p"] for k in passed if k not in no_probability})
    keys = _passes(_stream(corpus, tokenizer, sample_filter, seed=3), passes=1, expected=[{
        "no_score": len(no_score), "below_min_score": len(below), "no_probability": len(no_probability),
        "dropped_by_probability": len(passed) - len(no_probability) - len(expected)}])
    assert sorted(keys[0]) == sorted(expected)
    # each filter sees what the previous one kept
    sample_filter.reset_stats()
    for sample in shard_samples(expand_urls(corpus.pattern), on_error=None):
        sample_filter(sample, stream_sample_seed(3, 0, sample["__key__"]))
    assert sample_filter.report() == {"min_score": {"seen": 120, "kept": len(passed)},
                                      "keep_probability": {"seen": len(passed), "kept": len(expected)}}


def test_an_exact_resume_keeps_and_drops_the_same_samples(corpus, tokenizer, tmp_path):
    listed = corpus.keys[::2]
    keep = _save_uids(tmp_path / "keep.npy", [corpus.uids[k] for k in listed])
    path, _, _ = _probability_file(corpus, tmp_path, "npy-uid")
    sample_filter = SampleFilter(keep=keep, keep_probability=path)

    def batches(start, n):
        stream = ShardStream(expand_sources(corpus.pattern), tokenizer, 16, batch_size=3, seed=5, resampled=False,
                             shuffle_buffer=6, start=start, sample_filter=sample_filter)
        it = iter(stream)
        return [next(it) for _ in range(n)]

    full = batches(None, 30)  # more than two passes of ~25 kept samples
    assert full[-1]["position"][1] >= 2
    for cut in (1, 7, 13, 22):
        stream, epoch, emitted = full[cut - 1]["position"]
        resumed = batches({stream: (epoch, emitted)}, 30 - cut)
        assert [b["keys"] for b in resumed] == [b["keys"] for b in full[cut:]]
        assert [b["filtered"] for b in resumed] == [b["filtered"] for b in full[cut:]]  # counted from the cut on
        assert all((a["images"] == b["images"]).all() for a, b in zip(resumed, full[cut:]))


@pytest.mark.parametrize("workers", [0, 1])
def test_heartbeats_carry_the_filtered_counts_to_the_next_batch(corpus, tokenizer, tmp_path, workers):
    listed = corpus.keys[-4:]  # the last shard's last samples: most of a pass is filtered before the first batch
    keep = _save_uids(tmp_path / "keep.npy", [corpus.uids[k] for k in listed])
    loader = make_train_loader([[f"{corpus.root}/c-{s}.tar" for s in range(SHARDS)]], tokenizer, 16, 4,
                               workers=workers, seed=0, resampled=False, shuffle_buffer=0, heartbeat_every=0,
                               sample_filter=SampleFilter(keep=keep))
    with pytest.warns(DataStallWarning, match="filtered out not_in_keep_list="):
        batch = next(iter(loader))
    assert sorted(batch["keys"]) == listed and "heartbeat" not in batch
    # every raw sample before the batch's last was filtered: the heartbeats' counts and the batch's own, once
    assert batch["filtered"] == {"not_in_keep_list": batch["position"][2] - 4} and batch["skipped"] == {}


# ---- the inspector ----------------------------------------------------------------------------------------------


def test_the_inspector_reports_the_yield_training_gets(corpus, tokenizer, tmp_path, capsys):
    from clipalign.data.inspect_shards import inspect_shards
    from clipalign.data.inspect_shards import main as inspect_main

    listed = corpus.keys[::2]
    keep = _save_uids(tmp_path / "keep.npy", [corpus.uids[k] for k in listed])
    report = inspect_shards(corpus.pattern, seed=2, curation=SampleFilter(keep=keep, keep_probability="json:p",
                                                                            min_score="score>=0.2"))
    trained = _passes(_stream(corpus, tokenizer, SampleFilter(keep=keep, keep_probability="json:p",
                                                                 min_score="score>=0.2"), seed=2), passes=1)
    kept = len(trained[0])
    assert report["yield"] == {"samples": 120, "kept": kept, "fraction": round(kept / 120, 6)}
    assert report["filters"]["keep_list"] == {"seen": 120, "kept": 60}
    assert report["filters"]["keep_probability"]["kept"] == kept
    assert sum(report["filtered"].values()) == 120 - kept and report["good_samples"] == kept
    out = tmp_path / "report.json"
    inspect_main([corpus.pattern, "--keep", keep, "--min-score", "score>=0.2", "--keep-probability", "json:p",
                  "--seed", "2", "--json", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert f"yield         {kept} of 120" in printed and "keep_list     120 -> 60 (50.0%)" in printed
    # the counts after the yield describe the kept samples, and their shares are of those: every kept one has a jpg
    assert f"jpg {kept} (100%)" in printed
    assert json.loads(out.read_text())["yield"]["kept"] == kept


# ---- bad settings: one line, naming the file ------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    np.save(tmp_path / "floats.npy", np.zeros(4))
    np.save(tmp_path / "empty.npy", np.empty(0, np.dtype("u8,u8")))
    np.save(tmp_path / "nop.npy", np.zeros(3, [("uid", "u8,u8")]))
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    (tmp_path / "uids.txt").write_text("ab" * 16 + "\nnot-a-uid\n")
    (tmp_path / "keys.txt").write_text("000000000\n000000001\n")  # clipalign-make-shards' keys
    (tmp_path / "nocol.csv").write_text("id,probability\na,0.5\n")
    (tmp_path / "badp.csv").write_text("key,probability\na,0.5\nb,1.5\n")
    (tmp_path / "ids.parquet").write_bytes(b"PAR1")
    return {
        "missing": ({"keep": str(tmp_path / "nope.npy")}, "does not exist"),
        "wrong dtype": ({"keep": str(tmp_path / "floats.npy")}, "expected DataComp uids"),
        "empty": ({"keep": str(tmp_path / "empty.npy")}, "holds no ids"),
        "not npy": ({"keep": str(tmp_path / "junk.npy")}, "cannot be read as a NumPy .npy file"),
        "bad uid line": ({"keep": str(tmp_path / "uids.txt")}, "entry 2, 'not-a-uid', is not a uid"),
        "keys as uids": ({"keep": str(tmp_path / "keys.txt")}, "entry 1, '000000000', is not a uid (DataComp's 32 hex "
                                                               "digits) as data.keep_id=uid expects; if the list holds "
                                                               "sample keys"),
        "no column": ({"keep_probability": str(tmp_path / "nocol.csv")}, "has no 'uid' column"),
        "bad probability": ({"keep_probability": str(tmp_path / "badp.csv"), "keep_id": "key"},
                            "entry 2 has probability 1.5"),
        "no probability field": ({"keep_probability": str(tmp_path / "nop.npy")}, "fields 'uid' and 'probability'"),
        "bad parquet": ({"keep": str(tmp_path / "ids.parquet")}, "parquet"),
        "bad threshold": ({"min_score": "clip_score>0.3"}, "expected FIELD>=VALUE"),
        "empty json field": ({"keep_probability": "json:"}, "names no field"),
    }


@pytest.mark.parametrize("case", ["missing", "wrong dtype", "empty", "not npy", "bad uid line", "keys as uids",
                                  "no column",
                                  "bad probability", "no probability field", "bad parquet", "bad threshold",
                                  "empty json field"])
def test_a_bad_file_or_setting_is_one_config_error_naming_it(tmp_path, case):
    settings, expected = _bad_files(tmp_path)[case]
    with pytest.raises(ConfigError) as info:
        SampleFilter(**settings)
    message = str(info.value)
    assert expected in message and "\n" not in message
    named = settings.get("keep") or settings.get("keep_probability") or ""
    if named.startswith("/"):
        assert named in message


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "ids.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed: importing it fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"ids\.parquet is a parquet file, and reading parquet needs pyarrow, which "
                                          r"is not installed: pip install pyarrow"):
        SampleFilter(keep=str(tmp_path / "ids.parquet"))


def test_the_config_keys_and_their_checks():
    cfg = load_config(None, ["data.keep=/x/keep.npy", "data.keep_id=key", "data.keep_probability=json:p",
                             "data.min_score=score>=0.5"])
    assert (cfg.data.keep, cfg.data.keep_id, cfg.data.keep_probability, cfg.data.min_score) == (
        "/x/keep.npy", "key", "json:p", "score>=0.5")
    with pytest.raises(ConfigError, match="data.keep_id: 'hash' is not one of uid, key"):
        load_config(None, ["data.keep_id=hash"])
    assert SampleFilter.from_config(load_config(None, []).data) is None  # nothing set: no filter
    assert len(FILTER_REASON_NAMES) == len(set(FILTER_REASON_NAMES))


def test_a_filter_travels_as_its_settings(corpus, tmp_path):
    import pickle

    keep = _save_uids(tmp_path / "keep.npy", [corpus.uids[k] for k in corpus.keys[:5]])
    sample_filter = SampleFilter(keep=keep, min_score="score>=0.1")
    data = pickle.dumps(sample_filter)
    assert len(data) < 1000  # the settings, not the arrays
    again = pickle.loads(data)
    assert again.settings == sample_filter.settings and len(again.keep_list) == 5


# ---- training: early errors, and the counts in metrics.jsonl and summary.json --------------------------------------


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CLIPALIGN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "clipalign.train", str(REPO / "recipes" / "quickstart.yaml"),
                           "data.synthetic_samples=512", "data.batch_size=8", "data.workers=0",
                           "eval.zeroshot=none", "eval.retrieval=none", "export.dir=", "train.log_with=none", *args],
                          env=env, capture_output=True, text=True, timeout=600)


def test_a_bad_keep_list_stops_the_run_in_one_line_before_anything_is_built(tmp_path):
    np.save(tmp_path / "floats.npy", np.zeros(4))
    run = tmp_path / "run"
    proc = _train(tmp_path, f"data.keep={tmp_path / 'floats.npy'}", f"train.output_dir={run}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clipalign-train: error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"data.keep: {tmp_path / 'floats.npy'} holds a float64 array" in errors[0]
    assert not run.exists() and not (tmp_path / "cache").exists()  # no data drawn, no run directory written


def test_a_curated_run_counts_the_filtered_samples_in_its_metrics_and_summary(corpus, tmp_path):
    listed = corpus.keys[1::3]
    keep = _save_uids(tmp_path / "keep.npy", [corpus.uids[k] for k in listed])
    run = tmp_path / "run"
    proc = _train(tmp_path, "data.synthetic=false", f"data.train={corpus.pattern}", "data.resampled=false",
                  "data.shuffle_buffer=8", f"data.keep={keep}", "train.steps=3", "train.log_every=1",
                  "optim.warmup_steps=1", "data.log_keys=true", f"train.output_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "curating at load time: keep-list" in proc.stdout + proc.stderr
    from clipalign.checkpoint import latest_checkpoint, read_trainer_state

    (position,) = read_trainer_state(latest_checkpoint(run))["data"]["positions"].values()
    epoch, emitted = position
    assert epoch == 0
    kept = 3 * 8
    summary = json.loads((run / "summary.json").read_text())
    assert summary["filtered"] == {"not_in_keep_list": emitted - kept} and summary["skipped"] == {}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["filtered"] for m in lines if "loss" in m][-1] == summary["filtered"]
    trained = [k for line in (run / "keys" / "rank0.jsonl").read_text().splitlines() for k in json.loads(line)["keys"]]
    assert set(trained) <= set(listed) and len(trained) == len(set(trained)) == kept


# ---- the benchmark ------------------------------------------------------------------------------------------------


def test_the_keep_list_benchmark_compares_equal_work(tmp_path):
    import runpy

    tool = runpy.run_path(str(REPO / "tools" / "benchmark_data.py"))  # its globals; nothing runs
    results = tool["main"](["--keep-bench", "--keep-ids", "1000", "--sizes", "256", "--images", "8", "--repeats", "1",
                            "--batch-size", "4", "--cache", str(tmp_path / "cache"), "--json",
                            str(tmp_path / "keep.json")])
    assert json.loads((tmp_path / "keep.json").read_text()) == json.loads(json.dumps(results))
    (r,) = results["sizes"]
    # every sample of the shards is on the list, with 1000 others: both loaders do the same work
    assert (r["list_ids"], r["samples_on_list"], r["list_bytes"]) == (1008, 8, 16 * 1008)
    for key in ("throughput", "cpu_throughput"):
        assert all(len(t["runs"]) == 1 and t["median"] > 0 for t in r[key].values())
    assert r["ratio"] > 0 and r["cpu_ratio"] > 0 and r["filter_us_per_sample"] > 0


# ---- 2 processes x 2 workers ------------------------------------------------------------------------------------


def test_two_processes_with_two_workers_see_every_kept_sample_once_per_pass(corpus, tmp_path):
    listed = [k for i, k in enumerate(corpus.keys) if i % 5 != 2]
    keep = _save_uids(tmp_path / "keep.npy", [corpus.uids[k] for k in listed])
    path, _, probability = _probability_file(corpus, tmp_path, "npy-uid")
    seed = 4
    result = run_check_script(CHECK, 2, ["--shards", corpus.pattern, "--keep", keep, "--keep-probability", path,
                                         "--workers", "2", "--seed", str(seed), "--passes", "2"],
                              tmp_path / "out.json")
    assert result["world_size"] == 2 and result["streams"] == 4
    batches = result["batches"]
    assert {b[0] for b in batches} == {0, 1, 2, 3}
    for epoch in (0, 1):
        seen = Counter(b[3] for b in batches if b[1] == epoch)
        expected = _drawn(corpus, seed, epoch, {k: p for k, p in probability.items() if k in set(listed)})
        assert set(seen) == expected and max(seen.values()) == 1  # each kept sample once, no dropped one
    # per stream, in pass 0: kept + filtered = the raw samples the stream consumed, batch after batch
    for stream in range(4):
        mine = [b for b in batches if b[0] == stream and b[1] == 0]
        total = Counter()
        for n, (_, _, emitted, _, filtered) in enumerate(mine, 1):
            total.update(filtered)
            assert n + sum(total.values()) == emitted
        assert set(total) <= {"not_in_keep_list", "no_probability", "dropped_by_probability"}
