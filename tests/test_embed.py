"""clipalign-embed on real shards, folders and tables, with a real exported model; multi-process and resume runs."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from multiproc import accelerate_launch_cmd
from PIL import Image

import clipalign
from clipalign.checkpoint import save_checkpoint
from clipalign.config import Config, ModelConfig
from clipalign.data.sample import SKIP_REASONS
from clipalign.embed import load_embeddings, load_metadata, main, read_embed_config
from clipalign.export import export_model
from clipalign.layout import (
    EMBED_CONFIG_FILE,
    embed_part_marker,
    embedding_part,
    metadata_part,
)
from clipalign.model import create_model

REPO = Path(__file__).resolve().parent.parent
REASONS = {r.name for r in SKIP_REASONS}
FP16_TOLERANCE = 2e-3  # float16 keeps 11 bits: entries of a unit vector are off by up to ~5e-4


def _jpeg(colour, size=(80, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _noisy(seed: int, size=(72, 56)) -> Image.Image:
    """A small image with enough structure that no two embed alike."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    pixels = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _image_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    _noisy(seed).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread, as the multi-process tests run: on a busy 2-core machine two OpenMP threads wait on each
    other at every barrier, and the tiny model runs 30 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return create_model(ModelConfig(name="tiny-vit-64")).eval()


@pytest.fixture(scope="module")
def export(trained, tmp_path_factory) -> Path:
    return export_model(trained, tmp_path_factory.mktemp("model") / "export")


@pytest.fixture(scope="module")
def run_dir(trained, tmp_path_factory) -> Path:
    """A run directory whose one checkpoint holds the exported model."""
    cfg = Config()
    cfg.model.name = "tiny-vit-64"
    run = tmp_path_factory.mktemp("model") / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(cpu=True)
        accelerator.prepare(trained)  # save_state only writes models that went through prepare
        save_checkpoint(accelerator, run, 7, cfg, {"samples_seen": 56})
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return run


@pytest.fixture(scope="module")
def model(export):
    return clipalign.load(export)


def _shard_samples(source: str, shard: int) -> list[dict]:
    samples = [{"__key__": f"{source}{shard}-{i}", "jpg": _image_bytes(100 * shard + i + (0 if source == "a" else 50)),
                "txt": f"photo {i} of shard {source}{shard}, a {['red', 'green', 'blue', 'grey'][i % 4]} thing"}
               for i in range(4)]
    if shard == 0:
        samples.insert(1, {"__key__": f"{source}{shard}-corrupt", "jpg": b"\xff\xd8\xff not a jpeg", "txt": "broken"})
        samples.insert(3, {"__key__": f"{source}{shard}-nocaption", "jpg": _image_bytes(999 + len(source))})
        samples.append({"__key__": f"{source}{shard}-noimage", "txt": "a caption with no picture"})
        samples.append({"__key__": f"{source}{shard}-json", "png": _image_bytes(7),
                        "json": json.dumps({"captions": ["first of two", "second of two"]}).encode()})
    return samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Two sources joined by `::` (a-0, a-1 and b-0), with a corrupt JPEG, a sample without caption and one without
    image in each source's first shard."""
    root = tmp_path_factory.mktemp("shards")
    for source, count in (("a", 2), ("b", 1)):
        for shard in range(count):
            with wds.TarWriter(str(root / f"{source}-{shard}.tar")) as sink:
                for sample in _shard_samples(source, shard):
                    sink.write(sample)
    return f"{root}/a-{{0..1}}.tar::{root}/b-0.tar"


