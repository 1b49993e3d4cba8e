"""JPEGs decoded on the training device (`data.decode=device`): workers read, the training process decodes.

On a GPU the CPU is the scarce part, and PIL's JPEG decode is most of a worker's time. In this mode a DataLoader
worker only opens each image's header, checks it and draws its crop, and a batch carries the JPEG bytes:

    worker (`prepare_image`, under the sample's seeded RNG)
        header opens and is within the pixel limit (else `bad_image`, never decoded)
        a baseline JPEG (SOF0/SOF1: not progressive), colour (YCbCr/RGB), ending with the EOI marker FF D9, a crop
        (not a padding resize mode), of at most `budget_pixels` pixels
            -> `DeviceJpeg(data, box, size)`: the crop `train_transform` would take (same draft decision, same RNG
               draws), mapped to full-resolution pixels
        anything else (PNG, WebP, greyscale, CMYK, progressive JPEGs: nvJPEG decodes those one at a time in software,
        with a host wait each) -> decoded here with PIL as in `workers` mode
    worker (`pack_batch`): the batch's JPEG rows, largest last, until their decoded size would pass the budget
        (`data.decode_budget_mb`); the rest are decoded here, PIL at a reduced DCT scale, with the same crop box.
        One batch = a handful of tensors whatever its size (each tensor is one shared-memory file):
        images        uint8 (K, 3, S, S)  the K rows decoded in the worker (no placeholder for the others)
        image_rows    int64 (K,)          their rows in the batch
        jpeg          uint8 (N,)          the JPEG bytes of the J device rows, concatenated
        jpeg_offsets  int64 (J + 1,)      device row i's bytes are jpeg[offsets[i]:offsets[i + 1]]
        jpeg_rows     int64 (J,)          their rows in the batch
        boxes         int32 (J, 4)        (top, left, height, width) of each crop in full-resolution pixels
        interpolation uint8 (1,)          the resize's interpolation, an index into `INTERPOLATION_CODES`
    training process (`DeviceDecoder`): one batched decode on the device (torchcodec's nvJPEG decoder when torchcodec
        is installed, else torchvision's; each library's CPU decoder on a CPU device), then crop and antialiased
        resize of all rows together (`crop_resize_batch`: a fixed number of operators, however large the batch),
        with the model's interpolation, as the workers' `train_transform` resizes.

Stream safety on CUDA. nvJPEG's hardware decoder writes its output when the call is made, ignoring the order of the
stream it is given (torchcodec PR #1634 measures it; torchvision's `decode_jpeg` allocates the outputs on the caller's
stream). The caching allocator hands a block freed on a stream back to that stream at once, while kernels queued on
it may still read the block: the decoder would then overwrite another tensor (gradients freed by `zero_grad`, say)
before the queued kernels read it. `DeviceDecoder` rules this out by construction: every decode runs with a stream of
its own current, so its outputs come from that stream's pool, which holds only blocks freed by the decoder's own work;
before each decode call the host waits for that stream (its queued work is only the previous batch's crop and resize,
long finished); the finished batch is handed to the training stream with `wait_stream` and `record_stream`, so the
allocator keeps it from the decoder until the training stream is done with it.

Failures are never fatal. A batched decode that raises is split in halves and retried (a bad row costs a few calls,
not one per row); a row the device decoder refuses is decoded with PIL on the CPU here, with the same box; a row
nothing decodes counts as `bad_image` and its slot gets a copy of another row of the batch, so every process keeps the
same batch size (the loss gathers equal batches).
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from clipalign.config import DECODE_BACKENDS, DECODE_CHOICES, ConfigError
from clipalign.data.transforms import (
    DEFAULT_MAX_IMAGE_PIXELS,
    INTERPOLATIONS,
    decode_image,
    open_image,
    train_crop_box,
)

_EOI = b"\xff\xd9"
# PIL modes of JPEGs the device decoders turn into RGB as PIL's convert("RGB") does. Greyscale (L) stays with the
# workers: nvJPEG's batched hardware path does not take it; CMYK/YCCK neither decoder converts as PIL does.
_DEVICE_MODES = ("RGB",)
_DRAFT_SCALES = (8, 4, 2, 1)
INTERPOLATION_CODES = tuple(INTERPOLATIONS)  # a batch carries its interpolation as an index into these names
DEFAULT_DECODE_BUDGET_MB = 1024
_PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                 "nearest": Image.Resampling.NEAREST}


def resolve_decode(mode: str, device: torch.device | str) -> str:
    """`workers` or `device`: what `data.decode=mode` means on `device`.

    `auto` means the workers everywhere until the device path has passed the GPU check (`tools/gpu_check.py`) on a
    real GPU and its figures are in docs/benchmarks.md; `device` is one key away.
    """
    if mode not in DECODE_CHOICES:
        raise ValueError(f"data.decode must be one of {', '.join(DECODE_CHOICES)}, got {mode!r}")
    return "workers" if mode == "auto" else mode


def decode_backend(requested: str = "auto") -> str:
    """The library that decodes JPEGs on the device: `torchcodec` (its nvJPEG decoder, preferred: torchvision's
    image decoding is deprecated from 0.29) when it imports, else `torchvision`. Asking for torchcodec where it does
    not import is a ConfigError naming the fix."""
    if requested not in DECODE_BACKENDS:
        raise ConfigError(f"data.decode_backend must be one of {', '.join(DECODE_BACKENDS)}, got {requested!r}")
    if requested in ("auto", "torchcodec"):
        try:
            from torchcodec.decoders import decode_jpeg  # noqa: F401
            return "torchcodec"
        except Exception as e:  # ImportError, or a build that does not load beside this torch
            if requested == "torchcodec":
                raise ConfigError(f"data.decode_backend=torchcodec: torchcodec does not import here ({e}); "
                                  f"pip install 'clipalign[decode]' (a torchcodec built for this torch), or use "
                                  f"data.decode_backend=torchvision") from None
    return "torchvision"


class DeviceJpeg(NamedTuple):
    """A JPEG left for the training process: its bytes, the crop (top, left, height, width) in its own pixels and
    its full size (width, height)."""

    data: bytes
    box: tuple[int, int, int, int]
    size: tuple[int, int]


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


def for_the_device(img: Image.Image, data: bytes, budget_pixels: int = 0) -> bool:
    """Whether a lazily opened image is one the device decoders take in a batch: a baseline colour JPEG whose data
    ends with the EOI marker, of at most `budget_pixels` pixels (0: any size). Progressive JPEGs (SOF2; PIL reads
    the marker with the header) and greyscale ones go to nvJPEG's one-image software path: they stay with the
    workers."""
    if img.format != "JPEG" or img.mode not in _DEVICE_MODES or not data.endswith(_EOI):
        return False
    if img.info.get("progressive") or img.info.get("progression"):
        return False
    return not budget_pixels or img.size[0] * img.size[1] <= budget_pixels


def prepare_image(data: bytes, image_size: int, crop_scale: float, transform,
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, resize_mode: str = "shortest",
                  budget_pixels: int = 0) -> torch.Tensor | DeviceJpeg:
    """A worker's share of one image: a `DeviceJpeg` for the device, or the uint8 (3, S, S) image decoded here.

    Call it where `transform(decode_image(data, image_size, max_pixels))` would run (under the sample's seeded RNG),
    with the `resize_mode` `transform` was built with: it draws the same crop. Images `for_the_device` refuses
    (`budget_pixels`: the most pixels a device image may have; 0: any) are decoded here. Raises `ImageTooLarge` for
    an image over `max_pixels` (0: no limit) before anything is decoded, and, as PIL does, on data whose header does
    not open or that fails the CPU decode.
    """
    img = open_image(data, max_pixels)  # lazy: reads the header only
    padded = crop_scale >= 1.0 and resize_mode == "longest"  # a padding resize has no crop box for the device
    if padded or not for_the_device(img, data, budget_pixels):
        # not for the device decoders; a truncated JPEG fails here and counts as bad_image, as in `workers` mode
        return transform(decode_image(data, image_size, max_pixels))
    full = img.size
    img.draft("RGB", (image_size, image_size))  # the CPU path's reduced DCT scale; on a lazy image, the size only
    box = train_crop_box(img, image_size, crop_scale, resize_mode)
    return DeviceJpeg(data, _full_resolution_box(box, _draft_scale(full, img.size), full), full)


def pil_crop_resize(data: bytes, box: Sequence[int], image_size: int, interpolation: str) -> torch.Tensor | None:
    """The crop (top, left, height, width, full-resolution pixels) resized to S x S by PIL, decoding at the smallest
    DCT scale that keeps the crop at least S pixels on each side; uint8 (3, S, S), or None if PIL cannot decode the
    data."""
    top, left, height, width = (int(v) for v in box)
    try:
        img = Image.open(io.BytesIO(data))
        full_w, full_h = img.size
        img.draft("RGB", (math.ceil(full_w * image_size / width), math.ceil(full_h * image_size / height)))
        sx, sy = full_w / img.size[0], full_h / img.size[1]
        img = img.convert("RGB").resize((image_size, image_size), _PIL_RESAMPLE[interpolation],
                                        box=(left / sx, top / sy, (left + width) / sx, (top + height) / sy))
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        return None
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def budget_pixels(budget_mb: float) -> int:
    """Decoded RGB pixels in `budget_mb` MiB (`data.decode_budget_mb`); 0 for no budget."""
    return int(budget_mb * 2**20 // 3)


def pack_batch(items: Sequence[torch.Tensor | DeviceJpeg], image_size: int, interpolation: str = "bicubic",
               budget: int = 0) -> dict[str, torch.Tensor]:
    """Worker-side batch tensors of `prepare_image` results (see the module docstring for the fields); the device
    resizes with `interpolation` (one of `INTERPOLATION_CODES`). Device rows are kept, smallest first, while their
    decoded pixels stay within `budget` (0: no budget); the others are decoded here with PIL."""
    n = len(items)
    device_rows = [row for row, item in enumerate(items) if isinstance(item, DeviceJpeg)]
    decoded: dict[int, torch.Tensor] = {row: item for row, item in enumerate(items) if not isinstance(item, DeviceJpeg)}
    if budget:
        used = 0
        kept = []
        for row in sorted(device_rows, key=lambda r: items[r].size[0] * items[r].size[1]):
            pixels = items[row].size[0] * items[row].size[1]
            if used + pixels <= budget:
                used += pixels
                kept.append(row)
                continue
            image = pil_crop_resize(items[row].data, items[row].box, image_size, interpolation)
            if image is None:  # PIL cannot decode it either: the device gets its turn, then counts it
                kept.append(row)
            else:
                decoded[row] = image
        device_rows = sorted(kept)
    image_rows = sorted(decoded)
    images = (torch.stack([decoded[r] for r in image_rows]) if image_rows
              else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8))
    datas = [items[r].data for r in device_rows]
    lengths = torch.tensor([0] + [len(d) for d in datas], dtype=torch.int64)
    joined = bytearray(b"".join(datas))
    jpeg = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.zeros(0, dtype=torch.uint8)
    boxes = torch.tensor([items[r].box for r in device_rows], dtype=torch.int32).reshape(-1, 4)
    assert len(image_rows) + len(device_rows) == n
    return {"images": images, "image_rows": torch.tensor(image_rows, dtype=torch.int64),
            "jpeg": jpeg, "jpeg_offsets": torch.cumsum(lengths, 0),
            "jpeg_rows": torch.tensor(device_rows, dtype=torch.int64), "boxes": boxes,
            "interpolation": torch.tensor([INTERPOLATION_CODES.index(interpolation)], dtype=torch.uint8)}


# ---- crop and resize of a whole batch --------------------------------------------------------------------------


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """The cubic convolution kernel with a = -0.5, the one antialiased bicubic resizing uses (PIL's, torch's)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(lengths: torch.Tensor, out_size: int, max_length: int, interpolation: str) -> torch.Tensor:
    """Rows of the 1-D resampling matrices that take inputs of `lengths` (K,) to `out_size` samples: (K, S, M) float32,
    zero past each input's length, each row summing to 1.

    The weights are those of torch's antialiased interpolation (`F.interpolate(..., antialias=True)`, which
    torchvision's resize uses, PIL's filters): for output i, the centre scale * (i + 0.5), a filter support of
    (1 bilinear, 2 bicubic) x max(scale, 1) input pixels on each side, the filter stretched by max(scale, 1).
    `nearest` samples the pixel under each output centre (PIL's nearest, torch's nearest-exact).
    """
    device = lengths.device
    length = lengths.to(torch.float32)[:, None]  # (K, 1)
    scale = length / out_size
    centre = scale * (torch.arange(out_size, device=device, dtype=torch.float32) + 0.5)  # (K, S)
    j = torch.arange(max_length, device=device, dtype=torch.float32)  # (M,)
    if interpolation == "nearest":
        source = torch.minimum(centre.floor(), length - 1)  # (K, S)
        return (j == source[..., None]).to(torch.float32)
    stretch = scale.clamp(min=1.0)  # (K, 1)
    support = (1.0 if interpolation == "bilinear" else 2.0) * stretch
    first = (centre - support + 0.5).trunc().clamp(min=0)  # (K, S): the window of input pixels each output reads
    end = torch.minimum((centre + support + 0.5).trunc(), length)
    x = (j - centre[..., None] + 0.5) / stretch[..., None]  # (K, S, M)
    weights = (1 - x.abs()).clamp(min=0) if interpolation == "bilinear" else _cubic(x)
    weights = weights * ((j >= first[..., None]) & (j < end[..., None]))
    return weights / weights.sum(dim=-1, keepdim=True)


def _chunks(areas: Sequence[tuple[int, int]], budget_bytes: int, bytes_per_pixel: int) -> list[list[int]]:
    """Rows (indices into `areas`, (height, width) each) in groups whose padded crops fit `budget_bytes`: sorted by
    size, so that each group pads little; every group holds at least one row."""
    order = sorted(range(len(areas)), key=lambda i: (areas[i][0] * areas[i][1], areas[i]))
    groups: list[list[int]] = []
    group: list[int] = []
    height = width = 0
    for i in order:
        h, w = max(height, areas[i][0]), max(width, areas[i][1])
        if group and (len(group) + 1) * 3 * h * w * bytes_per_pixel > budget_bytes:
            groups.append(group)
            group, h, w = [], areas[i][0], areas[i][1]
        group.append(i)
        height, width = h, w
    if group:
        groups.append(group)
    return groups


def crop_resize_batch(images: Sequence[torch.Tensor], boxes: Sequence[Sequence[int]], image_size: int,
                      interpolation: str = "bicubic", budget_bytes: int = DEFAULT_DECODE_BUDGET_MB * 2**20
                      ) -> torch.Tensor:
    """Crop each uint8 (3, H_i, W_i) image to its box (top, left, height, width) and resize it to S x S, antialiased:
    uint8 (K, 3, S, S), rounded.

    All rows go through the same handful of operators, however many there are: the images are laid end to end in one
    buffer; the crops are gathered from it in one indexing operation (each crop row is a window of the buffer, so the
    index holds one entry per crop row, not per pixel), padded to the largest crop; and two batched matrix products
    with the resampling matrices of `resize_weights` (zero past each crop's size) resize them, across then down,
    rounded in between as PIL does. Rows are processed in
    groups whose padded crops (uint8 and float32 copies) fit `budget_bytes` (one group for batches within it).

    On CUDA the products run on TF32 tensor cores: pixel values are exact in TF32, the weights within 2**-11 of
    themselves, so a result is within 0.2 of the float32 one before rounding, and the sums stay float32 (float16
    products would round the results themselves to steps of 1/8 above 128).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
    if not images:
        return torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
    groups = _chunks([(int(b[2]), int(b[3])) for b in boxes], budget_bytes, 5)  # a uint8 and a float32 per pixel
    with _tf32_products(images[0].is_cuda):
        if len(groups) == 1:
            return _crop_resize_group(images, boxes, image_size, interpolation)
        parts = [_crop_resize_group([images[i] for i in g], [boxes[i] for i in g], image_size, interpolation)
                 for g in groups]
    out = torch.empty(len(images), 3, image_size, image_size, dtype=torch.uint8, device=images[0].device)
    order = torch.tensor([i for g in groups for i in g], dtype=torch.int64, device=images[0].device)
    out[order] = torch.cat(parts)
    return out


@contextlib.contextmanager
def _tf32_products(on: bool):
    """float32 matrix products on TF32 tensor cores inside (CUDA); the setting is read as kernels are launched."""
    matmul = torch.backends.cuda.matmul
    if not on:
        yield
        return
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    before = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, before)


def _crop_resize_group(images: Sequence[torch.Tensor], boxes: Sequence[Sequence[int]], image_size: int,
                       interpolation: str) -> torch.Tensor:
    device = images[0].device
    params, offset = [], 0
    for image, (top, left, height, width) in zip(images, boxes):
        _, h, w = image.shape
        if not (0 <= top and 0 <= left and 0 < height and 0 < width and top + height <= h and left + width <= w):
            raise ValueError(f"crop box {(top, left, height, width)} is outside a {w}x{h} image")
        params.append((offset, h * w, w, top, left, height, width))
        offset += 3 * h * w
    p = torch.tensor(params, dtype=torch.int64).to(device, non_blocking=True)  # (K, 7)
    crop_h, crop_w = max(int(b[2]) for b in boxes), max(int(b[3]) for b in boxes)
    # every image's pixels end to end, then room for the last crop row's window
    flat = torch.cat([image.reshape(-1) for image in images] + [images[0].new_zeros(crop_w)])
    windows = flat.as_strided((flat.numel() - crop_w + 1, crop_w), (1, 1))  # window i: crop_w pixels from i
    rows = torch.minimum(torch.arange(crop_h, device=device), p[:, 5:6] - 1)  # (K, Hc): rows past a crop repeat
    channels = torch.arange(3, device=device)
    starts = (p[:, 0, None, None] + channels[None, :, None] * p[:, 1, None, None]
              + (p[:, 3, None, None] + rows[:, None, :]) * p[:, 2, None, None] + p[:, 4, None, None])  # (K, 3, Hc)
    crops = windows.index_select(0, starts.reshape(-1)).view(len(images), 3, crop_h, crop_w).float()
    k = len(images)
    # both sides' matrices in one go (half the operators): heights, then widths, padded to the longer side
    weights = resize_weights(p[:, 5:7].T.reshape(-1), image_size, max(crop_h, crop_w), interpolation)  # (2K, S, M)
    wy, wx = weights[:k, None, :, :crop_h], weights[k:, None, :, :crop_w]  # (K, 1, S, Hc), (K, 1, S, Wc)
    # as PIL resamples: the rows first, rounded and clipped to 0..255 in between (bicubic overshoots), then the columns
    across = (crops @ wx.transpose(-1, -2)).round_().clamp_(0, 255)  # (K, 3, Hc, S)
    return (wy @ across).round_().clamp_(0, 255).to(torch.uint8)  # (K, 3, S, S)


# ---- the training process's side ------------------------------------------------------------------------------


def _decode_with(backend: str, datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One batched decode call: RGB uint8 (3, H, W) tensors on `device` (a CPU device decodes on the CPU)."""
    if backend == "torchcodec":
        from torchcodec.decoders import decode_jpeg

        return list(decode_jpeg(datas, mode="RGB", device=device))
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # deprecated in favour of torchcodec, which we prefer where installed
        warnings.simplefilter("ignore", DeprecationWarning)
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))


