"""Staging: a request's images, resized to uint8, put on the engine's device before its batch forms.

Runs on request worker threads, never on the engine thread. On a GPU each thread copies on its own CUDA stream
from page-locked memory and waits for its own copy only, so transfers overlap the batch the device is running
and the engine finds its inputs already there. On the CPU staging is the identity.

With decoder "torchvision", plain JPEG uploads skip PIL: torchvision decodes them on the engine's device (nvJPEG
on a GPU, libjpeg-turbo on the CPU) and resizes them there with antialiased bicubic, so only the compressed
bytes cross the bus and the CPU does no pixel work. This is not bit-identical to the reference preprocessing
(PIL's bicubic; the measured tolerance is in docs/service.md). Other formats, CMYK or EXIF-rotated JPEGs, and any
JPEG torchvision refuses take the PIL path, on the same worker threads.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torchvision.io as tvio
from PIL import Image
from torchvision.transforms.v2 import functional as TF

__all__ = ["DECODERS", "Decoder", "ImageStager", "jpeg_size"]

Decoder = Literal["pil", "torchvision"]
DECODERS: tuple[Decoder, ...] = ("pil", "torchvision")

_EXIF_ORIENTATION = 0x0112
# full-size decoded pixels held on the device at once per decode call: a request's JPEGs are decoded in groups
_DECODE_GROUP_PIXELS = 16_000_000


def _host_stack(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Host images stacked by numpy: torch's own stack and copies start an OpenMP team in every request thread
    that calls them (measured: one more native thread per thread), which then compete with the engine's."""
    return torch.from_numpy(np.stack([x.numpy() for x in images]))


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG the device decoder takes as is (RGB or greyscale, no EXIF rotation, ending in
    its end-of-image marker), read from its header without decoding; None for anything else, which then goes
    through PIL. The end marker check sends truncated files to PIL, which refuses them: nvJPEG might not."""
    if not data.startswith(b"\xff\xd8\xff") or not data.endswith(b"\xff\xd9"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: parses the header only
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return None
            return img.size
    except Exception:  # unreadable header: PIL's decode path gives the client the proper error
        return None


class ImageStager:
    def __init__(self, device: torch.device, size: int, decoder: Decoder = "pil") -> None:
        if decoder not in DECODERS:
            raise ValueError(f"unknown image decoder '{decoder}': use one of {', '.join(DECODERS)}")
        self.device, self.size, self.decoder = device, size, decoder
        self._local = threading.local()  # one CUDA stream per worker thread

    @property
    def decodes_jpeg(self) -> bool:
        return self.decoder == "torchvision"

    def stage(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) uint8 on the host -> the same on the engine's device (identity on the CPU)."""
        if self.device.type != "cuda":
            return images
        pinned = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
        np.copyto(pinned.numpy(), images.numpy())  # numpy's copy: see `_host_stack`
        with torch.cuda.stream(self._stream()):
            out = pinned.to(self.device, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        return out

    def join(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(3, S, S) uint8 images, each on the host (PIL path) or already on the device (decoded there) -> one
        (n, 3, S, S) batch on the engine's device. Device work runs on this thread's stream, which it waits for:
        memory made on that stream is only ever read there, so the allocator cannot hand it out too early."""
        if self.device.type != "cuda":
            return _host_stack(images)
        host = [i for i, x in enumerate(images) if not x.is_cuda]
        if len(host) == len(images):  # the PIL path: one stack, one copy
            return self.stage(_host_stack(images))
        parts = list(images)
        if host:
            moved = self.stage(_host_stack([parts[i] for i in host]))
            for j, i in enumerate(host):
                parts[i] = moved[j]
        with torch.cuda.stream(self._stream()):
            out = torch.stack(parts)
            torch.cuda.current_stream(self.device).synchronize()
        return out

    def decode_jpegs(self, payloads: Sequence[tuple[bytes, int]]) -> list[torch.Tensor | None]:
        """(JPEG bytes that passed `jpeg_size`, its pixel count) -> (3, S, S) uint8 on the engine's device,
        resized; None where torchvision refuses one (the caller falls back to PIL)."""
        out: list[torch.Tensor | None] = []
        group: list[bytes] = []
        pixels = 0
        for data, n in payloads:
            if group and pixels + n > _DECODE_GROUP_PIXELS:
                out += self._decode_group(group)
                group, pixels = [], 0
            group.append(data)
            pixels += n
        return out + (self._decode_group(group) if group else [])

    def _decode_group(self, payloads: list[bytes]) -> list[torch.Tensor | None]:
        tensors = [torch.from_numpy(np.frombuffer(d, dtype=np.uint8).copy()) for d in payloads]
        if self.device.type != "cuda":
            return [self._decode_one(t) for t in tensors]
        with torch.cuda.stream(self._stream()):
            try:  # one batched nvJPEG call for the group
                decoded = tvio.decode_jpeg(tensors, mode=tvio.ImageReadMode.RGB, device=self.device)
                out: list[torch.Tensor | None] = [self._resize(x) for x in decoded]
            except RuntimeError:  # one bad file fails the whole call: retry one by one
                out = [self._decode_one(t) for t in tensors]
            torch.cuda.current_stream(self.device).synchronize()
        return out

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            x = tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # damaged, or a JPEG variant it does not handle: PIL judges it
            return None
        return self._resize(x)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (self.size, self.size):  # as PIL: an image already at size is not resampled
            return x
        return TF.resize(x, [self.size, self.size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)

    def _stream(self) -> torch.cuda.Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return stream
