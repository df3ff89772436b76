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
import ctypes
import ctypes.util
import io
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from model.preprocess import ImageDecodeError, ImageTooLargeError, check_pixels, decode_image, resize_uint8

from .errors import InvalidImageError, PayloadTooLargeError, UnprocessableError
from .settings import Settings
from .staging import ImageStager, jpeg_size

__all__ = [
    "DECODE_BYTES_PER_PIXEL",
    "THUMB_SIZE",
    "DecodeBudget",
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
    "header_pixels",
    "limit_malloc_arenas",
    "stage_batch",
    "stage_uploads",
]

Upload = tuple[str, bytes]  # (filename, file bytes)
THUMB_SIZE = 128  # a kept result's thumbnail, px a side at most


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
    # with `thumbnails`: each image at most THUMB_SIZE px a side, RGB, made in the same decode (kept results)
    thumbnails: tuple[Image.Image | None, ...] = ()

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


# Host memory one image's decode may take at its peak, per pixel of its header size: the decoded source in its own
# mode (at most 4 bytes a pixel in PIL, 16-bit grey 2), numpy's copy of a high-depth source while it is scaled to
# 8 bits, the RGB image (PIL keeps RGB in 4 bytes a pixel), and an EXIF-rotated copy of it. Measured with VmHWM
# in docs/service.md ("Memory per upload"); any mode stays within it.
DECODE_BYTES_PER_PIXEL = 16


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc keeps large freed blocks otherwise: RSS stayed high)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
    _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
except (OSError, AttributeError):  # not glibc: nothing to trim
    _LIBC = None

_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> None:
    """At most `arenas` glibc heaps for the process's threads from now on (`create_app` calls this).

    Each worker thread that decodes otherwise gets a heap of its own, and what a decode freed there stayed in the
    process: 72 MiB after four concurrent 16 Mpx decodes, measured, where two heaps give it all back."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, arenas)


class DecodeBudget:
    """Bytes of host memory that decodes in flight may hold together, across all requests of the process.

    Each decode takes `pixels x DECODE_BYTES_PER_PIXEL` bytes (its header size; at most the whole budget, so an
    image under the pixel limit always gets its turn, alone) before it starts and gives them back once its pixels
    are resized or handed over, so N concurrent bombs wait their turn instead of multiplying the peak. Blocking:
    the decodes run on worker threads. When the last decode in flight finishes, freed memory is returned to the OS.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = max(1, int(limit_bytes))
        self.used = 0
        self.in_flight = 0
        self._cond = threading.Condition()

    def cost(self, pixels: int) -> int:
        return min(self.limit, max(1, pixels) * DECODE_BYTES_PER_PIXEL)

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        need = self.cost(pixels)
        with self._cond:
            self._cond.wait_for(lambda: self.used + need <= self.limit)
            self.used += need
            self.in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self.used -= need
                self.in_flight -= 1
                idle = self.in_flight == 0
                self._cond.notify_all()
            if idle and need >= 1 << 24:  # a large decode is over and none runs: give its pages back
                _malloc_trim()


_UNLIMITED = DecodeBudget(1 << 62)


def header_pixels(data: bytes) -> int:
    """Pixels an upload's header claims (0 when it has no readable header: decoding then refuses it)."""
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: the header only
            return img.width * img.height
    except Exception:
        return 0


