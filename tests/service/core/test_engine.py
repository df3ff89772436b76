"""The engine alone: results with and without maps, launch/finish against run, two batches on the device."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from model.preprocess import load_image, resize_uint8
from service.core.engine import Engine
from tests.helpers import PARITY

SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))


def _images(engine: Engine) -> torch.Tensor:
    return torch.stack([resize_uint8(load_image(p), engine.image_size) for p in TESTS])


def _check_maps_only_where_needed(engine: Engine) -> None:
    memory = engine.call_blocking(engine.fit, [load_image(p) for p in SHOTS])
    x = _images(engine)
    if engine.device.type == "cuda":
        x = x.to(engine.device)
    full = engine.call_blocking(engine.run, [x], [memory] * len(TESTS), True)
    lean = engine.call_blocking(engine.run, [x], [memory] * len(TESTS), False)
    # the parity images include both kinds (asserted, so the test cannot pass on one branch only)
    assert {f.map_max > f.pixel_threshold for f in full} == {True, False}
    for f, g in zip(full, lean, strict=True):
        assert (f.score, f.threshold, f.is_anomalous, f.map_max) == (g.score, g.threshold, g.is_anomalous, g.map_max)
        assert f.map_max == pytest.approx(float(f.anomaly_map.max()))
        if f.map_max > f.pixel_threshold:  # may hold a region: its map comes back all the same
            assert np.array_equal(g.anomaly_map, f.anomaly_map)
        else:
            assert g.anomaly_map is None
    pipelined = asyncio.run(engine.run_batch([x[:2], x[2:]], [memory] * len(TESTS), [True] * len(TESTS)))
    assert [r.score for r in pipelined] == [r.score for r in full]
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(pipelined, full, strict=True))


def test_maps_come_back_only_where_the_answer_needs_them(bundle: Path) -> None:
    engine = Engine(bundle, "cpu")
    try:
        _check_maps_only_where_needed(engine)
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: launch/finish across streams")
def test_cuda_launch_finish_and_two_batches_on_the_device(bundle: Path) -> None:
    engine = Engine(bundle, "cuda")
    try:
        _check_maps_only_where_needed(engine)
        x = _images(engine).to(engine.device)
        first = engine.call_blocking(engine.launch, [x], [None] * len(TESTS))
        second = engine.call_blocking(engine.launch, [x.flip(0)], [None] * len(TESTS))  # both queued at once
        a, b = engine.finish(first, [True] * len(TESTS)), engine.finish(second, [True] * len(TESTS))
        assert [r.score for r in a] == [r.score for r in b][::-1]
    finally:
        engine.close()
