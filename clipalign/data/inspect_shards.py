"""Look inside WebDataset shards before training on them: counts, keys, image sizes, captions and bad samples.

    clipalign-inspect-shards '/data/cc3m/{00000..00331}.tar' --limit 10000
    clipalign-inspect-shards 'shards/a-{0..9}.tar::shards/b-{0..4}.tar' --json report.json

A sample is judged by the training pipeline's own rules (`clipalign.data.sample`) and in its order: no image file
(`no_image`), undecodable `.txt`/`.json` (`bad_text`), no non-empty caption (`no_caption`), an image that does not
decode (`bad_image`). So the counts here are the ones training would report in `metrics.jsonl` under `skipped`.
Tar files that cannot be read to the end are listed with their error.

With the curation settings (`--keep`, `--keep-id`, `--keep-probability`, `--min-score`, as `data.keep` ...), each
sample is first judged by training's filter (`clipalign.data.curation.SampleFilter`), with the probability draw of
the first pass of an exact-pass run with `train.seed=--seed`; the report gives each filter's yield (samples seen
and kept) and the filtered samples by reason, and judges only the kept ones further.
"""

from __future__ import annotations

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
import yaml
from PIL import Image
from tqdm import tqdm

from clipalign.cli import inspect_shards_parser
from clipalign.config import check_caption_sources
from clipalign.data.curation import SampleFilter, stream_sample_seed
from clipalign.data.sample import caption_of, draw_caption, image_bytes
from clipalign.data.shards import expand_urls, shard_samples
from clipalign.data.transforms import decode_image
from clipalign.layout import write_atomic

_EXAMPLES_PER_REASON = 5


class _ShardReport:
    """Running totals over the samples of all shards read."""

    def __init__(self, examples: int, seed: int, captions: dict[str, float] | None = None):
        self.examples = examples
        self.rng = random.Random(seed)  # caption_of draws one of several captions; seeded, the report is repeatable
        self.caption_sources = captions or None  # data.captions: {source: weight}; None: the default rule
        self.sources: Counter[str] = Counter()  # usable samples by the caption source drawn (with caption_sources)
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
        reason, image, caption, source = self._judge(sample)
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
        if source is not None:
            self.sources[source] += 1
        if len(self.captions) < self.examples:
            self.captions.append({"key": sample["__key__"], "caption": caption})

    def _judge(self, sample: dict[str, Any]) -> tuple[str | None, Any, str | None, str | None]:
        """(skip reason or None, (format, size), caption, its caption source or None), checked in `decode_samples`'
        order."""
        data = image_bytes(sample)
        if data is None:
            return "no_image", None, None, None
        source = None
        try:
            if self.caption_sources:
                drawn = draw_caption(sample, self.rng, self.caption_sources)
                source, caption = drawn if drawn is not None else (None, None)
            else:
                caption = caption_of(sample, self.rng)
        except (UnicodeDecodeError, ValueError):
            return "bad_text", None, None, None
        if caption is None:
            return "no_caption", None, None, None
        try:
            with Image.open(io.BytesIO(data)) as probe:
                image = (probe.format or "unknown", probe.size)
            decode_image(data)
        except Exception:  # PIL raises many types, as in the training pipeline
            return "bad_image", None, None, None
        return None, image, caption, source