class _PixelBudget:
    """The per-request pixel limit, charged one image at a time (each image's own limit is checked before)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def charge(self, width: int, height: int) -> None:
        self.used += width * height
        if self.used > self.limit:
            raise PayloadTooLargeError(f"the images of this request hold more than {self.limit} pixels in all; "
                                       "send fewer per request")


def _decode_each(uploads: Sequence[Upload], limits: PixelLimits,
                 memory: DecodeBudget) -> Iterator[tuple[ImageSource, Image.Image]]:
    """Decode one upload at a time, within the per-image and per-request pixel limits."""
    budget = _PixelBudget(limits.request)
    for name, data in uploads:
        with memory.hold(min(header_pixels(data), limits.image)):
            img = decode_upload(data, name, limits.image)
        budget.charge(img.width, img.height)
        yield ImageSource(name, img.width, img.height), img


def decode_batch(uploads: Sequence[Upload], limits: PixelLimits,
                 memory: DecodeBudget = _UNLIMITED) -> DecodedImages:
    """Uploads -> decoded RGB images at their original size (registration keeps them as shots)."""
    pairs = list(_decode_each(uploads, limits, memory))
    return DecodedImages(tuple(img for _, img in pairs), tuple(src for src, _ in pairs))


def _thumbnail(img: Image.Image) -> Image.Image:
    """As `Image.thumbnail` would make it, without its full-size copy of the image."""
    if max(img.size) <= THUMB_SIZE:
        return img.convert("RGB")
    return img.resize(_fit(img.size), Image.Resampling.BILINEAR, reducing_gap=2.0).convert("RGB")


def _fit(size: tuple[int, int]) -> tuple[int, int]:
    scale = THUMB_SIZE / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def stage_batch(uploads: Sequence[Upload], limits: PixelLimits, stager: ImageStager,
                memory: DecodeBudget = _UNLIMITED, thumbnails: bool = False) -> StagedBatch:
    """Uploads -> the resized (n, 3, S, S) uint8 batch on the engine's device, with each image's source, and with
    `thumbnails` a small copy of each made while it is decoded (so keeping a result decodes nothing again; those
    requests take PIL's path, not the device decoder)."""
    budget = _PixelBudget(limits.request)
    sources: list[ImageSource] = []
    resized: dict[int, torch.Tensor] = {}  # image index -> (3, S, S) uint8, on the host (PIL) or the device
    thumbs: list[Image.Image | None] = [None] * len(uploads)
    jpegs: list[int] = []  # indexes left for the device decoder
    for i, (name, data) in enumerate(uploads):
        wh = jpeg_size(data) if stager.decodes_jpeg and not thumbnails else None
        if wh is None:
            with memory.hold(min(header_pixels(data), limits.image)):
                img = decode_upload(data, name, limits.image)
                wh = img.size
                resized[i] = resize_uint8(img, stager.size)
                if thumbnails:
                    thumbs[i] = _thumbnail(img)
                del img
        else:
            check_upload_pixels(name, *wh, limits.image)
            jpegs.append(i)
        budget.charge(*wh)
        sources.append(ImageSource(name, *wh))
    if jpegs:
        pixels = [sources[i].width * sources[i].height for i in jpegs]
        with memory.hold(sum(pixels)):  # at most the whole budget: the decoder then runs alone
            decoded = stager.decode_jpegs([(uploads[i][1], px) for i, px in zip(jpegs, pixels, strict=True)])
        for i, x, px in zip(jpegs, decoded, pixels, strict=True):
            name, data = uploads[i]
            if x is None:
                with memory.hold(px):
                    x = resize_uint8(decode_upload(data, name, limits.image), stager.size)
            resized[i] = x
    return StagedBatch(stager.join([resized[i] for i in range(len(uploads))]), tuple(sources),
                       tuple(thumbs) if thumbnails else ())


async def stage_uploads(uploads: Sequence[Upload], limits: PixelLimits, stager: ImageStager,
                        memory: DecodeBudget = _UNLIMITED, thumbnails: bool = False) -> StagedBatch:
    """`stage_batch` in one worker-thread hop."""
    return await asyncio.to_thread(stage_batch, uploads, limits, stager, memory, thumbnails)


async def decode_uploads(uploads: Sequence[Upload], limits: PixelLimits,
                         memory: DecodeBudget = _UNLIMITED) -> DecodedImages:
    """`decode_batch` on a worker thread."""
    return await asyncio.to_thread(decode_batch, uploads, limits, memory)
