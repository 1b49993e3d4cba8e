"""Shard tools on real files: make shards from each input kind, inspect them, and train-read them with ShardStream."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.datasets import ImageFolder

from clipalign.cli import parse_bytes
from clipalign.data.inspect_shards import format_report, inspect_shards
from clipalign.data.inspect_shards import main as inspect_main
from clipalign.data.make_shards import (
    STATS_FILE,
    ShardInputError,
    folder_samples,
    imagefolder_samples,
    make_shards,
    table_samples,
)
from clipalign.data.make_shards import main as make_main
from clipalign.data.shards import ShardStream, expand_urls
from clipalign.tokenizer import build_tokenizer

_PIL = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny-vit-64")


def _image(path: Path, size=(48, 32), colour=(200, 30, 30), noise: bool = False, exif=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if noise:
        pixels = np.random.default_rng(len(str(path))).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(pixels, "RGB")
    else:
        img = Image.new("RGB", size, colour)
    fmt = _PIL[path.suffix[1:].lower()]
    img.save(path, format=fmt, **({"exif": exif} if exif is not None else {}))
    return path


def _captioned(path: Path, caption: str, **kw) -> Path:
    _image(path, **kw)
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _raw(pattern: str) -> list[dict]:
    return list(wds.WebDataset(expand_urls(pattern), shardshuffle=False))


def _train_batch(pattern: str, n: int, tokenizer) -> dict:
    """One exact pass over the shards through the training pipeline, as one batch of all `n` samples."""
    stream = ShardStream(expand_urls(pattern), tokenizer, image_size=32, batch_size=n, resampled=False,
                         shuffle_buffer=0)
    return next(iter(stream))


def _assert_trains_with(pattern: str, captions_by_key: dict[str, list[str]], tokenizer) -> None:
    """ShardStream yields every key once, each with one of its captions."""
    batch = _train_batch(pattern, len(captions_by_key), tokenizer)
    assert sorted(batch["keys"]) == sorted(captions_by_key)
    assert batch["skipped"] == {}
    for key, tokens in zip(batch["keys"], batch["texts"]):
        options = tokenizer(captions_by_key[key])
        assert any(torch.equal(tokens, row) for row in options), key


def _stats(out: Path) -> dict:
    return json.loads((out / STATS_FILE).read_text())


def test_folder_round_trip(tmp_path, tokenizer, capsys):
    src = tmp_path / "photos"
    _captioned(src / "b.jpg", "a red square")
    _captioned(src / "a.png", "a png image", colour=(0, 200, 0))
    _captioned(src / "nested" / "deeper" / "c.webp", "  a webp, nested  ")
    _captioned(src / "d.jpeg", "a jpeg file")
    _image(src / "e.bmp")  # converted to JPEG
    (src / "e.json").write_text(json.dumps({"captions": ["first", " ", "second"], "label": 4, "extra": "kept"}))
    _image(src / "f.jpg")
    (src / "f.json").write_text(json.dumps({"caption": "from json"}))
    (src / ".hidden.jpg").write_bytes(b"macOS resource fork, not an image")
    (src / "notes.md").write_text("not an image")
    out = tmp_path / "shards"

    make_main(["folder", str(src), "--out", str(out), "--samples-per-shard", "4", "--no-progress"])
    stats = _stats(out)
    printed = capsys.readouterr().out
    assert stats["pattern"] == f"{out}/train-{{000000..000001}}.tar"
    assert f"'data.train={stats['pattern']}'" in printed
    assert (stats["samples_in"], stats["samples_written"], stats["shards_written"], stats["skipped"]) == (6, 6, 2, 0)
    assert stats["images_reencoded"] == 1 and stats["bytes_written"] == sum(p.stat().st_size for p in out.glob("*.tar"))

    rows = {r["__key__"]: r for r in _raw(stats["pattern"])}
    # keys follow the sorted relative paths: a.png b.jpg d.jpeg e.bmp f.jpg nested/deeper/c.webp
    assert sorted(rows) == [f"{i:09d}" for i in range(6)]
    assert rows["000000000"]["png"] == (src / "a.png").read_bytes()  # shard formats are stored byte for byte
    assert "jpg" in rows["000000002"] and "jpg" in rows["000000003"]  # named by what they hold: .jpeg, .bmp -> jpg
    assert json.loads(rows["000000003"]["json"]) == {"captions": ["first", "second"], "label": 4, "extra": "kept",
                                                     "source": "e.bmp"}
    assert "txt" not in rows["000000003"]  # with a .txt, training would never draw the other captions
    assert rows["000000005"]["txt"] == b"a webp, nested"
    assert json.loads(rows["000000005"]["json"])["source"] == "nested/deeper/c.webp"

    report = inspect_shards(stats["pattern"])
    assert report["samples"] == report["good_samples"] == 6 and report["bad_total"] == 0
    assert report["extensions"] == {"jpg": 4, "png": 1, "webp": 1, "json": 6, "txt": 5}
    assert [s["samples"] for s in report["shards"]] == [4, 2]
    assert report["images"]["width"] == {"min": 48, "median": 48.0, "max": 48}
    assert report["images"]["formats"] == {"JPEG": 4, "PNG": 1, "WEBP": 1}

    captions = {"000000000": ["a png image"], "000000001": ["a red square"], "000000002": ["a jpeg file"],
                "000000003": ["first", "second"], "000000004": ["from json"], "000000005": ["a webp, nested"]}
    _assert_trains_with(stats["pattern"], captions, tokenizer)


def test_table_two_caption_columns_and_tsv(tmp_path, tokenizer):
    images = tmp_path / "images"
    elsewhere = _image(tmp_path / "elsewhere" / "abs.png", colour=(0, 0, 200))
    table = tmp_path / "meta" / "captions.csv"
    table.parent.mkdir()
    rows = [("../images/0.jpg", "a title", "an alt text"),
            ("../images/1.jpg", 'with "quotes", and a comma', ""),  # one caption left: stored as caption + .txt
            (str(elsewhere), "absolute path", "also absolute")]
    for rel, *_ in rows[:2]:
        _image(table.parent / rel)
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title", "alt", "unused"])
        writer.writerows([(*r, "x") for r in rows])
    out = tmp_path / "out"
    make_main(["table", str(table), "--out", str(out), "--image-col", "filepath", "--caption-col", "title",
               "--caption-col", "alt", "--no-progress", "--workers", "2"])
    stats = _stats(out)
    assert (stats["samples_written"], stats["shards_written"], stats["skipped"]) == (3, 1, 0)
    assert stats["input"] == {"kind": "table", "path": str(table), "image_col": "filepath",
                              "caption_cols": ["title", "alt"]}
    raw = {r["__key__"]: r for r in _raw(stats["pattern"])}
    assert json.loads(raw["000000000"]["json"]) == {"captions": ["a title", "an alt text"],
                                                    "source": "../images/0.jpg"}
    assert raw["000000001"]["txt"].decode() == 'with "quotes", and a comma'
    assert raw["000000002"]["png"] == elsewhere.read_bytes()
    report = inspect_shards(stats["pattern"])
    assert report["extensions"] == {"jpg": 2, "png": 1, "json": 3, "txt": 1}
    _assert_trains_with(stats["pattern"], {"000000000": ["a title", "an alt text"],
                                           "000000001": ['with "quotes", and a comma'],
                                           "000000002": ["absolute path", "also absolute"]}, tokenizer)

    # TSV is read without quoting: a caption may start with a quote mark
    tsv = images / "list.tsv"
    tsv.write_text('image\tcaption\n0.jpg\t"Hello" on a sign\n1.jpg\tplain\n', encoding="utf-8")
    stats = make_shards(table_samples(tsv), tmp_path / "tsv")
    assert stats["samples_written"] == 2
    assert [r["txt"].decode() for r in _raw(stats["pattern"])] == ['"Hello" on a sign', "plain"]


def test_imagefolder_labels_captions_and_classnames(tmp_path, tokenizer):
    root = tmp_path / "val"
    counts = {"zebra": 2, "golden_retriever": 3, "cat": 1}
    for name, n in counts.items():
        for i in range(n):
            _image(root / name / f"{i}.jpg", colour=(10 * i, 100, 100))
    out = tmp_path / "out"
    make_main(["imagefolder", str(root), "--out", str(out), "--templates", "a photo of a {}.", "--templates",
               "a blurry {}.", "--no-progress"])
    stats = _stats(out)
    assert stats["samples_written"] == 6 and stats["input"]["classes"] == 3
    assert (out / "classnames.txt").read_text().splitlines() == ["cat", "golden retriever", "zebra"]
    class_to_idx = ImageFolder(str(root)).class_to_idx  # zero-shot evaluation's labels
    captions = {}
    for row in _raw(stats["pattern"]):
        meta = json.loads(row["json"])
        folder = meta["source"].split("/")[0]
        assert meta["label"] == class_to_idx[folder]
        name = folder.replace("_", " ")
        assert meta["captions"] == [f"a photo of a {name}.", f"a blurry {name}."] and meta["classname"] == name
        assert "txt" not in row
        captions[row["__key__"]] = meta["captions"]
    report = inspect_shards(stats["pattern"])
    assert report["extensions"] == {"jpg": 6, "json": 6}
    _assert_trains_with(stats["pattern"], captions, tokenizer)

    # templates and class names from files; a template without "{}" is an error
    (root / "classnames.txt").write_text("kitty\ndog\nstriped horse\n")
    samples, names = imagefolder_samples(root, templates=["{}"])
    assert names == ["kitty", "dog", "striped horse"] and samples[0].captions == ("kitty",)
    with pytest.raises(ShardInputError, match="has no '{}'"):
        imagefolder_samples(root, templates=["a photo"])


def test_shard_size_limits_by_count_and_by_bytes(tmp_path):
    src = tmp_path / "src"
    for i in range(13):
        _captioned(src / f"{i:02d}.jpg", f"noise {i}", size=(64, 64), noise=True)
    samples = folder_samples(src)
    by_count = make_shards(samples, tmp_path / "count", samples_per_shard=4)
    assert [len(_raw(str(tmp_path / "count" / n))) for n in by_count["shards"]] == [4, 4, 4, 1]

    limit = 40_000
    by_bytes = make_shards(samples, tmp_path / "bytes", samples_per_shard=100, max_shard_bytes=limit)
    paths = [tmp_path / "bytes" / n for n in by_bytes["shards"]]
    sizes = [p.stat().st_size for p in paths]
    assert len(paths) > 2 and max(sizes) <= limit, sizes
    assert sum(len(_raw(str(p))) for p in paths) == 13 and by_bytes["oversized_samples"] == 0
    # the limit is tight: the first sample of the next shard would not have fitted into the previous one
    for path, following in zip(paths, paths[1:]):
        with tarfile.open(path) as held, tarfile.open(following) as nxt:
            members = held.getmembers()
            first_key = nxt.getmembers()[0].name.split(".")[0]
            extra = [m for m in nxt.getmembers() if m.name.split(".")[0] == first_key]
        blocks = sum(1 + -(-m.size // 512) for m in members + extra) + 2
        assert -(-blocks * 512 // 10240) * 10240 > limit

    alone = make_shards(samples[:3], tmp_path / "alone", max_shard_bytes=5000)  # each sample is larger than that
    assert alone["shards_written"] == 3 and alone["oversized_samples"] == 3

    assert parse_bytes("40000") == 40_000 and parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2k") == 2000


def test_resize_on_write_and_exif_rotation(tmp_path):
    src = tmp_path / "src"
    _captioned(src / "landscape.jpg", "wide", size=(300, 200))
    _captioned(src / "portrait.png", "tall", size=(120, 400))
    small = _captioned(src / "small.png", "small", size=(80, 60))
    _captioned(src / "exact.jpg", "exact", size=(100, 150))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the upright picture is 20 wide, 40 high
    _captioned(src / "rotated.jpg", "rotated", size=(40, 20), exif=exif)
    stats = make_shards(folder_samples(src), tmp_path / "out", resize=100, quality=90)
    assert stats["images_resized"] == 2 and stats["images_reencoded"] == 3
    sizes = {}
    for row in _raw(stats["pattern"]):
        ext = next(e for e in ("jpg", "png") if e in row)
        sizes[row["txt"].decode()] = (ext, Image.open(io.BytesIO(row[ext])).size)
        if row["txt"] == b"small":
            assert row["png"] == small.read_bytes()  # not upscaled, not re-encoded
    assert sizes == {"exact": ("jpg", (100, 150)), "wide": ("jpg", (150, 100)), "tall": ("jpg", (100, 333)),
                     "small": ("png", (80, 60)), "rotated": ("jpg", (20, 40))}


def test_bad_inputs_are_skipped_and_counted(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(3):
        _captioned(src / f"good{i}.jpg", f"good {i}")
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (src / "corrupt.txt").write_text("corrupt")
    whole = io.BytesIO()
    Image.new("RGB", (200, 200), (1, 2, 3)).save(whole, format="JPEG")
    (src / "truncated.jpg").write_bytes(whole.getvalue()[:300])
    (src / "truncated.txt").write_text("truncated")
    _image(src / "nocaption.jpg")
    _captioned(src / "empty.jpg", "  \n ")
    _image(src / "emptyjson.jpg")
    (src / "emptyjson.json").write_text(json.dumps({"captions": ["", "  "]}))
    _image(src / "labelonly.jpg")
    (src / "labelonly.json").write_text(json.dumps({"label": 1}))
    _image(src / "badutf8.jpg")
    (src / "badutf8.txt").write_bytes(b"\xff\xfe\xfa")
    _image(src / "badjson.jpg")
    (src / "badjson.json").write_text("{not json")
    out = tmp_path / "out"
    make_main(["folder", str(src), "--out", str(out), "--no-progress"])
    stats = _stats(out)
    assert stats["samples_written"] == 3 and stats["skipped"] == 8
    counts = {reason: f["count"] for reason, f in stats["failures"].items()}
    assert counts == {"bad_image": 2, "no_caption": 2, "empty_caption": 2, "bad_text": 2}
    assert stats["failures"]["bad_image"]["examples"] == ["corrupt.jpg", "truncated.jpg"]
    assert "bad_image" in capsys.readouterr().out

    table = tmp_path / "t.csv"
    table.write_text("image,caption\nsrc/good0.jpg,fine\nsrc/missing.jpg,gone\n,no image\nsrc/good1.jpg,  \n"
                     "src/good2.jpg\nsrc/corrupt.jpg,corrupt\n", encoding="utf-8")
    stats = make_shards(table_samples(table), tmp_path / "table")
    counts = {reason: f["count"] for reason, f in stats["failures"].items()}
    assert counts == {"missing_file": 1, "no_image": 1, "empty_caption": 1, "no_caption": 1, "bad_image": 1}
    assert stats["failures"]["missing_file"]["examples"] == ["row 2: src/missing.jpg"]
    assert stats["samples_written"] == 1

    # nothing usable: stats still written, exit status 1
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "x.jpg").write_bytes(b"junk")
    (tmp_path / "allbad" / "x.txt").write_text("a caption for an image that does not decode")
    with pytest.raises(SystemExit) as exit_info:
        make_main(["folder", str(tmp_path / "allbad"), "--out", str(tmp_path / "none"), "--no-progress"])
    assert exit_info.value.code == 1 and _stats(tmp_path / "none")["shards_written"] == 0
    assert not list((tmp_path / "none").glob("*.tar"))


def _jpeg_bytes(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (9, 99, 199)).save(buf, format="JPEG")
    return buf.getvalue()


def test_inspect_reports_bad_samples_like_training(tmp_path, tokenizer, capsys):
    good = [{"__key__": f"g{i}", "jpg": _jpeg_bytes(), "txt": f"good {i} with five words"} for i in range(4)]
    # bad samples between the good ones, the last sample good: one training batch of 4 sees them all
    bad = [
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff broken", "txt": "corrupt image"},
        {"__key__": "truncated", "jpg": _jpeg_bytes((300, 300))[:400], "txt": "cut short"},
        {"__key__": "empty", "jpg": _jpeg_bytes(), "txt": "   "},
        {"__key__": "noimage", "txt": "no picture"},
        {"__key__": "badtext", "jpg": _jpeg_bytes(), "json": b"{broken"},
    ]
    with wds.TarWriter(str(tmp_path / "mixed-0.tar")) as sink:
        for sample in [s for pair in zip(bad, good[:-1]) for s in pair] + bad[3:] + good[-1:]:
            sink.write(sample)
    report = inspect_shards(str(tmp_path / "mixed-0.tar"))
    counts = {reason: b["count"] for reason, b in report["bad_samples"].items()}
    assert counts == {"bad_image": 2, "no_caption": 1, "no_image": 1, "bad_text": 1}
    assert report["bad_samples"]["no_caption"]["examples"] == [f"{tmp_path / 'mixed-0.tar'}:empty"]
    assert (report["samples"], report["good_samples"]) == (9, 4)
    assert report["captions"]["words"] == {"min": 5, "median": 5.0, "p95": 5.0, "max": 5}
    assert report["images"]["height"] == {"min": 30, "median": 30.0, "max": 30}
    batch = _train_batch(str(tmp_path / "mixed-0.tar"), 4, tokenizer)
    assert batch["skipped"] == counts  # the tool and the training pipeline agree

    # a truncated tar is reported, and --limit stops early
    data = (tmp_path / "mixed-0.tar").read_bytes()
    (tmp_path / "mixed-1.tar").write_bytes(data[: len(data) // 2 + 100])
    inspect_main([f"{tmp_path}/mixed-{{0..1}}.tar", "--json", str(tmp_path / "r.json"), "--no-progress"])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [e["shard"] for e in saved["tar_errors"]] == [str(tmp_path / "mixed-1.tar")]
    assert "truncated tar files" in capsys.readouterr().out
    quick = inspect_shards(f"{tmp_path}/mixed-{{0..1}}.tar", limit=3)
    assert quick["samples"] == 3 and quick["shards"] == [{"shard": str(tmp_path / "mixed-0.tar"), "samples": 3,
                                                          "partial": True}]
    assert "stopped at --limit" in format_report(quick)


def test_input_errors_name_what_is_wrong(tmp_path, capsys):
    _image(tmp_path / "a.jpg")
    table = tmp_path / "t.csv"
    table.write_text("path,title\na.jpg,cap\n")
    with pytest.raises(ShardInputError, match=r"no column 'caption' \(--caption-col\); its columns are: 'path', "
                                              r"'title'"):
        table_samples(table, image_col="path")
    with pytest.raises(SystemExit) as exit_info:
        make_main(["table", str(table), "--out", str(tmp_path / "o"), "--image-col", "image", "--caption-col", "title"])
    assert exit_info.value.code == 2
    assert "no column 'image' (--image-col); its columns are: 'path', 'title'" in capsys.readouterr().err

    urls = tmp_path / "urls.csv"
    urls.write_text("image,caption\na.jpg,local\nhttps://example.com/cat.jpg,a cat\n")
    with pytest.raises(ShardInputError, match=r"holds URLs \(1 of 2 rows; row 2: https://example.com/cat.jpg\).*"
                                              r"does not download.*img2dataset"):
        table_samples(urls)
    assert not (tmp_path / "o").exists()

    with pytest.raises(FileNotFoundError, match="nowhere"):
        folder_samples(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="table .*missing.csv does not exist"):
        table_samples(tmp_path / "missing.csv")

    # an earlier run's output is not silently mixed with a new one
    (tmp_path / "a.txt").write_text("cap")
    src = folder_samples(tmp_path)
    make_shards(src, tmp_path / "out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_shards(src, tmp_path / "out")
    assert make_shards(src, tmp_path / "out", overwrite=True)["samples_written"] == 1


def test_a_wrong_input_kind_or_separator_is_named_with_the_command_that_reads_it(tmp_path, capsys):
    # class folders of images without captions: an ImageFolder given to `folder`
    for cls in ("cat", "dog"):
        for i in range(2):
            _image(tmp_path / "pets" / cls / f"{i}.jpg")
    with pytest.raises(SystemExit) as exit_info:
        make_main(["folder", str(tmp_path / "pets"), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "none of the 4 images under" in err and "2 class folders (cat, dog)" in err
    assert f"run clipalign-make-shards imagefolder {tmp_path / 'pets'} --out OUT --templates 'a photo of a {{}}.'" \
        in err and not (tmp_path / "o").exists()
    # a tab-separated table named .csv
    _image(tmp_path / "a.jpg")
    table = tmp_path / "t.csv"
    table.write_text("image\tcaption\na.jpg\ta red square\n")
    with pytest.raises(SystemExit):
        make_main(["table", str(table), "--out", str(tmp_path / "o"), "--no-progress"])
    assert "The header looks tab-separated (2 columns): pass --table-format tsv." in capsys.readouterr().err
    assert len(table_samples(table, table_format="tsv")) == 1


def test_workers_give_byte_identical_shards(tmp_path):
    src = tmp_path / "src"
    for i in range(12):
        _captioned(src / f"{i:02d}.png", f"image {i}", size=(70, 50), colour=(i * 20, 0, 0))
    samples = folder_samples(src)
    one = make_shards(samples, tmp_path / "one", samples_per_shard=5, resize=40)
    two = make_shards(samples, tmp_path / "two", samples_per_shard=5, resize=40, workers=2)
    assert one["shards"] == two["shards"] and len(one["shards"]) == 3
    for name in one["shards"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed")
def test_parquet_table(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    pq.write_table(pa.table({"image": ["a.jpg", "b.jpg"], "caption": ["one", None]}), tmp_path / "t.parquet")
    stats = make_shards(table_samples(tmp_path / "t.parquet"), tmp_path / "out")
    assert stats["samples_written"] == 1 and stats["failures"]["no_caption"]["count"] == 1


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(ModuleNotFoundError, match="pip install pyarrow"):
        table_samples(tmp_path / "t.parquet")
    assert os.path.exists(tmp_path / "t.parquet")
