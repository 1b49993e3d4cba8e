#!/usr/bin/env python
"""Image decoding speed and quality: our pipeline against open_clip's, on the same JPEG shards, in one run.

    python tools/benchmark_data.py --sizes 256 512 1024 --images 300 --repeats 5 --json bench.json

For each stored size the tool writes (or reuses, under `--cache`) WebDataset shards of synthetic photo-like JPEGs,
reads their bytes once, and times decode + transform to 224 px in this one process with torch threads = 1:

    reference   `Image.open(...).convert("RGB")` + `open_clip.image_transform(224, is_train=False)`
                (Resize bicubic, CenterCrop, ToTensor, Normalize: float output)
    ours        `decode_image(data, 224)` (PIL draft: reduced DCT scale) + `eval_transform(224)` (uint8 output;
                normalisation happens on the device)
    ours + CPU normalise
                ours, then the float conversion and normalisation done here on the CPU, to separate what the draft
                decode buys from what moving normalisation to the device buys

The three alternate within every repeat (the order rotates between repeats); the table gives medians over repeats,
and each ratio is the median of the per-repeat ratios, so load from other processes shifts both sides alike. Then the
full pipeline (tar reading, decoding, tokenizing, batching) is timed through a DataLoader with one worker: ours
through `make_train_loader` (`ShardStream`, crop_scale=1 so that the transform is the eval one, no shuffle buffer),
the reference through open_clip_train's webdataset recipe (`decode("pilrgb")`, `map_dict`, `batched`). Both use
open_clip's BPE tokenizer; ours also seeds every sample (its per-sample RNG), as training does.

Quality: PSNR and mean absolute difference (0-255 units) between our uint8 output and the reference output
de-normalised back to uint8, per image, averaged over images; identical pairs (no draft) are counted, not averaged.

`--decode-bench` measures instead where a training JPEG is decoded (`data.decode`), with the training transform
(RandomResizedCrop to 224 px, scale 0.9..1, each image seeded by its index as training seeds samples):

    workers     the DataLoader workers' path: `decode_image` (PIL, draft) + `train_transform`, one image at a time
    device      a `DeviceDecoder` on `--device` (cpu | cuda) over batches of `--decode-batch-size` packed as the
                workers pack them: one batched decode (torchcodec's or torchvision's), then crop + bicubic
                antialiased resize of the whole batch to uint8; on CUDA the clock stops after a synchronize
    prepare     what the workers still do per image in device mode (header, draft size, crop box, packing)

    python tools/benchmark_data.py --decode-bench --device cuda --sizes 512 --images 2048 --json out.json

Images/s are medians over repeats, workers and device alternating; the ratio is the median of per-repeat ratios
device / workers, both on one CPU thread (the CUDA decode is driven from that one thread). Quality: PSNR of the
device output against the workers' output for the same images and crops.

`--keep-bench` measures the cost of a keep-list (`data.keep`): the full one-worker pipeline above (ours), without
and with a keep-list holding every sample of the shards plus `--keep-ids` random others (default 10^7), so that both
do the same work; each sample gets a `.json` with a DataComp-style `uid`, and the list is DataComp's sorted `.npy`
of uids (`--keep-id uid`, memory-mapped) or a text file of keys (`--keep-id key`, hashed at load). Images/s are
medians over repeats, the two alternating, through a one-worker DataLoader by the wall clock and through the same
loader without workers by the process's CPU time (what the work costs, whatever else the machine runs); each ratio
is the median of per-repeat ratios with / without. The table also gives the list's load time and the filter's own
CPU time per sample (JSON, uid, lookup), timed alone:

    python tools/benchmark_data.py --keep-bench --sizes 256 --images 2000 --repeats 5 --json keep.json

A stored size is the shorter side (img2dataset's `keep_ratio`) unless `--side long`; aspect ratios cycle through
1:1, 4:3, 3:2, 3:4, 16:9 and 2:3. The images are drawn, not downloaded: flat-coloured shapes under 1/f luminance
shading, a little chroma noise, patches of fine texture and sensor noise, saved at JPEG quality 90 with 4:2:0 chroma.
Real photos differ in content and entropy (the table gives bits per pixel: a detailed photo costs more to
entropy-decode, which the draft decode does not reduce), so treat the ratios as indicative.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import PIL
import torch
import torch.nn.functional as F
import torchvision
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter, features
from torch.utils.data import DataLoader

from clipalign.data.curation import SampleFilter, uid_pair
from clipalign.data.device_decode import device_images, pack_batch, prepare_image
from clipalign.data.shards import make_train_loader, shard_samples
from clipalign.data.transforms import decode_image, eval_transform, train_transform
from clipalign.data.writer import image_to_bytes, write_shards
from clipalign.tokenizer import build_tokenizer

IMAGE_SIZE = 224
JPEG_QUALITY = 90
ASPECTS = (1.0, 4 / 3, 3 / 2, 3 / 4, 16 / 9, 1.0, 2 / 3, 4 / 3)  # width / height, cycled over the images
SHARD_SAMPLES = 100
FORMAT_VERSION = 1  # bump when the drawing changes, so that cached shards are not taken for new ones
TOKENIZER = "ViT-B-32"
PIPELINES = ("reference", "ours", "ours_cpu_normalise")
_MARKER = "_complete.json"
_TAR_MTIME = 1_700_000_000
_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)


# ---------------------------------------------------------------- synthetic photo-like images

def _pink_noise(height: int, width: int, channels: int, beta: float, finest: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-mean unit-std noise whose amplitude grows as (cell size)^beta, (C, H, W).

    White noise is added at every level of a 2x pyramid from about 3 cells across down to `finest`-pixel cells, each
    level upsampled bicubically into the next: a cheap 1/f-like field, as natural images have.
    """
    levels, h, w, cell = [], height, width, 1
    while min(h, w) >= 3:
        if cell >= finest:
            levels.append((h, w, cell))
        h, w, cell = math.ceil(h / 2), math.ceil(w / 2), cell * 2
    field = None
    for h, w, cell in reversed(levels):
        noise = torch.randn(1, channels, h, w, generator=gen) * cell ** beta
        field = noise if field is None else F.interpolate(field, size=(h, w), mode="bicubic") + noise
    if field.shape[-2:] != (height, width):
        field = F.interpolate(field, size=(height, width), mode="bicubic")
    field = field[0]
    return (field - field.mean()) / field.std()


