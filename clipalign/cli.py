"""The console scripts' command lines, built without importing torch, so that `--help` and a usage error come at once.

Each slow console script has its parser here (`zeroshot_parser`, ...), with the choices and defaults it names, and an
entry function (`zeroshot`, ...) that setup.cfg points the script at: it parses `sys.argv` with the parser first,
then imports the module that does the work (torch, open_clip, webdataset, ...) and runs its `main`, which builds the
same parser. `python -m clipalign.evaluate` and the other modules' `main(argv)` work as before.

This module imports the standard library and light clipalign modules only (`clipalign.config`, `clipalign.layout`,
`clipalign.data.sample`); tests/test_cli.py checks that `--help` imports none of the heavy ones.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import math
import re
from pathlib import Path

from clipalign.config import (
    DEFAULT_MAX_IMAGE_PIXELS,
    EXPORT_FORMATS,
    KEEP_ID_CHOICES,
    TABLE_SEPARATORS,
    describe_keys,
)
from clipalign.data.sample import BUILTIN_SETS, CLASSNAMES_FILE, DEFAULT_TEMPLATE, TEMPLATES_FILE
from clipalign.layout import IMAGE_ONNX, TEXT_ONNX

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # clipalign-wiseft: the mixing ratios scored
DEFAULT_CHOICE = "mean"  # clipalign-wiseft --choose: the mean of the sets' main scores picks the mix
ONNX_EXPORTERS = ("auto", "dynamo", "torchscript")  # clipalign.export: the torch.onnx paths
MODEL_TYPES = ("unigram", "bpe")  # clipalign.train_tokenizer: the SentencePiece model types
MODALITIES = ("image", "text")  # clipalign.embed: what a corpus is embedded as
DEFAULT_PART_SIZE = 10_000  # samples per part of a folder or table: a resume redoes at most this many per process
EMBED_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # clipalign-embed --precision
EMBED_DECODES = ("draft", "full")  # clipalign-embed --decode

_PACKAGE = Path(__file__).resolve().parent


def _doc(module: str, function: str | None = None) -> str:
    """The docstring of a module of this package (its path in the package, e.g. `data/make_shards.py`), or of one of
    its top-level functions, read from the source: importing the module would import torch."""
    tree = ast.parse((_PACKAGE / module).read_text(encoding="utf-8"))
    if function is not None:
        tree = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function)
    return ast.get_docstring(tree, clean=False)


def _run(parser: argparse.ArgumentParser, module: str) -> None:
    """A console script: `--help` and usage errors from the light parser, then the module's `main` (which parses
    `sys.argv` again, with the same parser)."""
    parser.parse_args()
    importlib.import_module(module).main()


# ---- argparse types ----------------------------------------------------------------------------------------------


def parse_pixel_limit(text: str) -> int:
    """argparse type of a command line's --max-image-pixels: an integer >= 0 (underscores allowed: 89_478_485)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = no limit), got {value}")
    return value


def parse_bytes(text: str) -> int:
    """A byte count such as `500000000`, `500MB`, `1.5GB` (powers of 1000) or `512MiB`, `1GiB` (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if m is None or (m[3] and not m[2]):
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count such as 1000000, 500MB or 1GiB")
    power = " KMGT".index(m[2] or " ")
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)


def parse_alpha(text: str) -> float:
    """argparse type of a mixing ratio: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text}: a mixing ratio is in [0, 1] (0: the start, 1: the fine-tuned model)")
    return value


# ---- clipalign-train ---------------------------------------------------------------------------------------------


