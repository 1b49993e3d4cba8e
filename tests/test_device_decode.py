"""data.decode=device: workers read and check JPEGs, the training process decodes, crops and resizes them.

Everything runs on CPU tensors here (torchvision's CPU decoder in the main process): the same code as on CUDA but
the decoder. The device path decodes at full resolution where the CPU path uses PIL's reduced DCT scale (draft), so
the two agree closely, not bit for bit: PSNR bounds below were set from measured values with some margin.
"""

from __future__ import annotations

import io
import json
import math
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tool_module import load_tool

from clipalign.config import ConfigError, load_config
from clipalign.data.device_decode import (
    DeviceDecoder,
    DeviceJpeg,
    crop_resize_batch,
    device_images,
    pack_batch,
    prepare_image,
    resolve_decode,
)
from clipalign.data.shards import ShardStream, expand_sources, make_train_loader
from clipalign.data.synthetic import draw_sample
from clipalign.data.transforms import decode_image, train_transform
from clipalign.data.writer import image_to_bytes, write_shards
from clipalign.tokenizer import build_tokenizer

IMAGE_SIZE = 112
# (shorter side, width / height): 64 is upsampled, 112 and 200 decode at full scale, 300 at 1/2 and 512 at 1/4
GEOMETRIES = [(64, 1.0), (64, 4 / 3), (112, 3 / 4), (112, 1.0), (200, 16 / 9), (200, 2 / 3), (300, 4 / 3),
              (300, 3 / 4), (512, 4 / 3), (512, 1.0), (512, 2 / 3), (512, 16 / 9)]
# measured on these images, crop_scale 0.9 / 1.0: full scale some identical, min 71.4 / 39.4 dB
# (the centre crop's fractional box is rounded to whole pixels); drafted mean 47.1 / 46.0, min 44.0 / 44.3 dB
MIN_PSNR_FULL_SCALE = 36.0
MIN_PSNR_DRAFTED = 40.0


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny-vit-64")


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, bytes, int]]:
    """Photo-like JPEGs (the data benchmark's drawing) of the sizes in GEOMETRIES: (key, bytes, shorter side)."""
    bench = load_tool("benchmark_data")
    out = []
    for i, (short, aspect) in enumerate(GEOMETRIES):
        width, height = bench.stored_geometry(short, aspect, "short")
        img = bench.synthetic_photo(width, height, seed=i)
        out.append((f"photo{i:03d}", image_to_bytes(img, "jpg", quality=90), short))
    return out


def _samples(photos):
    return [{"__key__": key, "jpg": data, "txt": f"a photo number {i}"} for i, (key, data, _) in enumerate(photos)]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def _batch(urls, tokenizer, mode: str, batch_size: int, crop_scale: float = 0.9, **kwargs) -> dict:
    stream = ShardStream(urls, tokenizer, IMAGE_SIZE, batch_size, resampled=False, shuffle_buffer=0,
                         crop_scale=crop_scale, decode=mode, **kwargs)
    return next(iter(stream))


def test_resolve_decode_and_the_config_keys():
    assert resolve_decode("auto", torch.device("cpu")) == "workers"
    # never run on a GPU yet: auto keeps the workers there too until the GPU check has passed
    assert resolve_decode("auto", torch.device("cuda")) == "workers"
    assert resolve_decode("workers", "cuda") == "workers" and resolve_decode("device", "cpu") == "device"
    assert load_config(None, []).data.decode == "auto"
    assert load_config(None, ["data.decode=device"]).data.decode == "device"
    with pytest.raises(ConfigError, match=r"data\.decode: 'gpu' is not one of auto, workers, device"):
        load_config(None, ["data.decode=gpu"])
    with pytest.raises(ValueError, match="resolve data.decode=auto first"):
        ShardStream(["x.tar"], None, 16, 2, decode="auto")
    assert load_config(None, []).data.decode_backend == "auto"
    with pytest.raises(ConfigError, match=r"data\.decode_backend: 'nvjpeg' is not one of"):
        load_config(None, ["data.decode_backend=nvjpeg"])
    with pytest.raises(ConfigError, match=r"data\.decode_budget_mb"):
        load_config(None, ["data.decode_budget_mb=0"])


