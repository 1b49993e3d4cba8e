#!/usr/bin/env python
"""Corpus embedding speed: clipalign-embed against a plain open_clip loop, over the same files, in one run.

    python tools/benchmark_embed.py --models tiny-vit-64 ViT-B-32 --images 512 --size 512 --repeats 3 --json out.json

For each model, a randomly initialised model of that open_clip config is exported (`clipalign-export`'s directory,
which open_clip loads as `local-dir:`), and a folder of `--images` synthetic photo-like JPEGs (tools/benchmark_data.py's
drawing, stored with the given shorter side) with a caption beside each (`x.txt`; word counts lognormal around a
median of 10, from 2 to 90, as web alt-texts run: mostly short, a few past the text context) is written, both
under `--cache`. Then, alternating within every repeat (the order rotates), each of these embeds every image and
caption of the folder into float16 arrays on disk:

    reference   open_clip.create_model_and_transforms("local-dir:EXPORT") with its preprocess and tokenizer; a loop
                over the sorted files in batches of --batch-size: PIL.Image.open + preprocess, encode_image,
                read the captions, tokenize, encode_text, normalise; under torch.no_grad(); np.save at the end
    ours        clipalign.embed.embed_corpus (what clipalign-embed runs, the model loaded beforehand) on
                plan_folder(folder, --part-size), --workers DataLoader workers, fp32, the default draft decode
    ours, full decode
                the same with decode="full" (every JPEG decoded whole, as the reference does)

Model loading is outside the clock on both sides; listing the folder, reading, decoding, tokenizing, embedding and
writing are inside. The table gives medians over repeats (samples/s, a sample = one image and its caption) and each
ratio is the median of the per-repeat ratios against the reference. Agreement: the cosine similarity between our
rows and the reference's, image and text, mean and minimum over the corpus (the draft decode moves images by about a
pixel; text should agree to float16 precision).

`--threads` sets torch's threads in this process for both sides (default: torch's own). On a loaded machine two
OpenMP threads on two cores can stall each other at every barrier; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import PIL
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark_data, beside this script
from benchmark_data import ASPECTS, JPEG_QUALITY, stored_geometry, synthetic_photo  # noqa: E402

from clipalign.config import ModelConfig  # noqa: E402
from clipalign.embed import embed_corpus, load_embeddings, plan_folder  # noqa: E402
from clipalign.export import export_model  # noqa: E402
from clipalign.model import create_model, load  # noqa: E402

VARIANTS = ("reference", "ours", "ours_full_decode")
FORMAT_VERSION = 2  # bump when the folder's drawing or captions change
CAPTION_MEDIAN_WORDS = 10  # web alt-texts: mostly short, a long tail (lognormal, sigma 0.6: about 3% over 30 words)
_WORDS = ("a photo of the small red dog cat car house tree person standing sitting near under on beside old new "
          "bright dark blue green yellow white black wooden metal street beach mountain river city room table window "
          "with and in at during morning evening night close view two three many people group").split()


def ensure_folder(cache: Path, images: int, size: int, seed: int = 0) -> Path:
    """A folder of `images` synthetic JPEGs (shorter side `size`) with captions, written once under `cache`."""
    root = cache / f"folder-short{size}-n{images}-s{seed}-v{FORMAT_VERSION}"
    marker = root / "_complete"
    if marker.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(images):
        width, height = stored_geometry(size, ASPECTS[i % len(ASPECTS)], "short")
        synthetic_photo(width, height, seed * 1_000_003 + i).save(root / f"{i:06d}.jpg", quality=JPEG_QUALITY)
        words = rng.choice(_WORDS, size=int(np.clip(round(rng.lognormal(np.log(CAPTION_MEDIAN_WORDS), 0.6)), 2, 90)))
        (root / f"{i:06d}.txt").write_text(" ".join(words) + "\n")
    marker.write_text("")
    return root


def ensure_export(cache: Path, name: str) -> Path:
    """An export directory of a randomly initialised `name` (seed 0), written once under `cache`."""
    out = cache / f"export-{name}"
    if (out / "open_clip_config.json").is_file():
        return out
    torch.manual_seed(0)
    return export_model(create_model(ModelConfig(name=name)).eval(), out)


def run_reference(export: Path, folder: Path, out: Path, batch_size: int, loaded: dict) -> None:
    """The plain open_clip loop over the folder's files; writes image and text arrays to `out`."""
    model, preprocess, tokenizer = loaded["reference"]
    files = sorted(folder.glob("*.jpg"))
    images, texts = [], []
    with torch.no_grad():
        for start in range(0, len(files), batch_size):
            batch = files[start:start + batch_size]
            pixels = torch.stack([preprocess(Image.open(path)) for path in batch])
            features = model.encode_image(pixels)
            images.append((features / features.norm(dim=-1, keepdim=True)).half().numpy())
            captions = [path.with_suffix(".txt").read_text().strip() for path in batch]
            features = model.encode_text(tokenizer(captions))
            texts.append((features / features.norm(dim=-1, keepdim=True)).half().numpy())
    out.mkdir(parents=True)
    np.save(out / "img_emb.npy", np.concatenate(images))
    np.save(out / "text_emb.npy", np.concatenate(texts))


def run_ours(folder: Path, out: Path, batch_size: int, workers: int, part_size: int, decode: str,
             loaded: dict, precision: str = "fp32") -> None:
    embed_corpus(loaded["ours"], plan_folder(folder, part_size), out, batch_size=batch_size, workers=workers,
                 precision=precision, decode=decode, progress=False)


