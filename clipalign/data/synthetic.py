"""Procedurally drawn captioned images: shapes x colours x sizes x positions, for the quickstart and the tests.

Nothing is downloaded. A training image holds one object (about 60%) or two (about 40%) on a dark-to-mid grey
background with mild noise or a gentle gradient; its caption, one of several phrasings, names the colour and shape
of every object and is always true to the image (size, position and relation words included when used).

`make_synthetic_dataset(root)` writes, under `root`:

    train-000000.tar ...    WebDataset shards: KEY.jpg + KEY.txt (caption) + KEY.json (caption, shape, colour of
                            the first object named, and every object's geometry)
    heldout/<colour>_<shape>/<index>.jpg
                            single-object images for zero-shot classification (an ImageFolder, 30 classes),
                            drawn from a random stream disjoint from the training one
    heldout/classnames.txt  one class name per line, in ImageFolder's (sorted folder) order, e.g. "red circle"
    heldout/templates.txt   prompt templates with "{}"
    heldout/captions.csv    `filepath,caption` rows, two true captions per held-out image, for retrieval
    _complete.json          the parameters and the shard names; written last

`root` holds one data set: calling again with the same parameters returns it without redrawing; with different
parameters it raises `FileExistsError` naming the directory (pick another `root`, e.g. one keyed by the parameters).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipalign.data.writer import brace_pattern, image_to_bytes, write_shards

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 235),
    "yellow": (235, 220, 45),
    "purple": (150, 55, 210),
    "cyan": (45, 210, 220),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("above", "below", "left of", "right of")
TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "a small {}.",
    "a large {}.",
    "there is a {}.",
    "a picture of a {}.",
    "{}.",
)

COLOUR_JITTER = 12  # per channel, uniform in [-COLOUR_JITTER, COLOUR_JITTER]
FORMAT_VERSION = 1  # bump when drawing changes, so that an old data set on disk is not taken for a new one
JPEG_QUALITY = 90
TAR_MTIME = 1_700_000_000  # fixed member mtime: the same seed gives byte-identical shards

_MARKER = "_complete.json"
_TWO_OBJECTS_P = 0.4
# half-extent of an object as a fraction of the image side, before a +-8% jitter
_RADIUS = {"small": 0.13, "large": 0.2}
_RADIUS_JITTER = 0.08
# single-object anchors (x, y) as fractions of the side, jittered by up to _POSITION_JITTER
_ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
_POSITION_JITTER = 0.06
_POSITION_WORDS = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
_RELATION_WORDS = {
    "above": ("above",),
    "below": ("below", "under"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}


@dataclass
class SyntheticDataset:
    """A synthetic data set on disk (see the module docstring for the layout)."""

    root: Path
    train_pattern: str  # brace pattern over all training shards, e.g. "/root/train-{000000..000011}.tar"
    heldout_dir: Path  # ImageFolder of single-object images, classes "<colour>_<shape>"
    classnames: list[str]  # "red circle", ... in the class-index order of ImageFolder(heldout_dir)
    templates: list[str]  # zero-shot prompt templates with "{}"
    train_samples: int

    @property
    def heldout_captions(self) -> Path:
        """The held-out images' captions for retrieval: a CSV with `filepath` (relative to it) and `caption`."""
        return self.heldout_dir / HELDOUT_CAPTIONS


def heldout_classes() -> list[str]:
    """Held-out folder names, `<colour>_<shape>`, sorted as ImageFolder sorts them."""
    return sorted(f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES)


def draw_sample(rng: random.Random, image_size: int = 64) -> tuple[Image.Image, str, dict]:
    """Draw one training image with one or two objects and a true caption.

    Returns:
        The RGB image, its caption, and metadata: `caption`, `shape`, `colour`, `size` of the first object named,
        `position` (single object) or `relation` (two objects: "first <relation> second"), and `objects`, a list of
        `{"shape", "colour", "size", "center": [x, y], "radius", "rgb": [r, g, b]}` in the order named.
    """
    if rng.random() < _TWO_OBJECTS_P:
        return _draw_pair(rng, image_size)
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    img, obj, position = _draw_single(rng, image_size, colour, shape)
    caption = _single_caption(rng, obj, position)
    meta = {
        "caption": caption,
        "shape": shape,
        "colour": colour,
        "size": obj["size"],
        "position": position,
        "relation": None,
        "objects": [obj],
    }
    return img, caption, meta