@pytest.mark.parametrize("crop_scale", [0.9, 1.0])
def test_device_path_matches_the_cpu_path(tmp_path, tokenizer, photos, crop_scale):
    """Same samples, same seeds: the crops agree and the pixels are within a PSNR bound of PIL's."""
    urls = [str(p) for p in write_shards(_samples(photos), tmp_path)]
    cpu = _batch(urls, tokenizer, "workers", len(photos), crop_scale)
    dev = _batch(urls, tokenizer, "device", len(photos), crop_scale)
    assert dev["keys"] == cpu["keys"] and dev["jpeg_rows"].tolist() == list(range(len(photos)))
    assert dev["images"].shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)  # no placeholder for the device's rows
    images, skipped = device_images(dev, "cpu")
    assert skipped == {} and images.shape == cpu["images"].shape and images.dtype == torch.uint8
    short = {key: s for key, _, s in photos}
    full, drafted = [], []
    for key, a, b in zip(cpu["keys"], cpu["images"], images):
        (drafted if short[key] >= 2 * IMAGE_SIZE else full).append(_psnr(a, b))
    print(f"crop_scale {crop_scale}: full scale mean {sum(full) / len(full):.1f} min {min(full):.1f} dB; "
          f"drafted mean {sum(drafted) / len(drafted):.1f} min {min(drafted):.1f} dB")
    assert len(drafted) == 6 and min(drafted) > MIN_PSNR_DRAFTED
    assert min(full) > MIN_PSNR_FULL_SCALE


def test_the_draft_decision_and_the_crop_box_follow_the_cpu_path(photos):
    """The header-only draft gives the size PIL really decodes to, and the box is the crop the CPU path draws from
    the same seed, scaled back to full resolution."""
    transform = train_transform(IMAGE_SIZE, 0.9)
    crop = transform.transforms[0]
    for seed, (key, data, short) in enumerate(photos):
        torch.manual_seed(seed)
        item = prepare_image(data, IMAGE_SIZE, 0.9, transform)
        assert isinstance(item, DeviceJpeg) and item.data == data
        torch.manual_seed(seed)
        decoded = decode_image(data, IMAGE_SIZE)  # what the CPU path crops: really decoded, drafted
        top, left, height, width = crop.get_params(decoded, crop.scale, crop.ratio)
        full = Image.open(io.BytesIO(data)).size
        scale = round(full[0] / decoded.size[0])
        assert scale == (4 if short == 512 else 2 if short == 300 else 1), key
        expected = [top * scale, left * scale, height * scale, width * scale]
        expected[2], expected[3] = min(expected[2], full[1] - expected[0]), min(expected[3], full[0] - expected[1])
        assert list(item.box) == expected, key


def _odd_images() -> list[dict]:
    rng = random.Random(7)
    img, caption, _ = draw_sample(rng, 96)
    cmyk = io.BytesIO()
    img.convert("CMYK").save(cmyk, format="JPEG", quality=90)
    trailing = image_to_bytes(img, "jpg") + b"\0" * 16  # bytes after the EOI marker: PIL decodes it
    return [{"__key__": "png", "png": image_to_bytes(img, "png"), "txt": "a png"},
            {"__key__": "webp", "webp": image_to_bytes(img, "webp"), "txt": "a webp"},
            {"__key__": "cmyk", "jpg": cmyk.getvalue(), "txt": "a cmyk jpeg"},
            {"__key__": "trailing", "jpg": trailing, "txt": "a jpeg with bytes after its end"},
            {"__key__": "plain", "jpg": image_to_bytes(img, "jpg"), "txt": "a plain jpeg"},
            {"__key__": "grey", "jpg": image_to_bytes(img.convert("L"), "jpg"), "txt": "a greyscale jpeg"}]


