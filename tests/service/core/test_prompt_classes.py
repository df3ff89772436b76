"""The service serves a bundle with per-stage adapters and per-class prompt contexts: a registered class is
scored with the bundle's prompt class of the same name, else prompt class 0 (docs/scoring.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from model.bundle import load_bundle, save_bundle
from model.config import AdapterConfig, PromptConfig
from model.inference import fit_class, predict_scored
from model.preprocess import load_image, preprocess_batch, resize_uint8
from model.sowa import SowaModel
from service.client import decode_raw_heatmap
from service.core.engine import Engine
from tests.helpers import PARITY, perturb_trainables, tiny_config
from tests.in_process import serve_in_process

SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))
STAGES = (AdapterConfig(window_size=2, depth=2), AdapterConfig(window_size=4, depth=1, num_heads=4),
          AdapterConfig(window_size=8, depth=1, value_only=False), AdapterConfig(window_size=4, depth=3))


@pytest.fixture(scope="module")
def two_class_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(7)
    cfg = dataclasses.replace(tiny_config(), adapters=STAGES,
                              prompt=PromptConfig(length=4, class_names=("bolt", "nut")))
    model = SowaModel(cfg)
    perturb_trainables(model, 7)
    model.refresh_text()
    out = tmp_path_factory.mktemp("classes") / "bundle"
    save_bundle(model, out, {"source": "test"})
    return out


def _offline(bundle: Path, prompt_class: str) -> tuple[np.ndarray, np.ndarray]:
    """What a class named `prompt_class` should get: the model API with that prompt class, no service."""
    model, _ = load_bundle(bundle)
    shots = preprocess_batch([load_image(p) for p in SHOTS], 64)
    tests = preprocess_batch([load_image(p) for p in TESTS], 64)
    memory = fit_class(model, shots, prompt_name=prompt_class)
    pred = predict_scored(model, tests, [memory] * len(TESTS))
    return pred.anomaly_maps.numpy(), pred.text_scores.numpy()


def test_engine_scores_each_class_with_its_prompt_class(two_class_bundle: Path) -> None:
    engine = Engine(two_class_bundle, "cpu")
    try:
        shots = [load_image(p) for p in SHOTS]
        x = torch.stack([resize_uint8(load_image(p), engine.image_size) for p in TESTS])
        results = {}
        for name in ("bolt", "nut", "washer"):
            memory = engine.call_blocking(engine.fit, shots, name)
            assert memory.prompt_name == name
            results[name] = engine.call_blocking(engine.run, [x], [memory] * len(TESTS), True)
        text = {n: np.array([r.text_score for r in rs]) for n, rs in results.items()}
        assert not np.allclose(text["bolt"], text["nut"])
        assert np.array_equal(text["washer"], text["bolt"])  # not a prompt class of the bundle: class 0
        for name, prompt_class in (("bolt", "bolt"), ("nut", "nut"), ("washer", "bolt")):
            maps, scores = _offline(two_class_bundle, prompt_class)
            assert np.abs(np.stack([r.anomaly_map for r in results[name]]) - maps).max() <= 1e-5
            assert np.abs(text[name] - scores).max() <= 1e-6
    finally:
        engine.close()


@pytest.mark.anyio
async def test_service_serves_per_class_contexts(two_class_bundle: Path, tmp_path: Path) -> None:
    async with serve_in_process(two_class_bundle, tmp_path / "data", max_wait_ms=20) as svc:
        got = {}
        for name in ("bolt", "nut"):
            await svc.client.register_shots(name, SHOTS, mode="replace")
            got[name] = await svc.client.predict(TESTS, class_name=name, heatmap="raw")
        zero = await svc.client.predict(TESTS, heatmap="raw")
    for name in ("bolt", "nut"):
        maps, scores = _offline(two_class_bundle, name)
        served = np.stack([decode_raw_heatmap(r.heatmap) for r in got[name].results])
        assert np.abs(served - maps).max() <= 1e-5
        assert np.abs(np.array([r.text_score for r in got[name].results]) - scores).max() <= 1e-6
    bolt, nut = (np.array([r.text_score for r in got[n].results]) for n in ("bolt", "nut"))
    assert not np.allclose(bolt, nut)
    assert np.array_equal([r.text_score for r in zero.results], bolt)  # zero-shot: prompt class 0