def synthetic_photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: shapes on a gradient, 1/f shading, chroma noise, textured patches, sensor noise."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    side = min(width, height)
    top, bottom = rng.uniform(30, 230, 3), rng.uniform(20, 200, 3)
    t = np.linspace(0, 1, height)[:, None, None]
    base = Image.fromarray(np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(base)
    for _ in range(rng.integers(3, 10)):
        x, y = rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height
        r = rng.uniform(0.04, 0.35) * side
        grey = rng.uniform(40, 220)
        colour = tuple(int(np.clip(grey + c, 0, 255)) for c in rng.normal(0, 40, 3))
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r * rng.uniform(0.4, 1.0), x + r, y + r], fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))))
            draw.polygon([(x + r * np.cos(a), y + r * np.sin(a)) for a in angles], fill=colour)
    base = base.filter(ImageFilter.GaussianBlur(side / 500))  # soft edges, as a lens gives
    img = torch.from_numpy(np.array(base, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
    img = img * (1 + 0.3 * _pink_noise(height, width, 1, 0.8, 1, gen)) + 15 * _pink_noise(height, width, 3, 1.2, 4, gen)
    texture_mask = (0.8 * _pink_noise(height, width, 1, 2.0, max(1, side // 8), gen)).clamp(0, 1)
    img += 12 * texture_mask * torch.randn(1, height, width, generator=gen)
    img += 1.5 * torch.randn(3, height, width, generator=gen)
    return Image.fromarray(img.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def stored_geometry(size: int, aspect: float, side: str) -> tuple[int, int]:
    """(width, height) of an image of `aspect` (width / height) whose shorter or longer `side` is `size`."""
    landscape = aspect >= 1
    if (side == "short") == landscape:
        return round(size * aspect), size
    return size, round(size / aspect)


def _image_seed(seed: int, size: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, size, index]).generate_state(1)[0])


def sample_uid(seed: int, size: int, index: int) -> str:
    """The DataComp-style uid (32 hex digits) of a benchmark sample written `with_uid`."""
    return hashlib.blake2b(f"{seed}-{size}-{index}".encode(), digest_size=16).hexdigest()


def ensure_shards(cache: Path, size: int, images: int, side: str, seed: int = 0, with_uid: bool = False) -> list[Path]:
    """Shards of `images` synthetic JPEGs stored at `size` px, written under `cache` or reused from an earlier run.
    `with_uid`: each sample also gets a `.json` with a DataComp-style `uid` (`sample_uid`)."""
    params = {"version": FORMAT_VERSION, "size": size, "images": images, "side": side, "seed": seed,
              "quality": JPEG_QUALITY, "aspects": [round(a, 4) for a in ASPECTS], **({"uid": True} if with_uid else {})}
    root = cache / f"{side}{size}-n{images}-s{seed}-v{FORMAT_VERSION}{'-uid' if with_uid else ''}"
    marker = root / _MARKER
    if marker.is_file() and json.loads(marker.read_text())["params"] == params:
        return [root / name for name in json.loads(marker.read_text())["shards"]]

    def samples():
        for i in range(images):
            width, height = stored_geometry(size, ASPECTS[i % len(ASPECTS)], side)
            img = synthetic_photo(width, height, _image_seed(seed, size, i))
            yield {"__key__": f"{i:06d}", "jpg": image_to_bytes(img, "jpg", quality=JPEG_QUALITY),
                   "txt": f"a synthetic photo, number {i}",
                   **({"json": {"uid": sample_uid(seed, size, i)}} if with_uid else {})}

    shards = write_shards(samples(), root, prefix="bench", samples_per_shard=SHARD_SAMPLES, mtime=_TAR_MTIME)
    marker.write_text(json.dumps({"params": params, "shards": [p.name for p in shards]}))
    return shards


def read_jpegs(shards: list[Path]) -> list[bytes]:
    """The JPEG bytes of every sample, in shard order (read once, so that the timings exclude I/O)."""
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(p) for p in shards]), wds.tarfile_to_samples())
    return [sample["jpg"] for sample in pipeline]


# ---------------------------------------------------------------- the pipelines

def reference_pipeline(image_size: int = IMAGE_SIZE) -> Callable[[bytes], torch.Tensor]:
    """open_clip's eval preprocessing: full PIL decode, Resize + CenterCrop + ToTensor + Normalize (float)."""
    transform = open_clip.image_transform(image_size, is_train=False)
    return lambda data: transform(Image.open(io.BytesIO(data)).convert("RGB"))


def ours_pipeline(image_size: int = IMAGE_SIZE) -> Callable[[bytes], torch.Tensor]:
    """Our eval preprocessing: draft decode + Resize + CenterCrop, uint8 (normalised later, on the device)."""
    transform = eval_transform(image_size)
    return lambda data: transform(decode_image(data, image_size))


def ours_cpu_normalise_pipeline(image_size: int = IMAGE_SIZE) -> Callable[[bytes], torch.Tensor]:
    """Ours, then normalised on the CPU as `DualEncoder` does on the device: the float output of the reference."""
    ours, mean, std = ours_pipeline(image_size), _MEAN * 255, _STD * 255
    return lambda data: (ours(data).float() - mean) / std


def _make_pipelines(image_size: int) -> dict[str, Callable[[bytes], torch.Tensor]]:
    return {"reference": reference_pipeline(image_size), "ours": ours_pipeline(image_size),
            "ours_cpu_normalise": ours_cpu_normalise_pipeline(image_size)}


def to_uint8(normalised: torch.Tensor) -> torch.Tensor:
    """A reference output (normalised float) back in 0-255 uint8."""
    return ((normalised * _STD + _MEAN) * 255).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- measurements

def _run(fn: Callable[[bytes], torch.Tensor], jpegs: list[bytes]) -> tuple[float, float]:
    """Images/s over `jpegs` by the wall clock and by this process's CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    for data in jpegs:
        fn(data)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(jpegs) / wall, len(jpegs) / max(cpu, 1e-9)


def measure_throughput(pipelines: dict[str, Callable], jpegs: list[bytes], repeats: int) -> dict[str, dict]:
    """Per pipeline: images/s of every repeat (wall and CPU time), alternating pipelines, rotating their order."""
    names = list(pipelines)
    for name in names:  # warm-up: imports, allocator, caches
        for data in jpegs[:4]:
            pipelines[name](data)
    runs = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            wall, cpu = _run(pipelines[name], jpegs)
            runs[name]["wall"].append(wall)
            runs[name]["cpu"].append(cpu)
    return runs


def _paired_ratio(runs: dict[str, dict], name: str, key: str = "wall") -> float:
    return statistics.median(a / b for a, b in zip(runs[name][key], runs["reference"][key]))


def measure_quality(jpegs: list[bytes], image_size: int = IMAGE_SIZE) -> dict:
    """PSNR (dB) and mean absolute difference (0-255) between our uint8 output and the de-normalised reference."""
    ours, reference = ours_pipeline(image_size), reference_pipeline(image_size)
    return image_agreement((ours(data), to_uint8(reference(data))) for data in jpegs)


def image_agreement(pairs) -> dict:
    """PSNR (dB; mean and min over the images that differ), identical images and mean absolute difference (0-255)
    of pairs of uint8 images."""
    psnrs, mads, identical = [], [], 0
    for a, b in pairs:
        a, b = a.double(), b.double()
        if a.shape != b.shape:
            raise RuntimeError(f"ours gives {tuple(a.shape)}, the reference {tuple(b.shape)}")
        mse = float(((a - b) ** 2).mean())
        mads.append(float((a - b).abs().mean()))
        if mse == 0:
            identical += 1
        else:
            psnrs.append(10 * math.log10(255 ** 2 / mse))
    return {"psnr_db": statistics.mean(psnrs) if psnrs else None, "psnr_min_db": min(psnrs) if psnrs else None,
            "identical_images": identical, "mean_abs_diff": statistics.mean(mads)}


def draft_scales(jpegs: list[bytes], image_size: int = IMAGE_SIZE) -> dict[str, int]:
    """How many images `decode_image` decoded at each DCT scale ("1/1", "1/2", ...)."""
    scales = Counter()
    for data in jpegs:
        full = Image.open(io.BytesIO(data)).size
        drafted = decode_image(data, image_size).size
        scales[f"1/{round(full[0] / drafted[0])}"] += 1
    return dict(sorted(scales.items()))


def _reference_loader(shards: list[Path], image_size: int, batch_size: int, tokenizer) -> DataLoader:
    """open_clip_train's webdataset recipe (get_wds_dataset, without its shuffle buffers) in one worker."""
    preprocess = open_clip.image_transform(image_size, is_train=False)
    pipeline = wds.DataPipeline(
        wds.ResampledShards([str(p) for p in shards], deterministic=True),
        wds.tarfile_to_samples(),
        wds.decode("pilrgb"),
        wds.rename(image="jpg;png;jpeg;webp", text="txt;json"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=False),
    )
    return DataLoader(pipeline, batch_size=None, num_workers=1, persistent_workers=True, prefetch_factor=4)


def _ours_loader(shards: list[Path], image_size: int, batch_size: int, tokenizer,
                 sample_filter: SampleFilter | None = None, workers: int = 1) -> DataLoader:
    return make_train_loader([[str(p) for p in shards]], tokenizer, image_size, batch_size, workers=workers, seed=0,
                             resampled=True, shuffle_buffer=0, crop_scale=1.0, sample_filter=sample_filter)


def _batch_len(batch) -> int:
    return len(batch["images"]) if isinstance(batch, dict) else len(batch[0])


def _loader_rate(loader: DataLoader, images: int, cpu: bool = False) -> float:
    """Images/s of a loader once its worker has delivered a first batch (start-up is not timed); with `cpu`, by this
    process's CPU time (a loader without workers)."""
    clock = time.process_time if cpu else time.perf_counter
    it = iter(loader)
    next(it)
    count, start = 0, clock()
    while count < images:
        count += _batch_len(next(it))
    rate = count / (clock() - start)
    del it
    return rate


def measure_loaders(shards: list[Path], images: int, repeats: int, batch_size: int, tokenizer,
                    image_size: int = IMAGE_SIZE) -> dict[str, list[float]]:
    """Images/s through a one-worker DataLoader, reference and ours alternating (order rotating) over repeats."""
    makers = {"reference": _reference_loader, "ours": _ours_loader}
    names, runs = list(makers), {name: [] for name in makers}
    for r in range(repeats):
        for name in names[r % 2:] + names[:r % 2]:
            loader = makers[name](shards, image_size, batch_size, tokenizer)
            runs[name].append(_loader_rate(loader, images))
            del loader
            gc.collect()
    return runs


def benchmark_size(size: int, args: argparse.Namespace, cache: Path, tokenizer) -> dict:
    """Every measurement for one stored size."""
    shards = ensure_shards(cache, size, args.images, args.side)
    jpegs = read_jpegs(shards)
    pixels = 0
    for data in jpegs:
        w, h = Image.open(io.BytesIO(data)).size
        pixels += w * h
    runs = measure_throughput(_make_pipelines(IMAGE_SIZE), jpegs, args.repeats)
    result = {
        "size": size,
        "side": args.side,
        "images": len(jpegs),
        "mean_bytes": statistics.mean(len(d) for d in jpegs),
        "bits_per_pixel": 8 * sum(len(d) for d in jpegs) / pixels,
        "draft_scales": draft_scales(jpegs),
        "throughput": {name: {"median": statistics.median(r["wall"]), "runs": r["wall"],
                              "cpu_median": statistics.median(r["cpu"]), "cpu_runs": r["cpu"]}
                       for name, r in runs.items()},
        "ratio": {name: _paired_ratio(runs, name) for name in PIPELINES[1:]},
        "cpu_ratio": {name: _paired_ratio(runs, name, "cpu") for name in PIPELINES[1:]},
        "quality": measure_quality(jpegs),
    }
    if not args.no_loader:
        loader_images = max(args.batch_size, args.images // args.batch_size * args.batch_size)
        loader_runs = measure_loaders(shards, loader_images, args.repeats, args.batch_size, tokenizer)
        result["loader"] = {
            "batch_size": args.batch_size,
            "images": loader_images,
            "throughput": {name: {"median": statistics.median(r), "runs": r} for name, r in loader_runs.items()},
            "ratio": statistics.median(a / b for a, b in zip(loader_runs["ours"], loader_runs["reference"])),
        }
    return result


# ---------------------------------------------------------------- the cost of a keep-list (data.keep)

def ensure_keep_list(shards: list[Path], extra: int, keep_id: str, seed: int = 0) -> Path:
    """A keep-list beside `shards` holding every one of their samples plus `extra` random others: DataComp's sorted
    `.npy` of uids (`keep_id=uid`), or a text file of keys (`keep_id=key`). Reused when it is there."""
    root = shards[0].parent
    path = root / (f"keep-uid-{extra}-s{seed}.npy" if keep_id == "uid" else f"keep-key-{extra}-s{seed}.txt")
    if path.is_file():
        return path
    samples = list(shard_samples([str(p) for p in shards], on_error=_raise))
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    if keep_id == "uid":
        ours = [uid_pair(json.loads(sample["json"])["uid"]) for sample in samples]
        high = np.concatenate([rng.integers(0, 2 ** 64, extra, dtype=np.uint64, endpoint=False),
                               np.array([h for h, _ in ours], np.uint64)])
        low = np.concatenate([rng.integers(0, 2 ** 64, extra, dtype=np.uint64, endpoint=False),
                              np.array([lo for _, lo in ours], np.uint64)])
        order = np.lexsort((low, high))
        uids = np.empty(len(high), np.dtype("u8,u8"))  # DataComp's layout: high, low 64 bits
        uids["f0"], uids["f1"] = high[order], low[order]
        with open(tmp, "wb") as f:
            np.save(f, uids)
    else:
        with open(tmp, "w") as f:
            for start in range(0, extra, 1 << 20):
                f.write("".join(f"x{i:012d}\n" for i in range(start, min(extra, start + (1 << 20)))))
            f.write("".join(f"{sample['__key__']}\n" for sample in samples))
    tmp.replace(path)
    return path


def _raise(url: str, message: str) -> None:
    raise RuntimeError(f"{url}: {message}")


def measure_keep_list(shards: list[Path], images: int, repeats: int, batch_size: int, tokenizer, keep_path: Path,
                      keep_id: str) -> dict:
    """Without and with the keep-list (every sample of the shards on it, so both do the same work), alternating, the
    order rotating: images/s through a one-worker DataLoader (wall clock), and through the same loader without
    workers by this process's CPU time (what the work costs, whatever else the machine runs); the list's load time
    and the filter's own cost per sample, timed alone in this process over the shards' raw samples."""
    start = time.perf_counter()
    sample_filter = SampleFilter(keep=str(keep_path), keep_id=keep_id)
    load_seconds = time.perf_counter() - start
    samples = list(shard_samples([str(p) for p in shards], on_error=_raise))
    on_list = sum(sample_filter(sample) is None for sample in samples)
    if on_list != len(samples):
        raise RuntimeError(f"{len(samples) - on_list} of the shards' samples are not on {keep_path}")
    costs = []
    for _ in range(max(3, repeats)):
        start = time.process_time()
        for sample in samples:
            sample_filter(sample)
        costs.append((time.process_time() - start) / len(samples))
    filters = {"without": None, "with_keep_list": sample_filter}
    names = list(filters)
    runs = {name: [] for name in filters}
    cpu_runs = {name: [] for name in filters}
    for r in range(repeats):
        for name in names[r % 2:] + names[:r % 2]:
            loader = _ours_loader(shards, IMAGE_SIZE, batch_size, tokenizer, sample_filter=filters[name])
            runs[name].append(_loader_rate(loader, images))
            del loader
            gc.collect()
            loader = _ours_loader(shards, IMAGE_SIZE, batch_size, tokenizer, sample_filter=filters[name], workers=0)
            cpu_runs[name].append(_loader_rate(loader, images, cpu=True))
            del loader
            gc.collect()
    return {
        "keep_id": keep_id,
        "list_ids": len(sample_filter.keep_list),
        "list_bytes": sample_filter.keep_list.nbytes,
        "list_load_s": load_seconds,
        "samples_on_list": on_list,
        "filter_us_per_sample": statistics.median(costs) * 1e6,
        "throughput": {name: {"median": statistics.median(r), "runs": r} for name, r in runs.items()},
        "ratio": statistics.median(w / wo for w, wo in zip(runs["with_keep_list"], runs["without"])),
        "cpu_throughput": {name: {"median": statistics.median(r), "runs": r} for name, r in cpu_runs.items()},
        "cpu_ratio": statistics.median(w / wo for w, wo in zip(cpu_runs["with_keep_list"], cpu_runs["without"])),
    }


def keep_benchmark_size(size: int, args: argparse.Namespace, cache: Path, tokenizer) -> dict:
    """The keep-list measurements for one stored size."""
    shards = ensure_shards(cache, size, args.images, args.side, with_uid=True)
    keep_path = ensure_keep_list(shards, args.keep_ids, args.keep_id)
    loader_images = max(args.batch_size, args.images // args.batch_size * args.batch_size)
    return {"size": size, "side": args.side, "images": loader_images, "extra_ids": args.keep_ids,
            **measure_keep_list(shards, loader_images, args.repeats, args.batch_size, tokenizer, keep_path,
                                args.keep_id)}


def format_keep_table(results: dict) -> str:
    """A markdown table of a `--keep-bench` run."""
    cfg = results["config"]
    lines = [
        f"Full pipeline (tar -> decode -> tokenize -> batches of {cfg['batch_size']}), one DataLoader worker, "
        f"{cfg['images']} images x {cfg['repeats']} repeats, median images/s, without and with a keep-list "
        f"(data.keep_id={cfg['keep_id']}) of every sample plus {cfg['keep_ids']:,} others",
        "",
        "| stored | ids on the list | list size | list load | filter alone, CPU per sample | one worker: without "
        "| with keep-list | ratio | no worker, CPU time: without | with keep-list | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["sizes"]:
        t, c = r["throughput"], r["cpu_throughput"]
        lines.append(f"| {r['side']} side {r['size']} | {r['list_ids']:,} | {r['list_bytes'] / 2 ** 20:.0f} MiB "
                     f"| {r['list_load_s']:.2f} s | {r['filter_us_per_sample']:.1f} us "
                     f"| {t['without']['median']:.0f} | {t['with_keep_list']['median']:.0f} | {r['ratio']:.3f}x "
                     f"| {c['without']['median']:.0f} | {c['with_keep_list']['median']:.0f} | {r['cpu_ratio']:.3f}x |")
    return "\n".join(lines)


# ---------------------------------------------------------------- where JPEGs are decoded (data.decode)

def _seeded(seed: int) -> None:
    # the CPU generator only: torch.manual_seed would also queue a CUDA seeding call per image
    torch.default_generator.manual_seed(seed)


def _prepare_batches(jpegs: list[bytes], batch_size: int, crop_scale: float, pin: bool) -> list[dict]:
    """The workers' share of the device path: header, crop box and packing, per batch of `batch_size` images."""
    transform = train_transform(IMAGE_SIZE, crop_scale)
    batches = []
    for start in range(0, len(jpegs), batch_size):
        items = []
        for i in range(start, min(start + batch_size, len(jpegs))):
            _seeded(i)
            items.append(prepare_image(jpegs[i], IMAGE_SIZE, crop_scale, transform))
        batch = pack_batch(items, IMAGE_SIZE)
        batches.append({k: v.pin_memory() for k, v in batch.items()} if pin else batch)  # as a CUDA loader pins
    return batches


def _workers_path(jpegs: list[bytes], crop_scale: float) -> list[torch.Tensor]:
    transform = train_transform(IMAGE_SIZE, crop_scale)
    out = []
    for i, data in enumerate(jpegs):
        _seeded(i)
        out.append(transform(decode_image(data, IMAGE_SIZE)))
    return out


def _device_path(batches: list[dict], device: torch.device) -> list[torch.Tensor]:
    out = [device_images(batch, device)[0] for batch in batches]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # decode and resize run asynchronously: the clock stops when they are done
    return out


def _timed(fn: Callable[[], object], images: int) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return images / (time.perf_counter() - start), result


def measure_decode(jpegs: list[bytes], device: torch.device, batch_size: int, repeats: int,
                   crop_scale: float = 0.9) -> dict:
    """Images/s of the workers (PIL) path and the device path over the same JPEGs and crops, and their PSNR."""
    pin = device.type == "cuda"
    batches = _prepare_batches(jpegs, batch_size, crop_scale, pin)
    _device_path(batches[:1], device)  # warm-up: CUDA context, decoder handles, kernels
    _workers_path(jpegs[:4], crop_scale)
    runs = {"workers": [], "device": [], "prepare": []}
    for r in range(repeats):
        order = ["workers", "device"] if r % 2 == 0 else ["device", "workers"]
        for name in order:
            gc.collect()
            if name == "workers":
                runs[name].append(_timed(lambda: _workers_path(jpegs, crop_scale), len(jpegs))[0])
            else:
                runs[name].append(_timed(lambda: _device_path(batches, device), len(jpegs))[0])
        runs["prepare"].append(_timed(lambda: _prepare_batches(jpegs, batch_size, crop_scale, pin), len(jpegs))[0])
    cpu = _workers_path(jpegs, crop_scale)
    dev = torch.cat(_device_path(batches, device)).cpu()
    return {
        "throughput": {name: {"median": statistics.median(v), "runs": v} for name, v in runs.items()},
        "ratio": statistics.median(d / w for d, w in zip(runs["device"], runs["workers"])),
        "quality": image_agreement(zip(cpu, dev)),
        "device_rows": int(sum(len(b["jpeg_rows"]) for b in batches)),
    }


def decode_benchmark_size(size: int, args: argparse.Namespace, cache: Path) -> dict:
    """The decode measurements for one stored size."""
    jpegs = read_jpegs(ensure_shards(cache, size, args.images, args.side))
    return {"size": size, "side": args.side, "images": len(jpegs), "draft_scales": draft_scales(jpegs),
            **measure_decode(jpegs, torch.device(args.device), args.decode_batch_size, args.repeats, args.crop_scale)}


def format_decode_table(results: dict) -> str:
    """A markdown table of a `--decode-bench` run."""
    cfg = results["config"]
    lines = [
        f"Decode + random resized crop + resize to {IMAGE_SIZE} px (uint8), torch threads = 1: {cfg['images']} images "
        f"x {cfg['repeats']} repeats, median images/s; device = {cfg['device']} "
        f"({results['environment'].get('device_name', 'cpu')}), batches of {cfg['decode_batch_size']}",
        "",
        "| stored | draft (workers) | workers (PIL) | device | ratio | workers' share in device mode | PSNR dB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["sizes"]:
        t = r["throughput"]
        scales = ", ".join(f"{k} x{v}" if len(r["draft_scales"]) > 1 else k for k, v in r["draft_scales"].items())
        lines.append(f"| {r['side']} side {r['size']} | {scales} | {t['workers']['median']:.0f} "
                     f"| {t['device']['median']:.0f} | {r['ratio']:.2f}x | {t['prepare']['median']:.0f} "
                     f"| {_psnr_text(r['quality'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- report

def _psnr_text(q: dict) -> str:
    if q["psnr_db"] is None:
        return "identical"
    text = f"{q['psnr_db']:.1f} (min {q['psnr_min_db']:.1f})"
    return text + (f", {q['identical_images']} identical" if q["identical_images"] else "")


def format_table(results: dict) -> str:
    """Markdown tables of a run: decode + transform in memory, then the full one-worker pipeline."""
    cfg = results["config"]
    lines = [
        f"Decode + transform to {IMAGE_SIZE} px, one process, torch threads = 1: {cfg['images']} images x "
        f"{cfg['repeats']} repeats, median images/s (ratio: median of per-repeat ratios to the reference)",
        "",
        "| stored | bits/px | draft | reference | ours (uint8) | ratio | ours + CPU normalise | ratio "
        "| PSNR dB | mean abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["sizes"]:
        t = r["throughput"]
        scales = ", ".join(f"{k} x{v}" if len(r["draft_scales"]) > 1 else k for k, v in r["draft_scales"].items())
        lines.append(
            f"| {r['side']} side {r['size']} | {r['bits_per_pixel']:.2f} | {scales} "
            f"| {t['reference']['median']:.0f} | {t['ours']['median']:.0f} | {r['ratio']['ours']:.2f}x "
            f"| {t['ours_cpu_normalise']['median']:.0f} | {r['ratio']['ours_cpu_normalise']:.2f}x "
            f"| {_psnr_text(r['quality'])} | {r['quality']['mean_abs_diff']:.2f} |")
    loaders = [r for r in results["sizes"] if "loader" in r]
    if loaders:
        first = loaders[0]["loader"]
        lines += [
            "",
            f"Full pipeline (tar -> decode -> tokenize -> batches of {first['batch_size']}), one DataLoader worker, "
            f"{first['images']} images x {cfg['repeats']} repeats, median images/s",
            "",
            "| stored | reference (open_clip_train wds recipe) | ours (ShardStream) | ratio |",
            "| --- | --- | --- | --- |",
        ]
        for r in loaders:
            t = r["loader"]["throughput"]
            lines.append(f"| {r['side']} side {r['size']} | {t['reference']['median']:.0f} | {t['ours']['median']:.0f} "
                         f"| {r['loader']['ratio']:.2f}x |")
    return "\n".join(lines)


def _environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "open_clip": open_clip.__version__,
        "pillow": PIL.__version__,
        "libjpeg_turbo": features.version("jpg") if features.check_feature("libjpeg_turbo") else None,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_start": list(os.getloadavg()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024], help="stored sizes in px")
    parser.add_argument("--side", choices=("short", "long"), default="short",
                        help="which side of the stored image has the stored size (default: short)")
    parser.add_argument("--images", type=int, default=300, help="images per size and per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per pipeline (medians are reported)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the full-pipeline loaders")
    parser.add_argument("--no-loader", action="store_true", help="skip the full-pipeline (DataLoader) measurement")
    parser.add_argument("--cache", type=Path, default=None,
                        help="directory for the synthetic shards, reused across runs (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    parser.add_argument("--decode-bench", action="store_true",
                        help="measure data.decode instead: PIL in the workers against batched decode on --device")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="--decode-bench: where to decode")
    parser.add_argument("--decode-batch-size", type=int, default=256, help="--decode-bench: images per batch")
    parser.add_argument("--crop-scale", type=float, default=0.9,
                        help="--decode-bench: RandomResizedCrop's lower scale bound (data.train_crop_scale)")
    parser.add_argument("--keep-bench", action="store_true",
                        help="measure instead the loader without and with a keep-list (data.keep) of every sample "
                             "plus --keep-ids others")
    parser.add_argument("--keep-ids", type=int, default=10_000_000,
                        help="--keep-bench: random ids on the list besides the shards' own (default 10^7)")
    parser.add_argument("--keep-id", choices=("uid", "key"), default="uid",
                        help="--keep-bench: a DataComp .npy of uids, or a text file of keys (default: uid)")
    args = parser.parse_args(argv)
    if args.decode_bench and args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.decode_batch_size < 1:
        parser.error("--decode-batch-size must be >= 1")
    if args.keep_bench and (args.decode_bench or args.keep_ids < 0):
        parser.error("--keep-bench goes without --decode-bench, and --keep-ids must be >= 0")
    if args.images < 1 or args.repeats < 1 or args.batch_size < 1:
        parser.error("--images, --repeats and --batch-size must be >= 1")
    if any(s < IMAGE_SIZE for s in args.sizes):
        parser.error(f"--sizes must be >= {IMAGE_SIZE} (the output size); got {args.sizes}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its tables, optionally write JSON; returns the results."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.decode_bench:
        return _decode_main(args, argv)
    if args.keep_bench:
        return _keep_main(args, argv)
    tokenizer = None if args.no_loader else build_tokenizer(TOKENIZER)
    results = {"config": {"sizes": args.sizes, "side": args.side, "images": args.images, "repeats": args.repeats,
                          "batch_size": args.batch_size, "image_size": IMAGE_SIZE, "jpeg_quality": JPEG_QUALITY,
                          "command": " ".join(["python", "tools/benchmark_data.py", *(sys.argv[1:] if argv is None
                                                                                      else argv)])},
               "environment": _environment(), "sizes": []}
    return _run_sizes(args, results, lambda size, cache: benchmark_size(size, args, cache, tokenizer), format_table)


def _decode_main(args: argparse.Namespace, argv: list[str] | None) -> dict:
    environment = _environment()
    if args.device == "cuda":
        environment["device_name"] = torch.cuda.get_device_name()
    results = {"config": {"mode": "decode", "sizes": args.sizes, "side": args.side, "images": args.images,
                          "repeats": args.repeats, "device": args.device, "decode_batch_size": args.decode_batch_size,
                          "crop_scale": args.crop_scale, "image_size": IMAGE_SIZE, "jpeg_quality": JPEG_QUALITY,
                          "command": " ".join(["python", "tools/benchmark_data.py", *(sys.argv[1:] if argv is None
                                                                                      else argv)])},
               "environment": environment, "sizes": []}
    return _run_sizes(args, results, lambda size, cache: decode_benchmark_size(size, args, cache), format_decode_table)


def _keep_main(args: argparse.Namespace, argv: list[str] | None) -> dict:
    tokenizer = build_tokenizer(TOKENIZER)
    results = {"config": {"mode": "keep", "sizes": args.sizes, "side": args.side, "images": args.images,
                          "repeats": args.repeats, "batch_size": args.batch_size, "keep_ids": args.keep_ids,
                          "keep_id": args.keep_id, "image_size": IMAGE_SIZE, "jpeg_quality": JPEG_QUALITY,
                          "command": " ".join(["python", "tools/benchmark_data.py", *(sys.argv[1:] if argv is None
                                                                                      else argv)])},
               "environment": _environment(), "sizes": []}
    return _run_sizes(args, results, lambda size, cache: keep_benchmark_size(size, args, cache, tokenizer),
                      format_keep_table)


def _run_sizes(args: argparse.Namespace, results: dict, measure: Callable[[int, Path], dict],
               table: Callable[[dict], str]) -> dict:
    """Measure every stored size (shards in `--cache`, else a temporary folder), print the table, write the JSON."""
    with tempfile.TemporaryDirectory(prefix="clipalign-bench-") as tmp:
        cache = args.cache if args.cache is not None else Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            results["sizes"].append(measure(size, cache))
            print(f"stored {size} px done", file=sys.stderr, flush=True)
    results["environment"]["loadavg_end"] = list(os.getloadavg())
    print(table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
