"""JPEGs decoded on the training device (`data.decode=device`): workers read, the training process decodes.

On a GPU the CPU is the scarce part, and PIL's JPEG decode is most of a worker's time. In this mode a DataLoader
worker only opens each image's header, checks it and draws its crop, and a batch carries the JPEG bytes:

    worker (`prepare_image`, under the sample's seeded RNG)
        header opens and is within the pixel limit (else `bad_image`, never decoded)
        format JPEG, mode RGB or L, data ends with the EOI marker FF D9, a crop (not a padding resize mode)
            -> `DeviceJpeg(data, box)`: the crop `train_transform` would take (same draft decision, same RNG draws),
               mapped to full-resolution pixels
        anything else (PNG, WebP, CMYK JPEGs, bytes after the EOI) -> decoded here with PIL as in `workers` mode
    worker (`pack_batch`): one batch = a handful of tensors, whatever its size (each tensor is one shared-memory file)
        images       uint8 (B, 3, S, S)  rows decoded in the worker; zeros where `decode_mask` is set
        decode_mask  bool (B,)           rows still to decode
        jpeg         uint8 (N,)          the JPEG bytes of those rows, concatenated in row order
        jpeg_offsets int64 (B + 1,)      row r's bytes are jpeg[offsets[r]:offsets[r + 1]] (empty for decoded rows)
        boxes        int32 (B, 4)        (top, left, height, width) of the crop in full-resolution pixels
        interpolation uint8 (1,)         the resize's interpolation, an index into `INTERPOLATION_CODES`
    training process (`device_images`): one batched `torchvision.io.decode_jpeg` on the device (nvjpeg on CUDA, the
        CPU decoder in this process on a CPU device), then per row crop + antialiased resize to S x S, uint8, with
        the model's interpolation (bicubic for today's models), as the workers' `train_transform` resizes.

Failures are never fatal. If the batched decode raises, rows are decoded one by one; a row the device decoder
refuses is decoded with PIL on the CPU here, with the same box; a row nothing decodes counts as `bad_image` and its
slot gets a copy of another row of the batch, so every process keeps the same batch size (the loss gathers equal
batches).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from clipalign.config import DECODE_CHOICES
from clipalign.data.transforms import (
    DEFAULT_MAX_IMAGE_PIXELS,
    INTERPOLATIONS,
    decode_image,
    open_image,
    train_crop_box,
)

_EOI = b"\xff\xd9"
# PIL modes of JPEGs the device decoders turn into RGB as PIL's convert("RGB") does; CMYK/YCCK stay with PIL
_DEVICE_MODES = ("RGB", "L")
_DRAFT_SCALES = (8, 4, 2, 1)
INTERPOLATION_CODES = tuple(INTERPOLATIONS)  # a batch carries its interpolation as an index into these names


def resolve_decode(mode: str, device: torch.device | str) -> str:
    """`workers` or `device`: what `data.decode=mode` means on `device` (`auto` decodes on the device on CUDA only)."""
    if mode not in DECODE_CHOICES:
        raise ValueError(f"data.decode must be one of {', '.join(DECODE_CHOICES)}, got {mode!r}")
    if mode == "auto":
        return "device" if torch.device(device).type == "cuda" else "workers"
    return mode


class DeviceJpeg(NamedTuple):
    """A JPEG left for the training process: its bytes and the crop (top, left, height, width) in its own pixels."""

    data: bytes
    box: tuple[int, int, int, int]


def _draft_scale(full: tuple[int, int], drafted: tuple[int, int]) -> int:
    """The DCT scale PIL's draft chose: drafted sides are the full ones divided by it, rounded up."""
    for scale in _DRAFT_SCALES:
        if ((full[0] + scale - 1) // scale, (full[1] + scale - 1) // scale) == drafted:
            return scale
    raise ValueError(f"no DCT scale takes {full} to {drafted}")


def _full_resolution_box(box: tuple[float, float, float, float], scale: int,
                         size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A crop of the drafted image in the full image's whole pixels (a drafted pixel covers scale x scale of them)."""
    top, left, height, width = box
    width_full, height_full = size
    y0, x0 = min(round(top * scale), height_full - 1), min(round(left * scale), width_full - 1)
    y1, x1 = min(round((top + height) * scale), height_full), min(round((left + width) * scale), width_full)
    return y0, x0, max(1, y1 - y0), max(1, x1 - x0)


def prepare_image(data: bytes, image_size: int, crop_scale: float, transform,
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                  resize_mode: str = "shortest") -> torch.Tensor | DeviceJpeg:
    """A worker's share of one image: a `DeviceJpeg` for the device, or the uint8 (3, S, S) image decoded here.

    Call it where `transform(decode_image(data, image_size, max_pixels))` would run (under the sample's seeded RNG),
    with the `resize_mode` `transform` was built with: it draws the same crop. Raises `ImageTooLarge` for an image
    over `max_pixels` (0: no limit) before anything is decoded, and, as PIL does, on data whose header does not open
    or that fails the CPU decode.
    """
    img = open_image(data, max_pixels)  # lazy: reads the header only
    padded = crop_scale >= 1.0 and resize_mode == "longest"  # a padding resize has no crop box for the device
    if img.format != "JPEG" or img.mode not in _DEVICE_MODES or not data.endswith(_EOI) or padded:
        # not for the device decoders; a truncated JPEG fails here and counts as bad_image, as in `workers` mode
        return transform(decode_image(data, image_size, max_pixels))
    full = img.size
    img.draft("RGB", (image_size, image_size))  # the CPU path's reduced DCT scale; on a lazy image, the size only
    box = train_crop_box(img, image_size, crop_scale, resize_mode)
    return DeviceJpeg(data, _full_resolution_box(box, _draft_scale(full, img.size), full))


def pack_batch(items: Sequence[torch.Tensor | DeviceJpeg], image_size: int,
               interpolation: str = "bicubic") -> dict[str, torch.Tensor]:
    """Worker-side batch tensors of `prepare_image` results (see the module docstring for the fields); the device
    resizes with `interpolation` (one of `INTERPOLATION_CODES`)."""
    n = len(items)
    images = torch.zeros(n, 3, image_size, image_size, dtype=torch.uint8)
    mask = torch.zeros(n, dtype=torch.bool)
    boxes = torch.zeros(n, 4, dtype=torch.int32)
    lengths = torch.zeros(n + 1, dtype=torch.int64)
    chunks = []
    for row, item in enumerate(items):
        if isinstance(item, DeviceJpeg):
            mask[row] = True
            boxes[row] = torch.tensor(item.box, dtype=torch.int32)
            lengths[row + 1] = len(item.data)
            chunks.append(item.data)
        else:
            images[row] = item
    joined = bytearray(b"".join(chunks))
    jpeg = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.zeros(0, dtype=torch.uint8)
    return {"images": images, "decode_mask": mask, "jpeg": jpeg, "jpeg_offsets": torch.cumsum(lengths, 0),
            "boxes": boxes,
            "interpolation": torch.tensor([INTERPOLATION_CODES.index(interpolation)], dtype=torch.uint8)}


def _decode_rows(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decoded (3, H, W) uint8 images on `device`, None where the decoder refused; one batched call if it can."""
    where = device if device.type == "cuda" else torch.device("cpu")  # torchvision decodes on CPU or CUDA only
    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=where))
    except Exception:  # one bad row fails the batched call (RuntimeError, from libjpeg or nvjpeg): go row by row
        pass
    out = []
    for data in datas:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=where))
        except Exception:
            out.append(None)
    return out


_PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                 "nearest": Image.Resampling.NEAREST}


def _crop_resize(image: torch.Tensor, box: list[int], image_size: int, interpolation: str) -> torch.Tensor:
    """Crop (top, left, height, width), then antialiased resize to S x S; uint8 in and out (rounded)."""
    top, left, height, width = box
    # PIL's nearest samples pixel centres: on tensors that is "nearest-exact" (torch's "nearest" is off by half a pixel)
    mode = TF.InterpolationMode.NEAREST_EXACT if interpolation == "nearest" else INTERPOLATIONS[interpolation]
    return TF.resized_crop(image, top, left, height, width, [image_size, image_size], interpolation=mode,
                           antialias=True)


def _pil_crop_resize(data: bytes, box: list[int], image_size: int, interpolation: str) -> torch.Tensor | None:
    """The same crop and resize by PIL on the CPU (full decode), for rows the device decoder refused; None if PIL
    cannot decode them either. The worker checked the pixel limit of these rows already."""
    top, left, height, width = box
    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img = img.crop((left, top, left + width, top + height)).resize((image_size, image_size),
                                                                       _PIL_RESAMPLE[interpolation])
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        return None
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def device_images(batch: dict, device: torch.device | str,
                  memory_format: torch.memory_format = torch.contiguous_format) -> tuple[torch.Tensor, dict[str, int]]:
    """The batch's uint8 (B, 3, S, S) images on `device` in `memory_format`, and skip counts by reason.

    A `workers`-mode batch (no `jpeg` field) is only moved. A `device`-mode batch has its JPEG rows decoded, cropped
    and resized here. A row nothing can decode counts as `bad_image` and takes a copy of another row's image.
    """
    device = torch.device(device)
    images = batch["images"]
    if "jpeg" not in batch:
        return images.to(device, non_blocking=True, memory_format=memory_format), {}
    image_size = images.shape[-1]
    # batches packed before the field existed resize as they always did: bicubic
    interpolation = INTERPOLATION_CODES[int(batch["interpolation"][0])] if "interpolation" in batch else "bicubic"
    out = images.to(device, non_blocking=True, copy=True)  # copy: on a CPU device, leave the batch as it came
    rows = batch["decode_mask"].nonzero().flatten().tolist()
    offsets, boxes, jpeg = batch["jpeg_offsets"].tolist(), batch["boxes"].tolist(), batch["jpeg"]
    datas = [jpeg[offsets[r]:offsets[r + 1]] for r in rows]
    bad = []
    for row, data, decoded in zip(rows, datas, _decode_rows(datas, device)):
        if decoded is not None:
            try:
                out[row] = _crop_resize(decoded, boxes[row], image_size, interpolation)
                continue
            except Exception:  # a degenerate decode (e.g. a size the box does not fit): PIL's turn
                pass
        fallback = _pil_crop_resize(data.numpy().tobytes(), boxes[row], image_size, interpolation)
        if fallback is None:
            bad.append(row)
        else:
            out[row] = fallback.to(device, non_blocking=True)
    if bad:
        good = sorted(set(range(len(out))) - set(bad))
        # a copy of a decoded row keeps the batch size equal on every process; with none decoded the rows stay 0
        for i, row in enumerate(bad):
            if good:
                out[row] = out[good[i % len(good)]]
    return out.contiguous(memory_format=memory_format), ({"bad_image": len(bad)} if bad else {})