def test_png_webp_cmyk_greyscale_and_progressive_jpegs_are_decoded_in_the_worker(tmp_path, tokenizer):
    """Only baseline colour JPEGs go to the device: nvJPEG decodes progressive and greyscale ones one at a time in
    software with a host wait each, so the workers take them (the SOF2 marker is in the header they read)."""
    samples = _odd_images()
    img, _, _ = draw_sample(random.Random(8), 96)
    progressive = io.BytesIO()
    img.save(progressive, format="JPEG", quality=90, progressive=True)
    samples.append({"__key__": "progressive", "jpg": progressive.getvalue(), "txt": "a progressive jpeg"})
    assert b"\xff\xc2" in progressive.getvalue()[:600]  # SOF2, before the first scan
    urls = [str(p) for p in write_shards(samples, tmp_path)]
    cpu = _batch(urls, tokenizer, "workers", 7)
    dev = _batch(urls, tokenizer, "device", 7)
    assert dev["keys"] == cpu["keys"] == ["png", "webp", "cmyk", "trailing", "plain", "grey", "progressive"]
    assert dev["jpeg_rows"].tolist() == [4] and dev["image_rows"].tolist() == [0, 1, 2, 3, 5, 6]
    worker_rows = dev["image_rows"].tolist()
    assert torch.equal(dev["images"], cpu["images"][worker_rows])  # decoded in the worker, exactly as the CPU path
    assert dev["jpeg_offsets"].tolist() == [0, len(dev["jpeg"])] and len(dev["jpeg"]) == len(samples[4]["jpg"])
    images, skipped = device_images(dev, "cpu")
    assert skipped == {} and torch.equal(images[worker_rows], cpu["images"][worker_rows])
    assert _psnr(images[4], cpu["images"][4]) > MIN_PSNR_FULL_SCALE


def _corrupt_huffman(data: bytes) -> bytes:
    """A JPEG whose header opens and which ends with EOI, but whose Huffman table makes every decoder fail."""
    at = data.find(b"\xff\xc4")
    return data[:at + 5] + b"\xff" * 20 + data[at + 25:]


