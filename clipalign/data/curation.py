"""Curating at load time: keep-lists, keep probabilities and score thresholds, applied in the data workers.

Three settings, each optional (see docs/data.md, "Curating at load time"):

    data.keep              a file of sample ids to keep: DataComp's `.npy` of 128-bit uids, a text file with one id
                           per line, a CSV or parquet file with a `uid` or `key` column
    data.keep_id           what an id is: `uid` (the `uid` field of the sample's `.json`, 32 hex digits: DataComp)
                           or `key` (the WebDataset `__key__`)
    data.keep_probability  `json:FIELD` (a number in the sample's `.json`), or a file of ids and probabilities
                           (`.npy` with `uid`/`key` and `probability` fields, CSV or parquet with those columns)
    data.min_score         `FIELD>=VALUE` on a number of the sample's `.json`, e.g.
                           `clip_b32_similarity_score>=0.28`

A `SampleFilter` built from them (`SampleFilter.from_config`) judges a raw sample before its image is decoded:
`filter(sample, seed)` is None (kept) or the reason it is filtered (`FILTER_REASONS`). The training stream calls it
right after its cursor counted the sample, so resume positions stay in raw samples, and counts the filtered samples
apart from the skipped ones (`batch["filtered"]`, `filtered` in metrics.jsonl and summary.json).

Membership: uids are held as one sorted structured array of two uint64 (high, low), DataComp's own `u8,u8` layout:
16 bytes per uid, and a DataComp `.npy` that is already sorted is memory-mapped as it is (`np.load(mmap_mode="r")`:
the DataLoader workers share its pages). Keys are hashed to 64 bits (blake2b, 8 bytes) into a sorted uint64 array:
8 bytes per key; a key not on the list passes for one with probability about N / 2^64 (5.4e-12 for 10^8 keys). A
lookup is one `np.searchsorted`: about 3 us for a key hash, 10 us for a uid among 10^7, under 1 % of decoding a
small JPEG.

The probability draw: a sample is kept when `u < p`, where `u` in [0, 1) comes from the sample's own seed (the
stream's `sample_seed(key)`: train seed, pass, key) through splitmix64 with a salt of its own, so it is independent
of the sample's caption draw and crop but the same in a resumed or repeated run; another seed or another pass draws
anew.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import webdataset as wds

from clipalign.config import KEEP_ID_CHOICES, ConfigError
from clipalign.data.sample import sample_json


class FilterReason(NamedTuple):
    """Why a sample was filtered out by the curation settings (counted apart from skipped samples)."""

    name: str
    meaning: str


# Every filter reason, once, in the order of the counts in metrics.jsonl.
FILTER_REASONS = (
    FilterReason("not_in_keep_list", "its id is not on the data.keep list"),
    FilterReason("no_id", "it has no id to look up: with data.keep_id=uid, no .json, a .json that cannot be read, or "
                          "no uid of up to 32 hex digits in it"),
    FilterReason("below_min_score", "its data.min_score field is below the threshold"),
    FilterReason("no_score", "it has no data.min_score field, or the field is not a finite number"),
    FilterReason("dropped_by_probability", "its data.keep_probability draw dropped it"),
    FilterReason("no_probability", "it has no keep probability: not in the data.keep_probability file, or no finite "
                                   "number in its json:FIELD"),
)
FILTER_REASON_NAMES = tuple(r.name for r in FILTER_REASONS)

UID_DTYPE = np.dtype([("f0", "<u8"), ("f1", "<u8")])  # DataComp's np.dtype("u8,u8"): (high, low) 64 bits of a uid
JSON_PREFIX = "json:"
_UID = re.compile(r"[0-9a-fA-F]{1,32}")
_MIN_SCORE = re.compile(r"\s*([^\s<>=!]+)\s*>=\s*(\S+)\s*")
_CHUNK = 1 << 20  # ids converted or checked at a time
_DRAW_SALT = 0x6B656570  # "keep": the probability draw's own stream, apart from the caption draw and the crop
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------------------------
# ids


def uid_pair(text: Any) -> tuple[int, int] | None:
    """A uid (up to 32 hex digits, as DataComp writes it) as (high, low) 64-bit halves; None when it is not one."""
    if not isinstance(text, str) or not _UID.fullmatch(text):
        return None
    value = int(text, 16)
    return value >> 64, value & _MASK64


def key_hash(key: str) -> int:
    """A WebDataset key as the 64-bit number keep-lists of keys hold (blake2b, 8 bytes, little-endian)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def uid_array(pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """Sorted uids in DataComp's layout (`UID_DTYPE`), from (high, low) pairs: what `np.save` of a keep-list takes."""
    high, low = array("Q"), array("Q")
    for h, lo in pairs:
        high.append(h)
        low.append(lo)
    return _sorted_uids(np.frombuffer(high, np.uint64), np.frombuffer(low, np.uint64))[0]


def _sorted_uids(high: np.ndarray, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the uids sorted as one `UID_DTYPE` array, the order that sorts them)."""
    order = np.lexsort((low, high))
    ids = np.empty(len(high), UID_DTYPE)
    ids["f0"], ids["f1"] = high[order], low[order]
    return ids, order


class IdIndex:
    """Sorted sample ids for membership tests and table lookups: uids (`UID_DTYPE`, 16 bytes each) or key hashes
    (uint64, 8 bytes each). `find(sample_id)` is the index of the id, or -1."""

    def __init__(self, kind: str, ids: np.ndarray):
        self.kind, self.ids = kind, ids
        self.size = len(ids)
        # uids: the same memory seen as (N, 2) uint64, to compare the id found without building structured scalars
        self.pairs = ids.view(np.uint64).reshape(-1, 2) if kind == "uid" else None

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes)

    def find(self, sample_id: Any) -> int:
        if self.kind == "uid":
            high, low = sample_id
            i = int(self.ids.searchsorted(np.array(sample_id, UID_DTYPE)))
            found = i < self.size and int(self.pairs[i, 0]) == high and int(self.pairs[i, 1]) == low
        else:
            value = np.uint64(sample_id)
            i = int(self.ids.searchsorted(value))
            found = i < self.size and self.ids[i] == value
        return i if found else -1

    def __contains__(self, sample_id: Any) -> bool:
        return self.find(sample_id) >= 0

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Membership of many ids at once (a `UID_DTYPE` array, or uint64 key hashes), as a bool array."""
        ids = np.asarray(ids, self.ids.dtype)
        where = np.minimum(self.ids.searchsorted(ids), max(self.size - 1, 0))
        if self.kind == "uid":
            found = self.pairs[where]
            return (found[:, 0] == ids["f0"]) & (found[:, 1] == ids["f1"])
        return self.ids[where] == ids


# ----------------------------------------------------------------------------------------------------------------
# reading files


def _one_line(exn: BaseException) -> str:
    text = str(exn).strip().splitlines()
    return f"{type(exn).__name__}: {text[0] if text else ''}".rstrip(": ")


def _check_file(what: str, path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"{what}: {path} is a folder; expected a file of ids")
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what}: {path} cannot be read (no read permission)")


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return "npy"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    return "text"