def make_synthetic_dataset(
    root: str | Path,
    train_samples: int = 12000,
    heldout_per_class: int = 20,
    image_size: int = 64,
    samples_per_shard: int = 1000,
    seed: int = 0,
) -> SyntheticDataset:
    """Draw the training shards and the held-out ImageFolder into `root`, or return them if already there.

    Crash- and race-safe: everything is drawn into a temporary sibling directory that is renamed to `root` only
    once complete. When two processes draw at once, the loser of the rename discards its copy and uses the
    winner's. A crash leaves at most a `.<name>.tmp-*` sibling behind, never a half-written `root`.

    Raises:
        FileExistsError: `root` holds a data set drawn with other parameters, or files that are not a data set.
    """
    root = Path(root).expanduser().resolve()
    params = {
        "format_version": FORMAT_VERSION,
        "train_samples": train_samples,
        "heldout_per_class": heldout_per_class,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "seed": seed,
    }
    if train_samples < 1 or heldout_per_class < 1 or samples_per_shard < 1:
        raise ValueError(f"train_samples, heldout_per_class and samples_per_shard must be >= 1; got {params}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels for the shapes to be recognisable; got {image_size}")
    existing = _existing_dataset(root, params)
    if existing is not None:
        return existing

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        shards = write_shards(
            _train_samples(params),
            tmp,
            prefix="train",
            samples_per_shard=samples_per_shard,
            mtime=TAR_MTIME,
        )
        _write_heldout(tmp / "heldout", params)
        marker = {"params": params, "train_shards": [p.name for p in shards]}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, root)  # atomic; replaces an empty `root` directory, fails on a non-empty one
        except OSError:
            if not (root / _MARKER).is_file():
                raise
            # another process finished first: its data set stands, ours goes
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    existing = _existing_dataset(root, params)
    if existing is None:
        raise RuntimeError(f"synthetic data set at {root} is incomplete after writing it")
    return existing


# ----------------------------------------------------------------------------------------------------------------
# drawing


def _draw_single(rng: random.Random, image_size: int, colour: str, shape: str) -> tuple[Image.Image, dict, str]:
    """One object of the given colour and shape at a random size and position; returns (image, object, position)."""
    size = rng.choice(SIZES)
    position = rng.choice(POSITIONS)
    radius = _radius(rng, size, image_size)
    ax, ay = _ANCHORS[position]
    jitter = _POSITION_JITTER * (0.6 if position == "center" else 1.0)
    cx = _clamp((ax + rng.uniform(-jitter, jitter)) * image_size, radius, image_size - 1 - radius)
    cy = _clamp((ay + rng.uniform(-jitter, jitter)) * image_size, radius, image_size - 1 - radius)
    img = _background(rng, image_size)
    draw = ImageDraw.Draw(img)
    obj = _draw_object(rng, draw, shape, colour, size, cx, cy, radius)
    return img, obj, position


def _draw_pair(rng: random.Random, image_size: int) -> tuple[Image.Image, str, dict]:
    """Two objects of different kinds, the first `relation` the second, each in its own half of the image."""
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    (colour_a, shape_a), (colour_b, shape_b) = rng.sample(kinds, 2)
    relation = rng.choice(RELATIONS)
    size_a, size_b = rng.choice(SIZES), rng.choice(SIZES)
    r_a, r_b = _radius(rng, size_a, image_size), _radius(rng, size_b, image_size)
    half = image_size / 2
    # along the relation's axis the first object stays inside its half and the second inside the other half, so
    # the two never overlap and "above"/"left of" hold for every pixel; across it, both stay near the middle line
    near = [_clamp((0.27 + rng.uniform(-0.04, 0.04)) * image_size, r, half - 1 - r) for r in (r_a, r_b)]
    far = [_clamp((0.73 + rng.uniform(-0.04, 0.04)) * image_size, half + r, image_size - 1 - r) for r in (r_a, r_b)]
    across = [_clamp((0.5 + rng.uniform(-0.1, 0.1)) * image_size, r, image_size - 1 - r) for r in (r_a, r_b)]
    first_near = relation in ("above", "left of")
    along_a, along_b = (near[0], far[1]) if first_near else (far[0], near[1])
    if relation in ("above", "below"):
        (xa, ya), (xb, yb) = (across[0], along_a), (across[1], along_b)
    else:
        (xa, ya), (xb, yb) = (along_a, across[0]), (along_b, across[1])
    img = _background(rng, image_size)
    draw = ImageDraw.Draw(img)
    obj_a = _draw_object(rng, draw, shape_a, colour_a, size_a, xa, ya, r_a)
    obj_b = _draw_object(rng, draw, shape_b, colour_b, size_b, xb, yb, r_b)
    caption = _pair_caption(rng, obj_a, obj_b, relation)
    meta = {
        "caption": caption,
        "shape": shape_a,
        "colour": colour_a,
        "size": size_a,
        "position": None,
        "relation": relation,
        "objects": [obj_a, obj_b],
    }
    return img, caption, meta


