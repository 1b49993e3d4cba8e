"""clipalign-index and clipalign-search from the command line: exact and approximate faiss indexes of an embedding
directory, their recall against exact search, the round trip through the index directory, search output and one-line
errors. Real faiss, a real tiny model, real files; about 20 s on 2 busy CPU cores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embedding_fixture import make_embedding_dir, model_for_tests

from clipalign import index as index_module
from clipalign import search as search_module
from clipalign.index import (
    IndexInputError,
    index_embeddings,
    load_index,
    nlist_for,
    parse_size,
    plan_index,
    read_embeddings,
)
from clipalign.layout import EMBED_CONFIG_FILE, INDEX_CONFIG_FILE, embedding_part, index_file, metadata_part

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[Path, Path]:
    """(model, embedding directory): 40 drawn images and their captions, embedded by a tiny model."""
    root = tmp_path_factory.mktemp("embedded")
    model = model_for_tests(root)
    return model, make_embedding_dir(root, model)


@pytest.fixture(scope="module")
def indexed(embedded, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "index"
    index_embeddings(embedded[1], out, log=lambda line: None)
    return out


def _random_embedding_dir(root: Path, n: int, dim: int, parts: int = 3, seed: int = 0) -> Path:
    """Clustered unit vectors (as real embeddings are: near neighbours exist) in the embedding layout, image only."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(8, n // 80), dim))
    vectors = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for part in range(parts):
        rows = range(bounds[part], bounds[part + 1])
        embedding_part(root, "image", part).parent.mkdir(parents=True, exist_ok=True)
        np.save(embedding_part(root, "image", part), vectors[rows.start:rows.stop].astype(np.float16))
        metadata_part(root, part).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"key": [f"r{i}" for i in rows], "caption": [None] * len(rows)}),
                       metadata_part(root, part))
    (root / EMBED_CONFIG_FILE).write_text(json.dumps({"model": {"path": "none", "name": "random"}}))
    return root


def _recall_without_self(index: faiss.Index, vectors: np.ndarray, rows: np.ndarray, k: int = 10) -> float:
    """recall@k of `index` for some of its own rows as queries, each query's own row left out, by numpy."""
    queries = vectors[rows]
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :k + 1]
    _, found = index.search(queries, k + 1)
    hits = 0
    for q, row in enumerate(rows):
        truth = [r for r in exact[q] if r != row][:k]
        hits += len(set(truth) & {r for r in found[q] if r != row})
    return hits / (len(rows) * k)


# ---- building -------------------------------------------------------------------------------------------------


def test_a_small_directory_is_searched_exactly_and_round_trips(embedded, indexed):
    config = json.loads((indexed / INDEX_CONFIG_FILE).read_text())
    assert config["embeddings"] == str(embedded[1].resolve())
    assert config["model"] == {"path": str(embedded[0]), "name": "tiny-vit-64"}
    for modality in ("image", "text"):
        record = config["indexes"][modality]
        assert record["kind"] == "flat" and record["index_key"] == "Flat" and record["vectors"] == 40
        assert record["recall"]["same_modality"] == 1.0 and record["recall"]["cross_modal"] == 1.0
        assert record["index_bytes"] == index_file(indexed, modality).stat().st_size
        assert record["build_seconds"] >= 0 and record["recall"]["queries"] == 20
    assert not [p for p in indexed.iterdir() if p.name.startswith(".")]  # no temporary left behind
    embeddings, metadata = read_embeddings(embedded[1], "image")
    vectors = embeddings.rows(np.arange(len(embeddings)))
    scores, rows = load_index(indexed, "image").search(vectors[:5], 40)
    exact = np.sort(vectors[:5] @ vectors.T, axis=1)[:, ::-1]
    np.testing.assert_allclose(scores, exact, atol=1e-5)
    assert metadata.column_names[:2] == ["key", "caption"] and metadata.num_rows == 40


