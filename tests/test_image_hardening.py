"""Image hardening: 16-bit grayscale, the pixel limit, and the model's resize in training.

Real files in tmp_path, read by the real readers: the training stream (both decode paths), evaluation's readers and
make_shards.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from clipalign.config import DataConfig, ModelConfig
from clipalign.data.device_decode import device_images
from clipalign.data.eval_sets import ImagePaths, ShardSamples, collate_samples
from clipalign.data.make_shards import STATS_FILE, folder_samples, make_shards
from clipalign.data.make_shards import main as make_main
from clipalign.data.shards import ShardStream, expand_urls
from clipalign.data.transforms import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLarge,
    ToUint8Tensor,
    decode_image,
    eval_transform,
    train_transform,
)
from clipalign.data.writer import image_to_bytes, write_shards
from clipalign.evaluate import zero_shot_classification, zero_shot_retrieval
from clipalign.model import create_model
from clipalign.tokenizer import build_tokenizer

SIDE = 16  # the 16-bit test image's side; training at this size and crop_scale 1 leaves its pixels as they are
LIMIT = 10_000  # a low pixel limit, so that a 200 x 200 image is over it


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny-vit-64")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(ModelConfig(name="tiny-vit-64")).eval()


def _gray16() -> np.ndarray:
    """SIDE x SIDE 16-bit values spread over 0..65535, both ends included, none a multiple of 256 apart from 0."""
    return np.linspace(0, 65535, SIDE * SIDE).round().astype(np.uint16).reshape(SIDE, SIDE)


def _expected_rgb(values: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8: the 16-bit values scaled to 8 bits by their range."""
    return np.repeat((values >> 8).astype(np.uint8)[None], 3, axis=0)


def _png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_gray16()).save(buf, "PNG")
    return buf.getvalue()


def _big_jpeg(size: int = 200) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return image_to_bytes(Image.fromarray(pixels), "jpg", quality=90)


