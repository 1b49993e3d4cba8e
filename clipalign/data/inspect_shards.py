"""Look inside WebDataset shards before training on them: counts, keys, image sizes, captions and bad samples.

    clipalign-inspect-shards '/data/cc3m/{00000..00331}.tar' --limit 10000
    clipalign-inspect-shards 'shards/a-{0..9}.tar::shards/b-{0..4}.tar' --json report.json

A sample is judged by the training pipeline's own rules (`clipalign.data.sample`) and in its order: no image file
(`no_image`), undecodable `.txt`/`.json` (`bad_text`), no non-empty caption (`no_caption`), an image that does not
decode (`bad_image`). So the counts here are the ones training would report in `metrics.jsonl` under `skipped`.
Tar files that cannot be read to the end are listed with their error.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from clipalign.data.sample import caption_of, image_bytes
from clipalign.data.shards import expand_urls, shard_samples
from clipalign.data.transforms import decode_image
from clipalign.layout import write_atomic

_EXAMPLES_PER_REASON = 5


class _ShardReport:
    """Running totals over the samples of all shards read."""

    def __init__(self, examples: int, seed: int):
        self.examples = examples
        self.rng = random.Random(seed)  # caption_of draws one of several captions; seeded, the report is repeatable
        self.samples = 0
        self.extensions: Counter[str] = Counter()
        self.widths: list[int] = []
        self.heights: list[int] = []
        self.formats: Counter[str] = Counter()
        self.chars: list[int] = []
        self.words: list[int] = []
        self.captions: list[dict[str, str]] = []
        self.bad: Counter[str] = Counter()
        self.bad_examples: dict[str, list[str]] = {}

    def add(self, sample: dict[str, Any], shard: str) -> None:
        """Count one raw sample (bytes values) by the training pipeline's rules."""
        self.samples += 1
        self.extensions.update(k for k in sample if not k.startswith("__"))
        reason, image, caption = self._judge(sample)
        if reason is not None:
            self.bad[reason] += 1
            shown = self.bad_examples.setdefault(reason, [])
            if len(shown) < _EXAMPLES_PER_REASON:
                shown.append(f"{shard}:{sample['__key__']}")
            return
        fmt, (width, height) = image
        self.formats[fmt] += 1
        self.widths.append(width)
        self.heights.append(height)
        self.chars.append(len(caption))
        self.words.append(len(caption.split()))
        if len(self.captions) < self.examples:
            self.captions.append({"key": sample["__key__"], "caption": caption})

    def _judge(self, sample: dict[str, Any]) -> tuple[str | None, Any, str | None]:
        """(skip reason or None, (format, size), caption), checked in `decode_samples`' order."""
        data = image_bytes(sample)
        if data is None:
            return "no_image", None, None
        try:
            caption = caption_of(sample, self.rng)
        except (UnicodeDecodeError, ValueError):
            return "bad_text", None, None
        if caption is None:
            return "no_caption", None, None
        try:
            with Image.open(io.BytesIO(data)) as probe:
                image = (probe.format or "unknown", probe.size)
            decode_image(data)
        except Exception:  # PIL raises many types, as in the training pipeline
            return "bad_image", None, None
        return None, image, caption