def test_over_the_flat_size_an_inverted_file_reaches_its_recall_target(tmp_path):
    embed_dir = _random_embedding_dir(tmp_path / "emb", n=20_000, dim=32)
    config = index_embeddings(embed_dir, tmp_path / "index", flat_max=5000, log=lambda line: None)
    record = config["indexes"]["image"]
    nlist, nprobe = record["params"]["nlist"], record["params"]["nprobe"]
    assert record["kind"] == "ivf" and record["index_key"] == f"IVF{nlist},Flat"
    assert nlist == 256 and nlist == nlist_for(20_000, 20_000 - 400)  # 4*sqrt(N) = 566 -> 512, halved: 39 per list
    assert nprobe < nlist  # approximate: it does not search every list
    recall = record["recall"]
    assert recall["queries"] == 200 and recall["cross_modal"] is None and recall["target_reached"] is True
    assert 0.93 <= recall["same_modality"] <= 1.0  # tuned to 0.95 on other queries: the same, up to sampling
    tried = [t["nprobe"] for t in recall["tuning"]]
    assert tried == [2 ** i for i in range(len(tried))] and tried[-1] == nprobe
    assert min(recall["tuning"][-1]["recall"]) >= 0.95 > min(recall["tuning"][0]["recall"])
    assert record["train_rows"] == 19_600
    # the index read back searches with the tuned nprobe, and numpy agrees on its recall
    index = load_index(tmp_path / "index", "image")
    assert faiss.extract_index_ivf(index).nprobe == nprobe
    embeddings, _ = read_embeddings(embed_dir)
    vectors = embeddings.rows(np.arange(20_000))
    rows = np.random.default_rng(1).choice(20_000, 300, replace=False)
    assert _recall_without_self(index, vectors, rows) == pytest.approx(recall["same_modality"], abs=0.03)


def test_the_index_is_chosen_by_size_and_memory():
    assert plan_index(50_000, 512).kind == "flat"
    big = plan_index(2_000_000, 512)
    assert big.kind == "ivf" and big.key == "IVF4096,Flat"  # 4*sqrt(2M) = 5657: 2^12.47, nearest 2^12
    squeezed = plan_index(2_000_000, 512, max_memory=parse_size("1GB"))
    assert squeezed.kind == "ivfpq" and squeezed.key == "IVF4096,PQ128x8np" and squeezed.memory_bytes <= 1024 ** 3
    assert plan_index(2_000_000, 512, max_memory=parse_size("200MB")).pq_bytes == 64
    assert plan_index(80_000, 512, max_memory=parse_size("100MB")).kind == "ivfpq"  # exact search does not fit
    assert plan_index(80_000, 512, kind="hnsw").key == "HNSW32,Flat"
    assert parse_size("16GB") == 16 * 1024 ** 3 and parse_size("1.5k") == 1536 and parse_size("1000") == 1000
    with pytest.raises(IndexInputError, match="over --max-memory"):
        plan_index(2_000_000, 512, max_memory=parse_size("10MB"))
    with pytest.raises(IndexInputError, match="not a size"):
        parse_size("lots")