def test_truncated_and_corrupt_jpegs_count_once_and_the_batch_keeps_its_size(tmp_path, tokenizer, photos):
    good = _samples(photos)[:8]
    data = good[0]["jpg"]
    bad = [{"__key__": "truncated", "jpg": data[: len(data) // 2], "txt": "cut short"},
           {"__key__": "corrupt", "jpg": _corrupt_huffman(data), "txt": "a broken huffman table"},
           {"__key__": "garbage", "jpg": b"\xff\xd8\xff not a jpeg at all", "txt": "not an image"}]
    samples = good[:3] + bad[:1] + good[3:5] + bad[1:] + good[5:]
    urls = [str(p) for p in write_shards(samples, tmp_path)]
    stream = ShardStream(urls, tokenizer, IMAGE_SIZE, 4, resampled=False, shuffle_buffer=0, decode="device")
    it = iter(stream)
    batches = [next(it) for _ in range(3)]  # 9 samples reach the batches per pass; the stream goes on
    counts = {"worker": 0, "device": 0}
    for batch in batches:
        images, skipped = device_images(batch, "cpu")
        assert images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
        counts["worker"] += batch["skipped"].get("bad_image", 0)
        counts["device"] += skipped.get("bad_image", 0)
        if "corrupt" in batch["keys"]:
            row = batch["keys"].index("corrupt")
            others = [r for r in range(4) if r != row]
            assert any((images[row] == images[r]).all() for r in others)  # a copy of another row of the batch
    # truncated (no EOI: decoded in the worker, where PIL fails) and garbage (no header) in the worker; the corrupt
    # one passes the worker's check and fails in the training process: each counted once in the first pass
    assert [k for b in batches[:2] for k in b["keys"]].count("corrupt") == 1
    assert counts == {"worker": 2, "device": 1}
    assert "truncated" not in batches[0]["keys"] + batches[1]["keys"]


def test_the_loader_gives_the_same_batches_in_both_modes_and_resumes_exactly(tmp_path, tokenizer, photos):
    samples = [dict(s, __key__=f"{s['__key__']}r{r}") for r in range(2) for s in _samples(photos)]
    urls = [str(p) for p in write_shards(samples, tmp_path, samples_per_shard=6)]  # 24 samples, 4 shards
    sources = expand_sources(f"{tmp_path}/train-{{000000..000003}}.tar")

    def run(mode: str, n: int) -> list[dict]:
        loader = make_train_loader(sources, tokenizer, IMAGE_SIZE, 4, workers=2, seed=3, resampled=False,
                                   shuffle_buffer=4, decode=mode)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    cpu, dev = run("workers", 8), run("device", 8)
    for a, b in zip(cpu, dev):
        assert a["keys"] == b["keys"] and a["position"] == b["position"] and a["skipped"] == b["skipped"]
        assert torch.equal(a["texts"], b["texts"])
        images, _ = device_images(b, "cpu")
        assert min(_psnr(x, y) for x, y in zip(a["images"], images)) > MIN_PSNR_DRAFTED

    def batches(start, n):
        stream = ShardStream(urls, tokenizer, IMAGE_SIZE, 4, seed=3, resampled=False, shuffle_buffer=4,
                             start=start, decode="device")
        it = iter(stream)
        return [next(it) for _ in range(n)]

    full = batches(None, 9)  # past the end of the pass
    stream, epoch, emitted = full[2]["position"]
    resumed = batches({stream: (epoch, emitted)}, 6)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[3:]]
    for a, b in zip(resumed, full[3:]):  # the same crops: seeded per sample and pass
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(device_images(a, "cpu")[0],
                                                                    device_images(b, "cpu")[0])


@pytest.mark.slow  # 1 to 8 s here, depending on the machine's load
def test_a_short_training_run_decodes_on_the_device(tmp_path):
    from clipalign.train import train

    rng = random.Random(0)
    samples = []
    for i in range(24):
        img, caption, _ = draw_sample(rng, 64 if i % 2 else 160)
        samples.append({"__key__": f"{i:04d}", "jpg": image_to_bytes(img, "jpg"), "txt": caption})
    samples[5]["jpg"] = _corrupt_huffman(samples[5]["jpg"])
    write_shards(samples, tmp_path / "shards", samples_per_shard=12)
    run = tmp_path / "run"
    cfg = load_config(None, [f"data.train={tmp_path}/shards/train-{{000000..000001}}.tar", "data.decode=device",
                             "data.batch_size=8", "data.workers=1", "data.resampled=false", "data.shuffle_buffer=0",
                             "model.name=tiny-vit-64", "train.precision=fp32", "train.steps=3", "train.log_every=1",
                             "optim.warmup_steps=1", f"train.output_dir={run}", "train.log_with=none"])
    start = time.perf_counter()
    summary = train(cfg)
    print(f"3 steps in {time.perf_counter() - start:.1f} s")
    assert summary["step"] == 3 and math.isfinite(summary["loss"])
    assert summary["skipped"] == {"bad_image": 1}  # the corrupt JPEG, found in the training process, once
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # decoding in the training process is its own figure, not part of the time spent waiting for batches
    assert all(0 < m["decode"] < 1 and 0 <= m["data_wait"] < 1 for m in lines if "loss" in m)


def _count_operators(fn) -> int:
    """How many aten operators other than views `fn()` runs: on a GPU, each launches one kernel or more (a view
    launches none)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += not func.is_view
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def test_crop_and_resize_of_a_batch_is_a_fixed_number_of_operators_and_pils_result():
    """However many rows and sizes, the same operators; and the pixels PIL's crop + resize gives (the workers')."""
    gen = torch.Generator().manual_seed(0)

    def rows(n):
        images, boxes = [], []
        for i in range(n):
            h, w = 40 + 7 * i, 90 - 3 * i
            images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen))
            boxes.append((i % 5, i % 3, h - 6, w - 4))
        return images, boxes

    batches = {n: rows(n) for n in (2, 5, 17)}
    counts = {n: _count_operators(lambda n=n: crop_resize_batch(*batches[n], 24, "bicubic")) for n in batches}
    assert counts[2] == counts[5] == counts[17] and counts[17] < 80, counts
    images, boxes = rows(6)
    for interpolation, resample in [("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR),
                                    ("nearest", Image.Resampling.NEAREST)]:
        out = crop_resize_batch(images, boxes, 24, interpolation)
        for image, (top, left, height, width), got in zip(images, boxes, out):
            pil = Image.fromarray(image.permute(1, 2, 0).numpy()).crop((left, top, left + width, top + height))
            expected = torch.from_numpy(np.array(pil.resize((24, 24), resample))).permute(2, 0, 1)
            assert (got.int() - expected.int()).abs().max() <= 1, interpolation  # random noise: the hardest case
    # a memory budget smaller than the batch splits it into groups: the same pixels
    small = crop_resize_batch(images, boxes, 24, budget_bytes=3 * 60 * 90 * 5 * 2)
    assert torch.equal(small, crop_resize_batch(images, boxes, 24))


def test_a_batch_over_the_decode_budget_sends_its_largest_jpegs_to_the_workers(photos):
    transform = train_transform(IMAGE_SIZE, 0.9)
    items = []
    for seed, (_, data, _) in enumerate(photos):
        torch.manual_seed(seed)
        items.append(prepare_image(data, IMAGE_SIZE, 0.9, transform))
    sizes = [item.size[0] * item.size[1] for item in items]
    budget = sum(sorted(sizes)[:5])  # room for the five smallest
    packed = pack_batch(items, IMAGE_SIZE, budget=budget)
    kept = sorted(range(len(items)), key=lambda r: sizes[r])[:5]
    assert packed["jpeg_rows"].tolist() == sorted(kept)
    assert sorted(packed["image_rows"].tolist() + packed["jpeg_rows"].tolist()) == list(range(len(items)))
    whole = pack_batch(items, IMAGE_SIZE)  # no budget: every JPEG for the device
    full, _ = device_images(whole, "cpu")
    mixed, _ = device_images(packed, "cpu")
    # the worker decodes at a reduced DCT scale with the same box: close to the full-resolution decode
    assert min(_psnr(a, b) for a, b in zip(full, mixed)) > MIN_PSNR_DRAFTED - 6
    # an image over the whole budget never reaches the device
    torch.manual_seed(0)
    assert not isinstance(prepare_image(photos[-1][1], IMAGE_SIZE, 0.9, transform, budget_pixels=100), DeviceJpeg)


def test_both_decoder_libraries_give_the_same_batch(photos):
    pytest.importorskip("torchcodec")
    transform = train_transform(IMAGE_SIZE, 0.9)
    items = []
    for seed, (_, data, _) in enumerate(photos):
        torch.manual_seed(seed)
        items.append(prepare_image(data, IMAGE_SIZE, 0.9, transform))
    batch = pack_batch(items, IMAGE_SIZE)
    codec, vision = DeviceDecoder("cpu", "torchcodec"), DeviceDecoder("cpu", "torchvision")
    assert (codec.backend, vision.backend) == ("torchcodec", "torchvision")
    assert torch.equal(codec(batch)[0], vision(batch)[0])


def test_a_bad_row_costs_a_few_decode_calls_not_one_per_row(photos):
    transform = train_transform(IMAGE_SIZE, 0.9)
    items = []
    for i in range(16):
        torch.manual_seed(i)
        data = photos[i % len(photos)][1]
        items.append(prepare_image(_corrupt_huffman(data) if i == 11 else data, IMAGE_SIZE, 0.9, transform))
    decoder = DeviceDecoder("cpu", "torchvision")
    images, skipped = decoder(pack_batch(items, IMAGE_SIZE))
    assert skipped == {"bad_image": 1} and images.shape[0] == 16
    assert decoder.calls <= 2 * 4 + 1  # halving 16 rows down to the bad one: one failed call per level
    assert decoder.seconds > 0