@pytest.fixture(scope="module")
def shard_run(export, shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embedded") / "shards"
    main(["--model", str(export), "--shards", shards, "--out", str(out), "--workers", "0", "--batch-size", "3",
          "--no-progress"])
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def _all_samples(shards: str) -> dict[str, dict]:
    return {s["__key__"]: s for source, count in (("a", 2), ("b", 1)) for shard in range(count)
            for s in _shard_samples(source, shard)}


def _max_difference(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())


def _encode_images(model, images: list[Image.Image]) -> np.ndarray:
    with torch.no_grad():
        return model.encode_image(torch.stack([model.preprocess(img) for img in images])).numpy()


def _encode_texts(model, captions: list[str]) -> np.ndarray:
    with torch.no_grad():
        return model.encode_text(model.tokenizer(captions)).numpy()


def test_shards_embed_every_usable_sample_as_the_model_does(shard_run, shards, model, export):
    config = read_embed_config(shard_run)
    meta = load_metadata(shard_run).to_pylist()
    images, texts = load_embeddings(shard_run, "image"), load_embeddings(shard_run, "text")
    samples = _all_samples(shards)
    keys = [row["key"] for row in meta]
    # in shard order, parts in pattern order; the corrupt image and the sample without one are left out
    assert keys == [k for k, s in samples.items() if "corrupt" not in k and "noimage" not in k]
    assert config["skipped"] == {"bad_image": 2, "no_image": 2} and set(config["skipped"]) <= REASONS
    assert config["rows"] == len(keys) and config["samples"] == len(samples)
    assert config["embedded"] == {"image": len(keys), "text": len(keys) - 2}
    assert config["zero_rows"] == {"text": {"no_caption": 2}}
    assert images.dtype == texts.dtype == np.float16 and images.shape == texts.shape == (len(keys), 128)

    want = _encode_images(model, [Image.open(io.BytesIO(samples[k].get("jpg") or samples[k]["png"])) for k in keys])
    assert np.abs(images.astype(np.float32) - want).max() < FP16_TOLERANCE
    assert np.allclose(np.linalg.norm(images.astype(np.float32), axis=1), 1, atol=2e-3)
    captioned = [i for i, row in enumerate(meta) if row["caption"] is not None]
    assert meta[keys.index("a0-json")]["caption"] == "first of two"  # the first of a JSON list
    want = _encode_texts(model, [meta[i]["caption"] for i in captioned])
    assert np.abs(texts[captioned].astype(np.float32) - want).max() < FP16_TOLERANCE
    no_caption = [i for i, row in enumerate(meta) if row["caption"] is None]
    assert [keys[i] for i in no_caption] == ["a0-nocaption", "b0-nocaption"] and not texts[no_caption].any()
    root = shards.split("/a-")[0]
    assert [row["shard"] for row in meta] == [f"{root}/{k.split('-')[0][0]}-{k.split('-')[0][1]}.tar" for k in keys]

    assert config["model"]["name"] == "tiny-vit-64" and config["model"]["path"] == str(export)
    assert config["embed_dim"] == 128 and config["dtype"] == "float16" and config["normalization"] == "l2"
    assert config["source"] == {"kind": "shards", "spec": shards, "shards": 3}
    assert config["modalities"] == ["image", "text"] and config["columns"] == ["key", "caption", "shard"]
    assert [p["rows"] for p in config["parts"]] == [6, 4, 6] and config["clipalign_version"] == clipalign.__version__


def test_the_layout_reads_with_numpy_pyarrow_and_faiss(shard_run):
    config = read_embed_config(shard_run)
    for part in config["parts"]:
        image = np.load(embedding_part(shard_run, "image", part["part"]))
        table = pq.read_table(metadata_part(shard_run, part["part"]))
        assert image.shape == (part["rows"], 128) and table.num_rows == part["rows"]
        assert table.schema.field("key").type == pa.string()
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatIP(128)
    index.add(load_embeddings(shard_run, "image").astype(np.float32))
    _, found = index.search(load_embeddings(shard_run, "image")[:3].astype(np.float32), 1)
    assert found[:, 0].tolist() == [0, 1, 2]


def test_a_shard_cut_short_keeps_the_samples_before_the_cut_and_counts_once(export, shards, tmp_path):
    whole = Path(shards.split("/a-")[0]) / "a-1.tar"
    data = whole.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])  # inside the third of its four samples
    out = tmp_path / "out"
    main(["--model", str(export), "--shards", f"{whole}::{tmp_path / 'cut.tar'}", "--out", str(out), "--workers", "0",
          "--no-progress"])
    config = read_embed_config(out)
    assert config["skipped"] == {"unreadable_tar": 1} and config["rows"] == 4 + 2
    assert load_metadata(out).column("key").to_pylist()[4:] == ["a1-0", "a1-1"]
    (cut,) = [part for part in config["parts"] if part.get("errors")]
    assert cut["part"] == 1 and "cut.tar" in cut["errors"][0] and cut["skipped"] == {"unreadable_tar": 1}


