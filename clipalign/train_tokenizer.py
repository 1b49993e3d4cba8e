"""Train a SentencePiece tokenizer on your captions: WebDataset shards, text files or CSV/TSV/parquet tables.

    clipalign-train-tokenizer --data "/data/cc3m/{00000..00331}.tar" --output tok.model
    clipalign-train-tokenizer --data "captions.txt::more.tsv" --output tok.model --vocab-size 16000 --model-type bpe

`--data` is a spec as `data.train` takes it: brace patterns, sources joined by `::`. A file ending in `.txt` holds one
caption a line; `.csv`, `.tsv`, `.tab`, `.parquet` or `.pq` is a table whose `--caption-key` column holds the captions
(read by `clipalign.data.sources.open_table`; parquet needs pyarrow); anything else is a shard, whose samples give
every caption of a `KEY.json` `"captions"` list, else their captions by `clipalign.data.sample.sample_captions` (the
`KEY.txt`, else the JSON `"caption"`). Images are never decoded. Captions are cleaned as `SentencePieceTokenizer`
cleans them before encoding.

Writes `OUTPUT` (e.g. `tok.model`) and the sidecar `tok.json` (sizes, captions used, sources, skip counts, token
statistics). Load the model with `clipalign.tokenizer.load_tokenizer("tok.model")`.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import webdataset as wds

from clipalign.cli import MODEL_TYPES, train_tokenizer_parser
from clipalign.data.sample import listed_captions, sample_captions, sample_json
from clipalign.data.shards import SkipCounter, expand_urls, shard_samples
from clipalign.data.sources import open_table, table_format_of
from clipalign.layout import write_atomic
from clipalign.tokenizer import DEFAULT_CONTEXT_LENGTH, clean_text

TEXT_SUFFIX = ".txt"
STATS_CAPTIONS = 10_000  # captions kept (reservoir-sampled) to measure tokens per caption after training

_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_sentencepiece(
    sources: str,
    output: str | os.PathLike,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    max_samples: int = 1_000_000,
    character_coverage: float = 0.9995,
    seed: int = 0,
    caption_key: str = "caption",
) -> dict[str, Any]:
    """Train a SentencePiece model on the captions of `sources` and write it to `output` with a JSON sidecar.

    The files of `sources` are read in an order shuffled by `seed`, so a run capped by `max_samples` draws on every
    source of a `::` list. Captions are streamed into the trainer (which holds them in memory, as it must); no copy
    goes to disk. SentencePiece's own pad/BOS/EOS are off (`SentencePieceTokenizer` adds padding, SOT and EOT), byte
    fallback is on (no character is ever unknown), text is NFKC-normalised, and a corpus too small for `vocab_size`
    gives a smaller vocabulary rather than an error.

    Args:
        sources: a shard spec (see `clipalign.data.shards.expand_urls`) over shards, `.txt` and `.csv`/`.tsv` files.
        output: the model file to write; must end in `.model`. The sidecar is the same path ending in `.json`.
        vocab_size: pieces wanted (the text tower's vocabulary is 3 more: padding, SOT, EOT). With byte fallback it
            must exceed 256 plus the number of distinct characters kept by `character_coverage`.
        model_type: `unigram` or `bpe`.
        max_samples: the most captions to train on.
        character_coverage: share of the characters seen that get their own piece; the rarest rest become bytes.
        seed: order of the files and SentencePiece's random generator.
        caption_key: the caption column of CSV/TSV sources.

    Returns:
        The summary also written to the sidecar: `vocab_size` (for the text tower), `pieces`, `captions`,
        `skipped` (count by reason: `bad_text`, `no_caption`, `unreadable_tar`), `mean_tokens` and
        `truncated_fraction` (at 77 ids, over up to 10,000 sampled captions), an `example` caption and its pieces,
        sources and settings, plus `output`, `sidecar` and `seconds`.

    Raises:
        FileNotFoundError: a local file of `sources` is missing (named).
        ValueError: an empty spec, bad settings, a table without the caption column, no usable caption, or a
            vocabulary too small for the characters of the captions.
    """
    output = Path(output).expanduser()
    _check_settings(output, vocab_size, model_type, max_samples, character_coverage)
    if not sources or not sources.strip():
        raise ValueError("no tokenizer training data: give a spec such as /data/cc3m/{00000..00331}.tar")
    urls = expand_urls(sources)
    _check_tables(urls, caption_key)
    random.Random(seed).shuffle(urls)
    start = time.perf_counter()
    counter = SkipCounter()
    used = 0
    stats_sample: list[str] = []
    stats_rng = random.Random(seed)
    failure: list[Exception] = []

    def sentences() -> Iterator[str]:
        nonlocal used
        try:
            for caption in itertools.islice(_read_captions(urls, counter, caption_key), max_samples):
                used += 1
                _reservoir_add(stats_sample, caption, used, stats_rng)
                yield caption
        except Exception as e:  # SentencePiece turns it into a RuntimeError holding only its text; keep the original
            failure.append(e)
            raise

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, pad_id=-1, bos_id=-1, eos_id=-1, unk_id=0, byte_fallback=True,
            normalization_rule_name="nmt_nfkc", hard_vocab_limit=False, minloglevel=1)
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        if used == 0:
            skipped = counter.take() or "none"
            raise ValueError(f"no usable caption in {sources!r} ({len(urls)} files; skipped: {skipped})") from e
        raise ValueError(_training_error(str(e), vocab_size, character_coverage, used)) from e

    write_atomic(output, model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    lengths = [len(ids) for ids in processor.encode(stats_sample)]
    example = stats_sample[0]
    summary: dict[str, Any] = {
        "vocab_size": processor.vocab_size() + 3,
        "pieces": processor.vocab_size(),
        "vocab_size_requested": vocab_size,
        "model_type": model_type,
        "captions": used,
        "skipped": counter.take(),
        "sources": sources,
        "files": len(urls),
        "max_samples": max_samples,
        "character_coverage": character_coverage,
        "seed": seed,
        "context_length": DEFAULT_CONTEXT_LENGTH,
        "stats_captions": len(lengths),
        "mean_tokens": sum(lengths) / len(lengths),
        "truncated_fraction": sum(n + 2 > DEFAULT_CONTEXT_LENGTH for n in lengths) / len(lengths),
        "example": {"caption": example, "pieces": processor.encode(example, out_type=str)},
        "sentencepiece_version": spm.__version__,
    }
    sidecar = output.with_suffix(".json")
    write_atomic(sidecar, (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return {**summary, "output": str(output), "sidecar": str(sidecar), "seconds": time.perf_counter() - start}


def _read_captions(urls: Sequence[str], counter: SkipCounter, caption_key: str = "caption") -> Iterator[str]:
    """Cleaned, non-empty captions of every file in `urls`, in order; unusable ones are skipped and counted.

    Raises:
        ValueError: a CSV/TSV file has no `caption_key` column.
    """
    for url in urls:
        suffix = Path(url).suffix.lower()
        if suffix == TEXT_SUFFIX:
            captions = _text_file_captions(url, counter)
        elif table_format_of(url) is not None:
            captions = _table_captions(url, caption_key, counter)
        else:
            captions = _shard_captions(url, counter)
        for caption in captions:
            caption = clean_text(caption)
            if caption:
                yield caption
            else:
                counter.skip("no_caption")


def _sample_captions(sample: dict[str, Any]) -> list[str]:
    """Every caption of a raw shard sample: a `.json` `"captions"` list whole, else `sample_captions`.

    Raises:
        UnicodeDecodeError, ValueError: undecodable text or JSON where the caption has to come from.
    """
    try:
        listed = listed_captions(sample_json(sample))
    except ValueError:  # also UnicodeDecodeError; a good `.txt` may still stand, which sample_captions decides
        listed = []
    return listed or sample_captions(sample)


def _shard_captions(url: str, counter: SkipCounter) -> Iterator[str]:
    # every member is read (a tar stream passes over the images anyway) so that captionless samples are counted
    for sample in shard_samples([url], lambda _, __: counter.skip("unreadable_tar")):
        try:
            captions = _sample_captions(sample)
        except ValueError:  # UnicodeDecodeError included
            counter.skip("bad_text")
            continue
        if not captions:
            counter.skip("no_caption")
        yield from captions


def _text_file_captions(url: str, counter: SkipCounter) -> Iterator[str]:
    with wds.gopen(url, "rb") as f:
        for line in f:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                counter.skip("bad_text")
                continue
            if text.strip():  # blank lines separate, they are not captions
                yield text


def _table_captions(url: str, caption_key: str, counter: SkipCounter) -> Iterator[str]:
    # undecodable bytes survive as surrogates, so one bad row is skipped rather than the whole file
    with open_table(url, table_format_of(url), [caption_key], errors="surrogateescape") as (header, rows):
        column = _caption_column(url, header, caption_key)
        for row in rows:
            cell = row[column] if column < len(row) else None
            caption = "" if cell is None else str(cell)
            try:
                caption.encode("utf-8")
            except UnicodeEncodeError:
                counter.skip("bad_text")
                continue
            if caption.strip():
                yield caption
            else:
                counter.skip("no_caption")


def _caption_column(url: str, header: list[str] | None, caption_key: str) -> int:
    """Where the caption column is; ValueError naming the table when it has no `caption_key` column."""
    if caption_key not in (header or []):
        raise ValueError(f"table {url} has no caption column {caption_key!r}; its columns are "
                         f"{header or []} (choose one with --caption-key)")
    return header.index(caption_key)


def _check_tables(urls: Sequence[str], caption_key: str) -> None:
    """Fail before training, not after reading the shards listed first, when a table lacks the caption column."""
    for url in urls:
        if table_format_of(url) is not None:
            with open_table(url, table_format_of(url), [caption_key]) as (header, _):
                _caption_column(url, header, caption_key)


def _reservoir_add(sample: list[str], item: str, seen: int, rng: random.Random) -> None:
    """Keep `sample` a uniform draw of at most STATS_CAPTIONS of the `seen` items so far (`item` is the last)."""
    if len(sample) < STATS_CAPTIONS:
        sample.append(item)
    else:
        slot = rng.randrange(seen)
        if slot < STATS_CAPTIONS:
            sample[slot] = item


def _check_settings(output: Path, vocab_size: int, model_type: str, max_samples: int,
                    character_coverage: float) -> None:
    if output.suffix != ".model":
        raise ValueError(f"output {output} must end in .model (load_tokenizer recognises tokenizers by it)")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not one of {MODEL_TYPES}")
    if vocab_size < 1 or max_samples < 1:
        raise ValueError(f"vocab_size and max_samples must be >= 1, got {vocab_size} and {max_samples}")
    if not 0 < character_coverage <= 1:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")


def _training_error(message: str, vocab_size: int, character_coverage: float, captions: int) -> str:
    too_small = _TOO_SMALL.search(message)
    if too_small:
        needed = int(too_small.group(2))
        return (f"vocab_size {vocab_size} is too small for these {captions} captions: their characters (at "
                f"character_coverage {character_coverage}) plus the 256 byte-fallback pieces and <unk> need {needed}; "
                f"raise vocab_size to at least {needed} or lower character_coverage")
    return f"SentencePiece training on {captions} captions failed: {message}"


def main(argv: Sequence[str] | None = None) -> None:
    """`clipalign-train-tokenizer`: train a SentencePiece tokenizer and print what it learned."""
    parser = train_tokenizer_parser()
    args = parser.parse_args(argv)
    try:
        summary = train_sentencepiece(args.data, args.output, vocab_size=args.vocab_size, model_type=args.model_type,
                                      max_samples=args.max_samples, character_coverage=args.character_coverage,
                                      seed=args.seed, caption_key=args.caption_key)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    files = f"{summary['files']} file{'' if summary['files'] == 1 else 's'}"
    print(f"trained a {summary['model_type']} tokenizer on {summary['captions']:,} captions from {files} "
          f"in {summary['seconds']:.1f} s")
    print(f"  pieces: {summary['pieces']:,} (asked for {summary['vocab_size_requested']:,}); text tower vocab_size: "
          f"{summary['vocab_size']:,} (with padding, SOT and EOT)")
    skipped = ", ".join(f"{reason} {count:,}" for reason, count in sorted(summary["skipped"].items()))
    print(f"  skipped: {skipped or 'none'}")
    print(f"  tokens per caption: mean {summary['mean_tokens']:.1f}; truncated at {summary['context_length']}: "
          f"{summary['truncated_fraction']:.2%} (over {summary['stats_captions']:,} sampled captions)")
    print(f"  e.g. {summary['example']['caption']!r} -> {' '.join(summary['example']['pieces'])}")
    print(f"wrote {summary['output']} and {summary['sidecar']}")
    print(f"use it with: model.tokenizer={summary['output']}")


if __name__ == "__main__":
    main()