def inspect_shards(spec: str, limit: int | None = None, examples: int = 5, progress: bool = False,
                   seed: int = 0) -> dict[str, Any]:
    """A report on the shards of `spec` (brace patterns, `::` between sources, as `data.train`).

    Args:
        spec: the shard pattern.
        limit: stop after this many samples (a quick look); None: read everything.
        examples: how many captions to show.
        progress: show a progress bar.
        seed: picks among several captions of a sample, as training does.

    Returns:
        A JSON-ready dict: shards and samples per shard, extensions and how many samples carry each, image size
        and format counts, caption lengths, example captions, bad samples by reason with examples, tar errors.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    start = time.perf_counter()
    urls = expand_urls(spec)
    report = _ShardReport(examples, seed)
    shards: list[dict[str, Any]] = []
    tar_errors: list[dict[str, str]] = []
    with tqdm(unit="sample", disable=not progress, dynamic_ncols=True) as bar:
        for url in urls:
            if limit is not None and report.samples >= limit:
                break
            errors: list[str] = []
            count, complete = 0, True
            for sample in shard_samples([url], functools.partial(_record, errors)):
                if limit is not None and report.samples >= limit:
                    complete = False
                    break
                report.add(sample, url)
                count += 1
                bar.update()
            shards.append({"shard": url, "samples": count, **({} if complete else {"partial": True})})
            if errors:  # a read ends at its first error: one per broken shard
                tar_errors.append({"shard": url, "error": errors[0]})
    counts = [s["samples"] for s in shards if not s.get("partial")]
    return {
        "pattern": spec,
        "shards_total": len(urls),
        "shards_read": len(shards),
        "limit": limit,
        "samples": report.samples,
        "good_samples": report.samples - sum(report.bad.values()),
        "samples_per_shard": _summary(counts, percentiles=False),
        "extensions": dict(sorted(report.extensions.items())),
        "images": {"width": _summary(report.widths, percentiles=False),
                   "height": _summary(report.heights, percentiles=False),
                   "formats": dict(report.formats.most_common())},
        "captions": {"chars": _summary(report.chars), "words": _summary(report.words), "examples": report.captions},
        "bad_samples": {r: {"count": report.bad[r], "examples": report.bad_examples[r]} for r in sorted(report.bad)},
        "bad_total": sum(report.bad.values()),
        "tar_errors": tar_errors,
        "shards": shards,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _record(errors: list[str], url: str, message: str) -> None:
    errors.append(message)


def _summary(values: Sequence[int], percentiles: bool = True) -> dict[str, float] | None:
    """min / median (/ p95) / max of `values`; None when there are none."""
    if not values:
        return None
    arr = np.asarray(values)
    out = {"min": int(arr.min()), "median": float(np.median(arr))}
    if percentiles:
        out["p95"] = float(np.percentile(arr, 95))
    out["max"] = int(arr.max())
    return out


def format_report(report: dict[str, Any]) -> str:
    """The report as a readable table."""
    lines = [f"pattern       {report['pattern']}"]
    partial = " (stopped at --limit)" if any(s.get("partial") for s in report["shards"]) else ""
    lines.append(f"shards        {report['shards_read']} read of {report['shards_total']}{partial}")
    lines.append(f"samples       {report['samples']} ({report['good_samples']} usable, {report['bad_total']} bad)")
    lines.append(f"per shard     {_fmt_summary(report['samples_per_shard'])}")
    total = max(report["samples"], 1)
    lines.append("extensions    " + ", ".join(f"{ext} {n} ({100 * n / total:.0f}%)"
                                              for ext, n in report["extensions"].items()))
    images = report["images"]
    lines.append(f"image width   {_fmt_summary(images['width'])}")
    lines.append(f"image height  {_fmt_summary(images['height'])}")
    lines.append("formats       " + ", ".join(f"{fmt} {n}" for fmt, n in images["formats"].items()))
    captions = report["captions"]
    lines.append(f"caption chars {_fmt_summary(captions['chars'])}")
    lines.append(f"caption words {_fmt_summary(captions['words'])}")
    if captions["examples"]:
        lines.append("examples")
        lines.extend(f"  {c['key']}  {c['caption'][:100]!r}" for c in captions["examples"])
    if report["bad_samples"]:
        lines.append("bad samples (skipped by training)")
        for reason, bad in report["bad_samples"].items():
            lines.append(f"  {reason:<12}{bad['count']:>8}   e.g. {', '.join(bad['examples'][:3])}")
    if report["tar_errors"]:
        lines.append("unreadable or truncated tar files")
        lines.extend(f"  {e['shard']}: {e['error']}" for e in report["tar_errors"])
    return "\n".join(lines)


def _fmt_summary(summary: dict[str, float] | None) -> str:
    if summary is None:
        return "-"
    return " / ".join(f"{k} {v:g}" for k, v in summary.items())


def main(argv: Sequence[str] | None = None) -> None:
    """`clipalign-inspect-shards`: report on the samples of WebDataset shards."""
    parser = argparse.ArgumentParser(prog="clipalign-inspect-shards", description=__doc__.split("\n\n")[0],
                                     epilog="See docs/data.md.")
    parser.add_argument("pattern", help="shard pattern as for data.train: brace ranges, '::' between sources; quote it")
    parser.add_argument("--limit", type=int, metavar="N", help="stop after N samples (default: read everything)")
    parser.add_argument("--json", metavar="OUT", help="also write the report to OUT as JSON")
    parser.add_argument("--examples", type=int, default=5, metavar="N", help="example captions to show (default: 5)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        report = inspect_shards(args.pattern, limit=args.limit, examples=args.examples,
                                progress=not args.no_progress and sys.stderr.isatty())
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(format_report(report))
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
