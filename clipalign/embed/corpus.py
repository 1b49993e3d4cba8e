"""What clipalign-embed reads: WebDataset shards, a folder of images, or a CSV/TSV/parquet table, cut into parts.

A corpus is planned alike on every process (`plan_shards`, `plan_folder`, `plan_table`): its parts, each a unit of
work and of resume, and what the run records about its input. A shard is one part (its URL is the part's source); a
folder's sorted image files and a table's rows are cut into parts of `part_size`. `PartBatches` reads the parts it is
given in DataLoader workers, each worker whole parts of its own (worker w of W takes the parts w, w + W, ...), in the
order of the part: it decodes images to uint8 with the model's eval geometry, tokenizes captions a batch at a time,
and yields batches that never mix parts, then one item that closes the part with its counts.

Which samples become rows (the same rule for every input):

- with images asked for, a row needs a usable image: a sample without one is skipped (`no_image`, `bad_image`,
  `missing_file`); its caption, if any, is not embedded;
- with only text asked for, a row needs a caption: a sample without one is skipped (`no_caption`, `empty_caption`,
  `bad_text`), and images are not read at all;
- with both, a sample with a usable image but no caption keeps its image embedding; its text row is zeros and its
  `caption` null, counted by reason under `zero_rows`.

The reasons are `clipalign.data.sample.SKIP_REASONS`: shards count as the training stream counts (`unreadable_tar`
once for a shard that cannot be read to its end, the samples before the break kept), folders and tables as
make_shards counts their inputs. A sample's caption is its first one by the caption rule (`sample_captions`: the
`.txt`, else the JSON `captions` list's first entry, else its `caption`); no draw, so a rerun embeds the same text.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from clipalign.cli import DEFAULT_PART_SIZE, MODALITIES
from clipalign.data.sample import image_bytes, sample_captions
from clipalign.data.shards import ShardReadError, expand_sources, read_shard
from clipalign.data.sources import (
    ShardInputError,
    image_files,
    open_table,
    sidecar_captions,
    table_format_of,
)
from clipalign.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, decode_image, eval_transform, geometry
from clipalign.tokenizer import Tokenizer, tokenize

# the metadata columns of each kind of input, in order (their meanings: clipalign.embed's docstring)
COLUMNS = {"shards": ("key", "caption", "shard"),
           "folder": ("key", "caption", "image_path"),
           "table": ("key", "caption", "image_path", "row")}
_SIDECAR_SUFFIXES = (".txt", ".json")


class EmbedInputError(ShardInputError):
    """An input clipalign-embed cannot read at all: a missing column, a modality the input lacks, a bad option."""


@dataclass(frozen=True)
class Part:
    """One unit of work: a shard, or the slice [start, stop) of a folder's files or a table's rows."""

    index: int
    source: str  # the shard URL, or which files or rows
    start: int = 0
    stop: int = 0
    samples: int | None = None  # how many samples it holds, where known without reading it

    def record(self) -> dict[str, Any]:
        return {"part": self.index, "source": self.source, "samples": self.samples}


@dataclass
class Corpus:
    """A planned input: its kind, its parts, the modalities it has, and how to read a part's samples.

    Attributes:
        kind: `shards`, `folder` or `table`.
        source: what the run records about the input (embed.json's `source`); with `fingerprint`, what a resume
            compares.
        parts: in order; part N's files are numbered N.
        available: the modalities the input can give.
        urls: shards: one per part.
        root: folder: its path; items: folder: the files relative to it; table: the image paths (or None).
        captions, keys: table: the caption cells and the row keys.
    """

    kind: str
    source: dict[str, Any]
    parts: list[Part]
    available: tuple[str, ...]
    urls: list[str] = field(default_factory=list)
    root: str = ""
    items: list[str | None] = field(default_factory=list)
    captions: list[Any] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    @property
    def columns(self) -> tuple[str, ...]:
        return COLUMNS[self.kind]

    @property
    def total(self) -> int | None:
        """Samples in all parts, where every part's count is known."""
        sizes = [part.samples for part in self.parts]
        return None if any(size is None for size in sizes) else sum(sizes)

    def samples(self, part: Part, counts: PartCounts) -> Iterator[Candidate]:
        """The samples of `part`, in order, as candidates for a row; a shard read error is recorded in `counts`."""
        if self.kind == "shards":
            yield from _shard_candidates(part, counts)
        elif self.kind == "folder":
            for rel in self.items[part.start:part.stop]:
                path = os.path.join(self.root, rel)
                captions, reason = sidecar_captions(path)
                yield Candidate({"key": rel, "image_path": path}, path, None, *_first(captions, reason))
        else:
            for row in range(part.start, part.stop):
                image = self.items[row]
                image_skip = "no_image" if image is None else None
                yield Candidate({"key": self.keys[row], "image_path": image, "row": row}, image, image_skip,
                                *_table_caption(self.captions[row]))


@dataclass
class Candidate:
    """A sample as read: its metadata row (without the caption), its image (bytes or a path) and caption, and why
    either is missing (a skip reason) where it is."""

    meta: dict[str, Any]
    image: bytes | str | None
    image_skip: str | None
    caption: str | None
    caption_skip: str | None


@dataclass
class PartCounts:
    """What reading one part came to: samples read, skipped (no row) and zero rows, by reason; read errors."""

    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    zero_rows: Counter = field(default_factory=Counter)  # text rows left as zeros (both modalities, no caption)
    errors: list[str] = field(default_factory=list)


def _first(captions: Sequence[str], reason: str | None) -> tuple[str | None, str | None]:
    return (captions[0], None) if captions else (None, reason or "no_caption")


def _table_caption(cell: Any) -> tuple[str | None, str | None]:
    if cell is None:
        return None, "no_caption"
    text = str(cell).strip()
    return (text, None) if text else (None, "empty_caption")


def _shard_candidates(part: Part, counts: PartCounts) -> Iterator[Candidate]:
    def bad_member(message: str) -> None:  # a second member of one name: training counts it so, the sample kept
        counts.skipped["unreadable_tar"] += 1

    try:
        for sample in read_shard(part.source, bad_member):
            data = image_bytes(sample)
            try:
                caption, caption_skip = _first(sample_captions(sample), None)
            except (UnicodeDecodeError, ValueError):
                caption, caption_skip = None, "bad_text"
            yield Candidate({"key": sample["__key__"], "shard": part.source}, data,
                            "no_image" if data is None else None, caption, caption_skip)
    except ShardReadError as exn:
        counts.skipped["unreadable_tar"] += 1
        counts.errors.append(f"{exn.url}: {exn}")


# ----------------------------------------------------------------------------------------------------------------
# planning


def plan_shards(spec: str) -> Corpus:
    """Shards of a pattern as `data.train` takes them (brace patterns, `::` between sources, `pipe:` and URLs), one
    part each, in the order the pattern lists them.

    Raises:
        FileNotFoundError, ValueError: naming the shards that do not exist, or an empty pattern.
    """
    urls = [url for source in expand_sources(spec, key="--shards") for url in source]
    parts = [Part(i, url) for i, url in enumerate(urls)]
    return Corpus("shards", {"kind": "shards", "spec": spec, "shards": len(urls)}, parts, MODALITIES, urls=urls)


def plan_folder(root: str | os.PathLike, part_size: int = DEFAULT_PART_SIZE) -> Corpus:
    """The images under a folder (recursively, by make_shards' rules), cut into parts of `part_size` in sorted
    relative-path order. Captions come from sidecars (`x.txt`, else `x.json`) as each image is read; text is
    available when any image has such a caption file beside it.

    Raises:
        FileNotFoundError: the folder does not exist; EmbedInputError: it holds no images.
    """
    _check_part_size(part_size)
    root = Path(root).expanduser().absolute()
    files = [path.relative_to(root).as_posix() for path in image_files(root)]
    if not files:
        raise EmbedInputError(f"--folder {root}: no images in it (looked for jpg, jpeg, png, webp, bmp, gif, tif, "
                              f"tiff, recursively)")
    available = MODALITIES if _has_sidecars(root, files) else ("image",)
    source = {"kind": "folder", "path": str(root), "files": len(files), "files_sha256": _digest(files)}
    return Corpus("folder", source, _slices(len(files), part_size, "files"), available, root=str(root), items=files)


def plan_table(table: str | os.PathLike, image_column: str = "image", caption_column: str = "caption",
               key_column: str | None = None, image_root: str | os.PathLike | None = None,
               table_format: str | None = None, part_size: int = DEFAULT_PART_SIZE) -> Corpus:
    """The rows of a CSV/TSV/parquet table, cut into parts of `part_size` in the table's order.

    A row's image is a local path in `image_column` (relative ones from `image_root`, default the table's folder), its
    caption the cell of `caption_column`, its key the cell of `key_column` (default: the row number from 0). Image is
    available when the image column is there, text when the caption column is.

    Raises:
        FileNotFoundError: the table or the image root does not exist.
        EmbedInputError: an unknown format, a missing key column or neither column (naming the table's columns), an
            image given as a URL, no rows.
    """
    _check_part_size(part_size)
    path = Path(table).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(f"--table {path} does not exist")
    fmt = table_format or table_format_of(path)
    if fmt not in ("csv", "tsv", "parquet"):
        raise EmbedInputError(f"--table {path}: cannot tell its format from the extension; give --table-format "
                              f"csv, tsv or parquet")
    base = Path(image_root).expanduser().absolute() if image_root is not None else path.parent
    if image_root is not None and not base.is_dir():
        raise FileNotFoundError(f"--image-root {base} does not exist")
    wanted = [c for c in (image_column, caption_column, key_column) if c]
    with open_table(path, fmt, wanted) as (header, rows):
        header = header or []
        columns = {name: header.index(name) for name in wanted if name in header}
        if key_column and key_column not in columns:
            raise EmbedInputError(f"--table {path} has no column {key_column!r} (--key-column); its columns are: "
                                  f"{', '.join(map(repr, header))}")
        if image_column not in columns and caption_column not in columns:
            raise EmbedInputError(f"--table {path} has neither an image column {image_column!r} (--image-column) "
                                  f"nor a caption column {caption_column!r} (--caption-column); its columns are: "
                                  f"{', '.join(map(repr, header))}")
        cells = [[row[i] if i < len(row) else None for i in columns.values()] for row in rows]
    by_name = {name: [row[i] for row in cells] for i, name in enumerate(columns)}
    if not cells:
        raise EmbedInputError(f"--table {path} has no rows")
    images = [_image_path(cell, base, path, image_column, row) for row, cell in enumerate(by_name[image_column])] \
        if image_column in by_name else [None] * len(cells)
    captions = by_name.get(caption_column, [None] * len(cells))
    keys = [str(k) for k in by_name[key_column]] if key_column else [str(row) for row in range(len(cells))]
    available = tuple(m for m, column in zip(MODALITIES, (image_column, caption_column)) if column in by_name)
    source = {"kind": "table", "path": str(path), "format": fmt, "rows": len(cells),
              "image_column": image_column if image_column in by_name else None,
              "caption_column": caption_column if caption_column in by_name else None,
              "key_column": key_column, "image_root": str(base),
              "rows_sha256": _digest([repr(row) for row in cells])}
    return Corpus("table", source, _slices(len(cells), part_size, "rows"), available, items=images,
                  captions=captions, keys=keys)


def _image_path(cell: Any, base: Path, table: Path, column: str, row: int) -> str | None:
    text = "" if cell is None else str(cell).strip()
    if not text:
        return None
    if "://" in text:
        raise EmbedInputError(f"--table {table}, row {row}: column {column!r} holds a URL ({text}); clipalign-embed "
                              f"reads local files only: download them first (img2dataset writes shards to embed "
                              f"with --shards)")
    image = Path(text).expanduser()
    return str(image if image.is_absolute() else base / image)


def _check_part_size(part_size: int) -> None:
    if part_size < 1:
        raise EmbedInputError(f"--part-size must be at least 1, got {part_size}")


def _slices(count: int, part_size: int, what: str) -> list[Part]:
    return [Part(i, f"{what} {start}..{min(start + part_size, count) - 1}", start, min(start + part_size, count),
                 min(start + part_size, count) - start)
            for i, start in enumerate(range(0, count, part_size))]


def _has_sidecars(root: Path, files: Sequence[str]) -> bool:
    """Whether any image has a caption file beside it (`x.txt` or `x.json` for `x.jpg`): other text files in the
    folder (a templates.txt, a classnames.txt, a README.txt) are not captions."""
    stems = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        stems.update((rel / name).with_suffix("").as_posix() for name in filenames
                     if not name.startswith(".") and name.lower().endswith(_SIDECAR_SUFFIXES))
    return any(Path(f).with_suffix("").as_posix() in stems for f in files)


def _digest(lines: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()


def resolve_modalities(corpus: Corpus, requested: Sequence[str] | None) -> tuple[str, ...]:
    """The modalities to embed, in `MODALITIES` order: `requested`, or every one the input has.

    Raises:
        EmbedInputError: an unknown modality, or one the input lacks (naming the option that gives it).
    """
    if not requested:
        return tuple(corpus.available)
    unknown = [m for m in requested if m not in MODALITIES]
    if unknown:
        raise EmbedInputError(f"--modalities {' '.join(unknown)}: expected image, text or both")
    missing = [m for m in requested if m not in corpus.available]
    if missing:
        why = {"folder": "no image in the folder has a .txt or .json caption beside it",
               "table": f"the table has no {'image' if missing[0] == 'image' else 'caption'} column "
                        f"({corpus.source.get('path')}; choose it with "
                        f"--{'image' if missing[0] == 'image' else 'caption'}-column)"}.get(corpus.kind, "")
        raise EmbedInputError(f"--modalities {missing[0]}: {why}")
    return tuple(m for m in MODALITIES if m in requested)


def count_shard_samples(url: str) -> int | None:
    """The samples in a local shard, from its member headers alone (a seekable read skips the data); None for a
    `pipe:` or remote shard, or one that cannot be read to its end."""
    if url.startswith("pipe:") or ("://" in url and not url.startswith("file://")):
        return None
    path = url[len("file://"):] if url.startswith("file://") else url
    keys, last = 0, None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                tar.members = []
                prefix, _ = base_plus_ext(member.name)
                if member.isreg() and prefix is not None and not prefix.startswith("__") and prefix != last:
                    keys, last = keys + 1, prefix
    except (OSError, tarfile.TarError):
        return None
    return keys


# ----------------------------------------------------------------------------------------------------------------
# reading parts in DataLoader workers


class PartBatches(IterableDataset):
    """Batches of the samples of `parts`, for a DataLoader (`batch_size=None`): each worker reads whole parts.

    A batch: `{"part", "meta": {column: values}, "images": uint8 (B, 3, S, S) or None, "texts": token ids (T, L) or
    None, "text_rows": the T rows (of B) with a caption, "read": samples read since the last item}`; the end of a
    part: `{"part", "end": True, "read", "counts": PartCounts}`. Every sample of a part is read by the one worker,
    in order, so a part's rows come out in the same order on every run.
    """

    def __init__(self, corpus: Corpus, parts: Sequence[Part], modalities: Sequence[str], tokenizer: Tokenizer | None,
                 image_size: int, preprocess_cfg: dict[str, Any] | None, batch_size: int, draft: bool = True,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        super().__init__()
        if batch_size < 1:
            raise EmbedInputError(f"--batch-size must be at least 1, got {batch_size}")
        self.corpus, self.parts, self.modalities = corpus, list(parts), tuple(modalities)
        self.images, self.texts = "image" in modalities, "text" in modalities
        self.tokenizer, self.image_size, self.batch_size = tokenizer, image_size, batch_size
        self.draft, self.max_image_pixels = draft, max_image_pixels
        interpolation, resize_mode = geometry(preprocess_cfg)
        self.transform = eval_transform(image_size, interpolation, resize_mode,
                                        int((preprocess_cfg or {}).get("fill_color", 0)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for part in self.parts[worker::workers]:
            yield from self._part(part)

    def _part(self, part: Part) -> Iterator[dict[str, Any]]:
        counts = PartCounts()
        rows: list[tuple[dict[str, Any], torch.Tensor | None, str | None]] = []
        read = 0
        for candidate in self.corpus.samples(part, counts):
            read += 1
            row = self._row(candidate, counts)
            if row is not None:
                rows.append(row)
            if len(rows) == self.batch_size:
                yield self._batch(part, rows, read)
                counts.read, rows, read = counts.read + read, [], 0
        if rows:
            yield self._batch(part, rows, read)
            counts.read, read = counts.read + read, 0
        counts.read += read  # the samples skipped after the last batch
        yield {"part": part.index, "end": True, "read": read, "counts": counts}

    def _row(self, candidate: Candidate, counts: PartCounts) -> tuple[dict[str, Any], torch.Tensor | None,
                                                                      str | None] | None:
        """(metadata row, image, caption to embed) of a candidate, or None when it is skipped (counted)."""
        meta = {**candidate.meta, "caption": candidate.caption}
        image = None
        if self.images:
            if candidate.image_skip is not None:
                counts.skipped[candidate.image_skip] += 1
                return None
            image, skip = self._image(candidate.image)
            if skip is not None:
                counts.skipped[skip] += 1
                return None
            if self.texts and candidate.caption_skip is not None:
                counts.zero_rows[candidate.caption_skip] += 1
        elif candidate.caption_skip is not None:
            counts.skipped[candidate.caption_skip] += 1
            return None
        return meta, image, candidate.caption if self.texts else None

    def _image(self, source: bytes | str) -> tuple[torch.Tensor | None, str | None]:
        try:
            img = decode_image(source, self.image_size if self.draft else None, self.max_image_pixels)
        except FileNotFoundError:
            return None, "missing_file"
        except Exception:  # PIL raises many types for corrupt data; ours: ImageTooLarge
            return None, "bad_image"
        return self.transform(img), None

    def _batch(self, part: Part, rows: list, read: int) -> dict[str, Any]:
        meta = {column: [row[0].get(column) for row in rows] for column in self.corpus.columns}
        text_rows = [i for i, (_, _, caption) in enumerate(rows) if caption is not None]
        return {"part": part.index, "meta": meta, "read": read,
                "images": torch.stack([image for _, image, _ in rows]) if self.images else None,
                "texts": tokenize(self.tokenizer, [rows[i][2] for i in text_rows]) if text_rows else None,
                "text_rows": text_rows}
