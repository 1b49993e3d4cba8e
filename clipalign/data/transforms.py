"""Image transforms for training and evaluation: PIL in, uint8 (3, H, W) tensor out.

Normalisation happens on the device (see `clipalign.model.DualEncoder`): a uint8 batch crosses to the GPU at a
quarter of the size of a float one, and the float conversion is free there.

`train_crop_box` is the geometry of `train_transform` on its own, drawn from the same RNG calls: with
`data.decode=device` the workers draw it from the image header and the training process crops and resizes there
(see `clipalign.data.device_decode`).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

_BICUBIC = T.InterpolationMode.BICUBIC
_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (torchvision's and open_clip's default)


class ToUint8Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W), without the float round trip of `ToTensor`."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)

    def __repr__(self) -> str:
        return "ToUint8Tensor()"


def decode_image(data: bytes, target_size: int | None = None) -> Image.Image:
    """Decode image bytes to RGB; JPEGs much larger than `target_size` are decoded at a reduced DCT scale.

    PIL's draft mode picks the largest scale (1/2, 1/4, 1/8) that keeps both sides at least `target_size`, so the
    following resize never upsamples. Raises on corrupt or truncated data (the decode is forced here).
    """
    img = Image.open(io.BytesIO(data))
    if target_size and img.format == "JPEG":
        img.draft("RGB", (target_size, target_size))
    return img.convert("RGB")


def train_transform(image_size: int, crop_scale: float = 0.9) -> T.Compose:
    """open_clip's train recipe (RandomResizedCrop, no flip: captions may say left/right), ending in uint8."""
    if crop_scale >= 1.0:
        return eval_transform(image_size)
    return T.Compose([T.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), ratio=_RATIO, interpolation=_BICUBIC),
                      ToUint8Tensor()])


def eval_transform(image_size: int) -> T.Compose:
    """Resize the shorter side, centre crop, uint8: the geometry of open_clip's eval transform."""
    return T.Compose([T.Resize(image_size, interpolation=_BICUBIC), T.CenterCrop(image_size), ToUint8Tensor()])


def train_crop_box(img: Image.Image, image_size: int, crop_scale: float = 0.9) -> tuple[float, float, float, float]:
    """The region (top, left, height, width) of `img` that `train_transform` would resize to `image_size`.

    Reads only `img.size` (a header-only image will do) and draws from torch's default generator exactly as
    `train_transform` does, so under the same seed both give the same crop. For `crop_scale >= 1` (Resize of the
    shorter side, then CenterCrop) the region is fractional: the part of `img` the centre crop keeps.
    """
    if crop_scale < 1.0:
        top, left, height, width = T.RandomResizedCrop.get_params(img, [crop_scale, 1.0], list(_RATIO))
        return float(top), float(left), float(height), float(width)
    width, height = img.size
    # torchvision's Resize(int) and CenterCrop sizes and offsets, mapped back to `img`'s pixels
    short, long = min(width, height), max(width, height)
    new_long = int(image_size * long / short)
    new_w, new_h = (image_size, new_long) if width <= height else (new_long, image_size)
    crop_top, crop_left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
    sy, sx = height / new_h, width / new_w
    return crop_top * sy, crop_left * sx, image_size * sy, image_size * sx
