from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import image_transform
from PIL import Image

from model.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDecodeError,
    decode_image,
    load_image,
    normalize,
    preprocess,
    resize_uint8,
)


def _encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_reference_preprocessing_is_open_clips_squash_transform() -> None:
    """The same tensor, bit for bit, as open_clip's own eval transform in `squash` mode with bicubic resizing and
    the OpenAI mean/std (torchvision's Resize, ToTensor and Normalize): not a re-derivation of our own code."""
    squash = image_transform(64, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
                             resize_mode="squash", interpolation="bicubic")
    crop = image_transform(64, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    rng = np.random.default_rng(0)
    for h, w in ((30, 50), (300, 170), (64, 64)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        x = preprocess(img, 64)
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert torch.equal(x, squash(img)), (h, w)
        if h != w:  # open_clip's default (shortest side, then a centre crop) is deliberately not what we do
            assert not torch.allclose(x, crop(img), atol=0.1)
    assert (CLIP_MEAN, CLIP_STD) == (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def test_preprocessing_of_a_flat_colour_is_known_exactly() -> None:
    # any size squashes a flat colour to the same flat colour: (v / 255 - mean) / std, per channel
    x = preprocess(Image.new("RGB", (37, 11), (255, 0, 128)), 64)
    expected = [(1 - 0.48145466) / 0.26862954, (0 - 0.4578275) / 0.26130258, (128 / 255 - 0.40821073) / 0.27577711]
    assert torch.allclose(x, torch.tensor(expected).view(3, 1, 1).expand(3, 64, 64), atol=1e-6)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.9303, -1.7521, 0.3399]), atol=1e-4)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    img = Image.new("RGB", (20, 10), (200, 100, 50)).convert(mode) if mode != "I;16" else Image.fromarray(
        np.full((10, 20), 40000, dtype=np.uint16))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (20, 10)
    if mode == "I;16":  # 16-bit is scaled to 8 bits, not clipped to white
        assert np.asarray(out)[0, 0, 0] == round(40000 / 65535 * 255)


def test_exif_rotation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty file"),
    (b"hello, not an image", "not a readable image"),
])
def test_bad_bytes(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


@pytest.mark.filterwarnings("ignore")  # PIL warns about the damaged TIFF tags it meets
def test_damaged_bytes_never_escape_as_other_errors() -> None:
    tiff = bytearray(_encode(Image.new("RGB", (16, 16), (9, 9, 9)), "TIFF"))
    rng = np.random.default_rng(0)
    assert np.array_equal(np.asarray(decode_image(bytes(tiff))), np.full((16, 16, 3), 9, np.uint8))
    refused = decoded = 0
    for _ in range(200):  # random byte damage: PIL raises many exception types, callers see one
        data = bytearray(tiff)
        for i in rng.integers(0, len(data), 4):
            data[i] = int(rng.integers(0, 256))
        try:  # any other exception fails the test
            out = decode_image(bytes(data))
        except ImageDecodeError:
            refused += 1
            continue
        decoded += 1
        assert out.mode == "RGB" and out.width * out.height > 0  # what is returned is an image
    assert refused and decoded, (refused, decoded)  # both ways out were taken


def test_truncated_and_oversized_images(tmp_path: Path) -> None:
    data = _encode(Image.new("RGB", (64, 64), (1, 2, 3)).effect_spread(3), "PNG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="more than the limit"):
        decode_image(data, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="no such file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(ImageDecodeError, match="x.png"):
        load_image(tmp_path / "x.png")


@pytest.mark.parametrize("size", [(64, 64), (200, 120), (37, 301)])
def test_uint8_resize_then_normalize_is_bit_identical_to_preprocess(size: tuple[int, int]) -> None:
    # the service queues uint8 and normalises on the device: it must be the reference preprocessing, exactly
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    small = resize_uint8(img, 112)
    assert small.dtype == torch.uint8 and small.shape == (3, 112, 112)
    assert torch.equal(normalize(small), preprocess(img, 112))
    assert torch.equal(normalize(torch.stack([small, small]))[1], preprocess(img, 112))


def test_normalize_is_exact_division_for_every_byte_and_channel() -> None:
    # all 256 levels in all 3 channels against numpy's float32 true division: what preprocess does
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256).contiguous()
    ref = (x.numpy().astype(np.float32) / np.float32(255.0) - np.asarray(CLIP_MEAN, np.float32).reshape(3, 1, 1)) \
        / np.asarray(CLIP_STD, np.float32).reshape(3, 1, 1)
    assert np.array_equal(normalize(x).numpy(), ref)
    # multiplying by the rounded reciprocal (what CUDA does with a host scalar) is not the same float everywhere
    assert not torch.equal(x.float() * (1 / 255.0), x.float() / 255.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: normalisation on the GPU")
def test_normalize_on_the_gpu_is_bit_identical() -> None:
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    assert torch.equal(normalize(resize_uint8(img, 112).cuda()).cpu(), preprocess(img, 112))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: normalisation on the GPU")
def test_normalize_on_the_gpu_is_bit_identical_for_every_byte() -> None:
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256).contiguous()
    assert torch.equal(normalize(x.cuda()).cpu(), normalize(x))
