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
from PIL import Image, ImageOps, UnidentifiedImageError

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


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit and float greyscale are scaled, not clipped (PIL's convert clips)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = max(float(a.max(initial=0)), 1e-12) if a.max(initial=0) > 1 else 1.0
        img = Image.fromarray(np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def check_pixels(width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an image of more than `max_pixels` pixels, from its header size, before decoding it."""
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image has {width}x{height} = {width * height} pixels, more than the limit of "
                                 f"{max_pixels}")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image, EXIF orientation applied. Refuses empty, truncated and oversized images."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_pixels(*img.size, max_pixels)
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
