"""Image transforms for training and evaluation: PIL in, uint8 (3, H, W) tensor out.

Normalisation happens on the device (see `clipalign.model.DualEncoder`): a uint8 batch crosses to the GPU at a
quarter of the size of a float one, and the float conversion is free there.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

_BICUBIC = T.InterpolationMode.BICUBIC


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
    return T.Compose([T.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), interpolation=_BICUBIC),
                      ToUint8Tensor()])


def eval_transform(image_size: int) -> T.Compose:
    """Resize the shorter side, centre crop, uint8: the geometry of open_clip's eval transform."""
    return T.Compose([T.Resize(image_size, interpolation=_BICUBIC), T.CenterCrop(image_size), ToUint8Tensor()])
