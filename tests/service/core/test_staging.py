"""Staging: which uploads the device decoder takes, how close it comes to the reference, and device copies."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint_import import import_to_bundle
from model.preprocess import decode_image, resize_uint8
from service.core.engine import Engine
from service.core.staging import ImageStager, jpeg_size
from tests.helpers import PARITY

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: nvJPEG decode and streams")


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth structure plus grain: JPEG-like content, not white noise (which JPEG mangles)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8))
    a = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16) + rng.integers(-20, 20, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def test_jpeg_size_takes_plain_jpegs_only() -> None:
    plain = _jpeg(_photo(120, 80))
    assert jpeg_size(plain) == (120, 80)
    assert jpeg_size(_jpeg(_photo(50, 40).convert("L"))) == (50, 40)
    png = io.BytesIO()
    _photo(20, 20).save(png, format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    refused = {
        "png": png.getvalue(),
        "cmyk": _jpeg(_photo(30, 30).convert("CMYK")),
        "exif rotated": _jpeg(_photo(30, 20), exif=exif.tobytes()),
        "truncated": plain[: len(plain) // 2],
        "header only": plain[:3] + b"garbage\xff\xd9",
        "empty": b"",
    }
    assert {k: jpeg_size(v) for k, v in refused.items()} == dict.fromkeys(refused)
    exif[0x0112] = 1  # upright: nothing to rotate, so the device path keeps it
    assert jpeg_size(_jpeg(_photo(30, 20), exif=exif.tobytes())) == (30, 20)


@pytest.mark.parametrize(("w", "h", "size"), [(640, 480, 336), (200, 150, 336), (1024, 768, 112), (64, 64, 64)])
def test_torchvision_decoder_is_within_two_grey_levels_of_the_reference(w: int, h: int, size: int) -> None:
    data = _jpeg(_photo(w, h, seed=w))
    stager = ImageStager(torch.device("cpu"), size, "torchvision")
    (got,) = stager.decode_jpegs([(data, w * h)])
    ref = resize_uint8(decode_image(data), size)
    assert got is not None and got.shape == ref.shape == (3, size, size) and got.dtype == torch.uint8
    diff = (got.int() - ref.int()).abs()
    # the same libjpeg-turbo decode; torch's antialiased bicubic and PIL's round apart by 1 when shrinking and
    # at most 2 when enlarging, on about 0.5% of the values
    assert diff.max() <= (1 if w >= size else 2)
    assert diff.float().mean() < 0.02
    if (w, h) == (size, size):  # no resize on either side: identical
        assert torch.equal(got, ref)


def test_decoder_refusals_come_back_as_none_in_order() -> None:
    good = _jpeg(_photo(40, 30))
    damaged = good[:200] + b"\x00" * 50 + good[250:]  # a damaged header table, end marker intact
    stager = ImageStager(torch.device("cpu"), 32, "torchvision")
    got = stager.decode_jpegs([(good, 1200), (b"\xff\xd8\xff\xd9", 0), (good, 1200)])
    assert [g is None for g in got] == [False, True, False] and torch.equal(got[0], got[2])
    # libjpeg-turbo recovers from this damage on both paths alike: no stricter, no laxer than the reference
    assert decode_image(damaged).size == (40, 30) and stager.decode_jpegs([(damaged, 1200)])[0] is not None


def test_groups_bound_device_pixels_without_changing_results(monkeypatch: pytest.MonkeyPatch) -> None:
    datas = [(_jpeg(_photo(60, 40, seed=i)), 2400) for i in range(5)]
    stager = ImageStager(torch.device("cpu"), 32, "torchvision")
    whole = stager.decode_jpegs(datas)
    monkeypatch.setattr("service.core.staging._DECODE_GROUP_PIXELS", 5000)  # two images per group
    grouped = stager.decode_jpegs(datas)
    assert all(torch.equal(a, b) for a, b in zip(whole, grouped, strict=True))


def test_stage_is_the_identity_on_the_cpu_and_decoders_are_checked() -> None:
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    assert ImageStager(torch.device("cpu"), 8).stage(x) is x
    assert torch.equal(ImageStager(torch.device("cpu"), 8).join([x[1], x[0]]), x)
    assert not ImageStager(torch.device("cpu"), 8).decodes_jpeg
    with pytest.raises(ValueError, match="unknown image decoder 'nvjpeg': use one of pil, torchvision"):
        ImageStager(torch.device("cpu"), 8, "nvjpeg")  # type: ignore[arg-type]


@CUDA
def test_cuda_staging_copies_on_a_side_stream_and_nvjpeg_is_close_to_the_reference() -> None:
    dev = torch.device("cuda")
    stager = ImageStager(dev, 336, "torchvision")
    x = torch.randint(0, 256, (3, 3, 336, 336), dtype=torch.uint8)
    staged = stager.stage(x)
    assert staged.device.type == "cuda" and torch.equal(staged.cpu(), x)
    mixed = stager.join([x[0], staged[1], x[2]])  # host and device images in one request
    assert mixed.device.type == "cuda" and torch.equal(mixed.cpu(), x)
    data = [(_jpeg(_photo(640, 480, seed=i)), 640 * 480) for i in range(4)]
    got = stager.decode_jpegs(data)
    for (d, _), g in zip(data, got, strict=True):
        ref = resize_uint8(decode_image(d), 336)
        diff = (g.cpu().int() - ref.int()).abs().flatten().float()
        # nvJPEG's IDCT is not libjpeg's and hardware decoders bound no single pixel: bound the mean and a high
        # percentile, not the maximum (scripts/gpu_probe.py nvjpeg reports all three)
        assert g.device.type == "cuda" and diff.mean() < 0.5 and torch.quantile(diff, 0.999) <= 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: batches staged on the device")
def test_cuda_engine_takes_staged_batches_and_scores_them_as_host_ones(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    import_to_bundle(next(PARITY.glob("*.ckpt")), bundle, taps=None, text_heads=None,
               temperature=0.07)
    engine = Engine(bundle, "cuda")
    stager = ImageStager(engine.device, engine.image_size)
    parts = [torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8) for n in (2, 1)]
    try:
        staged = engine.call_blocking(engine.run, [stager.stage(p) for p in parts], [None] * 3)
        host = engine.call_blocking(engine.run, parts, [None] * 3)
        with pytest.raises(ValueError, match="mixes host and device images"):
            engine.call_blocking(engine.run, [stager.stage(parts[0]), parts[1]], [None] * 3)
    finally:
        engine.close()
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(staged, host, strict=True))


@pytest.mark.slow
def test_host_staging_starts_no_thread_pool_per_request_thread() -> None:
    """Request threads stage on the host with numpy: torch's stack would start an OpenMP team in each of them."""
    code = """
import os, threading, time
import numpy as np, torch
from service.core.staging import ImageStager
torch.set_num_threads(2)
x = [torch.from_numpy(np.full((3, 224, 224), i, np.uint8)) for i in range(8)]  # above torch's parallel grain
torch.stack(x)  # the main thread's own pool exists before counting
stager, done, out = ImageStager(torch.device("cpu"), 224), threading.Event(), []
def work():
    out.append(stager.join(x))
    done.wait()
before = len(os.listdir("/proc/self/task"))
threads = [threading.Thread(target=work) for _ in range(6)]
[t.start() for t in threads]
while len(out) < 6:
    time.sleep(0.01)
print(len(os.listdir("/proc/self/task")) - before - 6, all(bool((o[:, 0, 0, 0] == torch.arange(8)).all()) for o in out))
done.set()
"""
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert got == ["0", "True"]