def train_parser() -> argparse.ArgumentParser:
    epilog = ("Overrides are section.key=value, e.g. train.steps=100 optim.lr=1e-3\n\n"
              "Recipe keys as section.key=default (values are checked against their ranges before anything starts):\n\n"
              + describe_keys())
    parser = argparse.ArgumentParser(prog="clipalign-train", description=_doc("train.py").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    parser.add_argument("recipe", help="YAML recipe (sections data, model, loss, optim, train, eval, export)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def train() -> None:
    """`clipalign-train` (`clipalign.train.main`)."""
    _run(train_parser(), "clipalign.train")


# ---- clipalign-zeroshot ------------------------------------------------------------------------------------------


def zeroshot_parser(default_device: str | None = None) -> argparse.ArgumentParser:
    """`default_device`: the --device default (`clipalign.evaluate.main` gives cuda where there is a GPU, else cpu)."""
    parser = argparse.ArgumentParser(prog="clipalign-zeroshot", description=_doc("evaluate.py", "main"))
    parser.add_argument("--model", required=True, help="checkpoint directory, run directory (latest checkpoint) "
                                                       "or export directory")
    parser.add_argument("--data", help="classification: an ImageFolder root, WebDataset shards with a label per "
                                       "sample (e.g. 'test/{0..3}.tar'), or a CSV/TSV of (image path, label) rows")
    parser.add_argument("--dataset", choices=BUILTIN_SETS,
                        help="use the built-in class names and templates of this data set (CLIP's published ones)")
    parser.add_argument("--classnames", help=f"file with one class name per line in label order, or a built-in set "
                                             f"({', '.join(BUILTIN_SETS)}) (default: {CLASSNAMES_FILE} beside the "
                                             f"data, else an ImageFolder's folder names)")
    parser.add_argument("--templates", help=f"file with one prompt template per line, '{{}}' for the class name, or a "
                                            f"built-in set (default: {TEMPLATES_FILE} beside the data, else a "
                                            f"small general set)")
    parser.add_argument("--label-key", default="cls", help="shards: the member holding each sample's label (else "
                                                           "the JSON field 'label')")
    parser.add_argument("--csv-label-key", default="label", help="classification CSV column of labels (class "
                                                                  "index or class name)")
    parser.add_argument("--confusion", action="store_true", help="classification: add the confusion matrix to --output")
    parser.add_argument("--confusion-png", help="classification: draw the confusion matrix into this PNG")
    parser.add_argument("--retrieval", help="retrieval: a CSV/TSV with one row per (image, caption) pair, or "
                                            "WebDataset shards with one or many captions per image")
    parser.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths")
    parser.add_argument("--csv-caption-key", default="caption", help="retrieval CSV column of captions")
    parser.add_argument("--table-format", choices=tuple(TABLE_SEPARATORS),
                        help="how a --data/--retrieval table separates its columns: csv (commas) or tsv (tabs); "
                             "default: from the extension (.tsv: tabs, else commas)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast precision of the towers (bf16 on GPUs halves the time)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--max-image-pixels", type=parse_pixel_limit, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                        help=f"skip (and count as bad_image) images with more pixels than this, read from their "
                             f"header before decoding; 0 = no limit (default: {DEFAULT_MAX_IMAGE_PIXELS}, Pillow's)")
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--output", help="write the results here as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def zeroshot() -> None:
    """`clipalign-zeroshot` (`clipalign.evaluate.main`)."""
    _run(zeroshot_parser(), "clipalign.evaluate")


# ---- clipalign-wiseft --------------------------------------------------------------------------------------------


def wiseft_parser(default_device: str | None = None) -> argparse.ArgumentParser:
    """`default_device`: the --device default (`clipalign.wiseft.main` gives cuda where there is a GPU, else cpu)."""
    parser = argparse.ArgumentParser(prog="clipalign-wiseft", description=_doc("wiseft.py", "main"))
    parser.add_argument("--finetuned", required=True,
                        help="the fine-tuned model: a checkpoint, run or export directory")
    parser.add_argument("--start", help="the starting weights: a clipalign checkpoint, run or export directory, an "
                                        "open_clip weights file, or a pretrained tag of the fine-tuned architecture "
                                        "(TAG or NAME:TAG; downloads) (default: the fine-tuned run's model.pretrained, "
                                        "when a local file)")
    parser.add_argument("--alphas", type=parse_alpha, nargs="+", metavar="A",
                        help=f"mixing ratios to score, 0 = start, 1 = fine-tuned (default: "
                             f"{' '.join(f'{a:g}' for a in DEFAULT_ALPHAS)})")
    parser.add_argument("--alpha", type=parse_alpha, metavar="A",
                        help="export this one mix without evaluating (needs --export)")
    parser.add_argument("--data", action="extend", nargs="+", default=[], metavar="[NAME=]SOURCE",
                        help="classification sets, as clipalign-zeroshot --data (an ImageFolder, labelled shards or "
                             "a CSV/TSV), each named NAME in the table (default: the folder or file name)")
    parser.add_argument("--dataset", action="append", default=[], metavar="[NAME=]SET",
                        help=f"built-in class names and templates ({', '.join(BUILTIN_SETS)}) for set NAME, or for "
                             f"every classification set without NAME=")
    parser.add_argument("--classnames", action="append", default=[], metavar="[NAME=]FILE",
                        help="class names (a file, one per line in label order, or a built-in set) for set NAME, or "
                             "for every classification set (default: classnames.txt beside the data, else an "
                             "ImageFolder's folder names)")
    parser.add_argument("--templates", action="append", default=[], metavar="[NAME=]FILE",
                        help="prompt templates ('{}' for the class name; a file or a built-in set) for set NAME, or "
                             "for every classification set (default: templates.txt beside the data, else a small "
                             "general set)")
    parser.add_argument("--retrieval", action="extend", nargs="+", default=[], metavar="[NAME=]SOURCE",
                        help="retrieval sets, as clipalign-zeroshot --retrieval (a CSV/TSV of (image, caption) rows or "
                             "captioned shards)")
    parser.add_argument("--choose", default=DEFAULT_CHOICE, metavar="METRIC",
                        help="what picks the exported mix: 'mean' (the mean over the sets of their main score: "
                             "classification top-1, retrieval mean of both recall@1), a set's NAME (its main score) or "
                             "NAME.KEY (e.g. imagenet.top5, coco.text_retrieval_recall@5); ties go to the α nearest "
                             "0.5 (default: mean)")
    parser.add_argument("--export", metavar="DIR", help="export the chosen mix here (an open_clip local-dir: export)")
    parser.add_argument("--output", metavar="FILE", help="write the table (every set's full results per α) as JSON")
    parser.add_argument("--table-format", choices=tuple(TABLE_SEPARATORS),
                        help="how --data/--retrieval tables separate columns: csv or tsv (default: from the extension)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast precision of the towers during evaluation (the mix itself is float32)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def wiseft() -> None:
    """`clipalign-wiseft` (`clipalign.wiseft.main`)."""
    _run(wiseft_parser(), "clipalign.wiseft")


# ---- clipalign-export --------------------------------------------------------------------------------------------


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipalign-export", description=_doc("export.py", "main"))
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory (latest one)")
    parser.add_argument("--out", required=True, help="export directory (replaced if it holds an earlier export)")
    parser.add_argument("--onnx", action="store_true", help=f"also export {IMAGE_ONNX} and {TEXT_ONNX}")
    parser.add_argument("--onnx-exporter", choices=ONNX_EXPORTERS, default="auto",
                        help="torch.onnx path: dynamo (torch.export), torchscript (legacy tracer), "
                             "auto = dynamo with a torchscript fallback")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                        help="open_clip: its local-dir: files; transformers: those plus CLIPModel/CLIPProcessor files "
                             "in the same directory (default: the run's export.format, else open_clip)")
    return parser


def export() -> None:
    """`clipalign-export` (`clipalign.export.main`)."""
    _run(export_parser(), "clipalign.export")


# ---- clipalign-make-shards ---------------------------------------------------------------------------------------


def make_shards_parser() -> argparse.ArgumentParser:
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
    out.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                     help="skip (as bad_image) images with more pixels than this, read from their header before "
                          f"decoding; 0 = no limit (default: {DEFAULT_MAX_IMAGE_PIXELS}, Pillow's, as training's "
                          "data.max_image_pixels)")
    out.add_argument("--overwrite", action="store_true", help="replace the output of an earlier run in --out")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")

    parser = argparse.ArgumentParser(
        prog="clipalign-make-shards", description=_doc("data/make_shards.py").split("\n\n")[0],
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


def make_shards() -> None:
    """`clipalign-make-shards` (`clipalign.data.make_shards.main`)."""
    _run(make_shards_parser(), "clipalign.data.make_shards")


# ---- clipalign-inspect-shards ------------------------------------------------------------------------------------


def inspect_shards_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipalign-inspect-shards",
                                     description=_doc("data/inspect_shards.py").split("\n\n")[0],
                                     epilog="See docs/data.md.")
    parser.add_argument("pattern", help="shard pattern as for data.train: brace ranges, '::' between sources; quote it")
    parser.add_argument("--limit", type=int, metavar="N", help="stop after N samples (default: read everything)")
    parser.add_argument("--json", metavar="OUT", help="also write the report to OUT as JSON")
    parser.add_argument("--examples", type=int, default=5, metavar="N", help="example captions to show (default: 5)")
    parser.add_argument("--captions", metavar="MAPPING",
                        help="caption sources and weights as data.captions takes them, e.g. "
                             "'{txt: 0.5, json.recaption: 0.5}': captions are drawn so, and counted by source")
    curating = parser.add_argument_group("curating at load time (as the data.* keys of the same names)")
    curating.add_argument("--keep", metavar="FILE", default="", help="data.keep: a file of sample ids to keep")
    curating.add_argument("--keep-id", choices=KEEP_ID_CHOICES, default="uid",
                          help="data.keep_id: uid (the .json's uid) or key (the __key__) (default: uid)")
    curating.add_argument("--keep-probability", metavar="SPEC", default="",
                          help="data.keep_probability: json:FIELD, or a file of ids and probabilities")
    curating.add_argument("--min-score", metavar="FIELD>=VALUE", default="", help="data.min_score")
    curating.add_argument("--seed", type=int, default=0,
                          help="train.seed: the probability draw is that of an exact-pass run's first pass (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def inspect_shards() -> None:
    """`clipalign-inspect-shards` (`clipalign.data.inspect_shards.main`)."""
    _run(inspect_shards_parser(), "clipalign.data.inspect_shards")


# ---- clipalign-train-tokenizer -----------------------------------------------------------------------------------


def train_tokenizer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipalign-train-tokenizer",
        description="Train a SentencePiece tokenizer on captions from WebDataset shards, text files or CSV/TSV.")
    parser.add_argument("--data", required=True, metavar="SPEC",
                        help="shards, .txt (one caption a line) or .csv/.tsv files; brace patterns, '::' between "
                             "sources, e.g. '/data/cc3m/{00000..00331}.tar'")
    parser.add_argument("--output", required=True, metavar="FILE.model",
                        help="the model to write; the sidecar FILE.json goes next to it")
    parser.add_argument("--vocab-size", type=int, default=8000, help="pieces wanted (default: %(default)s)")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="unigram", help="default: %(default)s")
    parser.add_argument("--max-samples", type=int, default=1_000_000,
                        help="the most captions to train on (default: %(default)s)")
    parser.add_argument("--caption-key", default="caption",
                        help="the caption column of CSV/TSV sources (default: %(default)s)")
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="share of characters given their own piece; use 1.0 for small alphabets, 0.9995 for "
                             "Chinese or Japanese (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    return parser


