"""The sample format in one place: the skip reasons are one list, read_lines drops a BOM, the caption rules hold."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import pytest

import clipalign.data.inspect_shards
import clipalign.data.make_shards
import clipalign.data.shards
import clipalign.data.sources
import clipalign.train_tokenizer
from clipalign.data.eval_sets import sidecar_lines
from clipalign.data.sample import (
    MAKE_SHARDS_SKIP_REASONS,
    SKIP_REASONS,
    STREAM_SKIP_REASONS,
    caption_of,
    every_caption,
    folder_classnames,
    read_lines,
    sample_captions,
)
from clipalign.data.sources import _sidecar_captions
from clipalign.train_tokenizer import _sample_captions


def _reported_reasons(module) -> set[str]:
    """The skip reasons a module's code can report: string constants handed to `skip(...)` or `count(...)`, given as
    `reason=` or `skip=`, assigned to `skip`/`reason`, or returned by the functions that judge a sample or a sidecar
    (`decode` in the training stream)."""
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    places: list[ast.AST] = []
    for node in ast.walk(tree):
        called = getattr(node.func, "attr", getattr(node.func, "id", None)) if isinstance(node, ast.Call) else None
        if called in ("skip", "count"):
            places += node.args
        if isinstance(node, ast.keyword) and node.arg in ("reason", "skip"):
            places.append(node.value)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) in ("reason", "skip") for t in node.targets):
            places.append(node.value)
        if isinstance(node, ast.FunctionDef) and node.name in ("_sidecar_captions", "_judge"):
            places += [n.value for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None]
        if isinstance(node, ast.FunctionDef) and node.name == "decode":  # returns a reason, or the decoded sample
            places += [n.value for n in ast.walk(node)
                       if isinstance(n, ast.Return) and isinstance(n.value, ast.Constant)]
    return {n.value for place in places for n in ast.walk(place)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value}


def test_skip_reasons_are_one_list_and_both_subsets_come_from_it():
    names = [r.name for r in SKIP_REASONS]
    assert len(names) == len(set(names)) and all(r.meaning for r in SKIP_REASONS)
    assert STREAM_SKIP_REASONS == tuple(n for n in names if n in STREAM_SKIP_REASONS)  # in the one list's order
    assert MAKE_SHARDS_SKIP_REASONS == tuple(n for n in names if n in MAKE_SHARDS_SKIP_REASONS)
    # metrics.jsonl has always listed the training counts in this order
    assert STREAM_SKIP_REASONS == ("no_image", "no_caption", "bad_text", "bad_image", "unreadable_tar")

    stream = _reported_reasons(clipalign.data.shards)
    assert stream == set(STREAM_SKIP_REASONS)  # every reason the stream reports is listed, and no listed one is stale
    # the tools that judge samples as training does report nothing training would not
    for module in (clipalign.data.inspect_shards, clipalign.train_tokenizer):
        assert _reported_reasons(module) <= set(STREAM_SKIP_REASONS), module.__name__
    made = _reported_reasons(clipalign.data.make_shards) | _reported_reasons(clipalign.data.sources)
    assert made == set(MAKE_SHARDS_SKIP_REASONS)


def test_the_trainer_counts_the_stream_reasons():
    from clipalign.monitor import SKIP_REASONS as trainer_reasons

    assert trainer_reasons is STREAM_SKIP_REASONS


def test_read_lines_drops_a_byte_order_mark_and_blank_lines(tmp_path):
    path = tmp_path / "classnames.txt"
    path.write_bytes("\ufeffcat\r\n\n  dog  \n\t\nbird".encode())
    assert read_lines(path) == ["cat", "dog", "bird"]
    assert sidecar_lines(tmp_path, ["classnames.txt"]) == ["cat", "dog", "bird"]  # evaluation reads it alike
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        read_lines(tmp_path / "nope.txt")


def test_folder_classnames_from_a_file_or_the_folders(tmp_path):
    assert folder_classnames(tmp_path, ["golden_retriever", "cat"]) == ["golden retriever", "cat"]
    (tmp_path / "classnames.txt").write_text("\ufeffdog\ncat\n", encoding="utf-8")
    assert folder_classnames(tmp_path, ["a", "b"]) == ["dog", "cat"]
    with pytest.raises(ValueError, match=r"classnames.txt: 2 class names for 3 class folders in .*sorted folder-name"):
        folder_classnames(tmp_path, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"^--classnames: 1 class names for 2"):
        folder_classnames(tmp_path, ["a", "b"], ["x"], given_as="--classnames")


def _raw(txt: str | bytes | None = None, meta=None) -> dict:
    sample = {"__key__": "k", "jpg": b"\xff\xd8"}
    if txt is not None:
        sample["txt"] = txt.encode() if isinstance(txt, str) else txt
    if meta is not None:
        sample["json"] = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return sample


# (raw sample, training's candidates, retrieval's every caption, the tokenizer trainer's captions)
CASES = [
    (_raw(" a cat "), ["a cat"], ["a cat"], ["a cat"]),
    (_raw("txt", {"caption": "json"}), ["txt"], ["txt"], ["txt"]),  # .txt over JSON; img2dataset's pair counts once
    (_raw("txt", {"captions": ["x", "y"]}), ["txt"], ["txt", "x", "y"], ["x", "y"]),
    (_raw(" ", {"caption": " json "}), ["json"], [], ["json"]),  # a blank .txt leaves the JSON caption to training
    (_raw(None, {"captions": [" x ", "", "  ", 3, "y", "x"], "caption": "c"}), ["x", "y", "x"], ["x", "y", "x"],
     ["x", "y", "x"]),
    (_raw(None, {"captions": ["", " "], "caption": "c"}), ["c"], [], ["c"]),  # an all-blank list falls back
    (_raw(None, {"caption": "  "}), [], [], []),
    (_raw(None, ["not", "an", "object"]), [], [], []),
    (_raw("good", b"{broken"), ["good"], ValueError, ["good"]),  # a good .txt stands beside a broken .json
    (_raw(None, None), [], [], []),
]


@pytest.mark.parametrize("sample, candidates, every, tokenizer", CASES)
def test_each_caption_rule_gives_what_it_gave(sample, candidates, every, tokenizer):
    assert sample_captions(sample) == candidates
    expected = None if not candidates else candidates[0] if len(candidates) == 1 else "drawn"
    caption = caption_of(sample, random.Random(0))
    assert caption == expected or (expected == "drawn" and caption in candidates)
    if every is ValueError:
        with pytest.raises(ValueError):
            every_caption(sample)
    else:
        assert every_caption(sample) == every
    assert _sample_captions(sample) == tokenizer


def test_bad_text_or_json_raises_where_the_caption_has_to_come_from():
    for sample in (_raw(None, b"{broken"), _raw(" ", b"[1,"), _raw(b"\xc3\x28"), _raw(None, b"\xff\xfe")):
        with pytest.raises(ValueError):  # UnicodeDecodeError is a ValueError
            caption_of(sample, random.Random(0))
        with pytest.raises(ValueError):
            _sample_captions(sample)


def test_training_draws_the_same_caption_for_the_same_seed():
    sample = _raw(None, {"captions": [f"caption {i}" for i in range(10)]})
    for seed in range(20):
        # exactly what a fresh Random(seed).choice over the list gives: resumed runs see the same captions
        assert caption_of(sample, random.Random(seed)) == random.Random(seed).choice(sample_captions(sample))
    # a one-entry list draws too, so an rng shared across samples (inspect_shards) stays where it always was
    one, shared, reference = _raw(None, {"captions": ["only"]}), random.Random(3), random.Random(3)
    assert caption_of(one, shared) == reference.choice(["only"]) == "only"
    assert shared.getstate() == reference.getstate()
    text, shared = _raw("txt", {"captions": ["a", "b"]}), random.Random(3)
    assert caption_of(text, shared) == "txt" and shared.getstate() == random.Random(3).getstate()


def _sidecars(tmp_path: Path, txt: bytes | None, meta: bytes | None) -> Path:
    image = tmp_path / "x.jpg"
    image.write_bytes(b"")
    for path, data in ((image.with_suffix(".txt"), txt), (image.with_suffix(".json"), meta)):
        path.unlink(missing_ok=True)
        if data is not None:
            path.write_bytes(data)
    return image


@pytest.mark.parametrize("txt, meta, expected", [
    ("\ufeff a cat \n".encode(), None, (("a cat",), {}, None)),  # a BOM is dropped
    (b"txt", b'{"captions": ["x", "y"], "id": 3}', (("txt",), {"id": 3}, None)),  # .txt over JSON, fields kept
    (None, b'{"captions": [" x ", " "], "caption": "c"}', (("x",), {}, None)),
    (None, b'{"captions": [" "], "caption": "c"}', (("c",), {}, None)),
    (b"  ", b'{"id": 1}', ((), {"id": 1}, "empty_caption")),
    (None, b'{"caption": " "}', ((), {}, "empty_caption")),
    (None, b'{"id": 1}', ((), {"id": 1}, "no_caption")),
    (None, None, ((), {}, "no_caption")),
    (b"good", b"{broken", ((), {}, "bad_text")),  # make_shards keeps the JSON's fields, so a broken one is bad
    (None, b"[1, 2]", ((), {}, "bad_text")),
    (b"\xc3\x28", None, ((), {}, "bad_text")),
])
def test_make_shards_sidecar_rule(tmp_path, txt, meta, expected):
    assert _sidecar_captions(_sidecars(tmp_path, txt, meta)) == expected
