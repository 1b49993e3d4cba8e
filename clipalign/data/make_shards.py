"""Make WebDataset shards from local data: a folder of captioned images, a CSV/TSV/parquet table, or an ImageFolder.

    clipalign-make-shards folder      photos/            --out shards/photos
    clipalign-make-shards table       captions.csv       --out shards/mine --image-col filepath --caption-col title
    clipalign-make-shards imagefolder imagenet-mini/val  --out shards/val --templates "a photo of a {}."

Every sample becomes `KEY.jpg|png|webp` + `KEY.json` (`{"caption": ...}` or `{"captions": [...]}`, `"source"`, and
`"label"`/`"classname"` from an ImageFolder) + `KEY.txt` when it has exactly one caption. A sample with several
captions has no `.txt`, because the training pipeline prefers `.txt` and would never draw the other captions. Keys are
the input's position (`000000000`, ...) in a deterministic order, so skipped inputs leave gaps but never shift keys.

Images in a shard format (JPEG, PNG, WebP) are stored byte for byte; other formats (BMP, GIF, TIFF), images with an
EXIF rotation, and images shrunk by `resize` are re-encoded as JPEG. 16-bit grayscale images are stored as 8-bit
grayscale PNGs (JPEGs when shrunk) holding the values training reads from them, so that any reader of the shards
(open_clip, clip_benchmark, a plain `convert("RGB")`) sees the image and not a white square. Images over the pixel
limit (`max_image_pixels`, from the header) are `bad_image`, never decoded. Inputs the training pipeline could not use
are skipped and counted by reason (`clipalign.data.sample.MAKE_SHARDS_SKIP_REASONS`) in `OUT/_stats.json`, which is
written last. This tool reads local files only; to download images from URLs use img2dataset, whose webdataset output
trains as it is. The inputs are read by `clipalign.data.sources`; the shards are written by
`clipalign.data.writer.ShardSink`.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import shlex
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from tqdm import tqdm

from clipalign.cli import make_shards_parser
from clipalign.data.sample import CLASSNAMES_FILE, read_lines
from clipalign.data.sources import (
    ShardInputError,
    SourceSample,
    caption_templates,
    folder_samples,
    imagefolder_samples,
    table_samples,
)
from clipalign.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, decode_image, is_16bit_gray, open_image
from clipalign.data.writer import ShardSink, brace_pattern, image_to_bytes
from clipalign.layout import write_atomic

STATS_FILE = "_stats.json"

_SHARD_EXTENSION_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are
_EXIF_ORIENTATION = 0x0112
_TAR_MTIME = 1_700_000_000  # fixed member time: the same input and options give byte-identical shards
_EXAMPLES_PER_REASON = 5
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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


def _encode(src: SourceSample, resize: int | None, quality: int, key_width: int,
            max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> _Encoded:
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
        image, ext, resized, reencoded = _shard_image(data, resize, quality, max_pixels)
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError); ours: ImageTooLarge
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


def _shard_image(data: bytes, resize: int | None, quality: int,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[bytes, str, bool, bool]:
    """(image bytes, extension, resized, re-encoded); raises when the training pipeline could not decode it, and
    `ImageTooLarge` (from the header, before decoding) for an image over `max_pixels`."""
    with open_image(data, max_pixels) as probe:
        ext = _SHARD_EXTENSION_OF_FORMAT.get(probe.format)
        size = probe.size
        orientation = _exif_orientation(probe)
        wide_gray = is_16bit_gray(probe)
    # training decodes without applying EXIF rotation, so a rotated photo is stored upright
    upright = orientation not in (2, 3, 4, 5, 6, 7, 8)
    shrink = resize is not None and min(size) > resize
    if ext is not None and upright and not shrink and not wide_gray:
        decode_image(data, max_pixels=max_pixels)  # the training pipeline's own decode: raises on corrupt data
        return data, ext, False, False
    img = decode_image(data, resize if shrink else None, max_pixels)  # JPEG draft keeps the shorter side >= resize
    if not upright:
        img = ImageOps.exif_transpose(img)
    if shrink:
        img = img.resize(_shorter_side_to(img.size, resize), Image.Resampling.BICUBIC)
    elif wide_gray:
        # decode_image scaled it to 8 bits by the 16-bit range: stored losslessly, as gray, it is what training reads
        return image_to_bytes(img.convert("L"), "png"), "png", False, True
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


def _prepare_out_dir(out_dir: Path, prefix: str, overwrite: bool) -> None:
    """Create `out_dir`; refuse (or with `overwrite`, remove) shards of this prefix and stats from an earlier run."""
    if not prefix or "/" in prefix or "\\" in prefix or "{" in prefix or "}" in prefix:
        raise ShardInputError(f"shard prefix {prefix!r} must be a non-empty file name part without '/', '{{', '}}'")
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardInputError(f"output {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = re.compile(rf"^\.?{re.escape(prefix)}-\d+\.tar(\.tmp(-\d+-[0-9a-f]+)?)?$")  # shards, temporary ones too
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
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
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
        max_image_pixels: images with more pixels (header size) are skipped as `bad_image`, never decoded; 0: no
            limit (training's `data.max_image_pixels`).

    Returns:
        The statistics written to `_stats.json`.
    """
    _check_options(samples_per_shard, max_shard_bytes, resize, quality, workers, max_image_pixels)
    start = time.perf_counter()
    out_dir = Path(out_dir).expanduser()
    _prepare_out_dir(out_dir, prefix, overwrite)
    key_width = max(9, len(str(len(samples) - 1)))
    pattern = str(out_dir / f"{prefix}-").replace("%", "%%") + "%06d.tar"  # a '%' in a name is a plain character
    sink = ShardSink(pattern, samples_per_shard, max_shard_bytes, exact_bytes=True, mtime=_TAR_MTIME)
    failures: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    resized = reencoded = 0
    encode = partial(_encode, resize=resize, quality=quality, key_width=key_width, max_pixels=max_image_pixels)
    with sink, tqdm(total=len(samples), unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for result in _encoded(samples, encode, workers):
            bar.update()
            if result.sample is None:
                failures[result.reason] += 1
                shown = examples.setdefault(result.reason, [])
                if len(shown) < _EXAMPLES_PER_REASON:
                    shown.append(result.where)
                continue
            sink.write(result.sample)
            resized += result.resized
            reencoded += result.reencoded
    paths = sink.paths
    if classnames is not None:
        write_atomic(out_dir / CLASSNAMES_FILE, "".join(f"{name}\n" for name in classnames))
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
                    "resize": resize, "quality": quality, "workers": workers, "max_image_pixels": max_image_pixels},
        "seconds": round(seconds, 3),
        "samples_per_s": round(written / seconds, 1) if seconds > 0 else None,
    }
    write_atomic(out_dir / STATS_FILE, json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats


def _check_options(samples_per_shard: int, max_shard_bytes: int | None, resize: int | None, quality: int,
                   workers: int, max_image_pixels: int = 0) -> None:
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
    if max_image_pixels < 0:
        raise ShardInputError(f"max image pixels must be >= 0 (0 = no limit), got {max_image_pixels}")


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


def main(argv: Sequence[str] | None = None) -> None:
    """`clipalign-make-shards`: WebDataset shards from a captioned folder, a table, or an ImageFolder."""
    parser = make_shards_parser()
    args = parser.parse_args(argv)
    try:
        samples, classnames, info = _samples_from_args(args)
        stats = make_shards(samples, args.out, prefix=args.prefix, samples_per_shard=args.samples_per_shard,
                            max_shard_bytes=args.max_shard_bytes, resize=args.resize, quality=args.quality,
                            workers=args.workers, overwrite=args.overwrite, classnames=classnames, input_info=info,
                            progress=not args.no_progress and sys.stderr.isatty(),
                            max_image_pixels=args.max_image_pixels)
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
    info.update(templates=caption_templates(Path(args.src).expanduser(), templates or None), classes=len(classnames))
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
