"""Nearest-neighbour indexes of an embedding directory with faiss (`clipalign-index`), and the reader of both.

An embedding directory (`clipalign-embed`, laid out as `clipalign.layout` names it) holds float16, L2-normalised
embeddings in numbered parts with a parquet table of the same rows beside each; an index directory holds one faiss
index per modality and `index.json`. Inner product on normalised vectors is cosine similarity.

Which index, as autofaiss chooses one by size: exact search (`IndexFlatIP`) up to `--flat-max` vectors (100,000) when
it fits `--max-memory`; above that an inverted file (`IVF{nlist},Flat`, nlist the power of two nearest 4*sqrt(N)),
with product-quantised codes (`IVF{nlist},PQ{m}`) when the vectors themselves do not fit. The coarse quantizer and
codes are trained on a sample; the number of lists searched (nprobe, or efSearch of an HNSW graph) is the smallest
that reaches `--recall-target` on held-out queries. The index's own rows serve as queries, so each query's own row is
left out of its neighbours; where the directory also holds the other modality, its embeddings of the same rows are
queried too (text queries of an image index are what search sends it). recall@10 is the share of the exact 10
nearest neighbours the index returns, a neighbour whose score ties the 10th counting as found; it is measured on
other held-out rows than the tuning ones and written to `index.json` with the parameters, build time and sizes.

The builder reads the parts memory-mapped: what it holds in memory is the index, the training sample and the queries.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import clipalign
from clipalign.layout import (
    EMBED_CONFIG_FILE,
    EMBEDDING_DIRS,
    INDEX_CONFIG_FILE,
    METADATA_DIR,
    atomic_path,
    embedding_part,
    index_file,
    metadata_part,
    write_json,
)

if TYPE_CHECKING:
    import faiss
    import pyarrow as pa

MODALITIES = ("image", "text")
KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
FLAT_MAX = 100_000  # autofaiss's order of size where exact search stops being the best choice
MAX_MEMORY = "16GB"  # autofaiss's default memory budget for an index
RECALL_TARGET = 0.95
RECALL_K = 10
MAX_QUERIES = 1000  # per set (tuning, report): enough for recall to +-1 %, few enough to take no time
SCORE_TIE = 1e-5  # a neighbour this close to the 10th exact score is as good as it (duplicates, float rounding)
HNSW_M = 32
_CHUNK = 65_536  # rows converted to float32 at a time
_MIN_POINTS_PER_CENTROID = 39  # below this faiss's k-means warns that it cannot train well
_TRAIN_POINTS_PER_CENTROID = 128
_PQ_MIN_TRAIN = 100 * 256  # 8-bit codes: 256 centroids per sub-quantizer, ~100 points each
_PART = re.compile(r"_(\d{5,})\.(npy|parquet)$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


class IndexInputError(ValueError):
    """An embedding or index directory, or an option, that cannot be used; the message says which and why."""


def _faiss_message(error: Exception) -> str:
    """What a faiss error says, without the C++ function and source line in front of it."""
    return str(error).strip().splitlines()[-1].rsplit("Error: ", 1)[-1]


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise IndexInputError("faiss is not installed: pip install 'clipalign[index]' (or pip install faiss-cpu)") \
            from e
    return faiss


# ---- reading an embedding directory --------------------------------------------------------------------------------


@dataclass
class Embeddings:
    """One modality's embeddings over all parts of an embedding directory, read memory-mapped: row i of the whole is
    row i - offsets[p] of part p."""

    modality: str
    parts: list[np.ndarray]  # (n_p, D) each, float16 as clipalign-embed writes them
    offsets: np.ndarray = field(init=False)  # (P + 1,) first row of each part, then the total

    def __post_init__(self):
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.parts[0].shape[1])

    def rows(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """The embeddings of rows `ids` (of the whole), as float32 (len(ids), D), in the order given."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        part_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for p in np.unique(part_of):
            where = np.nonzero(part_of == p)[0]
            out[where] = self.parts[p][ids[where] - self.offsets[p]]
        return out

    def chunks(self, size: int = _CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 block) over all rows in order, at most `size` rows a block."""
        for p, part in enumerate(self.parts):
            for start in range(0, len(part), size):
                yield int(self.offsets[p]) + start, np.ascontiguousarray(part[start:start + size], dtype=np.float32)


def read_embed_config(embed_dir: str | os.PathLike) -> dict[str, Any]:
    """An embedding directory's `embed.json`.

    Raises:
        IndexInputError: the directory or its embed.json is missing or unreadable.
    """
    embed_dir = Path(embed_dir)
    if not embed_dir.is_dir():
        raise IndexInputError(f"{embed_dir}: no such embedding directory")
    path = embed_dir / EMBED_CONFIG_FILE
    if not path.is_file():
        raise IndexInputError(f"{embed_dir}: not an embedding directory (no {EMBED_CONFIG_FILE}); make one with "
                              f"clipalign-embed")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexInputError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(config, dict):
        raise IndexInputError(f"{path}: expected a JSON object")
    return config


def model_of(embed_config: dict[str, Any]) -> dict[str, str | None]:
    """The model that made an embedding directory, from its embed.json: {"path": ..., "name": ...} (None if unsaid).

    Takes `"model": {"path", "name"}`, `"model": PATH` or `"model_path"` / `"model_name"`.
    """
    model = embed_config.get("model")
    if isinstance(model, dict):
        return {"path": model.get("path"), "name": model.get("name")}
    return {"path": model if isinstance(model, str) else embed_config.get("model_path"),
            "name": embed_config.get("model_name")}


def _numbered(folder: Path, stem: str, suffix: str) -> dict[int, Path]:
    """The parts `folder/STEM_NNNNN.SUFFIX` by number; hidden files (temporaries of a writer) are not parts."""
    if not folder.is_dir():
        return {}
    parts = {}
    for path in folder.glob(f"{stem}_*.{suffix}"):
        match = _PART.search(path.name)
        if match and path.name == f"{stem}_{match.group(1)}.{suffix}":
            parts[int(match.group(1))] = path
    return parts


def embedding_modalities(embed_dir: str | os.PathLike) -> list[str]:
    """The modalities ("image", "text") an embedding directory holds parts of."""
    return [m for m in MODALITIES if _numbered(Path(embed_dir) / EMBEDDING_DIRS[m], EMBEDDING_DIRS[m], "npy")]


def _part_numbers(embed_dir: Path, modality: str) -> list[int]:
    """The part numbers of one modality, checked: 0..P-1 with no gap, each with its metadata part."""
    folder = EMBEDDING_DIRS[modality]
    arrays = _numbered(embed_dir / folder, folder, "npy")
    if not arrays:
        present = embedding_modalities(embed_dir)
        raise IndexInputError(f"{embed_dir}: no {modality} embeddings ({folder}/ has no parts); it holds: "
                              f"{', '.join(present) or 'none'}")
    numbers = sorted(arrays)
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
        raise IndexInputError(f"{embed_dir}: {folder}/ lacks part(s) {', '.join(map(str, missing[:5]))} of "
                              f"0..{numbers[-1]}: an unfinished or damaged embedding run")
    tables = _numbered(embed_dir / METADATA_DIR, METADATA_DIR, "parquet")
    lost = [n for n in numbers if n not in tables]
    if lost:
        raise IndexInputError(f"{embed_dir}: {metadata_part(embed_dir, lost[0])} is missing: the rows of "
                              f"{embedding_part(embed_dir, modality, lost[0]).name} have no keys or captions")
    return numbers


def _open_part(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexInputError(f"{path}: not a readable .npy array ({e})") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise IndexInputError(f"{path}: expected a float array (rows, dim), got {array.dtype} {array.shape}")
    return array


def open_embeddings(embed_dir: str | os.PathLike, modality: str) -> Embeddings:
    """One modality's embeddings of an embedding directory, memory-mapped (see `Embeddings`).

    Raises:
        IndexInputError: no such parts, a part missing or unreadable, or parts of different widths.
    """
    embed_dir = Path(embed_dir)
    parts = [_open_part(embedding_part(embed_dir, modality, n)) for n in _part_numbers(embed_dir, modality)]
    dims = {p.shape[1] for p in parts}
    if len(dims) > 1:
        raise IndexInputError(f"{embed_dir}: {EMBEDDING_DIRS[modality]}/ parts have different widths {sorted(dims)}")
    return Embeddings(modality, parts)


def read_metadata(embed_dir: str | os.PathLike, modality: str = "image") -> pa.Table:
    """The metadata of every row of an embedding directory, parts in order (the rows of `modality`'s parts).

    Raises:
        IndexInputError: pyarrow is missing, or a table cannot be read or has no `key` column.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise IndexInputError("reading an embedding directory's metadata needs pyarrow: "
                              "pip install 'clipalign[index]'") from e
    embed_dir = Path(embed_dir)
    tables = []
    for n in _part_numbers(embed_dir, modality):
        path = metadata_part(embed_dir, n)
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise IndexInputError(f"{path}: not a readable parquet table ({e})") from None
        if "key" not in table.column_names:
            raise IndexInputError(f"{path}: no `key` column (columns: {', '.join(table.column_names)})")
        tables.append(table)
    return pa.concat_tables(tables, promote_options="permissive")


def read_embeddings(embed_dir: str | os.PathLike, modality: str = "image") -> tuple[Embeddings, pa.Table]:
    """One modality's embeddings and the metadata of their rows, checked to line up part by part.

    Raises:
        IndexInputError: as `open_embeddings` and `read_metadata`, or a part whose array and table differ in rows.
    """
    embeddings = open_embeddings(embed_dir, modality)
    metadata = read_metadata(embed_dir, modality)
    if metadata.num_rows != len(embeddings):
        import pyarrow.parquet as pq

        for n, part in enumerate(embeddings.parts):
            rows = pq.ParquetFile(metadata_part(embed_dir, n)).metadata.num_rows
            if rows != len(part):
                raise IndexInputError(f"{embedding_part(embed_dir, modality, n)} has {len(part)} rows but "
                                      f"{metadata_part(embed_dir, n).name} has {rows}: they must hold the same rows")
    return embeddings, metadata


# ---- choosing an index ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes from a size such as "16GB", "500MB", "1.5G" or "1000000" (powers of 1024, as autofaiss counts).

    Raises:
        IndexInputError: not a size.
    """
    match = _SIZE.match(str(text))
    if not match:
        raise IndexInputError(f"{text!r} is not a size: expected a number with an optional unit, e.g. 16GB or 500MB")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** ("kmgt".index(unit) + 1)) if unit else int(number)


@dataclass
class IndexPlan:
    """The index to build: its kind, faiss factory key, size-derived parameters and estimated memory."""

    kind: str
    key: str
    nlist: int | None = None
    pq_bytes: int | None = None
    train_rows: int = 0
    memory_bytes: int = 0
    why: str = ""


def nlist_for(n: int, trainable: int) -> int:
    """Inverted lists for n vectors: the power of two nearest 4*sqrt(n), as few as k-means can train from
    `trainable` rows (at least 39 each)."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    while nlist > 1 and _MIN_POINTS_PER_CENTROID * nlist > trainable:
        nlist //= 2
    return nlist


def _memory(kind: str, n: int, dim: int, nlist: int = 0, pq_bytes: int = 0) -> int:
    """Estimated bytes of an index in memory (and about the same on disk)."""
    ids = 8  # an inverted list stores an int64 id per vector
    if kind == "flat":
        return n * dim * 4
    if kind == "hnsw":
        return n * (dim * 4 + 2 * HNSW_M * 4 + 16)  # level 0 links 2M neighbours; upper levels add little
    if kind == "ivf":
        return n * (dim * 4 + ids) + nlist * dim * 4
    return n * (pq_bytes + ids) + nlist * dim * 4 + dim * 256 * 4  # ivfpq: codes, centroids, codebooks


def _pq_sizes(dim: int) -> list[int]:
    """Bytes per vector for 8-bit product quantisation, largest first: divisors of dim, at least 4 dims each (with
    fewer, training is slow for the little recall it adds)."""
    return [m for m in (128, 96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if dim % m == 0 and dim // m >= 4]


def plan_index(n: int, dim: int, kind: str = "auto", max_memory: int = 16 * 1024 ** 3,
               flat_max: int = FLAT_MAX, trainable: int | None = None, index_key: str | None = None) -> IndexPlan:
    """The index for n vectors of `dim` dimensions, as `kind` asks ("auto": chosen by size and memory).

    `trainable`: rows available for training (n less the held-out queries); `index_key`: a faiss factory string,
    which overrides `kind`.

    Raises:
        IndexInputError: nothing of the kind fits `max_memory`.
    """
    trainable = n if trainable is None else trainable
    nlist = nlist_for(n, trainable)
    if index_key:
        return IndexPlan("custom", index_key, train_rows=min(trainable, max(_PQ_MIN_TRAIN, nlist * 256)),
                         why="--index-key")
    sizes = {k: _memory(k, n, dim, nlist) for k in ("flat", "hnsw", "ivf")}
    if kind == "auto":
        if n <= flat_max and sizes["flat"] <= max_memory:
            kind, why = "flat", f"{n} vectors <= --flat-max {flat_max}: exact search"
        elif sizes["ivf"] <= max_memory:  # an inverted file takes more memory than exact search: n > flat_max here
            kind, why = "ivf", f"{n} vectors > --flat-max {flat_max}: inverted file, {nlist} lists"
        else:
            kind, why = "ivfpq", "the vectors exceed --max-memory: inverted file with product-quantised codes"
    else:
        why = f"--kind {kind}"
    if kind in ("flat", "hnsw", "ivf"):
        if sizes[kind] > max_memory:
            raise IndexInputError(f"a {kind} index of {n} vectors of {dim} dims takes about {_human(sizes[kind])}, "
                                  f"over --max-memory {_human(max_memory)}; raise it or use --kind ivfpq")
        train = min(trainable, _TRAIN_POINTS_PER_CENTROID * nlist) if kind == "ivf" else 0
        key = {"flat": "Flat", "hnsw": f"HNSW{HNSW_M},Flat", "ivf": f"IVF{nlist},Flat"}[kind]
        return IndexPlan(kind, key, nlist=nlist if kind == "ivf" else None, train_rows=train,
                         memory_bytes=sizes[kind], why=why)
    fitting = [m for m in _pq_sizes(dim) if _memory("ivfpq", n, dim, nlist, m) <= max_memory]
    if not fitting:
        least = _memory("ivfpq", n, dim, nlist, min(_pq_sizes(dim) or [1]))
        raise IndexInputError(f"{n} vectors of {dim} dims need at least {_human(least)} even with the smallest "
                              f"product-quantised codes, over --max-memory {_human(max_memory)}")
    m = fitting[0]
    train = min(trainable, max(_PQ_MIN_TRAIN, _TRAIN_POINTS_PER_CENTROID * nlist))
    bits = _pq_bits(train)
    key = f"IVF{nlist},PQ{m}x{bits}np"  # np: no polysemous training, which only Hamming-filtered search uses
    return IndexPlan("ivfpq", key, nlist=nlist, pq_bytes=m, train_rows=train,
                     memory_bytes=_memory("ivfpq", n, dim, nlist, m), why=f"{why} ({m} bytes a vector)")


def _pq_bits(train_rows: int) -> int:
    """Bits per sub-quantizer code: 8, or fewer where the sample is too small to train 256 centroids."""
    bits = 8
    while bits > 1 and _MIN_POINTS_PER_CENTROID * 2 ** bits > train_rows:
        bits -= 1
    return bits


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


# ---- building and measuring --------------------------------------------------------------------------------------


def query_count(n: int) -> int:
    """Held-out queries per set (one set tunes the search parameter, another measures recall) for n vectors: 1 %,
    at least 100 and at most 1,000, and at most half of the rows."""
    return min(MAX_QUERIES, max(100, n // 100), n // 2) if n > 1 else 0


def _search_parameter(index: faiss.Index) -> tuple[str | None, list[int]]:
    """The parameter that trades speed for recall in this index, and the values to try, cheapest first."""
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        values = [2 ** i for i in range(int(math.log2(ivf.nlist)) + 1)]
        return "nprobe", values if values[-1] == ivf.nlist else [*values, ivf.nlist]
    if isinstance(index, faiss.IndexHNSW):
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024]
    return None, []


def _exact_neighbours(embeddings: Embeddings, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids of the k rows with the largest inner product with each query, by brute force over all parts."""
    faiss = _faiss()
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, block in embeddings.chunks():
        scores, ids = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(ids >= 0, ids + start, -1))
    heap.finalize()
    return heap.D, heap.I


def _without_self(scores: np.ndarray, ids: np.ndarray, own: np.ndarray | None, k: int) -> tuple[np.ndarray, ...]:
    """The first k neighbours of each row, leaving out the query's own row (`own`) where it was found."""
    if own is None:
        return scores[:, :k], ids[:, :k]
    keep = ids != own[:, None]
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    for row in range(len(ids)):
        kept = np.nonzero(keep[row])[0][:k]
        out_scores[row, :len(kept)], out_ids[row, :len(kept)] = scores[row, kept], ids[row, kept]
    return out_scores, out_ids


def _nonzero_rows(embeddings: Embeddings) -> np.ndarray:
    """(N,) bool: the rows that hold an embedding, not the zeros written for a sample without that modality."""
    found = np.zeros(len(embeddings), dtype=bool)
    for start, block in embeddings.chunks():
        found[start:start + len(block)] = np.any(block != 0, axis=1)
    return found


@dataclass
class _QuerySet:
    """Queries with their exact neighbours; `own`: each query's own row in the index (None: not in it)."""

    vectors: np.ndarray
    own: np.ndarray | None
    exact_scores: np.ndarray
    exact_ids: np.ndarray


def _query_set(embeddings: Embeddings, vectors: np.ndarray, own: np.ndarray | None, k: int) -> _QuerySet:
    extra = 0 if own is None else 1
    scores, ids = _exact_neighbours(embeddings, vectors, k + extra)
    scores, ids = _without_self(scores, ids, own, k)
    return _QuerySet(vectors, own, scores, ids)


def _recall_at_k(index: faiss.Index, embeddings: Embeddings, queries: _QuerySet) -> float:
    """The share of each query's exact k nearest neighbours that `index` returns in its k; a returned row that scores
    within `SCORE_TIE` of the k-th exact neighbour counts as one of them (ties among duplicates)."""
    k = queries.exact_ids.shape[1]
    extra = 0 if queries.own is None else 1
    scores, ids = index.search(queries.vectors, k + extra)
    _, found = _without_self(scores, ids, queries.own, k)
    hits = 0
    outside = []  # (query, row) of rows returned that are not among the exact ids
    for q in range(len(found)):
        rows = found[q][found[q] >= 0]
        inside = np.isin(rows, queries.exact_ids[q])
        hits += int(inside.sum())
        outside += [(q, r) for r in rows[~inside]]
    if outside:
        qs, rows = np.array(outside).T
        true_scores = np.einsum("ij,ij->i", embeddings.rows(rows), queries.vectors[qs])
        hits += int((true_scores >= queries.exact_scores[qs, -1] - SCORE_TIE).sum())
    return hits / (len(found) * k)


def _set_parameter(index: faiss.Index, name: str, value: int) -> None:
    _faiss().ParameterSpace().set_index_parameter(index, name, value)


def build_index(embeddings: Embeddings, plan: IndexPlan, other: Embeddings | None = None,
                recall_target: float = RECALL_TARGET, seed: int = 0, progress: bool = False,
                ) -> tuple[faiss.Index, dict[str, Any]]:
    """Build, tune and measure the index `plan` describes over `embeddings`.

    Args:
        embeddings: the vectors to index; their rows become the ids.
        plan: from `plan_index`.
        other: the other modality's embeddings of the same rows, queried too (for the image index: text queries).
        recall_target: the recall@10 the cheapest search parameter is chosen to reach.
        seed: draws the held-out queries and the training sample.
        progress: a bar over the vectors added.

    Returns:
        The index, with its search parameter set, and a record for index.json.
    """
    faiss = _faiss()
    start = time.perf_counter()
    n, dim = len(embeddings), embeddings.dim
    k = min(RECALL_K, n - 1)
    rng = np.random.default_rng(seed)
    # rows left as zeros (a sample without a caption has a zero text row) are indexed, so that ids stay rows, but
    # they score 0 against every query: they are neither queries nor training vectors
    usable = np.flatnonzero(_nonzero_rows(embeddings))
    count = query_count(len(usable))
    held = rng.choice(usable, size=2 * count, replace=False)
    tune_rows, report_rows = np.sort(held[:count]), np.sort(held[count:])
    both = _nonzero_rows(other) if other is not None else None
    index = faiss.index_factory(dim, plan.key, faiss.METRIC_INNER_PRODUCT)
    train_rows = 0
    if not index.is_trained:
        rest = np.setdiff1d(usable, held, assume_unique=True)
        sample = np.sort(rng.choice(rest, size=min(len(rest), plan.train_rows or len(rest)), replace=False))
        train_rows = len(sample)
        index.train(embeddings.rows(sample))
    _add_all(index, embeddings, progress)
    added = time.perf_counter()

    def sets(rows: np.ndarray) -> list[_QuerySet]:
        found = [_query_set(embeddings, embeddings.rows(rows), rows, k)]
        if other is not None and both[rows].any():
            rows = rows[both[rows]]
            found.append(_query_set(embeddings, other.rows(rows), None, k))
        return found

    name, values = _search_parameter(index)
    tuning, reached = [], None
    if count and name:
        tune_sets = sets(tune_rows)
        chosen = None
        for value in values:
            _set_parameter(index, name, value)
            recalls = [_recall_at_k(index, embeddings, s) for s in tune_sets]
            tuning.append({name: value, "recall": [round(r, 4) for r in recalls]})
            if min(recalls) >= recall_target:
                chosen = value
                break
            if len(tuning) > 2 and min(recalls) < min(tuning[-3]["recall"]) + 0.001:
                break  # two doublings gained nothing: quantised codes cap recall, and more lists only cost time
        if chosen is None:  # the codes cap recall below the target: the cheapest value within 0.5 % of the best
            best = max(min(t["recall"]) for t in tuning)
            chosen = next(t[name] for t in tuning if min(t["recall"]) >= best - 0.005)
        reached = chosen == tuning[-1][name] and min(tuning[-1]["recall"]) >= recall_target
        _set_parameter(index, name, chosen)
    recall = None
    if count:
        report = [_recall_at_k(index, embeddings, s) for s in sets(report_rows)]
        recall = {"k": k, "queries": int(count), "same_modality": round(report[0], 4),
                  "cross_modal": round(report[1], 4) if len(report) > 1 else None,
                  "target": recall_target, "target_reached": reached, "tuning": tuning}
    params = {"nlist": plan.nlist, "pq_bytes": plan.pq_bytes}
    if name:
        params[name] = int(_faiss_parameter(index, name))
    record = {
        "modality": embeddings.modality, "kind": plan.kind, "index_key": plan.key, "metric": "inner_product",
        "why": plan.why, "vectors": n, "dim": dim, "params": {k_: v for k_, v in params.items() if v is not None},
        "train_rows": train_rows, "recall": recall, "memory_estimate_bytes": plan.memory_bytes,
        "build_seconds": round(added - start, 2), "measure_seconds": round(time.perf_counter() - added, 2),
    }
    return index, record


def _faiss_parameter(index: faiss.Index, name: str) -> int:
    faiss = _faiss()
    if name == "nprobe":
        return faiss.extract_index_ivf(index).nprobe
    return faiss.downcast_index(index).hnsw.efSearch


def _add_all(index: faiss.Index, embeddings: Embeddings, progress: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=len(embeddings), unit="vec", desc=f"add {embeddings.modality}", disable=not progress) as bar:
        for _, block in embeddings.chunks():
            index.add(block)
            bar.update(len(block))


# ---- the index directory -------------------------------------------------------------------------------------------


def write_index(index: faiss.Index, index_dir: str | os.PathLike, modality: str) -> Path:
    """Write one modality's index into an index directory atomically (faiss.write_index to a temporary name)."""
    path = index_file(index_dir, modality)
    with atomic_path(path) as tmp:
        _faiss().write_index(index, str(tmp))
    return path


def read_index_config(index_dir: str | os.PathLike) -> dict[str, Any]:
    """An index directory's index.json.

    Raises:
        IndexInputError: the directory or its index.json is missing or unreadable.
    """
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise IndexInputError(f"{index_dir}: no such index directory; build one with clipalign-index")
    path = index_dir / INDEX_CONFIG_FILE
    if not path.is_file():
        raise IndexInputError(f"{index_dir}: not an index directory (no {INDEX_CONFIG_FILE}); build one with "
                              f"clipalign-index EMBED_DIR --out {index_dir}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexInputError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("indexes"), dict):
        raise IndexInputError(f"{path}: not an index.json of clipalign-index (no \"indexes\")")
    return config


def load_index(index_dir: str | os.PathLike, modality: str) -> faiss.Index:
    """One modality's index from an index directory, with the search parameter index.json records.

    Raises:
        IndexInputError: not built, or a file faiss cannot read.
    """
    config = read_index_config(index_dir)
    record = config["indexes"].get(modality)
    path = index_file(index_dir, modality)
    if record is None or not path.is_file():
        built = ", ".join(sorted(config["indexes"])) or "none"
        raise IndexInputError(f"{index_dir}: no {modality} index (it holds: {built}); build it with clipalign-index "
                              f"{config.get('embeddings', 'EMBED_DIR')} --out {index_dir} --modality {modality}")
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise IndexInputError(f"{path}: faiss cannot read it ({_faiss_message(e)})") from None
    if index.ntotal != record.get("vectors"):
        raise IndexInputError(f"{path} holds {index.ntotal} vectors but {INDEX_CONFIG_FILE} says "
                              f"{record.get('vectors')}: an interrupted build; build it again")
    for name in ("nprobe", "efSearch"):
        if name in record.get("params", {}):
            _set_parameter(index, name, record["params"][name])
    return index


def index_embeddings(embed_dir: str | os.PathLike, index_dir: str | os.PathLike, modalities: Sequence[str] = (),
                     kind: str = "auto", max_memory: int | str = MAX_MEMORY, flat_max: int = FLAT_MAX,
                     recall_target: float = RECALL_TARGET, index_key: str | None = None, seed: int = 0,
                     progress: bool = False, log=print) -> dict[str, Any]:
    """Build the index of each modality of an embedding directory into `index_dir`; returns the new index.json.

    `modalities`: those to index (default: every one present). An index directory indexes one embedding directory:
    building into one that indexes another is refused. Other modalities already there are kept.

    Raises:
        IndexInputError: a bad embedding directory, option or index directory (the message says which).
    """
    embed_dir, index_dir = Path(embed_dir).resolve(), Path(index_dir)
    embed_config = read_embed_config(embed_dir)
    max_memory = parse_size(max_memory) if isinstance(max_memory, str) else max_memory
    if kind not in KINDS:
        raise IndexInputError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if not 0 < recall_target <= 1:
        raise IndexInputError(f"--recall-target {recall_target}: expected a number in (0, 1]")
    present = embedding_modalities(embed_dir)
    embedded = embed_config.get("embedded") or {}
    for modality in modalities:
        if modality not in present:
            raise IndexInputError(f"{embed_dir}: no {modality} embeddings; it holds: {', '.join(present) or 'none'}")
        if embedded.get(modality) == 0:
            raise IndexInputError(f"{embed_dir}: every {modality} row is zeros (no sample had a "
                                  f"{'caption' if modality == 'text' else 'usable image'}); nothing to index")
    if not modalities:
        modalities = [m for m in present if embedded.get(m) != 0]
        for modality in sorted(set(present) - set(modalities)):
            log(f"{modality}: skipped: every row is zeros (no sample had a "
                f"{'caption' if modality == 'text' else 'usable image'})")
        if not modalities:
            raise IndexInputError(f"{embed_dir}: no modality holds an embedding")
    config = _index_config(index_dir, embed_dir, embed_config)
    for modality in modalities:
        embeddings, metadata = read_embeddings(embed_dir, modality)
        other = next((m for m in MODALITIES if m != modality and m in present), None)
        other_embeddings = open_embeddings(embed_dir, other) if other else None
        if other_embeddings is not None and (len(other_embeddings) != len(embeddings)
                                             or other_embeddings.dim != embeddings.dim):
            other_embeddings = None  # not the same rows: its recall would mean nothing
        plan = plan_index(len(embeddings), embeddings.dim, kind, max_memory, flat_max,
                          trainable=len(embeddings) - 2 * query_count(len(embeddings)), index_key=index_key)
        log(f"{modality}: {len(embeddings)} vectors of {embeddings.dim} dims -> {plan.key} ({plan.why})")
        try:
            index, record = build_index(embeddings, plan, other_embeddings, recall_target, seed, progress)
        except RuntimeError as e:  # faiss refuses a factory key or parameters it cannot use
            raise IndexInputError(f"faiss could not build {plan.key!r}: {_faiss_message(e)}") from None
        path = write_index(index, index_dir, modality)
        record.update(file=path.name, index_bytes=path.stat().st_size, metadata_rows=metadata.num_rows)
        config["indexes"][modality] = record
        write_json(index_dir / INDEX_CONFIG_FILE, config)  # after the index: a record always has its file
        log(describe_record(record, path))
    return config


def _index_config(index_dir: Path, embed_dir: Path, embed_config: dict[str, Any]) -> dict[str, Any]:
    """index.json as it stands (its other modalities kept), or a new one; refused if it indexes another directory."""
    config = {"indexes": {}}
    if (index_dir / INDEX_CONFIG_FILE).is_file():
        config = read_index_config(index_dir)
        if config.get("embeddings") not in (None, str(embed_dir)):
            raise IndexInputError(f"{index_dir} indexes {config['embeddings']}, not {embed_dir}; choose another "
                                  f"--out or remove it")
    config.update(embeddings=str(embed_dir), model=model_of(embed_config), embed_dim=embed_config.get("embed_dim"),
                  clipalign_version=clipalign.__version__)
    return config


def describe_record(record: dict[str, Any], path: str | os.PathLike | None = None) -> str:
    """One line on a built index: kind, parameters, recall, time, size."""
    params = ", ".join(f"{k} {v}" for k, v in record["params"].items())
    line = f"{record['modality']}: {record['index_key']}" + (f" ({params})" if params else "")
    recall = record.get("recall")
    if recall:
        line += (f"; recall@{recall['k']} {recall['same_modality']:.3f} against exact search on {recall['queries']} "
                 f"held-out {record['modality']} queries")
        if recall.get("cross_modal") is not None:
            other = next(m for m in MODALITIES if m != record["modality"])
            line += f", {recall['cross_modal']:.3f} on their {other} embeddings"
        if recall.get("target_reached") is False:
            line += f" (below --recall-target {recall['target']} at every setting tried: the codes cap it)"
    line += f"; built in {record['build_seconds']:.1f} s"
    if path is not None:
        line += f"; {_human(record['index_bytes'])} -> {path}"
    return line


def main(argv: Sequence[str] | None = None) -> None:
    """`clipalign-index`: build faiss nearest-neighbour indexes of an embedding directory (clipalign-embed's)."""
    parser = argparse.ArgumentParser(prog="clipalign-index", description=main.__doc__)
    parser.add_argument("embed_dir", help="embedding directory (embed.json, img_emb/, text_emb/, metadata/)")
    parser.add_argument("--out", required=True, help="index directory to write (index.json, image.index, ...)")
    parser.add_argument("--modality", choices=(*MODALITIES, "all"), default="all",
                        help="which embeddings to index (default: all the directory holds)")
    parser.add_argument("--kind", choices=KINDS, default="auto",
                        help="flat: exact; ivf: inverted file; ivfpq: with product-quantised codes; hnsw: graph; "
                             "auto: flat up to --flat-max vectors, else ivf, else ivfpq to fit --max-memory")
    parser.add_argument("--index-key", help="a faiss index_factory string instead (e.g. 'IVF1024,PQ32')")
    parser.add_argument("--max-memory", default=MAX_MEMORY, help=f"memory the index may take (default {MAX_MEMORY})")
    parser.add_argument("--flat-max", type=int, default=FLAT_MAX,
                        help=f"most vectors to search exactly (default {FLAT_MAX})")
    parser.add_argument("--recall-target", type=float, default=RECALL_TARGET,
                        help=f"recall@10 the search parameter (nprobe, efSearch) is tuned to reach "
                             f"(default {RECALL_TARGET})")
    parser.add_argument("--seed", type=int, default=0, help="draws the held-out queries and the training sample")
    args = parser.parse_args(argv)
    # k-means and product-quantiser training run thousands of short parallel regions; OpenMP workers that spin
    # between them starve each other wherever cores are shared (30x slower measured on 2 busy cores), and sleeping
    # ones cost microseconds. Read when faiss loads its OpenMP runtime, so before the first import of faiss
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        index_embeddings(args.embed_dir, args.out, [] if args.modality == "all" else [args.modality], args.kind,
                         args.max_memory, args.flat_max, args.recall_target, args.index_key, args.seed,
                         progress=sys.stderr.isatty())
    except IndexInputError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