def _truncated_big_jpeg() -> bytes:
    """A JPEG header saying 200 x 200, then too few bytes to decode: corrupt, yet over the limit from its header."""
    data = _big_jpeg()
    return data[:len(data) // 4]


def _small_png(colour=(10, 200, 30)) -> bytes:
    return image_to_bytes(Image.new("RGB", (SIDE, SIDE), colour), "png")


def _one_pass(urls, tokenizer, n, **kwargs) -> dict:
    stream = ShardStream(urls, tokenizer, image_size=SIDE, batch_size=n, resampled=False, shuffle_buffer=0,
                         crop_scale=1.0, **kwargs)
    return next(iter(stream))


# ---- 16-bit grayscale ------------------------------------------------------------------------------------------


def test_16bit_pngs_tiffs_and_pgms_decode_by_their_range():
    values = _gray16()
    opened = Image.open(io.BytesIO(_png16()))
    assert opened.mode == "I;16"
    assert (np.asarray(opened.convert("RGB")) == 255).mean() > 0.99  # the bug: Pillow clips every value above 255
    big_endian = Image.frombytes("I;16B", (SIDE, SIDE), values.astype(">u2").tobytes())
    tiff, pgm = io.BytesIO(), io.BytesIO()
    big_endian.save(tiff, "TIFF")
    Image.fromarray(values).save(pgm, "PPM")
    assert Image.open(io.BytesIO(pgm.getvalue())).mode == "I"  # 32-bit ints holding 16-bit data
    for data in (_png16(), tiff.getvalue(), pgm.getvalue()):
        got = np.asarray(decode_image(data)).transpose(2, 0, 1)
        np.testing.assert_array_equal(got, _expected_rgb(values))


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_training_reads_a_16bit_png_by_its_range(tmp_path, tokenizer, decode):
    urls = write_shards([{"__key__": "gray", "png": _png16(), "txt": "a gradient"}], tmp_path)
    batch = _one_pass([str(u) for u in urls], tokenizer, 1, decode=decode)
    images, skipped = device_images(batch, "cpu")
    assert skipped == {} and batch["skipped"] == {}
    np.testing.assert_array_equal(images[0].numpy(), _expected_rgb(_gray16()))


def test_evaluation_readers_read_a_16bit_png_by_its_range(tmp_path):
    path = tmp_path / "gray.png"
    path.write_bytes(_png16())
    image, _, reason = ImagePaths([path], [0], ToUint8Tensor())[0]
    assert reason == ""
    np.testing.assert_array_equal(image.numpy(), _expected_rgb(_gray16()))
    urls = write_shards([{"__key__": "gray", "png": _png16(), "cls": b"0"}], tmp_path / "shards")
    [(image, target, reason)] = list(ShardSamples(str(urls[0]), ToUint8Tensor(), lambda s: 0))
    np.testing.assert_array_equal(image.numpy(), _expected_rgb(_gray16()))


def test_make_shards_stores_16bit_gray_as_the_8bit_png_training_reads(tmp_path, tokenizer):
    src = tmp_path / "in"
    src.mkdir()
    (src / "gray.png").write_bytes(_png16())
    (src / "gray.txt").write_text("a gradient")
    stats = make_shards(folder_samples(src), tmp_path / "out")
    assert stats["samples_written"] == 1 and stats["images_reencoded"] == 1
    [raw] = list(wds.WebDataset(expand_urls(stats["pattern"]), shardshuffle=False))
    stored = Image.open(io.BytesIO(raw["png"]))
    assert (stored.format, stored.mode) == ("PNG", "L")  # any reader's convert("RGB") now sees the image
    np.testing.assert_array_equal(np.asarray(stored), _gray16() >> 8)
    batch = _one_pass(expand_urls(stats["pattern"]), tokenizer, 1)
    np.testing.assert_array_equal(batch["images"][0].numpy(), _expected_rgb(_gray16()))


# ---- the pixel limit -------------------------------------------------------------------------------------------


def test_the_limit_is_read_from_the_header_before_any_decode():
    assert DataConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS
    with pytest.raises(OSError):
        decode_image(_truncated_big_jpeg(), max_pixels=0)  # corrupt: a decode fails
    with pytest.raises(ImageTooLarge, match="200x200 = 40000 pixels"):
        decode_image(_truncated_big_jpeg(), max_pixels=LIMIT)  # refused first: never decoded
    assert decode_image(_big_jpeg(), max_pixels=40_000).size == (200, 200)  # at the limit: fine
    assert decode_image(_big_jpeg(), max_pixels=0).size == (200, 200)  # 0: no limit


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_training_counts_images_over_the_limit_as_bad_image(tmp_path, tokenizer, decode):
    samples = [{"__key__": "big", "jpg": _big_jpeg(), "txt": "big"},
               {"__key__": "cut", "jpg": _truncated_big_jpeg(), "txt": "big and cut"},
               {"__key__": "ok1", "png": _small_png(), "txt": "small"},
               {"__key__": "ok2", "jpg": _big_jpeg(50), "txt": "small jpeg"}]
    urls = [str(u) for u in write_shards(samples, tmp_path)]
    batch = _one_pass(urls, tokenizer, 2, decode=decode, max_image_pixels=LIMIT)
    assert batch["keys"] == ["ok1", "ok2"]
    assert batch["skipped"] == {"bad_image": 2}
    assert device_images(batch, "cpu")[1] == {}
    with pytest.raises(ValueError, match="max_image_pixels"):
        ShardStream(urls, tokenizer, SIDE, 2, max_image_pixels=-1)


def test_make_shards_counts_images_over_the_limit_as_bad_image(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name, data in (("big.jpg", _big_jpeg()), ("cut.jpg", _truncated_big_jpeg()), ("ok.png", _small_png())):
        (src / name).write_bytes(data)
        (src / name).with_suffix(".txt").write_text(f"the {name} image")
    make_main(["folder", str(src), "--out", str(tmp_path / "out"), "--max-image-pixels", str(LIMIT),
               "--no-progress"])
    stats = json.loads((tmp_path / "out" / STATS_FILE).read_text())
    assert stats["samples_written"] == 1
    assert stats["failures"]["bad_image"]["count"] == 2
    assert stats["options"]["max_image_pixels"] == LIMIT


def test_evaluation_skips_and_counts_images_over_the_limit(tmp_path, model):
    folder = tmp_path / "folder"
    for label, colour in enumerate([(220, 30, 30), (30, 30, 220)]):
        (folder / f"class{label}").mkdir(parents=True)
        (folder / f"class{label}" / "small.png").write_bytes(_small_png(colour))
    (folder / "class0" / "big.jpg").write_bytes(_big_jpeg())
    (folder / "class1" / "cut.jpg").write_bytes(_truncated_big_jpeg())
    result = zero_shot_classification(model, folder, templates=["a {}."], batch_size=2, progress=False,
                                      max_image_pixels=LIMIT)
    assert result["num_images"] == 2 and result["skipped"] == {"bad_image": 2}

    urls = write_shards([{"__key__": "big", "jpg": _big_jpeg(), "cls": b"0"},
                         {"__key__": "ok", "png": _small_png(), "cls": b"1"}], tmp_path / "shards")
    (tmp_path / "shards" / "classnames.txt").write_text("red\nblue\n")
    result = zero_shot_classification(model, str(urls[0]), templates=["a {}."], progress=False,
                                      max_image_pixels=LIMIT)
    assert result["num_images"] == 1 and result["skipped"] == {"bad_image": 1}

    # retrieval from a CSV: the skipped image's captions go with it, the others keep their own images
    table = tmp_path / "pairs.csv"
    with table.open("w", newline="") as f:
        rows = [("folder/class0/big.jpg", "a big one"), ("folder/class0/small.png", "a red square"),
                ("folder/class1/small.png", "a blue square"), ("folder/class0/big.jpg", "big again")]
        csv.writer(f).writerows([("filepath", "caption"), *rows])
    result = zero_shot_retrieval(model, table, batch_size=2, progress=False, max_image_pixels=LIMIT)
    assert (result["num_images"], result["num_texts"]) == (2, 2)
    assert result["skipped"] == {"bad_image": 1}


def test_evaluation_readers_skip_over_the_limit_as_bad_image(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(_truncated_big_jpeg())
    assert ImagePaths([path], [7], ToUint8Tensor(), max_pixels=LIMIT)[0] == (None, 7, "bad_image")
    with pytest.raises(ValueError, match="cannot be read"):  # a corrupt image a folder names is still an error
        ImagePaths([path], [7], ToUint8Tensor(), max_pixels=0)[0]
    loader = DataLoader(ImagePaths([path], [7], ToUint8Tensor(), max_pixels=LIMIT), batch_size=2,
                        collate_fn=collate_samples)
    [(images, targets, skipped)] = list(loader)
    assert images is None and targets == [] and skipped == {"bad_image": 1}


# ---- the model's resize ----------------------------------------------------------------------------------------


def _photo(width: int = 60, height: int = 40) -> Image.Image:
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_the_preprocess_configs_interpolation_reaches_the_training_transform(tmp_path, tokenizer, decode):
    photo = _photo()
    urls = [str(u) for u in write_shards([{"__key__": "p", "png": image_to_bytes(photo, "png"), "txt": "p"}],
                                         tmp_path)]
    bilinear = T.Compose([T.Resize(SIDE, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(SIDE),
                          ToUint8Tensor()])(photo)
    bicubic = T.Compose([T.Resize(SIDE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(SIDE),
                         ToUint8Tensor()])(photo)
    assert not torch.equal(bilinear, bicubic)
    pp = {**open_clip.get_model_preprocess_cfg(create_model(ModelConfig(name="tiny-vit-64")).clip),
          "interpolation": "bilinear"}
    batch = _one_pass(urls, tokenizer, 1, decode=decode, preprocess_cfg=pp)  # a PNG: decoded in the workers
    assert torch.equal(device_images(batch, "cpu")[0][0], bilinear)
    default = _one_pass(urls, tokenizer, 1, decode=decode)
    assert torch.equal(device_images(default, "cpu")[0][0], bicubic)  # no config: as before


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_the_device_path_resizes_jpegs_with_the_models_interpolation(tmp_path, tokenizer, interpolation):
    # 40 x 30 decodes at full scale in the workers too, and squash's box is the whole image: the paths agree closely
    data = image_to_bytes(_photo(40, 30), "jpg", quality=95)
    urls = [str(u) for u in write_shards([{"__key__": "p", "jpg": data, "txt": "p"}], tmp_path)]
    pp = {"interpolation": interpolation, "resize_mode": "squash"}
    batch = _one_pass(urls, tokenizer, 1, decode="device", preprocess_cfg=pp)
    assert batch["jpeg_rows"].tolist() == [0]  # left for the device, with its interpolation
    on_device = device_images(batch, "cpu")[0][0].double()
    workers = _one_pass(urls, tokenizer, 1, decode="workers", preprocess_cfg=pp)["images"][0].double()
    other = {**pp, "interpolation": "bilinear" if interpolation == "bicubic" else "bicubic"}
    another = _one_pass(urls, tokenizer, 1, decode="workers", preprocess_cfg=other)["images"][0].double()
    assert (on_device - workers).abs().mean() < 0.1  # measured: 0.01 (bilinear), 0.004 (bicubic), 0 (nearest)
    assert (on_device - another).abs().mean() > 1.0


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_the_training_resize_is_open_clips_eval_geometry(tokenizer, tmp_path, resize_mode):
    photo = _photo(40, 30)
    theirs = open_clip.image_transform(SIDE, is_train=False, mean=(0.0,) * 3, std=(1.0,) * 3,
                                       resize_mode=resize_mode, interpolation="bilinear")(photo)
    ours = train_transform(SIDE, 1.0, "bilinear", resize_mode)(photo)
    assert torch.equal(ours, (theirs * 255).round().to(torch.uint8))
    assert torch.equal(ours, eval_transform(SIDE, "bilinear", resize_mode)(photo))
    # the device path follows: a JPEG of each mode, decoded there (or, padded, in the workers) like in the workers
    jpeg = image_to_bytes(photo, "jpg", quality=95)
    urls = [str(u) for u in write_shards([{"__key__": "p", "jpg": jpeg, "txt": "p"}], tmp_path)]
    pp = {"interpolation": "bilinear", "resize_mode": resize_mode}
    on_device = device_images(_one_pass(urls, tokenizer, 1, decode="device", preprocess_cfg=pp), "cpu")[0][0]
    workers = _one_pass(urls, tokenizer, 1, decode="workers", preprocess_cfg=pp)["images"][0]
    assert (on_device.double() - workers.double()).abs().mean() < 3.0
