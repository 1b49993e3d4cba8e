"""The synthetic data set on real files: true captions, readable shards and ImageFolder, idempotency, races."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import random
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torchvision.datasets import ImageFolder

from clipalign.data.synthetic import (
    COLOUR_JITTER,
    COLOURS,
    SHAPES,
    SyntheticDataset,
    draw_sample,
    heldout_classes,
    make_synthetic_dataset,
)

SMALL = {"train_samples": 60, "heldout_per_class": 2, "image_size": 64, "samples_per_shard": 25, "seed": 3}
_SIZE_OF_WORD = {"small": "small", "little": "small", "large": "large", "big": "large"}
_RELATION_TEST = {
    "above": lambda a, b: a[1] < b[1],
    "below": lambda a, b: a[1] > b[1],
    "left of": lambda a, b: a[0] < b[0],
    "right of": lambda a, b: a[0] > b[0],
}
_RELATION_WORDS = {"above": ["above"], "below": ["below", "under"], "left of": ["left of"], "right of": ["right of"]}
_POSITION_WORDS = {
    "left": ["left"],
    "right": ["right"],
    "top": ["top"],
    "bottom": ["bottom"],
    "center": ["center", "middle"],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "ds", **SMALL)


def _nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda c: sum((int(x) - y) ** 2 for x, y in zip(rgb, COLOURS[c])))


def _centre_rgb(img: Image.Image, center: list[float], k: int = 1) -> np.ndarray:
    """Mean colour of the (2k+1)^2 pixels around the object's centre."""
    x, y = round(center[0]), round(center[1])
    return np.asarray(img.convert("RGB"), dtype=np.float32)[y - k : y + k + 1, x - k : x + k + 1].mean(axis=(0, 1))


def _read_train(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False))


def test_draw_sample_captions_are_true() -> None:
    rng = random.Random(0)
    counts = {1: 0, 2: 0}
    for _ in range(400):
        img, caption, meta = draw_sample(rng, 64)
        assert img.size == (64, 64) and img.mode == "RGB"
        assert meta["caption"] == caption
        objects = meta["objects"]
        counts[len(objects)] += 1
        assert (meta["shape"], meta["colour"]) == (objects[0]["shape"], objects[0]["colour"])
        # every object is named by colour and shape, in order
        names = [f"{o['colour']} {o['shape']}" for o in objects]
        positions = [caption.index(n) for n in names]
        assert positions == sorted(positions), caption
        for o in objects:
            # the drawn centre pixel is the object's own colour, close to the named base colour
            centre = _centre_rgb(img, o["center"], k=0)
            assert np.array_equal(centre, np.array(o["rgb"], dtype=np.float32)), (caption, o)
            assert np.abs(centre - np.array(COLOURS[o["colour"]])).max() <= COLOUR_JITTER
            # a size word, when put before the object's name, is the drawn size
            before = re.findall(rf"(\w+) {o['colour']} {o['shape']}", caption)
            sizes = [_SIZE_OF_WORD[w] for w in before if w in _SIZE_OF_WORD]
            assert sizes in ([], [o["size"]]), (caption, o)
        if len(objects) == 1:
            assert meta["relation"] is None
            # a position, when named, is the drawn one
            wrong = [w for p, ws in _POSITION_WORDS.items() if p != meta["position"] for w in ws]
            assert not any(w in caption for w in wrong), (caption, meta["position"])
        else:
            a, b = (o["center"] for o in objects)
            assert _RELATION_TEST[meta["relation"]](a, b), meta
            # the two objects never overlap: along the relation's axis they are in different halves
            axis = 1 if meta["relation"] in ("above", "below") else 0
            ra, rb = objects[0]["radius"], objects[1]["radius"]
            assert abs(a[axis] - b[axis]) >= ra + rb, meta
    assert 0.5 < counts[1] / 400 < 0.7


def test_draw_sample_relation_words_match() -> None:
    rng = random.Random(1)
    for _ in range(300):
        _, caption, meta = draw_sample(rng, 64)
        if meta["relation"] is None:
            continue
        found = {rel for rel, words in _RELATION_WORDS.items() if any(f" {w} " in caption for w in words)}
        assert found <= {meta["relation"]}, caption


def test_draw_sample_is_deterministic() -> None:
    for seed in range(5):
        a = draw_sample(random.Random(seed), 48)
        b = draw_sample(random.Random(seed), 48)
        assert a[1:] == b[1:]
        assert a[0].tobytes() == b[0].tobytes()


def test_shards_hold_all_samples_with_true_metadata(dataset: SyntheticDataset) -> None:
    assert dataset.train_pattern == str(dataset.root / "train-{000000..000002}.tar")
    assert [Path(p).is_file() for p in braceexpand(dataset.train_pattern)] == [True] * 3
    rows = _read_train(dataset.train_pattern)
    assert len(rows) == dataset.train_samples == SMALL["train_samples"]
    assert [r["__key__"] for r in rows] == [f"{i:09d}" for i in range(len(rows))]
    checked = 0
    for r in rows:
        caption = r["txt"].decode("utf-8")
        meta = json.loads(r["json"])
        assert meta["caption"] == caption
        assert f"{meta['colour']} {meta['shape']}" in caption
        img = Image.open(io.BytesIO(r["jpg"]))
        assert img.format == "JPEG" and img.size == (64, 64)
        obj = meta["objects"][0]
        if len(meta["objects"]) == 1 and obj["size"] == "large":
            # after JPEG, the centre of a large single object is still nearest its named colour
            assert _nearest_colour(_centre_rgb(img, obj["center"])) == meta["colour"], caption
            checked += 1
    assert checked >= 5