def inspect_shards(spec: str, limit: int | None = None, examples: int = 5, progress: bool = False,
                   seed: int = 0, captions: dict[str, float] | None = None,
                   curation: SampleFilter | None = None) -> dict[str, Any]:
    """A report on the shards of `spec` (brace patterns, `::` between sources, as `data.train`).

    Args:
        spec: the shard pattern.
        limit: stop after this many samples (a quick look); None: read everything.
        examples: how many captions to show.
        progress: show a progress bar.
        seed: picks among several captions of a sample, as training does.
        captions: caption sources and weights, as `data.captions`; the report then counts the source drawn.
        curation: the curation settings' filter (`SampleFilter`, as data.keep ...), its draws seeded as training's
            first exact pass with `seed`; the report then has `filters` (per filter: seen, kept), `filtered` (by
            reason) and `yield` (samples kept by all filters, of those read).

    Returns:
        A JSON-ready dict: shards and samples per shard, extensions and how many samples carry each, image size
        and format counts, caption lengths, example captions (with `captions`: usable samples by the caption
        source drawn), bad samples by reason with examples, tar errors.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    start = time.perf_counter()
    urls = expand_urls(spec)
    report = _ShardReport(examples, seed, check_caption_sources(captions) if captions else None)
    shards: list[dict[str, Any]] = []
    tar_errors: list[dict[str, str]] = []
    filtered: Counter[str] = Counter()  # samples the curation settings filtered out, by reason
    if curation is not None:
        curation.reset_stats()
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
                # curation first, as training filters before decoding; the stream's seed of pass 0
                why = None if curation is None else curation(sample, stream_sample_seed(seed, 0, sample["__key__"]))
                if why is None:
                    report.add(sample, url)
                else:
                    report.samples += 1
                    filtered[why] += 1
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
        "good_samples": report.samples - sum(report.bad.values()) - sum(filtered.values()),
        "samples_per_shard": _summary(counts, percentiles=False),
        "extensions": dict(sorted(report.extensions.items())),
        "images": {"width": _summary(report.widths, percentiles=False),
                   "height": _summary(report.heights, percentiles=False),
                   "formats": dict(report.formats.most_common())},
        "captions": {"chars": _summary(report.chars), "words": _summary(report.words), "examples": report.captions,
                     **({"sources": {name: report.sources[name] for name in report.caption_sources}}
                        if report.caption_sources else {})},
        "bad_samples": {r: {"count": report.bad[r], "examples": report.bad_examples[r]} for r in sorted(report.bad)},
        "bad_total": sum(report.bad.values()),
        "tar_errors": tar_errors,
        "shards": shards,
        **(_curation_report(curation, filtered, report.samples) if curation is not None else {}),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _curation_report(curation: SampleFilter, filtered: Counter[str], samples: int) -> dict[str, Any]:
    """What the curation settings keep: per filter the samples it saw and kept, the filtered ones by reason, and
    the yield (kept by every filter, of the samples read)."""
    kept = samples - sum(filtered.values())
    return {"filters": curation.report(), "filtered": dict(sorted(filtered.items())),
            "yield": {"samples": samples, "kept": kept, "fraction": round(kept / samples, 6) if samples else None}}


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
    filtered = f", {sum(report['filtered'].values())} filtered" if "filtered" in report else ""
    lines.append(f"samples       {report['samples']} ({report['good_samples']} usable, {report['bad_total']} bad"
                 f"{filtered})")
    if "filters" in report:  # curation: each filter's yield, then all of them together
        for name, counts in report["filters"].items():
            share = f" ({100 * counts['kept'] / counts['seen']:.1f}%)" if counts["seen"] else ""
            lines.append(f"{name:<14}{counts['seen']} -> {counts['kept']}{share}")
        kept = report["yield"]
        share = f" ({100 * kept['fraction']:.1f}%)" if kept["fraction"] is not None else ""
        lines.append(f"yield         {kept['kept']} of {kept['samples']}{share}; filtered: "
                     + (", ".join(f"{r} {n}" for r, n in report["filtered"].items()) or "none"))
    lines.append(f"per shard     {_fmt_summary(report['samples_per_shard'])}")
    # the counts below describe the samples the filters kept: their shares are of those, not of every sample read
    total = max(report["samples"] - sum(report.get("filtered", {}).values()), 1)
    lines.append("extensions    " + ", ".join(f"{ext} {n} ({100 * n / total:.0f}%)"
                                              for ext, n in report["extensions"].items()))
    images = report["images"]
    lines.append(f"image width   {_fmt_summary(images['width'])}")
    lines.append(f"image height  {_fmt_summary(images['height'])}")
    lines.append("formats       " + ", ".join(f"{fmt} {n}" for fmt, n in images["formats"].items()))
    captions = report["captions"]
    lines.append(f"caption chars {_fmt_summary(captions['chars'])}")
    lines.append(f"caption words {_fmt_summary(captions['words'])}")
    if "sources" in captions:
        drawn = max(sum(captions["sources"].values()), 1)
        lines.append("caption from  " + ", ".join(f"{name} {n} ({100 * n / drawn:.1f}%)"
                                                  for name, n in captions["sources"].items()))
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
    parser = inspect_shards_parser()
    args = parser.parse_args(argv)
    try:
        captions = _caption_sources(args.captions) if args.captions else None
        curation = (SampleFilter(args.keep, args.keep_id, args.keep_probability, args.min_score)
                    if args.keep or args.keep_probability or args.min_score else None)
        report = inspect_shards(args.pattern, limit=args.limit, examples=args.examples,
                                progress=not args.no_progress and sys.stderr.isatty(), captions=captions,
                                seed=args.seed, curation=curation)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(format_report(report))
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def _caption_sources(text: str) -> dict[str, float]:
    """`--captions`, read as YAML (as a `data.captions=...` override is) and checked as data.captions is."""
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"--captions is not valid YAML: {e}") from None
    try:
        return check_caption_sources(mapping)
    except ValueError as e:
        raise ValueError(f"--captions: {e}") from None


if __name__ == "__main__":
    main()
