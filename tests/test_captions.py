"""Caption sources (`data.captions`): each sample draws one of the sources it has, in proportion to their weights.

The draws are checked through the real stream over real shards: the batches' token ids are matched back to the
captions they encode. Shares are checked against the weights within 3 binomial standard deviations,
|share - p| <= 3 * sqrt(p * (1 - p) / n), for n draws of a source of probability p: each sample's draw is seeded on
its own (seed, pass, key), so the draws are independent, and a correct sampler stays inside that band with
probability 99.7% per check. The seeds are fixed, so a run of these tests always gives the same draws.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from collections import Counter

import pytest
import webdataset as wds
from PIL import Image

from clipalign.config import ConfigError, check_caption_sources, describe_keys, load_config
from clipalign.data.inspect_shards import format_report, inspect_shards
from clipalign.data.sample import caption_of, caption_sources, draw_caption, every_caption
from clipalign.data.shards import ShardStream, expand_sources, make_train_loader
from clipalign.tokenizer import build_tokenizer

WEIGHTS = {"txt": 0.5, "json.recaption": 0.25, "json.captions": 0.25}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny-vit-64")


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (90, 120, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _texts(i: int) -> dict[str, list[str]]:
    """The captions of sample `i`, by source: words that tokenize apart, and its number."""
    return {"txt": [f"alt text {i}"], "json.recaption": [f"synthetic recaption {i}"],
            "json.captions": [f"first listed caption {i}", f"second listed caption {i}"]}


def _sample(i: int, jpeg: bytes, recaption: bool = True) -> dict:
    texts = _texts(i)
    meta = {"captions": texts["json.captions"], "source": f"image-{i}.jpg"}
    if recaption:
        meta["recaption"] = texts["json.recaption"][0]
    return {"__key__": f"{i:06d}", "jpg": jpeg, "txt": texts["txt"][0], "json": json.dumps(meta).encode()}


def _shards(root, samples: list[dict], per_shard: int) -> list[list[str]]:
    root.mkdir(parents=True, exist_ok=True)
    count = math.ceil(len(samples) / per_shard)
    for s in range(count):
        with wds.TarWriter(str(root / f"c-{s}.tar")) as sink:
            for sample in samples[s * per_shard:(s + 1) * per_shard]:
                sink.write(sample)
    return expand_sources(f"{root}/c-{{0..{count - 1}}}.tar")


class _Captions:
    """Token ids -> (key number, source, caption), for every caption the samples `numbers` could draw."""

    def __init__(self, tokenizer, numbers):
        entries = [(i, source, text) for i in numbers for source, texts in _texts(i).items() for text in texts]
        ids = tokenizer([text for _, _, text in entries])
        self.by_ids = {tuple(row.tolist()): entry for row, entry in zip(ids, entries)}
        assert len(self.by_ids) == len(entries)  # every caption tokenizes apart

    def drawn(self, batch) -> list[tuple[int, str, str]]:
        found = [self.by_ids[tuple(row.tolist())] for row in batch["texts"]]
        assert [f"{i:06d}" for i, _, _ in found] == batch["keys"]  # each caption is its own sample's
        return found


def _within(count: int, n: int, p: float, what: str) -> None:
    """`count` of `n` draws is within 3 binomial standard deviations of the share `p`."""
    share, band = count / n, 3 * math.sqrt(p * (1 - p) / n)
    assert abs(share - p) <= band, f"{what}: {count}/{n} = {share:.4f}, expected {p:.4f} +- {band:.4f}"


# ---------------------------------------------------------------------------------------------------------------
# the draw, sample by sample


def _raw(txt=None, meta=None) -> dict:
    sample = {"__key__": "k", "jpg": b"\xff\xd8"}
    if txt is not None:
        sample["txt"] = txt if isinstance(txt, bytes) else txt.encode()
    if meta is not None:
        sample["json"] = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return sample


def test_only_the_sources_a_sample_has_are_drawn_from():
    sample = _raw(" alt ", {"recaption": "  ", "captions": ["", 3, " one ", "two"], "score": 0.3, "tags": []})
    sources = {"txt": 1.0, "json.recaption": 2.0, "json.captions": 3.0, "json.score": 1.0, "json.tags": 1.0,
               "json.missing": 1.0}
    # blank, non-string, empty or missing sources are not there; a list keeps its non-blank strings, stripped
    assert caption_sources(sample, sources) == [("txt", 1.0, ["alt"], False), ("json.captions", 3.0, ["one", "two"],
                                                                                True)]
    assert caption_of(_raw(None, {"caption": "the default rule's"}), random.Random(0), WEIGHTS) is None
    assert caption_of(_raw("  ", {"recaption": ""}), random.Random(0), WEIGHTS) is None
    assert draw_caption(_raw("alt", {"recaption": "re"}), random.Random(0), {"json.recaption": 1}) == \
        ("json.recaption", "re")


def test_no_sources_is_the_default_rule():
    for sample in (_raw("alt", {"captions": ["a", "b"]}), _raw(None, {"captions": ["a", "b", "c"]}),
                   _raw(" ", {"caption": "c"}), _raw(None, {"label": 1})):
        for seed in range(5):
            expected = caption_of(sample, random.Random(seed))
            assert caption_of(sample, random.Random(seed), {}) == expected
            assert caption_of(sample, random.Random(seed), None) == expected


def test_an_undecodable_member_a_source_names_is_bad_text_and_one_it_does_not_is_never_read():
    broken_json = _raw("alt", b"{broken")
    assert caption_of(broken_json, random.Random(0), {"txt": 1}) == "alt"  # the JSON is not read
    with pytest.raises(ValueError):  # the draw needs to know which JSON sources are there
        caption_of(broken_json, random.Random(0), {"txt": 1, "json.recaption": 1})
    bad_txt = _raw(b"\xff\xfe", {"recaption": "re"})
    assert caption_of(bad_txt, random.Random(0), {"json.recaption": 1}) == "re"
    with pytest.raises(UnicodeDecodeError):
        caption_of(bad_txt, random.Random(0), {"txt": 1, "json.recaption": 1})


def test_the_same_seed_draws_the_same_caption():
    sample = _sample(7, b"\xff\xd8")
    sample["txt"] = sample["txt"].encode()
    drawn = [draw_caption(sample, random.Random(seed), WEIGHTS) for seed in range(200)]
    assert drawn == [draw_caption(sample, random.Random(seed), WEIGHTS) for seed in range(200)]
    assert {source for source, _ in drawn} == set(WEIGHTS)


def test_retrieval_keeps_every_caption_whatever_the_sources():
    """`every_caption` is the evaluation set's own captions (the .txt and the JSON list), not data.captions': a
    recaption field is left out, so retrieval scores compare across caption mixes."""
    sample = _sample(3, b"\xff\xd8")
    sample["txt"] = sample["txt"].encode()
    assert every_caption(sample) == ["alt text 3", "first listed caption 3", "second listed caption 3"]


# ---------------------------------------------------------------------------------------------------------------
# through the stream


def test_the_stream_draws_each_source_in_proportion_and_renormalizes_over_those_a_sample_has(tmp_path, tokenizer,
                                                                                              jpeg):
    """2000 samples with all three sources, 1000 without a recaption (renormalized: txt 2/3, listed captions 1/3)
    and 20 with none of them (`no_caption`), one exact pass through `make_train_loader` and a worker."""
    full, partial, none = range(2000), range(2000, 3000), range(3000, 3020)
    samples = [_sample(i, jpeg) for i in full] + [_sample(i, jpeg, recaption=False) for i in partial]
    samples += [{"__key__": f"{i:06d}", "jpg": jpeg, "json": json.dumps({"caption": "default rule"}).encode()}
                for i in none]
    random.Random(0).shuffle(samples)
    sources = _shards(tmp_path, samples, per_shard=500)
    loader = make_train_loader(sources, tokenizer, 16, batch_size=100, workers=1, seed=4, resampled=False,
                               shuffle_buffer=50, captions=WEIGHTS)
    captions = _Captions(tokenizer, range(3000))
    drawn, skipped = [], Counter()
    batches = iter(loader)
    for _ in range(30):  # the 3000 samples with a caption: exactly one pass
        batch = next(batches)
        drawn += captions.drawn(batch)
        skipped.update(batch["skipped"])
    assert sorted(i for i, _, _ in drawn) == list(range(3000))
    assert skipped == {"no_caption": 20}

    with_all = Counter(source for i, source, _ in drawn if i in full)
    for source, p in WEIGHTS.items():
        _within(with_all[source], len(full), p, f"{source} among samples with every source")
    without = Counter(source for i, source, _ in drawn if i in partial)
    assert without["json.recaption"] == 0
    _within(without["txt"], len(partial), 0.5 / 0.75, "txt without a recaption")
    _within(without["json.captions"], len(partial), 0.25 / 0.75, "listed captions without a recaption")
    # a list draws its entries alike
    listed = [text for _, source, text in drawn if source == "json.captions"]
    _within(sum(text.startswith("first") for text in listed), len(listed), 0.5, "first of the list")


def _stream(sources, tokenizer, **args) -> ShardStream:
    return ShardStream(sources, tokenizer, 16, batch_size=4, seed=5, resampled=False, shuffle_buffer=6,
                       captions=WEIGHTS, **args)


def test_a_resumed_exact_pass_draws_the_same_captions(tmp_path, tokenizer, jpeg):
    sources = _shards(tmp_path, [_sample(i, jpeg) for i in range(21)], per_shard=7)  # batches straddle passes

    def batches(start, n):
        it = iter(_stream(sources, tokenizer, start=start))
        return [next(it) for _ in range(n)]

    full = batches(None, 12)  # more than two passes
    for cut in (1, 4, 7):
        stream, epoch, emitted = full[cut - 1]["position"]
        resumed = batches({stream: (epoch, emitted)}, 12 - cut)
        assert [b["keys"] for b in resumed] == [b["keys"] for b in full[cut:]]
        assert all((a["texts"] == b["texts"]).all() for a, b in zip(resumed, full[cut:]))


def test_each_pass_draws_afresh(tmp_path, tokenizer, jpeg):
    """The seed holds the pass: a sample's captions in two passes agree only as two independent draws would,
    with probability sum(p^2) over its 4 captions, 0.5^2 + 0.25^2 + 2 x 0.125^2 = 0.34375."""
    n = 400
    sources = _shards(tmp_path, [_sample(i, jpeg) for i in range(n)], per_shard=100)
    stream = ShardStream(sources, tokenizer, 16, batch_size=50, seed=8, resampled=False, shuffle_buffer=20,
                         captions=WEIGHTS)
    captions = _Captions(tokenizer, range(n))
    batches = iter(stream)
    passes = []
    for _ in range(2):
        passes.append({i: text for _ in range(n // 50) for i, _, text in captions.drawn(next(batches))})
    assert sorted(passes[0]) == sorted(passes[1]) == list(range(n))
    same = sum(passes[0][i] == passes[1][i] for i in range(n))
    _within(same, n, 0.34375, "the same caption in the next pass")


def test_the_inspector_draws_and_counts_the_sources(tmp_path, jpeg):
    samples = [_sample(i, jpeg) for i in range(400)] + [_sample(i, jpeg, recaption=False) for i in range(400, 410)]
    _shards(tmp_path, samples, per_shard=410)
    report = inspect_shards(f"{tmp_path}/c-0.tar", captions={"txt": 1, "json.recaption": 1})
    sources = report["captions"]["sources"]
    assert sum(sources.values()) == 410
    _within(sources["json.recaption"], 400, 0.5, "recaption drawn by the inspector")  # the 10 others: txt only
    assert "caption from  txt " in format_report(report)
    assert "sources" not in inspect_shards(f"{tmp_path}/c-0.tar")["captions"]


# ---------------------------------------------------------------------------------------------------------------
# the config


def test_data_captions_from_a_recipe_or_an_override(tmp_path):
    assert load_config().data.captions == {}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  captions:\n    txt: 0.5\n    json.recaption: 3e-1\n    json.captions: 1\n")
    cfg = load_config(recipe)
    assert cfg.data.captions == {"txt": 0.5, "json.recaption": 0.3, "json.captions": 1.0}
    assert list(cfg.data.captions) == ["txt", "json.recaption", "json.captions"]  # the recipe's order
    cfg = load_config(recipe, ["data.captions={json.recaption: 2}"])
    assert cfg.data.captions == {"json.recaption": 2.0}  # an override replaces the mapping
    assert load_config(recipe, ["data.captions={}"]).data.captions == {}
    assert "data.captions={}" in describe_keys()


@pytest.mark.parametrize("value, message", [
    ("{jsn.recaption: 1}", "caption source 'jsn.recaption' is neither txt nor json.FIELD"),
    ("{json.: 1}", "caption source 'json.' is neither txt nor json.FIELD"),
    ("{text: 1}", "caption source 'text' is neither"),
    ("{1: 1}", "caption source 1 is neither"),
    ("{txt: 0}", "caption source txt: the weight must be a finite number > 0, got 0"),
    ("{txt: 1, json.recaption: -0.5}", "caption source json.recaption: the weight must be .* got -0.5"),
    ("{txt: .inf}", "the weight must be a finite number > 0, got inf"),
    ("{txt: true}", "the weight must be a finite number > 0, got True"),
    ("{txt: lots}", "the weight must be a finite number > 0, got 'lots'"),
    ("{txt: }", "the weight must be a finite number > 0, got None"),
    ("[txt, json.recaption]", "expected a mapping of keys to values"),
])
def test_bad_caption_sources_are_config_errors_naming_the_entry(value, message):
    where = rf"^override 'data\.captions={re.escape(value)}': data\.captions: "
    with pytest.raises(ConfigError, match=where + f".*{message}"):
        load_config(overrides=[f"data.captions={value}"])


def test_the_stream_checks_its_sources_as_the_config_does(tmp_path, tokenizer, jpeg):
    sources = _shards(tmp_path, [_sample(0, jpeg)], per_shard=1)
    with pytest.raises(ValueError, match="caption source 'alt' is neither txt nor json.FIELD"):
        ShardStream(sources, tokenizer, 16, 1, captions={"alt": 1})
    assert check_caption_sources({"txt": "5e-1"}) == {"txt": 0.5}  # YAML 1.1 reads 5e-1 as a string
    with pytest.raises(ValueError, match="expected a mapping"):
        check_caption_sources(["txt"])
