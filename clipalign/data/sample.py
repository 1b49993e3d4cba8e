"""The sample format: image extensions, the caption rule, skip reasons, and the class-name and template files.

A raw sample is what webdataset reads from a shard: `{"__key__": ..., "jpg": b"...", "txt": b"...", "json": b"..."}`
with bytes values. Its captions come from `.txt`, else from the `.json` `"captions"` list, else from its
`"caption"` (`sample_captions`); training draws one of several with the sample's own rng (`caption_of`), and
make_shards reads sidecar files by the same rule. With caption sources (`data.captions`: `txt` or `json.FIELD`, each
with a weight) training draws instead one source among those the sample has, then one entry of it if it is a list
(`caption_sources`, `draw_caption`). Retrieval evaluation scores every caption (`every_caption`: the `.txt` and a
JSON list together, whatever `data.captions` says), and the tokenizer trainer takes a JSON list whole before the
`.txt`. Everything that reads or writes samples (the training stream, make_shards, inspect_shards, evaluation, the
tokenizer trainer) takes these rules, the skip reasons and the class-name and template files from here.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from clipalign.config import CAPTION_JSON_PREFIX, CAPTION_TXT

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # what a shard sample's image may be stored as
INPUT_EXTENSIONS = (*IMAGE_EXTENSIONS, "bmp", "gif", "tif", "tiff")  # what make_shards reads (and re-encodes)

CLASSNAMES_FILE = "classnames.txt"  # one class name per line, in label order
TEMPLATES_FILE = "templates.txt"  # one prompt template per line, "{}" standing for the class name
DEFAULT_TEMPLATE = "a photo of a {}."  # make_shards' caption of an ImageFolder image without a templates file
# the names clip_benchmark gives the same files in its WebDataset layout (DATASET/classnames.txt, DATASET/test/*.tar)
CLIP_BENCHMARK_TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TEMPLATE_FILES = (TEMPLATES_FILE, CLIP_BENCHMARK_TEMPLATES_FILE)  # looked for beside evaluation data, in this order
BUILTIN_DIR = Path(__file__).resolve().parents[1] / "zeroshot_data"
BUILTIN_SETS = ("cifar10", "cifar100", "imagenet1k")


class SkipReason(NamedTuple):
    """Why a sample or an input is left out, and which tools can report it."""

    name: str
    meaning: str
    stream: bool  # the training stream (and inspect_shards, the tokenizer trainer) counts it
    make_shards: bool  # make_shards counts it in `_stats.json`


# Every skip reason, once. The order is the training stream's order of its counts in metrics.jsonl.
SKIP_REASONS = (
    SkipReason("no_image", "no image member (jpg, jpeg, png, webp) in the sample, or no image in the table row",
               stream=True, make_shards=True),
    SkipReason("no_caption", "no caption at all: no .txt, no JSON caption/captions, no caption cell",
               stream=True, make_shards=True),
    SkipReason("empty_caption", "a caption source is there but every caption in it is blank", stream=False,
               make_shards=True),
    SkipReason("bad_text", "the .txt or .json cannot be decoded (not UTF-8, not JSON, JSON not an object)",
               stream=True, make_shards=True),
    SkipReason("bad_image", "the image cannot be read or decoded", stream=True, make_shards=True),
    SkipReason("unreadable_tar", "a shard that cannot be opened or read to its end, once per read (the sample "
               "being read when it broke goes with it, uncounted), or a second member of one name in a sample",
               stream=True, make_shards=False),
    SkipReason("missing_file", "the image file an input names does not exist", stream=False, make_shards=True),
)
STREAM_SKIP_REASONS = tuple(r.name for r in SKIP_REASONS if r.stream)
MAKE_SHARDS_SKIP_REASONS = tuple(r.name for r in SKIP_REASONS if r.make_shards)


# ----------------------------------------------------------------------------------------------------------------
# images and captions of a raw sample


def image_bytes(sample: dict[str, Any]) -> bytes | None:
    """The sample's image member, the first of `IMAGE_EXTENSIONS` present; None when it has none."""
    return next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)