def train_tokenizer() -> None:
    """`clipalign-train-tokenizer` (`clipalign.train_tokenizer.main`)."""
    _run(train_tokenizer_parser(), "clipalign.train_tokenizer")


# ---- clipalign-embed ---------------------------------------------------------------------------------------------


def embed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipalign-embed",
        description="Embed a corpus (WebDataset shards, a folder of images, or a CSV/TSV/parquet table) with a "
                    "trained model into an embedding directory: float16 arrays in img_emb/ and text_emb/, their rows' "
                    "metadata in metadata/ (parquet), embed.json (clip-retrieval's layout, which autofaiss reads).",
        epilog="A killed run resumes when the same command runs again. Under `accelerate launch` each process embeds "
               "its own parts. See docs/embed.md.")
    parser.add_argument("--model", required=True, help="export directory, checkpoint directory, or run directory "
                                                       "(its latest checkpoint)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", metavar="PATTERN", help="WebDataset shards as data.train takes them: brace "
                                                            "patterns, '::' between sources, pipe: URLs; one part each")
    source.add_argument("--folder", metavar="DIR", help="images under DIR (recursively), captions from x.txt or x.json "
                                                        "beside x.jpg")
    source.add_argument("--table", metavar="FILE", help="a CSV, TSV or parquet table of image paths and/or captions")
    parser.add_argument("--out", required=True, metavar="DIR", help="the embedding directory to write (or resume)")
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES, metavar="{image,text}",
                        help="what to embed (default: both where the input has both)")
    table = parser.add_argument_group("tables")
    table.add_argument("--image-column", default="image", help="column of image paths (default: image)")
    table.add_argument("--caption-column", default="caption", help="column of captions (default: caption)")
    table.add_argument("--key-column", help="column of sample keys (default: the row number, from 0)")
    table.add_argument("--image-root", metavar="DIR", help="where relative image paths start (default: the table's "
                                                           "folder)")
    table.add_argument("--table-format", choices=("csv", "tsv", "parquet"), help="default: from the extension")
    parser.add_argument("--part-size", type=int, metavar="N",
                        help=f"folders and tables: samples per part, the unit of resume (default: "
                             f"{DEFAULT_PART_SIZE}); a shard is always one part")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N",
                        help="samples per forward pass (default: 256)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="DataLoader workers per process, which decode and tokenize (default: 2; 0: in the "
                             "process itself)")
    parser.add_argument("--precision", choices=EMBED_PRECISIONS, default="auto",
                        help="autocast precision; auto: bf16 on GPUs (fp16 where bf16 is missing), fp32 on CPU")
    parser.add_argument("--decode", choices=EMBED_DECODES, default="draft",
                        help="draft (default): decode large JPEGs at a reduced scale, as training does; full: decode "
                             "every image whole, exactly as model.preprocess")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N "
                                                         "(cuda:N for a single process)")
    parser.add_argument("--max-image-pixels", type=parse_pixel_limit, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                        help=f"skip (as bad_image) images with more pixels than this, read from their header; 0 = no "
                             f"limit (default: {DEFAULT_MAX_IMAGE_PIXELS})")
    parser.add_argument("--overwrite", action="store_true", help="replace an embedding directory at --out (finished "
                                                                 "or not); other files there are never removed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def embed() -> None:
    """`clipalign-embed` (`clipalign.embed.run.main`)."""
    _run(embed_parser(), "clipalign.embed.run")
