"""Make WebDataset shards from local data: a folder of captioned images, a CSV/TSV/parquet table, or an ImageFolder.

    clipalign-make-shards folder      photos/            --out shards/photos
    clipalign-make-shards table       captions.csv       --out shards/mine --image-col filepath --caption-col title
    clipalign-make-shards imagefolder imagenet-mini/val  --out shards/val --templates "a photo of a {}."

Every sample becomes `KEY.jpg|png|webp` + `KEY.json` (`{"caption": ...}` or `{"captions": [...]}`, `"source"`, and
`"label"`/`"classname"` from an ImageFolder) + `KEY.txt` when it has exactly one caption. A sample with several
captions has no `.txt`, because the training pipeline prefers `.txt` and would never draw the other captions. Keys are
the input's position (`000000000`, ...) in a deterministic order, so skipped inputs leave gaps but never shift keys.

Images in a shard format (JPEG, PNG, WebP) are stored byte for byte; other formats (BMP, GIF, TIFF), images with an
EXIF rotation, and images shrunk by `resize` are re-encoded as JPEG. Inputs the training pipeline could not use are
skipped and counted by reason in `OUT/_stats.json`, which is written last. This tool reads local files only; to
download images from URLs use img2dataset, whose webdataset output trains as it is.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing
import os
import re
import shlex
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, ImageOps
from tqdm import tqdm

from clipalign.data.shards import IMAGE_EXTENSIONS
from clipalign.data.transforms import decode_image
from clipalign.data.writer import brace_pattern, image_to_bytes

INPUT_EXTENSIONS = (*IMAGE_EXTENSIONS, "bmp", "gif", "tif", "tiff")  # what the folder readers pick up
STATS_FILE = "_stats.json"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"
DEFAULT_TEMPLATE = "a photo of a {}."
TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}
# why an input is skipped; the first four are the training pipeline's own names for the same faults
SKIP_REASONS = ("bad_image", "no_caption", "bad_text", "no_image", "empty_caption", "missing_file")

_SHARD_EXTENSION_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are
_EXIF_ORIENTATION = 0x0112
_TAR_MTIME = 1_700_000_000  # fixed member time: the same input and options give byte-identical shards
_TAR_BLOCK = tarfile.BLOCKSIZE
_EXAMPLES_PER_REASON = 5
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SHARD_NAME = "{prefix}-{number:06d}.tar"


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
    return samples


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
    templates = _templates(root, templates)
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


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a text file, stripped (class names, templates)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def _existing_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise ShardInputError(f"{what} {path} is not a directory")
    return path


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
        captions = captions or _json_captions(meta)
        meta = {k: v for k, v in meta.items() if k not in ("caption", "captions")}
    if captions:
        return captions, meta, None
    return (), meta, "empty_caption" if present else "no_caption"


def _json_captions(meta: dict[str, Any]) -> tuple[str, ...]:
    """The non-empty captions of a JSON sidecar, by `clipalign.data.shards.caption_of`'s rules."""
    captions = meta.get("captions")
    if isinstance(captions, list):
        kept = tuple(c.strip() for c in captions if isinstance(c, str) and c.strip())
        if kept:
            return kept
    caption = meta.get("caption")
    return (caption.strip(),) if isinstance(caption, str) and caption.strip() else ()


def _read_table(path: Path, fmt: str, columns: list[str], flags: dict[str, str]) -> list[tuple[Any, ...]]:
    """The cells of `columns` in every row, in order (None for a missing cell); `flags` names each column's flag."""
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ModuleNotFoundError(f"reading the parquet table {path} needs pyarrow, which is not installed: "
                                      f"pip install pyarrow (or save the table as CSV/TSV)") from e
        parquet = pq.ParquetFile(path)
        _check_columns(path, parquet.schema_arrow.names, flags)
        data = parquet.read(columns=list(flags))
        return list(zip(*(data.column(name).to_pylist() for name in columns)))
    with open(path, newline="", encoding="utf-8-sig") as f:
        # TSV has no quoting (a caption may start with a quote mark); CSV quotes as the csv module writes it
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ShardInputError(f"table {path} is empty; its first row should name the columns")
        header = [name.strip() for name in header]
        _check_columns(path, header, flags)
        positions = [header.index(name) for name in columns]
        try:
            return [tuple(row[i] if i < len(row) else None for i in positions) for row in reader if row]
        except csv.Error as e:
            raise ShardInputError(f"table {path}, line {reader.line_num}: {e}") from e


