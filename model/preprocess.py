"""Image decoding and the reference preprocessing (SOWA_SPEC.md §7.4).

Squash-resize to the model size with PIL's bicubic (aspect ratio not kept), scale to [0, 1], CLIP mean/std.
open_clip's own transform (shortest-side resize + centre crop) is deliberately not used.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageDecodeError",
    "ImageTooLargeError",
    "check_pixels",
    "decode_image",
    "load_image",
    "normalize",
    "preprocess",
    "preprocess_batch",
    "resize_uint8",
    "to_rgb",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 64_000_000  # a decompression-bomb guard for files; the service sets its own, smaller limit


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can fully decode."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than allowed (decompression-bomb guard)."""


_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ROWS_BYTES = 1 << 22  # float64 temporaries of one slice of rows while scaling a high-depth image: 4 MiB


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit and float greyscale are scaled, not clipped (PIL's convert clips).

    High-depth images are scaled a slice of rows at a time: the float64 temporaries stay a few MiB whatever the
    image size (converting the whole array at once took ~27 bytes per pixel), and the result is the same.
    """
    if img.mode in _HIGH_DEPTH:
        a = np.asarray(img)
        peak = float(a.max(initial=0))
        top = 65535.0 if img.mode.startswith("I;16") or peak > 255 else 255.0
        if img.mode == "F":
            top = max(peak, 1e-12) if peak > 1 else 1.0
        out = np.empty(a.shape, dtype=np.uint8)
        step = max(1, _ROWS_BYTES // (8 * max(1, a.shape[1])))
        for r in range(0, a.shape[0], step):
            out[r:r + step] = np.clip(np.rint(a[r:r + step].astype(np.float64) / top * 255.0), 0, 255)
        del a
        img = Image.fromarray(out, mode="L")
        del out
    return img if img.mode == "RGB" else img.convert("RGB")


def check_pixels(width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an image of more than `max_pixels` pixels, from its header size, before decoding it."""
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image has {width}x{height} = {width * height} pixels, more than the limit of "
                                 f"{max_pixels}")


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose that displays it upright
# JPEG frames coded with arithmetic coding: the one-bit-per-block lower bound below is for Huffman coding
_ARITHMETIC_SOF = frozenset(range(0xC9, 0xD0)) - {0xCC}


def _jpeg_min_bytes(img: Image.Image) -> int:
    """The fewest bytes a complete Huffman-coded JPEG of this size and sampling can have: every 8x8 block of
    every component costs at least one bit (a DC code; baseline adds an end-of-block code). libjpeg pads a file
    that ends early (an end-of-image marker in the middle of the data) with grey instead of failing, so a file
    below this bound is refused as truncated."""
    layers = getattr(img, "layer", None) or []
    if not layers or img.format != "JPEG":
        return 0
    hmax = max(h for _, h, _, _ in layers) or 1
    vmax = max(v for _, _, v, _ in layers) or 1
    w, h = img.size

    def ceil(a: int, b: int) -> int:
        return (a + b - 1) // b

    return sum(ceil(ceil(w * hs, hmax), 8) * ceil(ceil(h * vs, vmax), 8) for _, hs, vs, _ in layers) // 8


def _is_arithmetic_jpeg(data: bytes) -> bool:
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker in _ARITHMETIC_SOF
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image, EXIF orientation applied. Refuses empty, truncated and oversized images.

    Memory: the decoded image in its own mode, then its RGB conversion, then (when EXIF rotates it) the rotated
    copy, each source dropped as soon as the next exists (docs/service.md gives the measured bytes per pixel).
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as src:
            check_pixels(*src.size, max_pixels)
            if src.format == "JPEG" and len(data) < _jpeg_min_bytes(src) and not _is_arithmetic_jpeg(data):
                raise ImageDecodeError(f"truncated JPEG: {len(data)} bytes cannot hold {src.size[0]}x{src.size[1]} "
                                       f"pixels (at least {_jpeg_min_bytes(src)})")
            orientation = src.getexif().get(0x0112, 1)
            src.load()  # force full decoding now: truncated files fail here, not later
            img = to_rgb(src)
        src = None  # the decoded source goes before the rotated copy is made
        method = _TRANSPOSE.get(orientation)
        return img if method is None else img.transpose(method)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (unknown or unsupported format)") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image refused as a decompression bomb: {e}") from None
    except Exception as e:  # PIL's decoders raise OSError, ValueError, SyntaxError, TypeError... on bad bytes
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from None


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read an image file (see `decode_image`); errors name the file."""
    try:
        return decode_image(Path(path).read_bytes(), max_pixels)
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: no such file") from None
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{path}: {e}") from None


_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.asarray(CLIP_STD, dtype=np.float32).reshape(3, 1, 1)


def resize_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> (3, size, size) uint8: the reference's bicubic squash-resize, not yet normalised.

    What the service queues and copies to the device: a quarter of the float32 bytes, and `normalize` runs there.
    """
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, S, S) uint8 on any device -> float32 scaled to [0, 1] and normalised with the CLIP mean and std.

    The same float32 operations in the same order as `preprocess`, each correctly rounded on CPU and GPU alike,
    so the result is bit-identical to it. The 255 is a device tensor, not a Python number: CUDA turns division
    by a host scalar into multiplication by its rounded reciprocal, which is not the same float.
    """
    scale, mean, std = _constants(images.device)
    return (images.to(torch.float32) / scale - mean) / std


@functools.lru_cache(maxsize=16)
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # made once per device: building them per batch would be blocking host-to-device copies on a GPU
    with torch.inference_mode(False):
        return (torch.tensor(255.0, dtype=torch.float32, device=device),
                torch.tensor(CLIP_MEAN, dtype=torch.float32, device=device).view(3, 1, 1),
                torch.tensor(CLIP_STD, dtype=torch.float32, device=device).view(3, 1, 1))


def preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> (3, size, size) float32, normalised with the CLIP mean and std.

    The arithmetic is numpy's, single-threaded: threads outside the device thread may call this, and torch ops
    there would start a thread pool per calling thread and fight the device thread for the cores.
    """
    x = resize_uint8(img, size).numpy().astype(np.float32) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray((x - _MEAN) / _STD))


def preprocess_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """A list of RGB images -> (B, 3, size, size)."""
    return torch.from_numpy(np.stack([preprocess(img, size).numpy() for img in images]))
