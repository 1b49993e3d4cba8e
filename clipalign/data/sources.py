"""Readers of make_shards' inputs: a folder of captioned images, a CSV/TSV/parquet table, an ImageFolder.

Each turns its input into `SourceSample`s in a deterministic order (a sample's position becomes its key), with the
captions found by the sample format's rules (`clipalign.data.sample`) and, for inputs that cannot be used, the reason
they are to be skipped. `read_table` is the one reader of CSV/TSV/parquet tables: make_shards, the labelled CSVs of
evaluation and the tokenizer trainer's caption tables all go through it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from clipalign.data.sample import (
    DEFAULT_TEMPLATE,
    INPUT_EXTENSIONS,
    TEMPLATES_FILE,
    folder_classnames,
    json_captions,
    read_lines,
)

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ShardInputError(ValueError):
    """Input that cannot be turned into shards at all: a missing column, a URL, no images, a bad option."""


@dataclass(frozen=True)
class SourceSample:
    """One input before encoding: an image file, its captions and extra JSON fields, or why it is to be skipped.

    Attributes:
        index: position in the input's deterministic order; becomes the sample key.
        image: path of the image file.
        source: the image as the input names it (relative path or the table's cell), stored in the JSON.
        where: where to look when it is skipped (a relative path, or a table row).
        captions: the non-empty captions; empty when `skip` is set.
        meta: extra JSON fields (sidecar fields, `label`, `classname`).
        skip: the reason to skip it, when known before reading the image.
    """

    index: int
    image: str
    source: str
    where: str
    captions: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# reading the three kinds of input


def folder_samples(root: str | os.PathLike) -> list[SourceSample]:
    """Images under `root` (recursively, hidden files and folders left out) with sidecar captions.

    `x.jpg` takes its caption from `x.txt`, else from `x.json` (`"captions": [...]` or `"caption"`), by the training
    pipeline's rules; the sidecar JSON's other fields are kept.
    """
    root = _existing_dir(root, "input folder")
    samples = []
    for index, path in enumerate(_image_files(root)):
        rel = path.relative_to(root).as_posix()
        captions, meta, skip = _sidecar_captions(path)
        samples.append(SourceSample(index, str(path), rel, rel, captions, meta, skip))
    if not samples:
        raise ShardInputError(f"no images under {root} (looked for {', '.join(INPUT_EXTENSIONS)}, recursively)")
    if all(sample.skip == "no_caption" for sample in samples):
        raise ShardInputError(_uncaptioned_folder(root, samples))
    return samples


def _uncaptioned_folder(root: Path, samples: list[SourceSample]) -> str:
    """Why a folder of images without a single caption makes no shards, and what to run instead."""
    classes = sorted({Path(s.source).parts[0] for s in samples if len(Path(s.source).parts) == 2})
    message = (f"none of the {len(samples)} images under {root} has a caption (x.txt, or x.json with "
               f"\"caption\"/\"captions\", beside x.jpg)")
    if len(classes) >= 2 and all(len(Path(s.source).parts) == 2 for s in samples):
        return (f"{message}; they sit in {len(classes)} class folders ({', '.join(classes[:3])}"
                f"{', ...' if len(classes) > 3 else ''}), as in an ImageFolder: for captions made from the class "
                f"names, run clipalign-make-shards imagefolder {root} --out OUT --templates 'a photo of a {{}}.'")
    return f"{message}; write one caption file per image, or use a table of (image, caption) rows"


def table_samples(
    table: str | os.PathLike,
    image_col: str = "image",
    caption_cols: Sequence[str] = ("caption",),
    image_root: str | os.PathLike | None = None,
    table_format: str | None = None,
) -> list[SourceSample]:
    """Rows of a CSV/TSV/parquet table naming a local image and one or more captions.

    Args:
        table: the table; its first row names the columns (CSV/TSV). TSV is read without quoting.
        image_col: column with image paths; relative ones are taken from `image_root`.
        caption_cols: caption columns; with several, a sample gets the non-empty ones as `"captions"`.
        image_root: base of relative image paths; default: the table's directory.
        table_format: `csv`, `tsv` or `parquet`; default: from the file extension.

    Raises:
        FileNotFoundError: the table does not exist.
        ShardInputError: a column is missing (the message lists the table's columns), an image is a URL, or the
            format is unknown.
    """
    path = Path(table).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"table {path} does not exist")
    caption_cols = list(caption_cols)
    if not caption_cols:
        raise ShardInputError("give at least one caption column (--caption-col)")
    fmt = table_format or TABLE_FORMATS.get(path.suffix.lower())
    if fmt not in ("csv", "tsv", "parquet"):
        raise ShardInputError(f"cannot tell the format of table {path} from its extension; name it with "
                              f"--table-format csv|tsv|parquet (known extensions: {', '.join(TABLE_FORMATS)})")
    flags = {image_col: "--image-col", **{c: "--caption-col" for c in caption_cols if c != image_col}}
    rows = _read_table(path, fmt, [image_col, *caption_cols], flags)
    base = Path(image_root).expanduser() if image_root is not None else path.parent
    if image_root is not None and not base.is_dir():
        raise FileNotFoundError(f"image root {base} does not exist")
    _refuse_urls(path, image_col, rows)
    samples = []
    for index, (image, *captions) in enumerate(rows):
        where = f"row {index + 1}"
        image = "" if image is None else str(image).strip()
        if not image:
            samples.append(SourceSample(index, "", "", where, skip="no_image"))
            continue
        image_path = Path(image).expanduser()
        image_path = image_path if image_path.is_absolute() else base / image_path
        where = f"row {index + 1}: {image}"
        present = [str(c).strip() for c in captions if c is not None]
        kept = tuple(c for c in present if c)
        skip = None if kept else ("empty_caption" if present else "no_caption")
        samples.append(SourceSample(index, str(image_path), image, where, kept, {}, skip))
    if not samples:
        raise ShardInputError(f"table {path} has no rows")
    return samples


def imagefolder_samples(
    root: str | os.PathLike,
    templates: Sequence[str] | None = None,
    classnames: Sequence[str] | None = None,
) -> tuple[list[SourceSample], list[str]]:
    """Images of an ImageFolder (one sub-folder per class), captioned with every template filled with the class name.

    Labels are torchvision's ImageFolder indices (sorted folder names), so they agree with zero-shot evaluation.

    Args:
        root: the ImageFolder.
        templates: prompt templates with `{}`; default: `root/templates.txt` if present, else `"a photo of a {}."`.
        classnames: one name per class folder in sorted order; default: `root/classnames.txt` if present, else the
            folder names with `_` read as a space.

    Returns:
        The samples and the class names in label order.
    """
    from torchvision.datasets.folder import find_classes  # the class order zero-shot evaluation uses

    root = _existing_dir(root, "ImageFolder")
    try:
        classes, _ = find_classes(root)
    except FileNotFoundError as e:
        raise ShardInputError(f"{root} has no class sub-folders; an ImageFolder holds one folder of images per "
                              f"class") from e
    names = _classnames(root, classes, classnames)
    templates = caption_templates(root, templates)
    samples: list[SourceSample] = []
    for label, (folder, name) in enumerate(zip(classes, names)):
        captions = tuple(t.replace("{}", name) for t in templates)
        for path in _image_files(root / folder):
            rel = path.relative_to(root).as_posix()
            meta = {"label": label, "classname": name}
            samples.append(SourceSample(len(samples), str(path), rel, rel, captions, meta))
    if not samples:
        raise ShardInputError(f"no images in the class folders of {root} (looked for {', '.join(INPUT_EXTENSIONS)})")
    return samples, names


def _existing_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise ShardInputError(f"{what} {path} is not a directory")
    return path


def image_files(root: str | os.PathLike) -> list[Path]:
    """The image files under a folder, as `folder_samples` finds them (recursively, hidden names left out), in sorted
    relative-path order; for readers that take their captions later, one image at a time (`sidecar_captions`).

    Raises:
        FileNotFoundError: the folder does not exist.
        ShardInputError: it is not a directory.
    """
    return _image_files(_existing_dir(root, "input folder"))


def sidecar_captions(image: str | os.PathLike) -> tuple[tuple[str, ...], str | None]:
    """(captions, skip reason) of an image file from its `.txt` / `.json` sidecars, by `folder_samples`' rules: the
    captions when there are some (reason None), else () and `no_caption`, `empty_caption` or `bad_text`."""
    captions, _, skip = _sidecar_captions(Path(image))
    return captions, skip


def _image_files(root: Path) -> list[Path]:
    """Image files under `root` in sorted relative-path order; hidden names (`.DS_Store`, `._x.jpg`) are left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix[1:].lower() in INPUT_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _sidecar_captions(image: Path) -> tuple[tuple[str, ...], dict[str, Any], str | None]:
    """(captions, extra JSON fields, skip reason) from `image`'s `.txt` / `.json` sidecars."""
    txt, sidecar = image.with_suffix(".txt"), image.with_suffix(".json")
    captions: tuple[str, ...] = ()
    present = False  # a caption source exists, even if empty
    if txt.is_file():
        present = True
        try:
            text = txt.read_bytes().decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            return (), {}, "bad_text"
        captions = (text,) if text else ()
    meta: dict[str, Any] = {}
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError):
            return (), {}, "bad_text"
        if not isinstance(meta, dict):
            return (), {}, "bad_text"
        present = present or "caption" in meta or "captions" in meta
        captions = captions or tuple(json_captions(meta))
        meta = {k: v for k, v in meta.items() if k not in ("caption", "captions")}
    if captions:
        return captions, meta, None
    return (), meta, "empty_caption" if present else "no_caption"


class TableError(ShardInputError):
    """A CSV/TSV line the csv module cannot parse; the message names the table and the line."""


def table_format_of(path: str | os.PathLike) -> str | None:
    """`csv`, `tsv` or `parquet` from a table's extension (see `TABLE_FORMATS`); None for another extension."""
    return TABLE_FORMATS.get(Path(str(path)).suffix.lower())


@contextlib.contextmanager
def open_table(
    url: str | os.PathLike,
    fmt: str,
    columns: Sequence[str] | None = None,
    *,
    delimiter: str | None = None,
    quoting: int | None = None,
    errors: str = "strict",
) -> Iterator[tuple[list[str] | None, Iterator[list[Any]]]]:
    """The one reader of tables: (column names, rows) of a CSV/TSV/parquet table, local or remote.

    Column names are stripped; rows are lists of cells in column order (a CSV row may be short), blank lines left
    out. A UTF-8 byte-order mark is dropped. The names are None for an empty CSV/TSV.

    Args:
        url: a path, or anything `webdataset.gopen` opens (CSV/TSV only).
        fmt: `csv`, `tsv` or `parquet`.
        columns: parquet only: read just these columns (the others' cells are None); None: all of them.
        delimiter: the CSV/TSV separator; default: a tab for `tsv`, a comma for `csv`.
        quoting: a `csv.QUOTE_*` mode; default: none for a tab separator (a caption may start with a quote mark),
            the csv module's own for others.
        errors: how undecodable bytes are handled (`strict`, or `surrogateescape` to let the caller skip a row).

    Raises:
        TableError: a CSV/TSV line that cannot be parsed, naming the table and the line.
    """
    if fmt == "parquet":
        yield _parquet_table(url, columns)
        return
    delimiter = delimiter or ("\t" if fmt == "tsv" else ",")
    if quoting is None:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with wds.gopen(str(url), "rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors=errors, newline="")
        reader = csv.reader(text, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        yield (None if header is None else [name.strip() for name in header]), _csv_rows(url, reader)


def _csv_rows(url: str | os.PathLike, reader) -> Iterator[list[str]]:
    try:
        yield from (row for row in reader if row)
    except csv.Error as e:
        raise TableError(f"table {url}, line {reader.line_num}: {e}") from e


def _parquet_table(path: str | os.PathLike, columns: Sequence[str] | None) -> tuple[list[str], Iterator[list[Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ModuleNotFoundError(f"reading the parquet table {path} needs pyarrow, which is not installed: "
                                  f"pip install pyarrow (or save the table as CSV/TSV)") from e
    parquet = pq.ParquetFile(path)
    names = list(parquet.schema_arrow.names)
    data = parquet.read(columns=[c for c in names if columns is None or c in columns])
    # columns left unread come back as None cells, so that a row lines up with the column names
    unread = [None] * data.num_rows
    cells = [data.column(c).to_pylist() if c in data.column_names else unread for c in names]
    return names, (list(row) for row in zip(*cells))


def _read_table(path: Path, fmt: str, columns: list[str], flags: dict[str, str]) -> list[tuple[Any, ...]]:
    """The cells of `columns` in every row, in order (None for a missing cell); `flags` names each column's flag."""
    with open_table(path, fmt, list(flags)) as (header, rows):
        if header is None:
            raise ShardInputError(f"table {path} is empty; its first row should name the columns")
        _check_columns(path, header, flags)
        positions = [header.index(name) for name in columns]
        return [tuple(row[i] if i < len(row) else None for i in positions) for row in rows]


def separator_hint(columns: Sequence[str] | None, tab_fix: str) -> str:
    """A sentence for a table read with the wrong separator, its header one column holding tabs (`tab_fix` says
    how to read it as a TSV) or semicolons; empty when the header does not look so."""
    if not columns or len(columns) != 1:
        return ""
    header = columns[0]
    if "\t" in header:
        return f" The header looks tab-separated ({len(header.split(chr(9)))} columns): {tab_fix}."
    if ";" in header:
        return (f" The header looks semicolon-separated ({len(header.split(';'))} columns): save the table with "
                f"commas or tabs.")
    return ""


def _check_columns(path: Path, columns: Sequence[str], flags: dict[str, str]) -> None:
    missing = [f"{name!r} ({flag})" for name, flag in flags.items() if name not in columns]
    if missing:
        hint = separator_hint(columns, "pass --table-format tsv")
        raise ShardInputError(f"table {path} has no column {', '.join(missing)}; its columns are: "
                              f"{', '.join(repr(c) for c in columns)}.{hint}")


def _refuse_urls(path: Path, image_col: str, rows: list[tuple[Any, ...]]) -> None:
    cells = ((i, str(row[0]).strip()) for i, row in enumerate(rows) if row[0] is not None)
    urls = [(i, cell) for i, cell in cells if _URL.match(cell)]
    if urls:
        row, url = urls[0]
        raise ShardInputError(
            f"table {path}: column {image_col!r} holds URLs ({len(urls)} of {len(rows)} rows; row {row + 1}: {url}). "
            f"clipalign-make-shards reads local files only and does not download. Use img2dataset "
            f"(https://github.com/rom1504/img2dataset) with --output_format webdataset: its shards train as they are.")


def _classnames(root: Path, classes: list[str], classnames: Sequence[str] | None) -> list[str]:
    try:
        return folder_classnames(root, classes, classnames, given_as="--classnames")
    except ValueError as e:
        raise ShardInputError(str(e)) from None


def caption_templates(root: Path, templates: Sequence[str] | None) -> list[str]:
    """The caption templates of an ImageFolder: `templates`, else `root/templates.txt`, else `DEFAULT_TEMPLATE`."""
    if templates is None:
        path = root / TEMPLATES_FILE
        templates = read_lines(path) if path.is_file() else [DEFAULT_TEMPLATE]
    templates = [t.strip() for t in templates if t.strip()]
    if not templates:
        raise ShardInputError("no caption templates given; e.g. --templates 'a photo of a {}.'")
    for template in templates:
        if "{}" not in template:
            raise ShardInputError(f"caption template {template!r} has no '{{}}' where the class name goes")
    return templates
