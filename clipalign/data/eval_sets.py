"""Evaluation sets: where zero-shot classification and retrieval read images, labels, captions and prompts.

Classification reads an ImageFolder (one sub-folder per class), WebDataset shards with a label per sample, or a
CSV/TSV of (image path, label) rows. Retrieval reads a CSV/TSV of (image path, caption) rows or WebDataset shards
with one or many captions per image (`clipalign.data.sample.every_caption`). Tables go through the one table reader,
`clipalign.data.sources.open_table`. Class names and prompt templates come from text files (one per line) or from
the built-in sets for CIFAR-10, CIFAR-100 and ImageNet-1k (the class names and templates published with CLIP, shipped
in `clipalign/zeroshot_data/`); `clipalign.data.sample` holds the file names and how they are found.

A sample in a shard that cannot be used (corrupt image, no label, no caption) is skipped and counted by reason;
the counts come back with the results. Every reader decodes with `clipalign.data.transforms.decode_image`: an image
over the pixel limit is skipped as `bad_image` (shards, folders and CSVs alike) without being decoded, and 16-bit
grayscale is scaled to 8 bits. A corrupt image named by a folder or CSV stops the evaluation, naming it.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import Dataset, IterableDataset

from clipalign.data.sample import image_bytes, lines_beside, sample_json
from clipalign.data.shards import expand_urls, shard_samples
from clipalign.data.sources import open_table, separator_hint
from clipalign.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLarge, decode_image

# how to read a tab-separated evaluation table named .csv, in clipalign-zeroshot and in a recipe
TAB_FIX = "read it as one (clipalign-zeroshot --table-format tsv; eval.table_format=tsv in a recipe) or name it .tsv"


def source_kind(spec: str | os.PathLike) -> str:
    """How to read an evaluation source: "shards" (tar patterns, `pipe:` URLs), "csv" (.csv/.tsv) or "folder"."""
    text = str(spec)
    if ".tar" in text or text.startswith("pipe:") or "::" in text:
        return "shards"
    if Path(text).suffix.lower() in (".csv", ".tsv"):
        return "csv"
    return "folder"


def sidecar_lines(spec: str | os.PathLike, names: Sequence[str]) -> list[str] | None:
    """The lines of the first of `names` found beside an evaluation source (a folder, a CSV or local shards).

    Looked up in the folder itself, the folder of a CSV, and the folder of the shards and its parent (clip_benchmark
    keeps `classnames.txt` one level above `test/*.tar`).
    """
    kind = source_kind(spec)
    if kind == "folder":
        places = [Path(spec)]
    elif kind == "csv":
        places = [Path(spec).parent]
    else:
        first = expand_urls(str(spec))[0]
        if first.startswith("pipe:") or "://" in first:
            return None
        places = [Path(first).parent, Path(first).parent.parent]
    return lines_beside(places, names)


def label_reader(label_key: str, classnames: Sequence[str]) -> Callable[[dict[str, Any]], int | None]:
    """A function raw sample -> class index, from the member `KEY.<label_key>` (clip_benchmark writes `cls`), else
    the JSON field `label_key` or "label"; a label may be an index or a class name. None when the sample has none.

    Raises ValueError for a label that is neither a valid index nor one of `classnames`.
    """
    index = {name: i for i, name in enumerate(classnames)}

    def read(sample: dict[str, Any]) -> int | None:
        if label_key in sample:
            value: Any = sample[label_key].decode("utf-8").strip()
        else:
            meta = sample_json(sample)
            value = meta.get(label_key, meta.get("label"))
        if value is None or value == "":
            return None
        return class_index(value, index, len(classnames))

    return read


def class_index(value: Any, index: dict[str, int], num_classes: int) -> int:
    """A label (an int, a digit string or a class name) as a class index; ValueError naming the value otherwise."""
    if isinstance(value, str) and value in index:
        return index[value]
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"label {value!r} is neither a class index nor one of the {num_classes} class names") from None
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} is outside the {num_classes} classes")
    return label


class ShardSamples(IterableDataset):
    """Images of WebDataset shards through `transform`, each with `target(sample)` (a label, captions, ...).

    Yields `(image, target, "")` for a usable sample and `(None, None, reason)` for one that is not, so that
    `collate_samples` can count skips across DataLoader workers. Workers read disjoint shards. An image over
    `max_pixels` (0: no limit) is a `bad_image`, never decoded.
    """

    def __init__(self, spec: str, transform: Callable, target: Callable[[dict[str, Any]], Any],
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.urls = expand_urls(spec)
        self.transform, self.target = transform, target
        self.max_pixels = max_pixels
        self.tar_errors = 0

    def _tar_error(self, url: str, message: str) -> None:
        self.tar_errors += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, Any, str]]:
        _, _, worker, workers = wds.utils.pytorch_worker_info()
        for sample in shard_samples(self.urls[worker::workers], self._tar_error):
            data = image_bytes(sample)
            if data is None:
                yield None, None, "no_image"
                continue
            try:
                target = self.target(sample)
            except (UnicodeDecodeError, ValueError):
                yield None, None, "bad_target"
                continue
            if target is None or target == []:
                yield None, None, "no_target"
                continue
            try:
                image = self.transform(decode_image(data, max_pixels=self.max_pixels))
            except Exception:  # PIL raises many types for corrupt data; ours: ImageTooLarge
                yield None, None, "bad_image"
                continue
            yield image, target, ""


def collate_samples(batch: list[tuple[torch.Tensor | None, Any, str]]) -> tuple[torch.Tensor | None, list, Counter]:
    """(stacked images or None, their targets, skip counts by reason) from `ShardSamples` items."""
    kept = [(image, target) for image, target, reason in batch if not reason]
    skipped = Counter(reason for _, _, reason in batch if reason)
    if not kept:
        return None, [], skipped
    return torch.stack([image for image, _ in kept]), [target for _, target in kept], skipped


class ImagePaths(Dataset):
    """Images read from paths through `transform`, with a target each (labels for classification, indices else).

    Items are `(image, target, "")`, or `(None, target, "bad_image")` for an image over `max_pixels` (0: no limit),
    skipped unread, like `ShardSamples`' items. Any other unreadable image is an error naming its path.
    """

    def __init__(self, paths: Sequence[Path], targets: Sequence[Any], transform: Callable,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.paths, self.targets, self.transform = list(paths), list(targets), transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, Any, str]:
        path = self.paths[index]
        try:
            image = self.transform(decode_image(path, max_pixels=self.max_pixels))
        except ImageTooLarge:
            return None, self.targets[index], "bad_image"
        except (OSError, ValueError) as e:
            raise ValueError(f"evaluation image {path} cannot be read: {e}") from e
        return image, self.targets[index], ""


def csv_separator(path: str | os.PathLike, separator: str | None = None) -> str:
    """The separator an evaluation table is read with: `separator`, else a tab for `.tsv` and a comma otherwise."""
    return separator or ("\t" if Path(path).suffix.lower() == ".tsv" else ",")


def _csv_rows(path: Path, keys: Sequence[str], separator: str | None, hint: str) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"CSV {path} does not exist")
    sep = csv_separator(path, separator)
    # quoted cells even in a TSV: clip_benchmark reads these files with pandas, which honours quotes
    with open_table(path, "csv", delimiter=sep, quoting=csv.QUOTE_MINIMAL) as (header, rows):
        missing = [k for k in keys if k not in (header or [])]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r}; columns are {header} ({hint})."
                             f"{separator_hint(header, TAB_FIX) if sep != chr(9) else ''}")
        for number, row in enumerate(rows, 2):
            yield number, {name: row[i] if i < len(row) else None for i, name in enumerate(header)}


def _image_path(csv_path: Path, row_number: int, value: str) -> Path:
    image = Path(value)
    image = image if image.is_absolute() else csv_path.parent / image
    if not image.is_file():
        raise FileNotFoundError(f"{csv_path}:{row_number}: image {image} does not exist")
    return image


def read_labelled_csv(path: str | os.PathLike, classnames: Sequence[str], image_key: str = "filepath",
                      label_key: str = "label", separator: str | None = None) -> tuple[list[Path], list[int]]:
    """Image paths and class indices from a CSV/TSV with one row per image; a label is an index or a class name.

    Raises:
        FileNotFoundError: the CSV or an image it names is missing (naming it).
        ValueError: a missing column, a bad label (naming file and row), or no rows.
    """
    path = Path(path)
    index = {name: i for i, name in enumerate(classnames)}
    paths, labels = [], []
    for row_number, row in _csv_rows(path, (image_key, label_key), separator,
                                     "choose them with --csv-img-key / --csv-label-key"):
        try:
            labels.append(class_index((row[label_key] or "").strip(), index, len(classnames)))
        except ValueError as e:
            raise ValueError(f"{path}:{row_number}: {e}") from None
        paths.append(_image_path(path, row_number, row[image_key]))
    if not paths:
        raise ValueError(f"{path}: no rows; expected one row per (image, label) pair")
    return paths, labels


def read_retrieval_csv(path: str | os.PathLike, image_key: str = "filepath", caption_key: str = "caption",
                       separator: str | None = None) -> tuple[list[Path], list[str], list[int]]:
    """Images, captions and each caption's image index from a CSV/TSV with one row per (image, caption) pair.

    An image with several captions has several rows; relative image paths are read from the CSV's folder. The
    separator defaults to a tab for `.tsv` files and a comma otherwise.

    Raises:
        FileNotFoundError: the CSV or an image it names is missing (naming it).
        ValueError: a column is missing, a caption is empty, or the file has no rows (naming file, row or column).
    """
    path = Path(path)
    images: dict[Path, int] = {}
    captions, owners = [], []
    for row_number, row in _csv_rows(path, (image_key, caption_key), separator,
                                     "choose them with --csv-img-key / --csv-caption-key"):
        caption = (row[caption_key] or "").strip()
        if not caption:
            raise ValueError(f"{path}:{row_number}: empty caption for {row[image_key]}")
        image = Path(row[image_key])
        image = image if image.is_absolute() else path.parent / image
        if image not in images:
            images[_image_path(path, row_number, row[image_key])] = len(images)
        captions.append(caption)
        owners.append(images[image])
    if not captions:
        raise ValueError(f"{path}: no rows; expected one row per (image, caption) pair")
    return list(images), captions, owners