def sample_json(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's `.json` member as a dict; {} when absent or not an object. Raises ValueError for bad JSON."""
    if "json" not in sample:
        return {}
    meta = json.loads(sample["json"].decode("utf-8"))
    return meta if isinstance(meta, dict) else {}


def listed_captions(meta: dict[str, Any]) -> list[str]:
    """The non-blank entries of a JSON `"captions"` list, stripped; [] when there is none."""
    captions = meta.get("captions")
    if not isinstance(captions, list):
        return []
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


def json_captions(meta: dict[str, Any]) -> list[str]:
    """The captions of a JSON sidecar: its `"captions"` list, else its `"caption"`; blank ones left out."""
    captions = listed_captions(meta)
    if captions:
        return captions
    caption = meta.get("caption")
    return [caption.strip()] if isinstance(caption, str) and caption.strip() else []


def sample_captions(sample: dict[str, Any]) -> list[str]:
    """The usable captions of a raw sample: its `.txt`, else its JSON captions (see `json_captions`).

    The JSON is only read when the `.txt` is absent or blank, so a good `.txt` stands beside a broken `.json`.

    Raises:
        UnicodeDecodeError, ValueError: undecodable text or JSON where the captions have to come from.
    """
    return _captions(sample)[0]


def caption_of(sample: dict[str, Any], rng: random.Random,
               sources: Mapping[str, float] | None = None) -> str | None:
    """The training caption of a raw sample, drawn with `rng` (the sample's own, in training: see `decode_samples`).

    Without `sources` (or with none): one of `sample_captions`, drawn from a JSON list. With `sources`
    (`data.captions`, checked by `clipalign.config.check_caption_sources`): see `draw_caption`.

    None when it has none. Raises UnicodeDecodeError / ValueError for undecodable text or JSON.
    """
    if sources:
        drawn = draw_caption(sample, rng, sources)
        return None if drawn is None else drawn[1]
    captions, listed = _captions(sample)
    if not captions:
        return None
    # a list of one draws too, as it always has, so that an rng shared by many samples (inspect_shards) stays in step
    return rng.choice(captions) if listed else captions[0]


def _captions(sample: dict[str, Any]) -> tuple[list[str], bool]:
    """(`sample_captions`, whether they come from a JSON `"captions"` list)."""
    if "txt" in sample:
        text = sample["txt"].decode("utf-8").strip()
        if text:
            return [text], False
    meta = sample_json(sample)
    listed = listed_captions(meta)
    return (listed, True) if listed else (json_captions(meta), False)


def caption_sources(sample: dict[str, Any], sources: Mapping[str, float]) -> list[tuple[str, float, list[str], bool]]:
    """The caption sources of `sources` ({`txt` | `json.FIELD`: weight}) that the sample has, in their order:
    (source, weight, its non-blank captions stripped, whether it is a list). `txt` is the `.txt` member; `json.FIELD`
    the JSON's FIELD, a string or a list (its non-string entries left out). A source that is missing or blank is not
    listed.

    Every member a source names is read, since the draw depends on which sources are there: a `.txt` (when `txt` is
    listed) or a `.json` (when a `json.` source is) that cannot be decoded raises, though another source would do.

    Raises:
        UnicodeDecodeError, ValueError: undecodable text or JSON named by a source.
    """
    meta = sample_json(sample) if any(name != CAPTION_TXT for name in sources) else {}
    found = []
    for name, weight in sources.items():
        if name == CAPTION_TXT:
            value: Any = sample["txt"].decode("utf-8") if "txt" in sample else None
        else:
            value = meta.get(name[len(CAPTION_JSON_PREFIX):])
        if isinstance(value, str) and value.strip():
            found.append((name, weight, [value.strip()], False))
        elif isinstance(value, list):
            captions = [c.strip() for c in value if isinstance(c, str) and c.strip()]
            if captions:
                found.append((name, weight, captions, True))
    return found


def draw_caption(sample: dict[str, Any], rng: random.Random,
                 sources: Mapping[str, float]) -> tuple[str, str] | None:
    """(source, caption) drawn with `rng`: one of the sources the sample has (`caption_sources`), with probability
    its weight over the sum of their weights, then one entry of it, uniformly, if it is a list. None when it has none
    of them (a `no_caption` in training).

    Raises:
        UnicodeDecodeError, ValueError: undecodable text or JSON named by a source.
    """
    found = caption_sources(sample, sources)
    if not found:
        return None
    name, _, captions, listed = rng.choices(found, weights=[weight for _, weight, _, _ in found])[0]
    return name, rng.choice(captions) if listed else captions[0]


def every_caption(sample: dict[str, Any]) -> list[str]:
    """Every caption of a raw sample for retrieval: the `.txt` and the JSON `captions` list, or else the JSON
    `caption` (img2dataset writes the same caption to `.txt` and `.json`; it is counted once). Repeats in a list are
    kept, as clip_benchmark keeps them. The training caption sources (`data.captions`) do not change it: retrieval
    scores the evaluation set's own captions, so its numbers compare across runs with different caption mixes."""
    captions = []
    if "txt" in sample:
        captions.append(sample["txt"].decode("utf-8").strip())
    meta = sample_json(sample)
    listed = meta.get("captions")
    if isinstance(listed, list):
        captions.extend(c.strip() for c in listed if isinstance(c, str))
    elif isinstance(meta.get("caption"), str) and "txt" not in sample:
        captions.append(meta["caption"].strip())
    return [c for c in captions if c]


# ----------------------------------------------------------------------------------------------------------------
# class names and templates


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a text file, stripped (class names, templates); a UTF-8 byte-order mark is dropped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def builtin_lines(name: str, what: str) -> list[str]:
    """The built-in class names (`what="classnames"`) or templates (`what="templates"`) of a named data set."""
    if name not in BUILTIN_SETS:
        raise ValueError(f"no built-in {what} for {name!r}; built in: {', '.join(BUILTIN_SETS)}")
    return read_lines(BUILTIN_DIR / name / f"{what}.txt")


def resolve_lines(spec: str | os.PathLike, what: str) -> list[str]:
    """Class names or templates from `spec`: a file (one per line), else the name of a built-in set."""
    if Path(spec).is_file():
        return read_lines(spec)
    if str(spec) in BUILTIN_SETS:
        return builtin_lines(str(spec), what)
    raise FileNotFoundError(f"{what} {str(spec)!r} is neither a file nor a built-in set "
                            f"({', '.join(BUILTIN_SETS)})")


def lines_beside(places: Iterable[Path], names: Sequence[str]) -> list[str] | None:
    """The lines of the first of `names` found in the first of `places` holding one; None when none does."""
    for place in places:
        for name in names:
            if (place / name).is_file():
                return read_lines(place / name)
    return None


def folder_classnames(root: str | os.PathLike, classes: Sequence[str], classnames: Sequence[str] | None = None,
                      given_as: str = "classnames") -> list[str]:
    """The class names of an ImageFolder whose sorted class folders are `classes`.

    Args:
        root: the ImageFolder.
        classes: its class folder names, in label order.
        classnames: names given by the user; default: `root/classnames.txt` if present, else the folder names with
            `_` read as a space.
        given_as: how the user gave `classnames`, for the error message (a flag or argument name).

    Raises:
        ValueError: the number of names is not the number of class folders.
    """
    source = given_as
    if classnames is None:
        path = Path(root) / CLASSNAMES_FILE
        if path.is_file():
            classnames, source = read_lines(path), str(path)
        else:
            classnames = [name.replace("_", " ") for name in classes]
    classnames = list(classnames)
    if len(classnames) != len(classes):
        raise ValueError(f"{source}: {len(classnames)} class names for {len(classes)} class folders in {root}; "
                         f"give one name per folder, in sorted folder-name order")
    return classnames