class DeviceDecoder:
    """Turns a batch's pixels into uint8 (B, 3, S, S) images on one device: a `workers`-mode batch is moved, a
    `device`-mode batch has its JPEG rows decoded, cropped and resized there (see the module docstring, and its part
    on stream safety). Calling it returns the images and skip counts by reason.

    `backend`: the decoder library (see `decode_backend`), or None for a loader of `workers`-mode batches only (no
    library is looked for, no stream made). `seconds` adds up the host time spent decoding, and on CUDA
    `take_gpu_seconds()` the decode stream's own time (read back at log steps, when the host waits anyway).
    """

    def __init__(self, device: torch.device | str, backend: str | None = "auto",
                 budget_bytes: int = DEFAULT_DECODE_BUDGET_MB * 2**20):
        self.device = torch.device(device)
        self.backend = None if backend is None else decode_backend(backend)
        self.budget_bytes = budget_bytes
        cuda = self.device.type == "cuda" and self.backend is not None
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.seconds = 0.0
        self.calls = 0  # decode calls made (a batch that decodes at once makes one)
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __call__(self, batch: dict, memory_format: torch.memory_format = torch.contiguous_format
                 ) -> tuple[torch.Tensor, dict[str, int]]:
        images = batch["images"]
        if "jpeg" not in batch:
            return images.to(self.device, non_blocking=True, memory_format=memory_format), {}
        if self.backend is None:
            raise ValueError("a data.decode=device batch reached a decoder made for workers-mode batches")
        start = time.perf_counter()
        if self.stream is None:
            out, skipped = self._decode_batch(batch)
        else:
            consumer = torch.cuda.current_stream(self.device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.stream):
                begin.record(self.stream)
                out, skipped = self._decode_batch(batch)
                end.record(self.stream)
            self._events.append((begin, end))
            consumer.wait_stream(self.stream)
            out.record_stream(consumer)  # the allocator keeps it from the decoder until the training stream is done
        out = out.contiguous(memory_format=memory_format)
        self.seconds += time.perf_counter() - start
        return out, skipped

    def take_gpu_seconds(self) -> float:
        """The decode stream's time since the last call (waits for it: call where the host waits anyway)."""
        total = 0.0
        for begin, end in self._events:
            end.synchronize()
            total += begin.elapsed_time(end) / 1e3
        self._events.clear()
        return total

    def _decode_calls(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decoded images on the device, None for rows the decoder refuses. One call for the whole batch; a call that
        fails is split in halves, so k bad rows cost about 2 k log2(J) calls rather than one call per row."""
        results: list[torch.Tensor | None] = [None] * len(datas)
        pending = [list(range(len(datas)))] if datas else []
        while pending:
            rows = pending.pop()
            try:
                if self.stream is not None:
                    # a host wait, not a stream dependency: nvJPEG's hardware decoder ignores stream order. The
                    # decode stream only ever holds the previous batch's crop and resize, long finished.
                    self.stream.synchronize()
                self.calls += 1
                decoded = _decode_with(self.backend, [datas[i] for i in rows], self.device)
            except Exception:  # RuntimeError from libjpeg or nvJPEG, ValueError: one bad row fails the call
                if len(rows) > 1:
                    pending += [rows[len(rows) // 2:], rows[:len(rows) // 2]]
                continue
            for i, image in zip(rows, decoded):
                results[i] = image
        return results

    def _index(self, rows: list[int]) -> torch.Tensor:
        # built on the host and copied without a host wait (torch.tensor(..., device=cuda) would wait for the stream)
        return torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)

    def _decode_batch(self, batch: dict) -> tuple[torch.Tensor, dict[str, int]]:
        image_rows, jpeg_rows = batch["image_rows"], batch["jpeg_rows"]
        worker_images = batch["images"]
        size = worker_images.shape[-1]
        total = len(image_rows) + len(jpeg_rows)
        interpolation = INTERPOLATION_CODES[int(batch["interpolation"][0])]
        offsets, boxes, jpeg = batch["jpeg_offsets"].tolist(), batch["boxes"].tolist(), batch["jpeg"]
        datas = [jpeg[offsets[i]:offsets[i + 1]] for i in range(len(jpeg_rows))]
        # every decode call first, before any other work on the decode stream (see `_decode_calls`)
        decoded = self._decode_calls(datas)
        rows = jpeg_rows.tolist()
        ok = [i for i, image in enumerate(decoded)
              if image is not None and image.dim() == 3 and image.shape[0] == 3
              and boxes[i][0] + boxes[i][2] <= image.shape[1] and boxes[i][1] + boxes[i][3] <= image.shape[2]]
        out = torch.empty(total, 3, size, size, dtype=torch.uint8, device=self.device)
        if len(image_rows):
            out[image_rows.to(self.device, non_blocking=True)] = worker_images.to(self.device, non_blocking=True)
        if ok:
            resized = crop_resize_batch([decoded[i] for i in ok], [boxes[i] for i in ok], size, interpolation,
                                        self.budget_bytes)
            out[self._index([rows[i] for i in ok])] = resized
        refused = sorted(set(range(len(rows))) - set(ok))
        fallback_rows, fallbacks, bad = [], [], []
        for i in refused:  # rare: PIL on the CPU, with the same box
            image = pil_crop_resize(datas[i].numpy().tobytes(), boxes[i], size, interpolation)
            if image is None:
                bad.append(rows[i])
            else:
                fallback_rows.append(rows[i])
                fallbacks.append(image)
        if fallbacks:
            out[self._index(fallback_rows)] = torch.stack(fallbacks).to(self.device, non_blocking=True)
        if bad:
            good = sorted(set(range(total)) - set(bad))
            if good:  # a copy of a decoded row keeps every process's batch size; with none decoded the rows stay 0
                sources = [good[i % len(good)] for i in range(len(bad))]
                out[self._index(bad)] = out[self._index(sources)]
            else:
                out.zero_()
        return out, ({"bad_image": len(bad)} if bad else {})


_DECODERS: dict[tuple[str, str], DeviceDecoder] = {}


def device_images(batch: dict, device: torch.device | str,
                  memory_format: torch.memory_format = torch.contiguous_format) -> tuple[torch.Tensor, dict[str, int]]:
    """The batch's uint8 (B, 3, S, S) images on `device` in `memory_format`, and skip counts by reason, through one
    `DeviceDecoder` per device (and the default backend)."""
    key = (str(torch.device(device)), "auto")
    if key not in _DECODERS:
        _DECODERS[key] = DeviceDecoder(device)
    return _DECODERS[key](batch, memory_format)