def test_heldout_is_an_imagefolder_of_30_classes(dataset: SyntheticDataset) -> None:
    folder = ImageFolder(str(dataset.heldout_dir))
    assert len(folder.classes) == 30 == len(COLOURS) * len(SHAPES)
    assert folder.classes == heldout_classes()
    assert [c.replace("_", " ") for c in folder.classes] == dataset.classnames
    assert dataset.classnames[0] == "blue circle"
    assert len(folder) == 30 * SMALL["heldout_per_class"]
    img, label = folder[0]
    assert img.size == (64, 64) and label == 0
    lines = (dataset.heldout_dir / "classnames.txt").read_text().splitlines()
    assert lines == dataset.classnames
    assert dataset.templates and all("{}" in t for t in dataset.templates)
    assert "a photo of a {}." in dataset.templates


def test_heldout_images_show_their_class(dataset: SyntheticDataset) -> None:
    # the object covers the image's most saturated pixels: their mean colour is the class colour
    for name in heldout_classes():
        colour = name.split("_")[0]
        for path in sorted((dataset.heldout_dir / name).glob("*.jpg")):
            px = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).reshape(-1, 3)
            saturation = px.max(axis=1) - px.min(axis=1)
            assert _nearest_colour(px[saturation > 80].mean(axis=0)) == colour, path


def test_heldout_stream_is_disjoint_from_training(dataset: SyntheticDataset) -> None:
    train = {r["jpg"] for r in _read_train(dataset.train_pattern)}
    heldout = {p.read_bytes() for p in dataset.heldout_dir.rglob("*.jpg")}
    assert not train & heldout


def test_second_call_returns_without_redrawing(dataset: SyntheticDataset) -> None:
    files = [p for p in dataset.root.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = make_synthetic_dataset(dataset.root, **SMALL)
    assert again == dataset
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert sorted(p for p in dataset.root.rglob("*") if p.is_file()) == sorted(files)


def test_other_parameters_raise_naming_the_directory(dataset: SyntheticDataset) -> None:
    with pytest.raises(FileExistsError, match=str(dataset.root)) as info:
        make_synthetic_dataset(dataset.root, **{**SMALL, "seed": 4})
    assert "seed" in str(info.value)


def test_foreign_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete synthetic data set"):
        make_synthetic_dataset(tmp_path / "ds", **SMALL)
    assert (tmp_path / "ds" / "notes.txt").read_text() == "mine"


def test_empty_existing_directory_is_filled(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    ds = make_synthetic_dataset(tmp_path / "ds", **{**SMALL, "train_samples": 5})
    assert len(_read_train(ds.train_pattern)) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary directory left behind


def test_same_seed_same_bytes_in_two_roots(tmp_path: Path, dataset: SyntheticDataset) -> None:
    other = make_synthetic_dataset(tmp_path / "again", **SMALL)
    for a, b in zip(braceexpand(dataset.train_pattern), braceexpand(other.train_pattern), strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    rel = sorted(p.relative_to(dataset.root) for p in dataset.heldout_dir.rglob("*") if p.is_file())
    assert rel == sorted(p.relative_to(other.root) for p in other.heldout_dir.rglob("*") if p.is_file())
    assert all((dataset.root / r).read_bytes() == (other.root / r).read_bytes() for r in rel)


def _make_in_process(root: str, barrier, queue) -> None:
    barrier.wait()
    ds = make_synthetic_dataset(root, **{**SMALL, "train_samples": 40})
    queue.put(ds.train_pattern)


def test_two_processes_at_once_agree(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    root = str(tmp_path / "ds")
    procs = [ctx.Process(target=_make_in_process, args=(root, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    patterns = [queue.get(timeout=5) for _ in procs]
    assert patterns[0] == patterns[1] == str(tmp_path / "ds" / "train-{000000..000001}.tar")
    assert len(_read_train(patterns[0])) == 40
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # the loser removed its temporary copy


def test_heldout_captions_are_true_and_restored_when_missing(dataset: SyntheticDataset) -> None:
    import csv

    with open(dataset.heldout_captions, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    images = sorted({row["filepath"] for row in rows})
    assert images == sorted(str(p.relative_to(dataset.heldout_dir)) for p in dataset.heldout_dir.rglob("*.jpg"))
    assert len(rows) == 2 * len(images)
    for row in rows:
        colour, shape = Path(row["filepath"]).parent.name.split("_")
        assert f"{colour} {shape}" in row["caption"], row
    # a set drawn before the captions existed gets them, the same ones, on its next use
    before = dataset.heldout_captions.read_bytes()
    dataset.heldout_captions.unlink()
    again = make_synthetic_dataset(dataset.root, **SMALL)
    assert again.heldout_captions.read_bytes() == before