def _folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        path = root / ("sub" if i % 2 else ".") / f"img{i}.png"
        _noisy(i).save(path)
        if i != 3:
            path.with_suffix(".txt").write_text(f"caption number {i}\n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def test_a_folder_in_parts_and_workers_gives_the_same_rows_as_one_part(export, run_dir, model, tmp_path):
    folder = _folder(tmp_path / "photos")
    one, many = tmp_path / "one", tmp_path / "many"
    # a run directory (its latest checkpoint) embeds as the export of the same weights
    main(["--model", str(run_dir), "--folder", str(folder), "--out", str(one), "--workers", "0", "--no-progress"])
    assert read_embed_config(one)["model"]["path"] == str(run_dir)
    main(["--model", str(export), "--folder", str(folder), "--out", str(many), "--workers", "2", "--part-size", "2",
          "--batch-size", "1", "--no-progress"])
    config = read_embed_config(many)
    assert len(config["parts"]) == 3 and config["skipped"] == {"bad_image": 1}
    assert config["zero_rows"] == {"text": {"no_caption": 1}}
    meta = load_metadata(many).to_pylist()
    assert meta == load_metadata(one).to_pylist()
    assert [row["key"] for row in meta] == ["img0.png", "img2.png", "img4.png", "sub/img1.png", "sub/img3.png"]
    assert [row["image_path"] for row in meta] == [str(folder / row["key"]) for row in meta]
    for modality in ("image", "text"):  # the same up to a float16 step: the batches differ
        assert _max_difference(load_embeddings(many, modality), load_embeddings(one, modality)) <= 1e-3
    want = _encode_images(model, [Image.open(row["image_path"]) for row in meta])
    assert np.abs(load_embeddings(one, "image").astype(np.float32) - want).max() < FP16_TOLERANCE


def test_csv_and_parquet_tables_with_image_only_and_text_only_runs(export, model, tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(6):
        _noisy(20 + i).save(tmp_path / "img" / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "text": f"table caption {i}" if i != 2 else "  ", "uid": f"u{i}"})
    rows.append({"path": "img/missing.png", "text": "its file is gone", "uid": "u6"})
    csv = tmp_path / "t.csv"
    csv.write_text("path,text,uid\n" + "".join(f"{r['path']},{r['text']},{r['uid']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    common = ["--model", str(export), "--image-column", "path", "--caption-column", "text", "--workers", "0",
              "--no-progress", "--part-size", "4"]
    main(common + ["--table", str(csv), "--out", str(tmp_path / "csv")])
    main(common + ["--table", str(tmp_path / "t.parquet"), "--key-column", "uid", "--out", str(tmp_path / "pq")])
    main(common + ["--table", str(csv), "--modalities", "text", "--out", str(tmp_path / "text")])
    main(common + ["--table", str(csv), "--modalities", "image", "--out", str(tmp_path / "image")])

    csv_meta, pq_meta = load_metadata(tmp_path / "csv").to_pylist(), load_metadata(tmp_path / "pq").to_pylist()
    assert [r["key"] for r in csv_meta] == ["0", "1", "2", "3", "4", "5"] and [r["row"] for r in csv_meta] == list(
        range(6))
    assert [r["key"] for r in pq_meta] == ["u0", "u1", "u2", "u3", "u4", "u5"]
    assert read_embed_config(tmp_path / "csv")["skipped"] == {"missing_file": 1}
    assert read_embed_config(tmp_path / "csv")["zero_rows"] == {"text": {"empty_caption": 1}}
    for modality in ("image", "text"):  # the same rows in the same batches
        assert np.array_equal(load_embeddings(tmp_path / "csv", modality), load_embeddings(tmp_path / "pq", modality))
    want = _encode_images(model, [Image.open(tmp_path / f"img/{i}.png") for i in range(6)])
    assert np.abs(load_embeddings(tmp_path / "csv", "image").astype(np.float32) - want).max() < FP16_TOLERANCE

    text = read_embed_config(tmp_path / "text")
    assert text["modalities"] == ["text"] and text["skipped"] == {"empty_caption": 1} and text["rows"] == 6
    text_meta = load_metadata(tmp_path / "text").to_pylist()
    assert [r["key"] for r in text_meta] == ["0", "1", "3", "4", "5", "6"]  # the missing file is not read
    want = _encode_texts(model, [r["caption"] for r in text_meta])
    assert np.abs(load_embeddings(tmp_path / "text", "text").astype(np.float32) - want).max() < FP16_TOLERANCE
    assert not (tmp_path / "text" / "img_emb").exists()

    image = read_embed_config(tmp_path / "image")
    assert image["modalities"] == ["image"] and image["rows"] == 6 and image["skipped"] == {"missing_file": 1}
    assert np.array_equal(load_embeddings(tmp_path / "image", "image"), load_embeddings(tmp_path / "csv", "image"))
    assert load_metadata(tmp_path / "image").column("caption").to_pylist()[:2] == ["table caption 0",
                                                                                  "table caption 1"]


def test_captions_of_very_different_lengths_in_one_batch_embed_as_the_model_does(export, model, tmp_path):
    # the text tower takes a batch in chunks sorted by length, each cut after its own longest caption
    words = "a small red dog runs on the beach near two people".split()
    captions = [" ".join(words[:1 + i % 11] * (1 + 3 * (i % 7 == 0))) for i in range(70)]
    (tmp_path / "c.csv").write_text("caption\n" + "".join(f"{c}\n" for c in captions))
    main(["--model", str(export), "--table", str(tmp_path / "c.csv"), "--out", str(tmp_path / "out"), "--workers",
          "0", "--batch-size", "70", "--no-progress"])
    assert load_metadata(tmp_path / "out").column("caption").to_pylist() == captions
    got = load_embeddings(tmp_path / "out", "text").astype(np.float32)
    assert np.abs(got - _encode_texts(model, captions)).max() < FP16_TOLERANCE


def _refusal(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err.split("error: ", 1)[-1] and "Traceback" not in err
    return err


def test_refusals_name_what_is_wrong_in_one_line(export, run_dir, shards, shard_run, tmp_path, capsys):
    base = ["--model", str(export), "--workers", "0", "--no-progress"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    err = _refusal(base + ["--shards", shards, "--out", str(tmp_path / "notes")], capsys)
    assert "is not empty and holds no embedding (it has todo.txt)" in err
    err = _refusal(base + ["--shards", shards, "--out", str(tmp_path / "notes"), "--overwrite"], capsys)
    assert "holds no embedding" in err and (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    err = _refusal(base + ["--shards", shards, "--out", str(shard_run)], capsys)
    assert f"{shard_run} already holds a finished embedding (16 rows" in err and "--overwrite" in err
    err = _refusal(base + ["--shards", shards, "--out", str(tmp_path / "x"), "--part-size", "3"], capsys)
    assert "--part-size applies to --folder and --table" in err
    err = _refusal(base + ["--shards", shards.replace("b-0", "b-7"), "--out", str(tmp_path / "x")], capsys)
    assert "b-7.tar" in err and "do not exist" in err
    folder = tmp_path / "plain"
    folder.mkdir()
    _noisy(0).save(folder / "a.png")
    err = _refusal(base + ["--folder", str(folder), "--modalities", "text", "--out", str(tmp_path / "x")], capsys)
    assert "--modalities text: no image in the folder has a .txt or .json caption beside it" in err
    (tmp_path / "t.csv").write_text("file,label\na.png,3\n")
    err = _refusal(base + ["--table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "x")], capsys)
    assert "has neither an image column 'image' (--image-column) nor a caption column 'caption'" in err
    assert "its columns are: 'file', 'label'" in err
    (tmp_path / "u.csv").write_text("image,caption\nhttps://example.com/a.jpg,a cat\n")
    err = _refusal(base + ["--table", str(tmp_path / "u.csv"), "--out", str(tmp_path / "x")], capsys)
    assert "holds a URL" in err

    # another live run holds the directory
    held = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from clipalign.layout import lock_run_dir; "
                               "lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(held)],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _refusal(base + ["--folder", str(folder), "--out", str(held)], capsys)
        assert f"{held} is being written by another run (pid {holder.pid} holds" in err
    finally:
        holder.kill()
        holder.wait()

    # an unfinished embedding of something else: the plan is there, no embed.json
    unfinished = tmp_path / "unfinished"
    main(base + ["--folder", str(folder), "--out", str(unfinished)])
    (unfinished / EMBED_CONFIG_FILE).unlink()
    embed_part_marker(unfinished, 0).unlink()
    err = _refusal(base + ["--folder", str(folder), "--out", str(unfinished), "--decode", "full"], capsys)
    assert "holds an unfinished embedding of something else (settings decode: was draft, now full)" in err
    # the same weights read from elsewhere resume it too (a fingerprint, not a path, names the model)
    main(base[:1] + [str(run_dir)] + base[2:] + ["--folder", str(folder), "--out", str(unfinished)])
    assert read_embed_config(unfinished)["rows"] == 1
    main(base + ["--folder", str(folder), "--out", str(unfinished), "--overwrite", "--decode", "full"])
    assert read_embed_config(unfinished)["settings"]["decode"] == "full"


@pytest.mark.slow
def test_two_processes_embed_the_rows_of_one(export, shards, shard_run, tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = accelerate_launch_cmd(2, ["-m", "clipalign.embed", "--model", str(export), "--shards", shards, "--out",
                                    str(out), "--workers", "1", "--batch-size", "2", "--no-progress"])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("rows (image") == 1  # the summary comes from the main process only
    one, two = read_embed_config(shard_run), read_embed_config(out)
    assert {k: two[k] for k in ("rows", "embedded", "skipped", "zero_rows", "samples")} == \
        {k: one[k] for k in ("rows", "embedded", "skipped", "zero_rows", "samples")}
    assert load_metadata(out).to_pylist() == load_metadata(shard_run).to_pylist()  # parts in order, whoever wrote them
    for modality in ("image", "text"):  # other batches, one thread per process
        assert _max_difference(load_embeddings(out, modality), load_embeddings(shard_run, modality)) <= 1e-3


@pytest.mark.slow
def test_a_killed_run_resumes_and_embeds_each_sample_once(export, shards, shard_run, tmp_path):
    # the shards come through a slow pipe: command, so that the kill lands while parts remain
    urls = [u for source in shards.split("::") for u in (
        [source.replace("{0..1}", "0"), source.replace("{0..1}", "1")] if "{" in source else [source])]
    slow = "::".join(f"pipe:sleep 1; cat {url}" for url in urls)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "clipalign.embed", "--model", str(export), "--shards", slow, "--out", str(out),
           "--workers", "0", "--batch-size", "3", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not embed_part_marker(out, 0).is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / EMBED_CONFIG_FILE).exists() and not embed_part_marker(out, 2).exists()
    # resumed through the console script as users run it (it exits with what main returns: 0 on success)
    script = Path(sys.executable).parent / "clipalign-embed"
    resumed = subprocess.run([str(script), *cmd[3:]] if script.is_file() else cmd, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    config = read_embed_config(out)
    assert config["rows"] == read_embed_config(shard_run)["rows"]
    keys = load_metadata(out).column("key").to_pylist()
    assert len(keys) == len(set(keys)) and keys == load_metadata(shard_run).column("key").to_pylist()
    for modality in ("image", "text"):
        assert np.array_equal(load_embeddings(out, modality), load_embeddings(shard_run, modality))
    leftovers = [p.name for p in out.rglob(".*") if ".tmp-" in p.name]
    assert not leftovers