def _ids_from_strings(values: Iterable[Any], kind: str, what: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Ids given as text (hex uids, or keys) -> (sorted ids, the order that sorts them)."""
    if kind == "uid":
        high, low = array("Q"), array("Q")
        for n, text in enumerate(values, 1):
            text = text.strip() if isinstance(text, str) else text
            # a list's uids are DataComp's 32 hex digits: a shorter entry (make-shards' 9-digit keys) is a key
            pair = uid_pair(text) if isinstance(text, str) and len(text) == 32 else None
            if pair is None:
                raise ConfigError(f"{what}: {path}: entry {n}, {str(text)[:40]!r}, is not a uid (DataComp's 32 hex "
                                  f"digits) as data.keep_id=uid expects; if the list holds sample keys (the "
                                  f"__key__ of each sample, e.g. clipalign-make-shards' 000000001), set "
                                  f"data.keep_id=key")
            high.append(pair[0])
            low.append(pair[1])
        return _sorted_uids(np.frombuffer(high, np.uint64), np.frombuffer(low, np.uint64))
    hashes = array("Q")
    for n, text in enumerate(values, 1):
        if not isinstance(text, str):
            raise ConfigError(f"{what}: {path}: entry {n}, {text!r}, is not a key (a string)")
        hashes.append(key_hash(text))
    hashed = np.frombuffer(hashes, np.uint64)
    order = np.argsort(hashed, kind="stable")
    return hashed[order], order


def _text_lines(path: Path, what: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield line
    except (OSError, UnicodeDecodeError) as exn:
        raise ConfigError(f"{what}: {path} cannot be read as a text file of ids, one per line ({_one_line(exn)})") \
            from None


def _csv_columns(path: Path, columns: list[str], what: str) -> dict[str, list[str]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ConfigError(f"{what}: {path} is empty (expected a CSV file with a header row naming "
                                  f"{' and '.join(columns)})")
            header = [h.strip() for h in header]
            missing = [c for c in columns if c not in header]
            if missing:
                raise ConfigError(f"{what}: {path} has no {' or '.join(repr(c) for c in missing)} column (expected "
                                  f"columns {', '.join(columns)}; it has {', '.join(header) or 'none'})")
            where = [header.index(c) for c in columns]
            out: dict[str, list[str]] = {c: [] for c in columns}
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                for c, i in zip(columns, where):
                    out[c].append(row[i] if i < len(row) else "")
            return out
    except (OSError, UnicodeDecodeError, csv.Error) as exn:
        raise ConfigError(f"{what}: {path} cannot be read as CSV ({_one_line(exn)})") from None


def _parquet_columns(path: Path, columns: list[str], what: str) -> dict[str, list[Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{what}: {path} is a parquet file, and reading parquet needs pyarrow, which is not "
                          f"installed: pip install pyarrow (or give the ids as .npy, CSV or a text file)") from None
    try:
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise ConfigError(f"{what}: {path} has no {' or '.join(repr(c) for c in missing)} column (expected "
                              f"columns {', '.join(columns)}; it has {', '.join(names) or 'none'})")
        out: dict[str, list[Any]] = {c: [] for c in columns}
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_CHUNK, columns=columns):
            for c in columns:
                out[c].extend(batch.column(c).to_pylist())
        return out
    except ConfigError:
        raise
    except Exception as exn:  # pyarrow's errors are many (ArrowInvalid, OSError, ...)
        raise ConfigError(f"{what}: {path} cannot be read as parquet ({_one_line(exn)})") from None


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exn:  # a truncated header, not an .npy at all, an object array
        raise ConfigError(f"{what}: {path} cannot be read as a NumPy .npy file ({_one_line(exn)})") from None


def _uid_view(arr: np.ndarray) -> np.ndarray | None:
    """A DataComp uid array (two uint64 fields, or an (N, 2) uint64 array) seen as `UID_DTYPE`, without a copy where
    its layout allows; None when `arr` is neither."""
    if arr.dtype.names is not None:
        fields = [arr.dtype.fields[name] for name in arr.dtype.names]
        if len(fields) != 2 or any(f[0].kind != "u" or f[0].itemsize != 8 for f in fields) or arr.ndim != 1:
            return None
        if arr.dtype.itemsize == 16 and [f[1] for f in fields] == [0, 8] and all(
                f[0].byteorder in ("<", "=") for f in fields) and arr.flags.c_contiguous:
            return np.asarray(arr).view(UID_DTYPE)
        return np.asarray(arr).astype(UID_DTYPE)  # another byte order or layout: a copy
    if arr.ndim == 2 and arr.shape[1] == 2 and arr.dtype.kind == "u" and arr.dtype.itemsize == 8:
        if arr.dtype.byteorder in ("<", "=") and arr.flags.c_contiguous:
            return np.asarray(arr).view(UID_DTYPE).reshape(-1)
        return np.ascontiguousarray(arr, dtype="<u8").view(UID_DTYPE).reshape(-1)
    return None


def _is_sorted(ids: np.ndarray) -> bool:
    """Whether `UID_DTYPE` ids are in ascending order, checked in chunks (a memory-mapped file stays mapped)."""
    for start in range(0, len(ids) - 1, _CHUNK):
        chunk = np.asarray(ids[start:start + _CHUNK + 1])
        high, low = chunk["f0"], chunk["f1"]
        if not ((high[1:] > high[:-1]) | ((high[1:] == high[:-1]) & (low[1:] >= low[:-1]))).all():
            return False
    return True


def load_ids(path: str | os.PathLike, kind: str, what: str = "data.keep") -> IdIndex:
    """The ids of a keep-list file, sorted for lookups (see the module's docstring for the formats).

    Raises:
        ConfigError: one line naming `what`, the file and what was expected of it.
    """
    path = Path(path).expanduser()
    _check_file(what, path)
    form = _kind(path)
    if form == "npy":
        arr = _load_npy(path, what)
        if kind == "uid":
            ids = _uid_view(arr)
            if ids is None:
                raise ConfigError(f"{what}: {path} holds a {arr.dtype} array of shape {arr.shape}; expected DataComp "
                                  f"uids: a structured array of two uint64 fields (np.dtype('u8,u8'), high then low "
                                  f"64 bits) or an (N, 2) uint64 array")
            if not _is_sorted(ids):
                ids = _sorted_uids(np.ascontiguousarray(ids["f0"]), np.ascontiguousarray(ids["f1"]))[0]
        else:
            if arr.ndim != 1 or arr.dtype.kind not in "US":
                raise ConfigError(f"{what}: {path} holds a {arr.dtype} array of shape {arr.shape}; with "
                                  f"data.keep_id=key expected a 1-D array of strings (the keys)")
            ids = _ids_from_strings((k.decode() if isinstance(k, bytes) else str(k) for k in arr), kind, what,
                                    path)[0]
    elif form == "text":
        ids = _ids_from_strings(_text_lines(path, what), kind, what, path)[0]
    else:
        read = _csv_columns if form == "csv" else _parquet_columns
        ids = _ids_from_strings(read(path, [kind], what)[kind], kind, what, path)[0]
    if len(ids) == 0:
        raise ConfigError(f"{what}: {path} holds no ids: every sample would be filtered out")
    return IdIndex(kind, ids)


def load_probabilities(path: str | os.PathLike, kind: str,
                       what: str = "data.keep_probability") -> tuple[IdIndex, np.ndarray]:
    """(sorted ids, their keep probabilities as float32, in the same order) of a probability file: a `.npy`
    structured array with fields `uid` (two uint64, or a (2,) uint64 sub-array) or `key` (strings) and
    `probability`, or a CSV or parquet file with such columns (uids as hex strings).

    Raises:
        ConfigError: one line naming `what`, the file and what was expected of it.
    """
    path = Path(path).expanduser()
    _check_file(what, path)
    form = _kind(path)
    expected = f"fields {kind!r} and 'probability'"
    if form == "npy":
        arr = _load_npy(path, what)
        names = arr.dtype.names or ()
        if arr.ndim != 1 or kind not in names or "probability" not in names \
                or arr.dtype["probability"].kind not in "fiu":
            raise ConfigError(f"{what}: {path} holds a {arr.dtype} array of shape {arr.shape}; expected a 1-D "
                              f"structured array with {expected} (a number)")
        probabilities = np.asarray(arr["probability"], np.float64)
        if kind == "uid":
            uids = _uid_view(np.asarray(arr["uid"]))  # a (u8, u8) field, or a (2,) uint64 sub-array: (N, 2)
            if uids is None:
                raise ConfigError(f"{what}: {path}: the 'uid' field is {arr.dtype['uid']}; expected two uint64 "
                                  f"(np.dtype('u8,u8') or ('u8', 2)), high then low 64 bits")
            ids, order = _sorted_uids(np.ascontiguousarray(uids["f0"]), np.ascontiguousarray(uids["f1"]))
        else:
            if arr.dtype["key"].kind not in "US":
                raise ConfigError(f"{what}: {path}: the 'key' field is {arr.dtype['key']}; expected strings")
            ids, order = _ids_from_strings((k.decode() if isinstance(k, bytes) else str(k) for k in arr["key"]),
                                           kind, what, path)
    else:
        if form == "text":
            raise ConfigError(f"{what}: {path}: expected .npy, .csv or .parquet with {expected} (or json:FIELD)")
        read = _csv_columns if form == "csv" else _parquet_columns
        columns = read(path, [kind, "probability"], what)
        try:
            probabilities = np.array([float(p) if p not in (None, "") else math.nan for p in columns["probability"]],
                                     np.float64)
        except (TypeError, ValueError) as exn:
            raise ConfigError(f"{what}: {path}: a 'probability' that is not a number ({_one_line(exn)})") from None
        ids, order = _ids_from_strings(columns[kind], kind, what, path)
    bad = ~(np.isfinite(probabilities) & (probabilities >= 0) & (probabilities <= 1))
    if bad.any():
        first = int(np.argmax(bad))
        raise ConfigError(f"{what}: {path}: entry {first + 1} has probability {float(probabilities[first])!r}; every "
                          f"probability must be a number in [0, 1]")
    if len(ids) == 0:
        raise ConfigError(f"{what}: {path} holds no ids: every sample would be filtered out")
    return IdIndex(kind, ids), probabilities[order].astype(np.float32)


def parse_min_score(text: str) -> tuple[str, float]:
    """`FIELD>=VALUE` (`data.min_score`) as (field, value)."""
    match = _MIN_SCORE.fullmatch(text)
    value = None
    if match:
        try:
            value = float(match.group(2))
        except ValueError:
            pass
    if value is None or not math.isfinite(value):
        raise ConfigError(f"data.min_score: expected FIELD>=VALUE (a field of the sample's .json and a number), e.g. "
                          f"clip_b32_similarity_score>=0.28; got {text!r}")
    return match.group(1), value


# ----------------------------------------------------------------------------------------------------------------
# the filter


def stream_sample_seed(seed: int, epoch: int, key: str) -> int:
    """The seed the training stream gives a sample (`ShardStream`'s `sample_seed`): from the stream's seed (the
    train seed in exact passes), the pass and the key."""
    return wds.utils.make_seed(seed, epoch, zlib.crc32(key.encode()))


def keep_draw(seed: int) -> float:
    """The uniform number in [0, 1) that decides a sample's keep probability, from its seed (splitmix64)."""
    z = (seed ^ _DRAW_SALT) * 0x9E3779B97F4A7C15 & _MASK64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
    z ^= z >> 31
    return (z >> 11) * 2.0 ** -53


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return value if math.isfinite(value) else None


class _Sample:
    """One raw sample as the filters see it: its JSON and its id, each read once, when first asked for."""

    __slots__ = ("sample", "keep_id", "_meta", "_id")

    def __init__(self, sample: dict[str, Any], keep_id: str):
        self.sample, self.keep_id = sample, keep_id
        self._meta: dict[str, Any] | None = None
        self._id: Any = ...

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            try:
                self._meta = sample_json(self.sample)
            except (UnicodeDecodeError, ValueError):
                self._meta = {}  # unreadable: it has no field (decoding reports it as bad_text if it gets there)
        return self._meta

    @property
    def id(self) -> Any:
        """(high, low) of its uid, or its key's hash; None when it has no uid."""
        if self._id is ...:
            self._id = uid_pair(self.meta.get("uid")) if self.keep_id == "uid" else key_hash(self.sample["__key__"])
        return self._id


class SampleFilter:
    """The curation settings as one callable: `filter(sample, seed)` -> None (kept) or the reason it is filtered.

    Filters run in this order, each only on what the previous kept: the keep-list (`keep_list`), the score threshold
    (`min_score`), the keep probability (`keep_probability`). `stats` counts, per filter, the samples it saw and kept
    (per process or worker: what `clipalign-inspect-shards` reports as the yield). Pickled (a DataLoader started
    with `spawn`), a filter travels as its settings and reads its files again where it lands; forked workers share
    the parent's arrays (and the pages of a memory-mapped `.npy`).
    """

    def __init__(self, keep: str = "", keep_id: str = "uid", keep_probability: str = "", min_score: str = ""):
        if keep_id not in KEEP_ID_CHOICES:
            raise ConfigError(f"data.keep_id: {keep_id!r} is not one of {', '.join(KEEP_ID_CHOICES)}")
        self.settings = (keep, keep_id, keep_probability, min_score)
        self.keep_id = keep_id
        self.steps: list[tuple[str, Callable[[_Sample, int], str | None]]] = []
        self.parts: list[str] = []  # what each filter is, in words
        self.keep_list: IdIndex | None = None
        self.probabilities: tuple[IdIndex, np.ndarray] | None = None
        if keep:
            self.keep_list = load_ids(keep, keep_id)
            self.steps.append(("keep_list", self._in_keep_list))
            self.parts.append(f"keep-list {keep} ({len(self.keep_list):,} {keep_id}s, "
                              f"{self.keep_list.nbytes / 2 ** 20:.1f} MiB)")
        if min_score:
            self.score_field, self.min_score = parse_min_score(min_score)
            self.steps.append(("min_score", self._above_min_score))
            self.parts.append(f"min_score {self.score_field}>={self.min_score:g}")
        self.draws = bool(keep_probability)
        if keep_probability.startswith(JSON_PREFIX):
            self.probability_field = keep_probability[len(JSON_PREFIX):].strip()
            if not self.probability_field:
                raise ConfigError(f"data.keep_probability: {keep_probability!r} names no field: expected json:FIELD "
                                  f"or a file")
            self.steps.append(("keep_probability", self._json_probability))
            self.parts.append(f"keep probability from the .json field {self.probability_field!r}")
        elif keep_probability:
            self.probabilities = load_probabilities(keep_probability, keep_id)
            self.steps.append(("keep_probability", self._file_probability))
            self.parts.append(f"keep probabilities from {keep_probability} ({len(self.probabilities[0]):,} "
                              f"{keep_id}s)")
        self.stats: dict[str, list[int]] = {name: [0, 0] for name, _ in self.steps}

    @classmethod
    def from_config(cls, data: Any) -> SampleFilter | None:
        """The filter of a `DataConfig` (`data.keep`, `keep_id`, `keep_probability`, `min_score`); None when it
        sets none of them."""
        keep, probability, score = data.keep.strip(), data.keep_probability.strip(), data.min_score.strip()
        if not (keep or probability or score):
            return None
        return cls(keep, data.keep_id, probability, score)

    def __reduce__(self):
        return (SampleFilter, self.settings)

    def describe(self) -> str:
        return "; ".join(self.parts)

    def __call__(self, sample: dict[str, Any], seed: int = 0) -> str | None:
        view = _Sample(sample, self.keep_id)
        for name, step in self.steps:
            counts = self.stats[name]
            counts[0] += 1
            reason = step(view, seed)
            if reason is not None:
                return reason
            counts[1] += 1
        return None

    def report(self) -> dict[str, dict[str, int]]:
        """Per filter, in order: {"seen": samples it judged, "kept": those it kept}."""
        return {name: {"seen": seen, "kept": kept} for name, (seen, kept) in self.stats.items()}

    def reset_stats(self) -> None:
        self.stats = {name: [0, 0] for name in self.stats}

    # -- the filters

    def _in_keep_list(self, view: _Sample, seed: int) -> str | None:
        if view.id is None:
            return "no_id"
        return None if view.id in self.keep_list else "not_in_keep_list"

    def _above_min_score(self, view: _Sample, seed: int) -> str | None:
        score = _number(view.meta.get(self.score_field))
        if score is None:
            return "no_score"
        return None if score >= self.min_score else "below_min_score"

    def _json_probability(self, view: _Sample, seed: int) -> str | None:
        return self._draw(_number(view.meta.get(self.probability_field)), seed)

    def _file_probability(self, view: _Sample, seed: int) -> str | None:
        if view.id is None:
            return "no_id"
        ids, probabilities = self.probabilities
        i = ids.find(view.id)
        return self._draw(float(probabilities[i]) if i >= 0 else None, seed)

    @staticmethod
    def _draw(p: float | None, seed: int) -> str | None:
        if p is None:
            return "no_probability"
        return None if keep_draw(seed) < p else "dropped_by_probability"


def filter_samples(samples: Iterable[dict | None], sample_filter: SampleFilter, count: Callable[[str], None],
                   sample_seed: Callable[[str], int]) -> Iterator[dict | None]:
    """The samples `sample_filter` keeps; each one it drops is counted (`count(reason)`) and comes out as None, so
    that a consumer with heartbeats gets a turn (None in `samples` passes as it is)."""
    for sample in samples:
        if sample is not None:
            seed = sample_seed(sample["__key__"]) if sample_filter.draws else 0
            reason = sample_filter(sample, seed)
            if reason is not None:
                count(reason)
                sample = None
        yield sample