def test_product_quantised_and_graph_indexes_from_the_command_line(tmp_path):
    """--kind ivfpq and --kind hnsw through the CLI, into one index directory (each modality keeps its own)."""
    embed_dir = _random_embedding_dir(tmp_path / "emb", n=3000, dim=32, parts=2)
    for part in range(2):  # a text modality: the same vectors, so that the cross-modal queries are exact copies
        text = embedding_part(embed_dir, "text", part)
        text.parent.mkdir(exist_ok=True)
        shutil.copy(embedding_part(embed_dir, "image", part), text)
    out = tmp_path / "index"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for modality, kind in (("image", "ivfpq"), ("text", "hnsw")):
        proc = subprocess.run([sys.executable, "-m", "clipalign.index", str(embed_dir), "--out", str(out),
                               "--modality", modality, "--kind", kind], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert f"{modality}: 3000 vectors of 32 dims" in proc.stdout and "recall@10" in proc.stdout
    records = json.loads((out / INDEX_CONFIG_FILE).read_text())["indexes"]
    pq_record, hnsw_record = records["image"], records["text"]
    # 6-bit codes: the 2,800 rows left after the held-out queries train 64 centroids per sub-quantizer, not 256
    assert pq_record["kind"] == "ivfpq" and pq_record["index_key"] == "IVF64,PQ8x6np"
    assert 0.3 < pq_record["recall"]["same_modality"] <= 1.0  # codes of 8 bytes cap it well below exact
    assert hnsw_record["index_key"] == "HNSW32,Flat" and "efSearch" in hnsw_record["params"]
    assert hnsw_record["recall"]["same_modality"] >= 0.95
    assert load_index(out, "image").ntotal == load_index(out, "text").ntotal == 3000


# ---- search from the command line ---------------------------------------------------------------------------


def _run(main, argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(main, argv: list[str], capsys, prog: str) -> str:
    code, out, err = _run(main, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_search_by_text_image_and_key_prints_ranked_results(embedded, indexed, capsys):
    code, out, _ = _run(search_module.main, [str(indexed), "--text", "a red circle", "-k", "5"], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("text 'a red circle' -> image index Flat, 40 vectors")
    assert lines[1].split() == ["rank", "score", "key", "caption"] and len(lines) == 7
    scores = [float(line.split()[1]) for line in lines[2:]]
    assert [int(line.split()[0]) for line in lines[2:]] == [1, 2, 3, 4, 5] and scores == sorted(scores, reverse=True)

    code, out, _ = _run(search_module.main, [str(indexed), "--key", "000031", "-k", "3", "--json"], capsys)
    found = json.loads(out)
    assert code == 0 and found["query"] == {"key": "000031"} and len(found["results"]) == 3
    first = found["results"][0]
    assert first["key"] == "000031" and first["score"] == pytest.approx(1.0, abs=1e-3)  # itself, from its shard
    assert first["shard"].endswith(".tar") and first["image_path"] is None and first["caption"]

    image = embedded[1].parent / "source" / "images" / "000004.jpg"
    code, out, _ = _run(search_module.main, [str(indexed), "--image", str(image), "-k", "2", "--json"], capsys)
    first = json.loads(out)["results"][0]
    assert code == 0 and first["key"] == "000004" and first["image_path"] == str(image)  # the file found itself
    code, out, _ = _run(search_module.main, [str(indexed), "--text", "a blue square", "--modality", "text",
                                             "-k", "3", "--json"], capsys)
    assert code == 0 and json.loads(out)["modality"] == "text" and len(json.loads(out)["results"]) == 3


def test_bad_input_gets_a_one_line_error(embedded, indexed, tmp_path, capsys):
    search, index = search_module.main, index_module.main
    assert "no such index directory" in _one_line_error(search, [str(tmp_path / "nope"), "--text", "x"], capsys,
                                                        "clipalign-search")
    assert "not an index directory" in _one_line_error(search, [str(tmp_path), "--text", "x"], capsys,
                                                       "clipalign-search")
    assert "empty query" in _one_line_error(search, [str(indexed), "--text", "  "], capsys, "clipalign-search")
    assert "query too long: 10000 characters" in _one_line_error(search, [str(indexed), "--text", "a" * 10_000],
                                                                 capsys, "clipalign-search")
    assert "no sample with key '../x'" in _one_line_error(search, [str(indexed), "--key", "../x"], capsys,
                                                          "clipalign-search")
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not a picture")
    assert "cannot open it as an image" in _one_line_error(search, [str(indexed), "--image", str(not_image)], capsys,
                                                           "clipalign-search")
    assert "no such image file" in _one_line_error(search, [str(indexed), "--image", str(tmp_path / "gone.png")],
                                                   capsys, "clipalign-search")
    assert "not an embedding directory" in _one_line_error(index, [str(tmp_path), "--out", str(tmp_path / "i")],
                                                           capsys, "clipalign-index")
    other = _random_embedding_dir(tmp_path / "other", n=50, dim=8, parts=1)
    assert "choose another --out" in _one_line_error(index, [str(other), "--out", str(indexed)], capsys,
                                                     "clipalign-index")
    assert "no text embeddings" in _one_line_error(index, [str(other), "--out", str(tmp_path / "i"), "--modality",
                                                           "text"], capsys, "clipalign-index")


def test_a_model_that_moved_is_named_and_can_be_given(embedded, indexed, tmp_path, capsys):
    moved_index = tmp_path / "index"
    shutil.copytree(indexed, moved_index)
    config = json.loads((moved_index / INDEX_CONFIG_FILE).read_text())
    config["model"]["path"] = str(tmp_path / "was-here")
    (moved_index / INDEX_CONFIG_FILE).write_text(json.dumps(config))
    error = _one_line_error(search_module.main, [str(moved_index), "--text", "a red circle"], capsys,
                            "clipalign-search")
    assert "was-here" in error and "moved" in error and "--model" in error
    code, out, _ = _run(search_module.main, [str(moved_index), "--text", "a red circle", "--model", str(embedded[0]),
                                             "-k", "1"], capsys)
    assert code == 0 and len(out.splitlines()) == 3


def test_clipalign_embed_output_is_indexed_and_searched_end_to_end(tmp_path):
    """What clipalign-embed writes of a folder (one image without a caption among them) is what the index and the
    search read: hits carry their files, and the captionless sample's zero text row never comes back."""
    import random

    from embedding_fixture import tiny_export

    from clipalign.data.synthetic import draw_sample
    from clipalign.embed import embed_corpus
    from clipalign.embed.corpus import plan_folder
    from clipalign.index import index_embeddings
    from clipalign.search import Searcher

    rng = random.Random(3)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        image, caption, _ = draw_sample(rng, 48)
        image.save(folder / f"{i:02d}.jpg")
        if i != 5:
            (folder / f"{i:02d}.txt").write_text(caption)
    import clipalign

    model_dir = tiny_export(tmp_path / "model")
    embed_corpus(clipalign.load(model_dir), plan_folder(folder), tmp_path / "emb", batch_size=8, workers=0,
                 progress=False, model_path=model_dir)
    index_embeddings(tmp_path / "emb", tmp_path / "idx", progress=False)
    searcher = Searcher(tmp_path / "idx")
    hits = searcher.search_text("a red circle", k=12, modality="image")
    assert len(hits) == 12 and all(Path(hit.image_path).is_file() for hit in hits)
    texts = searcher.search_text("a red circle", k=12, modality="text")
    assert len(texts) == 11 and all(hit.caption for hit in texts)  # 05.jpg has no caption: no text row to find
    config = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert config["indexes"]["text"]["recall"]["queries"] == 5  # of the 11 captions: the zero row is no query

    # a folder whose only text files are not captions (an evaluation set's templates and class names) has images
    # only; one whose captions are all empty has zero text rows, which the index leaves out, saying so
    bare = tmp_path / "bare"
    bare.mkdir()
    for i in range(4):
        draw_sample(rng, 48)[0].save(bare / f"{i}.jpg")
    (bare / "templates.txt").write_text("a photo of a {}.\n")
    (bare / "classnames.txt").write_text("circle\n")
    assert plan_folder(bare).available == ("image",)
    for i in range(4):
        (bare / f"{i}.txt").write_text("")
    corpus = plan_folder(bare)
    assert corpus.available == ("image", "text")
    embed_corpus(clipalign.load(model_dir), corpus, tmp_path / "emb-bare", batch_size=8, workers=0, progress=False,
                 model_path=model_dir)
    lines = []
    config = index_embeddings(tmp_path / "emb-bare", tmp_path / "idx-bare", progress=False, log=lines.append)
    assert list(config["indexes"]) == ["image"] and config["indexes"]["image"]["recall"]["cross_modal"] is None
    assert any(line.startswith("text: skipped: every row is zeros") for line in lines)
    with pytest.raises(IndexInputError, match="every text row is zeros"):
        index_embeddings(tmp_path / "emb-bare", tmp_path / "idx-bare", modalities=["text"], progress=False)