def _check_columns(path: Path, columns: Sequence[str], flags: dict[str, str]) -> None:
    missing = [f"{name!r} ({flag})" for name, flag in flags.items() if name not in columns]
    if missing:
        raise ShardInputError(f"table {path} has no column {', '.join(missing)}; its columns are: "
                              f"{', '.join(repr(c) for c in columns)}")


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
    source = "--classnames"
    if classnames is None:
        path = root / CLASSNAMES_FILE
        if path.is_file():
            classnames, source = read_lines(path), str(path)
        else:
            classnames = [name.replace("_", " ") for name in classes]
    classnames = list(classnames)
    if len(classnames) != len(classes):
        raise ShardInputError(f"{source}: {len(classnames)} class names for {len(classes)} class folders in {root}; "
                              f"give one name per folder, in sorted folder-name order")
    return classnames


def _templates(root: Path, templates: Sequence[str] | None) -> list[str]:
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


# ----------------------------------------------------------------------------------------------------------------
# encoding (runs in the worker processes)


@dataclass
class _Encoded:
    index: int
    where: str
    sample: dict[str, Any] | None = None
    reason: str | None = None
    resized: bool = False
    reencoded: bool = False


def _encode(src: SourceSample, resize: int | None, quality: int, key_width: int) -> _Encoded:
    """A shard sample (every value bytes) from one input, or the reason it is skipped."""
    if src.skip is not None:
        return _Encoded(src.index, src.where, reason=src.skip)
    try:
        data = Path(src.image).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return _Encoded(src.index, src.where, reason="missing_file")
    except OSError:
        return _Encoded(src.index, src.where, reason="bad_image")
    try:
        image, ext, resized, reencoded = _shard_image(data, resize, quality)
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        return _Encoded(src.index, src.where, reason="bad_image")
    if len(src.captions) == 1:
        text = {"txt": src.captions[0].encode("utf-8")}
        meta = {"caption": src.captions[0], **src.meta, "source": src.source}
    else:
        text = {}
        meta = {"captions": list(src.captions), **src.meta, "source": src.source}
    sample = {"__key__": f"{src.index:0{key_width}d}", ext: image, **text,
              "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    return _Encoded(src.index, src.where, sample, None, resized, reencoded)


def _shard_image(data: bytes, resize: int | None, quality: int) -> tuple[bytes, str, bool, bool]:
    """(image bytes, extension, resized, re-encoded); raises when the training pipeline could not decode it."""
    with Image.open(io.BytesIO(data)) as probe:
        ext = _SHARD_EXTENSION_OF_FORMAT.get(probe.format)
        size = probe.size
        orientation = _exif_orientation(probe)
    # training decodes without applying EXIF rotation, so a rotated photo is stored upright
    upright = orientation not in (2, 3, 4, 5, 6, 7, 8)
    shrink = resize is not None and min(size) > resize
    if ext is not None and upright and not shrink:
        decode_image(data)  # the training pipeline's own decode: raises on corrupt or truncated data
        return data, ext, False, False
    img = decode_image(data, resize if shrink else None)  # JPEG draft decode keeps the shorter side >= resize
    if not upright:
        img = ImageOps.exif_transpose(img)
    if shrink:
        img = img.resize(_shorter_side_to(img.size, resize), Image.Resampling.BICUBIC)
    return image_to_bytes(img, "jpg", quality), "jpg", shrink, True


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block does not make the pixels unusable
        return 1


def _shorter_side_to(size: tuple[int, int], side: int) -> tuple[int, int]:
    width, height = size
    if width <= height:
        return side, max(1, round(height * side / width))
    return max(1, round(width * side / height)), side


# ----------------------------------------------------------------------------------------------------------------
# writing


class _ShardSink:
    """Numbered tar shards with a hard limit on samples and on file bytes (tar headers and padding included).

    A shard is written as a hidden `.NAME.tmp` and renamed when complete, so a crash never leaves a truncated shard
    under a shard name.
    """

    def __init__(self, out_dir: Path, prefix: str, max_count: int, max_bytes: int | None):
        self.out_dir, self.prefix, self.max_count, self.max_bytes = out_dir, prefix, max_count, max_bytes
        self.paths: list[Path] = []
        self.oversized = 0  # samples that exceed max_bytes alone, each written alone into a shard
        self._writer: wds.TarWriter | None = None
        self._count = 0
        self._payload = 0  # bytes of headers and padded data of the members written so far

    def add(self, sample: dict[str, Any]) -> None:
        size = _members_size(sample)
        if self._writer is not None and (self._count >= self.max_count or self._too_big(self._payload + size)):
            self._finish()
        if self._writer is None:
            self._writer = wds.TarWriter(str(self._tmp_path()), mtime=_TAR_MTIME)
            self._count = self._payload = 0
        if self._too_big(size):
            self.oversized += 1
        self._writer.write(sample)
        self._count += 1
        self._payload += size

    def close(self) -> list[Path]:
        if self._writer is not None:
            self._finish()
        return self.paths

    def _too_big(self, payload: int) -> bool:
        return self.max_bytes is not None and _tar_file_size(payload) > self.max_bytes

    def _final_path(self) -> Path:
        return self.out_dir / _SHARD_NAME.format(prefix=self.prefix, number=len(self.paths))

    def _tmp_path(self) -> Path:
        return self.out_dir / f".{self._final_path().name}.tmp"

    def _finish(self) -> None:
        self._writer.close()
        self._writer = None
        final = self._final_path()
        os.replace(self._tmp_path(), final)
        self.paths.append(final)


def _members_size(sample: dict[str, Any]) -> int:
    """Bytes the sample's members take in a ustar archive: a header block each plus data padded to whole blocks."""
    return sum(_TAR_BLOCK + _round_up(len(v), _TAR_BLOCK) for k, v in sample.items() if not k.startswith("__"))


def _tar_file_size(payload: int) -> int:
    """Size of a tar file holding `payload` bytes of members: two zero blocks, then padding to a whole record."""
    return _round_up(payload + 2 * _TAR_BLOCK, tarfile.RECORDSIZE)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _prepare_out_dir(out_dir: Path, prefix: str, overwrite: bool) -> None:
    """Create `out_dir`; refuse (or with `overwrite`, remove) shards of this prefix and stats from an earlier run."""
    if not prefix or "/" in prefix or "\\" in prefix or "{" in prefix or "}" in prefix:
        raise ShardInputError(f"shard prefix {prefix!r} must be a non-empty file name part without '/', '{{', '}}'")
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardInputError(f"output {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = re.compile(rf"^\.?{re.escape(prefix)}-\d+\.tar(\.tmp)?$")
    old = sorted(p for p in out_dir.iterdir() if ours.match(p.name))
    old += [p for p in (out_dir / STATS_FILE, out_dir / CLASSNAMES_FILE) if p.exists()]
    if old and not overwrite:
        shown = ", ".join(p.name for p in old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else "")
        raise FileExistsError(f"{out_dir} already holds the output of an earlier run ({shown}); pass --overwrite to "
                              f"replace it, or choose another output directory")
    for path in old:
        path.unlink()


def make_shards(
    samples: Sequence[SourceSample],
    out_dir: str | os.PathLike,
    *,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    max_shard_bytes: int | None = None,
    resize: int | None = None,
    quality: int = 95,
    workers: int = 1,
    overwrite: bool = False,
    classnames: Sequence[str] | None = None,
    input_info: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Encode `samples` into `out_dir/{prefix}-000000.tar`, ... and write `out_dir/_stats.json` last.

    Args:
        samples: from `folder_samples`, `table_samples` or `imagefolder_samples`.
        out_dir: the output directory; created if missing. Output of an earlier run there is an error.
        prefix: shard name prefix.
        samples_per_shard: the most samples one shard holds.
        max_shard_bytes: the largest shard file, tar overhead included; None: no limit. A sample that exceeds it on
            its own gets a shard of its own and is counted as `oversized_samples`.
        resize: shrink images so that their shorter side is this many pixels (keeping the aspect ratio) and
            re-encode them as JPEG; smaller images are left as they are; None: no resizing.
        quality: JPEG quality of re-encoded images.
        workers: processes that read, check and encode images; 1 works in this process.
        overwrite: remove the shards of this prefix, `_stats.json` and `classnames.txt` of an earlier run first.
        classnames: written to `out_dir/classnames.txt`, one per line (ImageFolder input).
        input_info: what the input was, recorded in the stats.
        progress: show a progress bar.

    Returns:
        The statistics written to `_stats.json`.
    """
    _check_options(samples_per_shard, max_shard_bytes, resize, quality, workers)
    start = time.perf_counter()
    out_dir = Path(out_dir).expanduser()
    _prepare_out_dir(out_dir, prefix, overwrite)
    key_width = max(9, len(str(len(samples) - 1)))
    sink = _ShardSink(out_dir, prefix, samples_per_shard, max_shard_bytes)
    failures: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    resized = reencoded = 0
    encode = partial(_encode, resize=resize, quality=quality, key_width=key_width)
    with tqdm(total=len(samples), unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for result in _encoded(samples, encode, workers):
            bar.update()
            if result.sample is None:
                failures[result.reason] += 1
                shown = examples.setdefault(result.reason, [])
                if len(shown) < _EXAMPLES_PER_REASON:
                    shown.append(result.where)
                continue
            sink.add(result.sample)
            resized += result.resized
            reencoded += result.reencoded
    paths = sink.close()
    if classnames is not None:
        (out_dir / CLASSNAMES_FILE).write_text("".join(f"{name}\n" for name in classnames), encoding="utf-8")
    seconds = time.perf_counter() - start
    written = len(samples) - sum(failures.values())
    stats = {
        "input": input_info or {},
        "output_dir": str(out_dir),
        "pattern": brace_pattern(paths) if paths else None,
        "samples_in": len(samples),
        "samples_written": written,
        "shards_written": len(paths),
        "bytes_written": sum(p.stat().st_size for p in paths),
        "skipped": sum(failures.values()),
        "failures": {r: {"count": failures[r], "examples": examples[r]} for r in sorted(failures)},
        "images_resized": resized,
        "images_reencoded": reencoded,
        "oversized_samples": sink.oversized,
        "shards": [p.name for p in paths],
        "options": {"prefix": prefix, "samples_per_shard": samples_per_shard, "max_shard_bytes": max_shard_bytes,
                    "resize": resize, "quality": quality, "workers": workers},
        "seconds": round(seconds, 3),
        "samples_per_s": round(written / seconds, 1) if seconds > 0 else None,
    }
    tmp = out_dir / f".{STATS_FILE}.tmp"
    tmp.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / STATS_FILE)
    return stats


def _check_options(samples_per_shard: int, max_shard_bytes: int | None, resize: int | None, quality: int,
                   workers: int) -> None:
    if samples_per_shard < 1:
        raise ShardInputError(f"samples per shard must be >= 1, got {samples_per_shard}")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ShardInputError(f"max shard bytes must be >= 1, got {max_shard_bytes}")
    if resize is not None and resize < 1:
        raise ShardInputError(f"resize must be >= 1 pixel, got {resize}")
    if not 1 <= quality <= 100:
        raise ShardInputError(f"JPEG quality must be in 1..100, got {quality}")
    if workers < 1:
        raise ShardInputError(f"workers must be >= 1, got {workers}")


def _encoded(samples: Sequence[SourceSample], encode, workers: int) -> Iterator[_Encoded]:
    """`encode` applied to every sample, in input order, in this process or in a pool of `workers`."""
    if workers == 1:
        yield from map(encode, samples)
        return
    chunksize = max(1, min(32, math.ceil(len(samples) / (workers * 8))))
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(encode, samples, chunksize=chunksize)


# ----------------------------------------------------------------------------------------------------------------
# command line


def parse_bytes(text: str) -> int:
    """A byte count such as `500000000`, `500MB`, `1.5GB` (powers of 1000) or `512MiB`, `1GiB` (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if m is None or (m[3] and not m[2]):
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count such as 1000000, 500MB or 1GiB")
    power = " KMGT".index(m[2] or " ")
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    out = common.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards and _stats.json")
    out.add_argument("--prefix", default="train", help="shard name prefix: PREFIX-000000.tar, ... (default: train)")
    out.add_argument("--samples-per-shard", type=int, default=1000, metavar="N",
                     help="most samples per shard (default: 1000)")
    out.add_argument("--max-shard-bytes", type=parse_bytes, metavar="SIZE",
                     help="largest shard file, e.g. 500MB or 1GiB (default: no limit)")
    out.add_argument("--resize", type=int, metavar="N", help="shrink images to N pixels on the shorter side, keeping "
                                                             "the aspect ratio, and re-encode as JPEG; never upscales")
    out.add_argument("--quality", type=int, default=95, metavar="Q",
                     help="JPEG quality of re-encoded images (default: 95)")
    out.add_argument("--workers", type=int, default=1, metavar="N",
                     help="processes reading and encoding images (default: 1)")
    out.add_argument("--overwrite", action="store_true", help="replace the output of an earlier run in --out")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")

    parser = argparse.ArgumentParser(
        prog="clipalign-make-shards", description=__doc__.split("\n\n")[0],
        epilog="Writes OUT/PREFIX-NNNNNN.tar and OUT/_stats.json (counts, skipped inputs by reason with examples) and "
               "prints the pattern to pass as data.train. See docs/data.md.")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{folder,table,imagefolder}")
    folder = kinds.add_parser("folder", parents=[common], help="images with sidecar captions (x.jpg + x.txt/x.json)",
                              description="A folder of images, searched recursively; x.jpg takes its caption from "
                                          "x.txt, else from x.json ('caption' or 'captions').")
    folder.add_argument("src", help="the folder")
    table = kinds.add_parser("table", parents=[common], help="a CSV/TSV/parquet table of image paths and captions",
                             description="A table with a column of local image paths and caption column(s). "
                                         "URLs are refused: use img2dataset to download.")
    table.add_argument("src", help="the table: .csv, .tsv/.tab or .parquet (parquet needs pyarrow)")
    table.add_argument("--image-col", default="image", metavar="COL", help="column of image paths (default: image)")
    table.add_argument("--caption-col", action="append", dest="caption_cols", metavar="COL",
                       help="caption column; repeat for several captions per image (default: caption)")
    table.add_argument("--image-root", metavar="DIR",
                       help="base of relative image paths (default: the table's directory)")
    table.add_argument("--table-format", choices=("csv", "tsv", "parquet"), help="default: from the extension")
    imagefolder = kinds.add_parser("imagefolder", parents=[common], help="class sub-folders + caption templates",
                                   description="An ImageFolder (one sub-folder of images per class); every image gets "
                                               "every template filled with its class name, and its class index as "
                                               "'label'. Writes OUT/classnames.txt.")
    imagefolder.add_argument("src", help="the ImageFolder root")
    imagefolder.add_argument("--templates", action="append", metavar="TEMPLATE",
                             help="caption template with '{}' for the class name; repeatable (default: "
                                  f"SRC/{TEMPLATES_FILE}, else '{DEFAULT_TEMPLATE}')")
    imagefolder.add_argument("--templates-file", metavar="FILE",
                             help="file with one template per line (added to --templates)")
    imagefolder.add_argument("--classnames", metavar="FILE",
                             help=f"file with one class name per line, in sorted folder order "
                                  f"(default: SRC/{CLASSNAMES_FILE}, else the folder names)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """`clipalign-make-shards`: WebDataset shards from a captioned folder, a table, or an ImageFolder."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        samples, classnames, info = _samples_from_args(args)
        stats = make_shards(samples, args.out, prefix=args.prefix, samples_per_shard=args.samples_per_shard,
                            max_shard_bytes=args.max_shard_bytes, resize=args.resize, quality=args.quality,
                            workers=args.workers, overwrite=args.overwrite, classnames=classnames, input_info=info,
                            progress=not args.no_progress and sys.stderr.isatty())
    except (ShardInputError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    _print_summary(stats)
    if stats["samples_written"] == 0:
        raise SystemExit(1)


def _samples_from_args(args: argparse.Namespace) -> tuple[list[SourceSample], list[str] | None, dict[str, Any]]:
    info: dict[str, Any] = {"kind": args.kind, "path": str(args.src)}
    if args.kind == "folder":
        return folder_samples(args.src), None, info
    if args.kind == "table":
        caption_cols = args.caption_cols or ["caption"]
        info.update(image_col=args.image_col, caption_cols=caption_cols)
        samples = table_samples(args.src, args.image_col, caption_cols, args.image_root, args.table_format)
        return samples, None, info
    templates = list(args.templates or [])
    if args.templates_file:
        templates += read_lines(args.templates_file)
    classnames = read_lines(args.classnames) if args.classnames else None
    samples, classnames = imagefolder_samples(args.src, templates or None, classnames)
    info.update(templates=_templates(Path(args.src).expanduser(), templates or None), classes=len(classnames))
    return samples, classnames, info


def _print_summary(stats: dict[str, Any]) -> None:
    shards = f"{stats['shards_written']} shard{'' if stats['shards_written'] == 1 else 's'}"
    print(f"wrote {stats['samples_written']} of {stats['samples_in']} samples into {shards} "
          f"({_human_bytes(stats['bytes_written'])}) in {stats['output_dir']} in {stats['seconds']:.2f} s")
    if stats["failures"]:
        print(f"skipped {stats['skipped']}:")
        for reason, failure in stats["failures"].items():
            print(f"  {reason:<14}{failure['count']:>8}   e.g. {'; '.join(failure['examples'][:3])}")
    print(f"details: {Path(stats['output_dir']) / STATS_FILE}")
    if stats["pattern"]:
        print("train on them with:")
        print(f"  {shlex.quote('data.train=' + stats['pattern'])}")
    else:
        print("no samples written", file=sys.stderr)


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


if __name__ == "__main__":
    main()