def _radius(rng: random.Random, size: str, image_size: int) -> float:
    return _RADIUS[size] * image_size * (1.0 + rng.uniform(-_RADIUS_JITTER, _RADIUS_JITTER))


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _background(rng: random.Random, image_size: int) -> Image.Image:
    """Dark-to-mid grey, faintly tinted, with mild noise or a gentle linear gradient (plus fainter noise)."""
    level = rng.uniform(25, 120)
    tint = np.array([rng.uniform(-6, 6) for _ in range(3)], dtype=np.float32)
    if rng.random() < 0.5:
        noise_amp = rng.uniform(6, 16)
        field = np.full((image_size, image_size), level, dtype=np.float32)
    else:
        noise_amp = rng.uniform(2, 6)
        ramp = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        field = level + rng.uniform(8, 25) * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    # uniform noise from the Python stream: deterministic with `rng`, and far cheaper than seeding a numpy Generator
    noise = np.frombuffer(rng.randbytes(image_size * image_size), dtype=np.uint8).reshape(image_size, image_size)
    field = field + (noise.astype(np.float32) * (noise_amp / 255.0) - noise_amp / 2)
    pixels = np.clip(field[:, :, None] + tint, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _draw_object(
    rng: random.Random, draw: ImageDraw.ImageDraw, shape: str, colour: str, size: str, cx: float, cy: float, r: float
) -> dict:
    """Draw one filled shape centred on (cx, cy) within the box of half-side r; its centre pixel is inside it."""
    rgb = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        h = 0.88 * r  # a little smaller than the box, so a square does not look larger than a circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    elif shape == "triangle":
        # equilateral, pointing up, inscribed in the circle of radius r: its centroid is (cx, cy)
        dx = 0.866 * r
        draw.polygon([(cx, cy - r), (cx + dx, cy + r / 2), (cx - dx, cy + r / 2)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
    elif shape == "cross":
        t = 0.34 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=rgb)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return {
        "shape": shape,
        "colour": colour,
        "size": size,
        "center": [round(cx, 2), round(cy, 2)],
        "radius": round(r, 2),
        "rgb": list(rgb),
    }


# ----------------------------------------------------------------------------------------------------------------
# captions


def _single_caption(rng: random.Random, obj: dict, position: str) -> str:
    colour, shape = obj["colour"], obj["shape"]
    size = rng.choice(_SIZE_WORDS[obj["size"]])
    where = rng.choice(_POSITION_WORDS[position])
    forms = (
        f"a {size} {colour} {shape}",
        f"a {colour} {shape}",
        f"a photo of a {size} {colour} {shape} {where}",
        f"a photo of a {colour} {shape}",
        f"a picture of a {colour} {shape} {where}",
        f"there is a {colour} {shape} {where}",
        f"there is a {size} {colour} {shape}",
        f"a {colour} {shape} {where}",
        f"{colour} {shape}",
        f"{size} {colour} {shape} {where}",
    )
    return _finish(rng, rng.choice(forms))


def _pair_caption(rng: random.Random, a: dict, b: dict, relation: str) -> str:
    rel = rng.choice(_RELATION_WORDS[relation])
    first, second = f"{a['colour']} {a['shape']}", f"{b['colour']} {b['shape']}"
    size_a, size_b = rng.choice(_SIZE_WORDS[a["size"]]), rng.choice(_SIZE_WORDS[b["size"]])
    forms = (
        f"a {first} {rel} a {second}",
        f"a {size_a} {first} {rel} a {size_b} {second}",
        f"a photo of a {first} {rel} a {second}",
        f"there is a {first} {rel} a {second}",
        f"a {first} and a {second}",
        f"a picture of a {size_a} {first} and a {second}",
        f"{first} {rel} {second}",
    )
    return _finish(rng, rng.choice(forms))


def _finish(rng: random.Random, caption: str) -> str:
    return caption + "." if rng.random() < 0.5 else caption


# ----------------------------------------------------------------------------------------------------------------
# writing


def _train_samples(params: dict) -> Iterator[dict]:
    rng = random.Random(f"clipalign-synthetic/train/{params['seed']}")
    for index in range(params["train_samples"]):
        img, caption, meta = draw_sample(rng, params["image_size"])
        yield {"__key__": f"{index:09d}", "jpg": image_to_bytes(img, "jpg", JPEG_QUALITY), "txt": caption, "json": meta}


HELDOUT_CAPTIONS = "captions.csv"
CAPTIONS_PER_HELDOUT_IMAGE = 2


def _heldout_images(params: dict) -> Iterator[tuple[str, Image.Image, dict, str]]:
    """(relative path, image, object, position) of every held-out image, in a fixed order."""
    # a string seed of its own: a stream disjoint from the training one for every integer seed
    rng = random.Random(f"clipalign-synthetic/heldout/{params['seed']}")
    for name in heldout_classes():
        colour, shape = name.split("_")
        for index in range(params["heldout_per_class"]):
            img, obj, position = _draw_single(rng, params["image_size"], colour, shape)
            yield f"{name}/{index:04d}.jpg", img, obj, position


def _write_heldout_captions(heldout: Path, params: dict,
                            objects: Iterable[tuple[str, dict, str]] | None = None) -> None:
    """captions.csv for the held-out images; its own random stream, so the images do not depend on it.

    `objects` are the (relative path, object, position) of the images in their drawing order; None replays the
    drawing to recover them (for a set drawn before the captions existed).
    """
    import csv

    if objects is None:
        objects = ((path, obj, position) for path, _, obj, position in _heldout_images(params))
    rng = random.Random(f"clipalign-synthetic/heldout-captions/{params['seed']}")
    tmp = heldout / f".{HELDOUT_CAPTIONS}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        for path, obj, position in objects:
            for _ in range(CAPTIONS_PER_HELDOUT_IMAGE):
                writer.writerow([path, _single_caption(rng, obj, position)])
    os.replace(tmp, heldout / HELDOUT_CAPTIONS)  # atomic: readers never see half a file


def _write_heldout(heldout: Path, params: dict) -> None:
    objects = []
    for path, img, obj, position in _heldout_images(params):
        (heldout / path).parent.mkdir(parents=True, exist_ok=True)
        (heldout / path).write_bytes(image_to_bytes(img, "jpg", JPEG_QUALITY))
        objects.append((path, obj, position))
    _write_heldout_captions(heldout, params, objects)
    classnames = [name.replace("_", " ") for name in heldout_classes()]
    (heldout / "classnames.txt").write_text("\n".join(classnames) + "\n", encoding="utf-8")
    (heldout / "templates.txt").write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")


def _existing_dataset(root: Path, params: dict) -> SyntheticDataset | None:
    """The data set in `root` if complete and made with `params`; None if `root` is absent or empty."""
    marker_path = root / _MARKER
    if not marker_path.is_file():
        if root.is_dir() and any(root.iterdir()):
            raise FileExistsError(
                f"{root} exists and is not a complete synthetic data set (no {_MARKER}); "
                f"remove it or choose another directory"
            )
        if root.exists() and not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a directory")
        return None
    marker = json.loads(marker_path.read_text(encoding="utf-8"))
    if marker.get("params") != params:
        differing = {
            k: (marker.get("params", {}).get(k), v) for k, v in params.items() if marker.get("params", {}).get(k) != v
        }
        raise FileExistsError(
            f"{root} holds a synthetic data set drawn with other parameters (on disk vs requested: {differing}); "
            f"remove it or choose another directory"
        )
    heldout = root / "heldout"
    if not (heldout / HELDOUT_CAPTIONS).is_file():  # a set drawn before held-out captions existed: add them
        _write_heldout_captions(heldout, params)
    shards = [root / name for name in marker["train_shards"]]
    return SyntheticDataset(
        root=root,
        train_pattern=brace_pattern(shards),
        heldout_dir=heldout,
        classnames=(heldout / "classnames.txt").read_text(encoding="utf-8").splitlines(),
        templates=(heldout / "templates.txt").read_text(encoding="utf-8").splitlines(),
        train_samples=params["train_samples"],
    )
