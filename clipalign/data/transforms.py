"""Image transforms for training and evaluation: PIL in, uint8 (3, H, W) tensor out.

Normalisation happens on the device (see `clipalign.model.DualEncoder`): a uint8 batch crosses to the GPU at a
quarter of the size of a float one, and the float conversion is free there.

`decode_image` is the one decoder of every reader (training, evaluation, make_shards): it refuses images over a pixel
limit from the header alone, before any decode, and scales 16-bit grayscale to 8 bits by its range.

The resize follows the model's preprocess config (`interpolation`, `resize_mode`, as open_clip's
`get_model_preprocess_cfg` gives them), so a model is trained with the geometry it is evaluated with.
`train_crop_box` is the geometry of `train_transform` on its own, drawn from the same RNG calls: with
`data.decode=device` the workers draw it from the image header and the training process crops and resizes there
(see `clipalign.data.device_decode`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from open_clip.transform import CenterCropOrPad, ResizeKeepRatio
from PIL import Image
from torchvision import transforms as T

from clipalign.config import DEFAULT_MAX_IMAGE_PIXELS

INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}
RESIZE_MODES = ("shortest", "longest", "squash")  # open_clip's eval resize modes
_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (torchvision's and open_clip's default)
# modes Pillow opens 16-bit grayscale as (I;16 for PNGs in current Pillow, I;16B for big-endian files); convert("RGB")
# would clip every value above 255 to white
_16BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageTooLarge(ValueError):
    """An image whose header size is over the pixel limit; raised before any of it is decoded."""


class ToUint8Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W), without the float round trip of `ToTensor`."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)

    def __repr__(self) -> str:
        return "ToUint8Tensor()"


def open_image(source: bytes | str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image lazily (the header only) and refuse it if it has more than `max_pixels` pixels (0: no limit).

    Raises `ImageTooLarge` over the limit, and also for what Pillow itself refuses at open as a decompression bomb
    (over 2 x `PIL.Image.MAX_IMAGE_PIXELS`, a process-wide setting clipalign leaves alone); Pillow's errors otherwise.
    """
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from e
    width, height = img.size
    if max_pixels and width * height > max_pixels:
        img.close()
        raise ImageTooLarge(f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                            f"(data.max_image_pixels / --max-image-pixels)")
    return img


def is_16bit_gray(img: Image.Image) -> bool:
    """Whether `img` is 16-bit grayscale: an I;16 mode, or 32-bit "I" opened from a PNG or PGM (Pillow opens 16-bit
    PGMs so, older Pillows 16-bit PNGs too; neither format holds wider gray). Other "I" images (32-bit TIFFs) keep
    Pillow's conversion."""
    return img.mode in _16BIT_GRAY_MODES or (img.mode == "I" and img.format in ("PNG", "PPM"))


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as RGB; 16-bit grayscale is scaled to 8 bits by its range (value >> 8) instead of clipped at 255."""
    if is_16bit_gray(img):
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)  # "I" is signed 32-bit: keep it to 16 bits
        img = Image.fromarray((wide >> 8).astype(np.uint8))
    return img.convert("RGB")


def decode_image(data: bytes | str | os.PathLike, target_size: int | None = None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes (or a file) to RGB; JPEGs much larger than `target_size` are decoded at a reduced DCT scale.

    PIL's draft mode picks the largest scale (1/2, 1/4, 1/8) that keeps both sides at least `target_size`, so the
    following resize never upsamples. An image over `max_pixels` (0: no limit) raises `ImageTooLarge` before it is
    decoded; 16-bit grayscale is scaled to 8 bits (see `to_rgb`). Raises on corrupt or truncated data (the decode is
    forced here).
    """
    with open_image(data, max_pixels) as img:
        if target_size and img.format == "JPEG":
            img.draft("RGB", (target_size, target_size))
        return to_rgb(img)


def geometry(preprocess_cfg: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(interpolation, resize_mode) of a model's preprocess config; open_clip's defaults (bicubic, shortest) if unset.

    open_clip's "random" interpolation means bicubic outside its timm augmentations, as in its own transforms.
    """
    cfg = preprocess_cfg or {}
    interpolation = cfg.get("interpolation") or "bicubic"
    interpolation = "bicubic" if interpolation == "random" else interpolation
    resize_mode = cfg.get("resize_mode") or "shortest"
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"preprocess interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"preprocess resize_mode {resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    return interpolation, resize_mode


def train_transform(image_size: int, crop_scale: float = 0.9, interpolation: str = "bicubic",
                    resize_mode: str = "shortest", fill_color: int = 0) -> T.Compose:
    """open_clip's train recipe (RandomResizedCrop, no flip: captions may say left/right), ending in uint8.

    `interpolation` is the model's (see `geometry`); `resize_mode` and `fill_color` only matter for
    `crop_scale >= 1`, which is the eval transform (open_clip's random crop has no resize mode).
    """
    if crop_scale >= 1.0:
        return eval_transform(image_size, interpolation, resize_mode, fill_color)
    return T.Compose([T.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), ratio=_RATIO,
                                          interpolation=INTERPOLATIONS[interpolation]),
                      ToUint8Tensor()])


def eval_transform(image_size: int, interpolation: str = "bicubic", resize_mode: str = "shortest",
                   fill_color: int = 0) -> T.Compose:
    """The geometry of open_clip's eval transform for `resize_mode`, ending in uint8.

    shortest: resize the shorter side, centre crop; longest: resize the longer side, pad to a square with
    `fill_color`; squash: resize both sides, ignoring the aspect ratio.
    """
    mode = INTERPOLATIONS[interpolation]
    if resize_mode == "longest":
        steps: list = [ResizeKeepRatio(image_size, interpolation=mode, longest=1),
                       CenterCropOrPad(image_size, fill=fill_color)]
    elif resize_mode == "squash":
        steps = [T.Resize((image_size, image_size), interpolation=mode)]
    elif resize_mode == "shortest":
        steps = [T.Resize(image_size, interpolation=mode), T.CenterCrop(image_size)]
    else:
        raise ValueError(f"resize_mode {resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    return T.Compose([*steps, ToUint8Tensor()])


def train_crop_box(img: Image.Image, image_size: int, crop_scale: float = 0.9,
                   resize_mode: str = "shortest") -> tuple[float, float, float, float]:
    """The region (top, left, height, width) of `img` that `train_transform` would resize to `image_size`.

    Reads only `img.size` (a header-only image will do) and draws from torch's default generator exactly as
    `train_transform` does, so under the same seed both give the same crop. For `crop_scale >= 1` the region is
    fractional: with `shortest` (Resize of the shorter side, then CenterCrop) the part of `img` the centre crop keeps,
    with `squash` the whole image. `longest` pads rather than crops, so no box describes it: ValueError.
    """
    if crop_scale < 1.0:
        top, left, height, width = T.RandomResizedCrop.get_params(img, [crop_scale, 1.0], list(_RATIO))
        return float(top), float(left), float(height), float(width)
    width, height = img.size
    if resize_mode == "squash":
        return 0.0, 0.0, float(height), float(width)
    if resize_mode != "shortest":
        raise ValueError(f"resize_mode {resize_mode!r} pads the image: it has no crop box")
    # torchvision's Resize(int) and CenterCrop sizes and offsets, mapped back to `img`'s pixels
    short, long = min(width, height), max(width, height)
    new_long = int(image_size * long / short)
    new_w, new_h = (image_size, new_long) if width <= height else (new_long, image_size)
    crop_top, crop_left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
    sy, sx = height / new_h, width / new_w
    return crop_top * sy, crop_left * sx, image_size * sy, image_size * sx
