"""service.core.uploads without HTTP: (filename, bytes) pairs in, a staged batch or decoded images out, 4xx errors
naming the file."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.preprocess import decode_image, resize_uint8
from service.core.errors import InvalidImageError, PayloadTooLargeError, UnprocessableError
from service.core.staging import ImageStager
from service.core.uploads import ImageSource, PixelLimits, check_count, decode_batch, stage_batch

LIMITS = PixelLimits(image=10_000, request=15_000)


def _png(w: int, h: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_batch_is_staged_resized_with_its_sources() -> None:
    uploads = [("a.png", _png(40, 30)), ("b.png", _png(32, 32, seed=1))]
    batch = stage_batch(uploads, LIMITS, ImageStager(torch.device("cpu"), 32))
    assert batch.sources == (ImageSource("a.png", 40, 30), ImageSource("b.png", 32, 32)) and len(batch) == 2
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (2, 3, 32, 32)
    for x, (_, data) in zip(batch.images, uploads, strict=True):
        assert torch.equal(x, resize_uint8(decode_image(data), 32))  # the reference preprocessing, bit for bit
    decoded = decode_batch(uploads, LIMITS)
    assert decoded.sources == batch.sources and [img.size for img in decoded.images] == [(40, 30), (32, 32)]


def test_limits_and_bad_files_name_the_file() -> None:
    stager = ImageStager(torch.device("cpu"), 32)
    with pytest.raises(PayloadTooLargeError, match="big.png: image has 200x100"):
        stage_batch([("big.png", _png(200, 100))], LIMITS, stager)
    with pytest.raises(PayloadTooLargeError, match="in all"):  # each image fits, the request does not
        stage_batch([(f"{i}.png", _png(100, 80, seed=i)) for i in range(2)], LIMITS, stager)
    with pytest.raises(InvalidImageError, match="notes.txt"):
        decode_batch([("notes.txt", b"hello")], LIMITS)
    with pytest.raises(UnprocessableError, match="more than the limit of 6"):
        check_count(7, 6)