def _load(export: Path) -> dict:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    return {"reference": (model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{export}")),
            "ours": load(export)}


def _arrays(variant: str, out: Path) -> tuple[np.ndarray, np.ndarray]:
    if variant == "reference":
        return np.load(out / "img_emb.npy"), np.load(out / "text_emb.npy")
    return load_embeddings(out, "image"), load_embeddings(out, "text")


def _cosines(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = a.astype(np.float32), b.astype(np.float32)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean": float(cos.mean()), "min": float(cos.min())}


def benchmark_model(name: str, args: argparse.Namespace, cache: Path, folder: Path, work: Path) -> dict:
    export = ensure_export(cache, name)
    loaded = _load(export)
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    outputs: dict[str, Path] = {}
    for repeat in range(args.repeats):
        order = VARIANTS[repeat % len(VARIANTS):] + VARIANTS[:repeat % len(VARIANTS)]
        for variant in order:
            out = work / f"{name}-{variant}-{repeat}"
            start = time.perf_counter()
            if variant == "reference":
                run_reference(export, folder, out, args.batch_size, loaded)
            else:
                run_ours(folder, out, args.batch_size, args.workers, args.part_size,
                         "full" if variant == "ours_full_decode" else "draft", loaded, args.precision)
            runs[variant].append(args.images / (time.perf_counter() - start))
            if variant in outputs:
                shutil.rmtree(out)
            else:
                outputs[variant] = out
            print(f"  {name} repeat {repeat + 1}/{args.repeats} {variant}: {runs[variant][-1]:.1f} samples/s",
                  flush=True)
    reference = _arrays("reference", outputs["reference"])
    result = {"model": name, "image_size": loaded["ours"].image_size, "samples_per_s": {}, "ratio": {},
              "agreement": {}}
    for variant in VARIANTS:
        result["samples_per_s"][variant] = {"median": statistics.median(runs[variant]), "runs": runs[variant]}
        if variant != "reference":
            result["ratio"][variant] = statistics.median(o / r for o, r in zip(runs[variant], runs["reference"]))
            ours = _arrays(variant, outputs[variant])
            result["agreement"][variant] = {"image": _cosines(ours[0], reference[0]),
                                            "text": _cosines(ours[1], reference[1])}
    return result


def format_table(results: dict) -> str:
    cfg = results["config"]
    lines = [f"{cfg['images']} images (shorter side {cfg['size']} px) + captions, batch {cfg['batch_size']}, "
             f"{cfg['workers']} workers, part size {cfg['part_size']}, torch threads {cfg['threads']}, ours in "
             f"{cfg.get('precision', 'fp32')} (the reference in fp32)",
             "",
             "| model | reference samples/s | ours samples/s | ratio | ours, full decode samples/s | ratio | "
             "image cosine to reference, mean (min) | text cosine, mean (min) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["models"]:
        s, ratio, agree = r["samples_per_s"], r["ratio"], r["agreement"]
        image = "; ".join(f"{agree[v]['image']['mean']:.5f} ({agree[v]['image']['min']:.5f})"
                          for v in ("ours", "ours_full_decode"))
        lines.append(f"| {r['model']} ({r['image_size']} px) | {s['reference']['median']:.1f} | "
                     f"{s['ours']['median']:.1f} | {ratio['ours']:.2f}x | {s['ours_full_decode']['median']:.1f} | "
                     f"{ratio['ours_full_decode']:.2f}x | {image} | {agree['ours']['text']['mean']:.5f} "
                     f"({agree['ours']['text']['min']:.5f}) |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-vit-64", "ViT-B-32"], help="open_clip model configs")
    parser.add_argument("--images", type=int, default=512, help="images (with captions) in the folder")
    parser.add_argument("--size", type=int, default=512, help="stored shorter side of the JPEGs, px")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (medians are reported)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward pass, both sides")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="ours: autocast precision (bf16 only on CPUs with AVX-512 BF16 or AMX); the reference "
                             "stays fp32, as the plain loop runs")
    parser.add_argument("--workers", type=int, default=2, help="ours: DataLoader workers (clipalign-embed's default)")
    parser.add_argument("--part-size", type=int, default=64,
                        help="ours: samples per part; small, so that every worker has parts, as in a large folder")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in this process (0: torch's default)")
    parser.add_argument("--cache", type=Path, default=None, help="where the folder and exports are kept between runs "
                                                                 "(default: a temporary directory)")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    args = parser.parse_args(argv)
    if min(args.images, args.repeats, args.batch_size, args.part_size) < 1 or args.workers < 0 or args.threads < 0:
        parser.error("--images, --repeats, --batch-size and --part-size must be >= 1; --workers, --threads >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its table, optionally write JSON; returns the results."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp) / "cache"
        folder = ensure_folder(cache, args.images, args.size)
        results = {"config": {"models": args.models, "images": args.images, "size": args.size,
                              "repeats": args.repeats, "batch_size": args.batch_size, "workers": args.workers,
                              "part_size": args.part_size, "threads": torch.get_num_threads(),
                              "precision": args.precision,
                              "command": " ".join(["python", "tools/benchmark_embed.py", *(argv or sys.argv[1:])])},
                   "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                   "open_clip": open_clip.__version__, "pillow": PIL.__version__,
                                   "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
                   "models": []}
        for name in args.models:
            results["models"].append(benchmark_model(name, args, cache, folder, Path(tmp) / "runs"))
        results["environment"]["loadavg_end"] = list(os.getloadavg())
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
