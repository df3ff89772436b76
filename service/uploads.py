"""Uploads in, a staged batch out: the one path from a request's files to what the batcher queues.

`(filename, bytes)` pairs -> decoded within the per-image and per-request pixel limits -> resized to uint8 ->
on the engine's device (`StagedBatch`), or kept as decoded RGB images for registration (`DecodedImages`).
Errors are the service's 4xx errors and name the file. Knows nothing of HTTP: routes read the multipart
files and pass their bytes. The sync functions run on worker threads; the async ones make that one hop.

PIL images are dropped once resized, so a request never holds all its full-size images at once. PIL work is PIL
and numpy only (no torch thread pool starts outside the device thread). JPEGs go to the device decoder when the
stager has one, their limits checked from their headers; any it refuses come back through PIL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from model.preprocess import ImageDecodeError, ImageTooLargeError, check_pixels, decode_image, resize_uint8

from .errors import InvalidImageError, PayloadTooLargeError, UnprocessableError
from .settings import Settings
from .staging import ImageStager, jpeg_size

__all__ = [
    "DecodedImages",
    "ImageSource",
    "PixelLimits",
    "StagedBatch",
    "Upload",
    "check_count",
    "check_upload_pixels",
    "decode_batch",
    "decode_upload",
    "decode_uploads",
    "stage_batch",
    "stage_uploads",
]

Upload = tuple[str, bytes]  # (filename, file bytes)


@dataclass(frozen=True)
class ImageSource:
    """Where an image came from: its file name and original size (heatmaps and regions are given in it)."""

    name: str
    width: int
    height: int


@dataclass(frozen=True)
class StagedBatch:
    images: torch.Tensor  # (n, 3, S, S) uint8, resized, on the engine's device
    sources: tuple[ImageSource, ...]

    def __len__(self) -> int:
        return len(self.sources)


@dataclass(frozen=True)
class DecodedImages:
    images: tuple[Image.Image, ...]  # RGB, original size, EXIF orientation applied
    sources: tuple[ImageSource, ...]


@dataclass(frozen=True)
class PixelLimits:
    image: int  # pixels of one image (decompression bombs)
    request: int  # pixels of all a request's images together

    @classmethod
    def of(cls, settings: Settings) -> PixelLimits:
        return cls(settings.max_image_pixels, settings.max_request_pixels)


def check_count(count: int, limit: int) -> None:
    """Checked before any file is read."""
    if count > limit:
        raise UnprocessableError(f"{count} images in one request, more than the limit of {limit}")


def decode_upload(data: bytes, filename: str, max_pixels: int) -> Image.Image:
    """Decode one uploaded file to RGB (EXIF orientation applied), or raise the right 4xx error naming it."""
    try:
        return decode_image(data, max_pixels)
    except ImageTooLargeError as e:
        raise PayloadTooLargeError(f"{filename}: {e}") from None
    except ImageDecodeError as e:
        raise InvalidImageError(f"{filename}: {e}") from None


def check_upload_pixels(filename: str, width: int, height: int, max_pixels: int) -> None:
    """`decode_upload`'s pixel limit, for an upload decoded elsewhere (the device JPEG decoder)."""
    try:
        check_pixels(width, height, max_pixels)
    except ImageTooLargeError as e:
        raise PayloadTooLargeError(f"{filename}: {e}") from None


class _PixelBudget:
    """The per-request pixel limit, charged one image at a time (each image's own limit is checked before)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def charge(self, width: int, height: int) -> None:
        self.used += width * height
        if self.used > self.limit:
            raise PayloadTooLargeError(f"the images of this request hold more than {self.limit} pixels in all; "
                                       "send fewer per request")


def _decode_each(uploads: Sequence[Upload], limits: PixelLimits) -> Iterator[tuple[ImageSource, Image.Image]]:
    """Decode one upload at a time, within the per-image and per-request pixel limits."""
    budget = _PixelBudget(limits.request)
    for name, data in uploads:
        img = decode_upload(data, name, limits.image)
        budget.charge(img.width, img.height)
        yield ImageSource(name, img.width, img.height), img


def decode_batch(uploads: Sequence[Upload], limits: PixelLimits) -> DecodedImages:
    """Uploads -> decoded RGB images at their original size (registration keeps them as shots)."""
    pairs = list(_decode_each(uploads, limits))
    return DecodedImages(tuple(img for _, img in pairs), tuple(src for src, _ in pairs))


def stage_batch(uploads: Sequence[Upload], limits: PixelLimits, stager: ImageStager) -> StagedBatch:
    """Uploads -> the resized (n, 3, S, S) uint8 batch on the engine's device, with each image's source."""
    budget = _PixelBudget(limits.request)
    sources: list[ImageSource] = []
    resized: dict[int, torch.Tensor] = {}  # image index -> (3, S, S) uint8, on the host (PIL) or the device
    jpegs: list[int] = []  # indexes left for the device decoder
    for i, (name, data) in enumerate(uploads):
        wh = jpeg_size(data) if stager.decodes_jpeg else None
        if wh is None:
            img = decode_upload(data, name, limits.image)
            wh = img.size
            resized[i] = resize_uint8(img, stager.size)
        else:
            check_upload_pixels(name, *wh, limits.image)
            jpegs.append(i)
        budget.charge(*wh)
        sources.append(ImageSource(name, *wh))
    if jpegs:
        decoded = stager.decode_jpegs([(uploads[i][1], sources[i].width * sources[i].height) for i in jpegs])
        for i, x in zip(jpegs, decoded, strict=True):
            name, data = uploads[i]
            resized[i] = x if x is not None else resize_uint8(decode_upload(data, name, limits.image), stager.size)
    return StagedBatch(stager.join([resized[i] for i in range(len(uploads))]), tuple(sources))


async def stage_uploads(uploads: Sequence[Upload], limits: PixelLimits, stager: ImageStager) -> StagedBatch:
    """`stage_batch` in one worker-thread hop."""
    return await asyncio.to_thread(stage_batch, uploads, limits, stager)


async def decode_uploads(uploads: Sequence[Upload], limits: PixelLimits) -> DecodedImages:
    """`decode_batch` on a worker thread."""
    return await asyncio.to_thread(decode_batch, uploads, limits)
