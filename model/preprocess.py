"""Image decoding and the reference preprocessing (SOWA_SPEC.md §7.4).

Squash-resize to the model size with PIL's bicubic (aspect ratio not kept), scale to [0, 1], CLIP mean/std.
open_clip's own transform (shortest-side resize + centre crop) is deliberately not used.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageDecodeError",
    "ImageTooLargeError",
    "decode_image",
    "load_image",
    "preprocess",
    "preprocess_batch",
    "to_rgb",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 64_000_000  # a decompression-bomb guard for files; the service sets its own, smaller limit


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can fully decode."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than allowed (decompression-bomb guard)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit and float greyscale are scaled, not clipped (PIL's convert clips)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = max(float(a.max(initial=0)), 1e-12) if a.max(initial=0) > 1 else 1.0
        img = Image.fromarray(np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image, EXIF orientation applied. Refuses empty, truncated and oversized images."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageTooLargeError(f"image has {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
            img.load()  # force full decoding now: truncated files fail here, not later
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
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


def preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> (3, size, size) float32, normalised with the CLIP mean and std.

    The arithmetic is numpy's, single-threaded: request threads of the service call this, and torch ops there
    would start a thread pool per calling thread and fight the device thread for the cores.
    """
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray((x - _MEAN) / _STD))


def preprocess_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """A list of RGB images -> (B, 3, size, size)."""
    return torch.from_numpy(np.stack([preprocess(img, size).numpy() for img in images]))
