"""model/postprocess.py: the one normalised score, verdict, threshold override and heat ramp, pinned against the
formulas they replace (numbers must not move), and the packed score columns of a prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.calibration import ImageScores
from model.inference import Prediction, ScoreColumns
from model.postprocess import HEAT_RAMP, heat_colours, normalise, normalised_score, verdict, with_threshold


def _old_scalar(raw: float, threshold: float) -> float:  # service/core/results.py's `normalised`, as it was
    v = 0.5 * raw / threshold if raw <= threshold else 0.5 + 0.5 * (raw - threshold) / (1.0 - threshold)
    return min(max(v, 0.0), 1.0)


def _old_colormap(v: np.ndarray) -> np.ndarray:  # training/visuals.py and service/core/results.py, as they were
    colors = np.array([[0, 0, 0], [120, 0, 140], [230, 60, 30], [255, 210, 0], [255, 255, 255]], dtype=np.float32)
    pos = np.clip(v, 0, 1) * (len(colors) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(colors) - 2)
    t = (pos - lo)[..., None]
    return (colors[lo] * (1 - t) + colors[lo + 1] * t).astype(np.uint8)


def test_one_image_normalises_exactly_as_before() -> None:
    rng = np.random.default_rng(0)
    pairs = [(float(r), float(t)) for r, t in zip(rng.random(2000), rng.uniform(0.01, 0.99, 2000), strict=True)]
    pairs += [(0.0, 0.5), (1.0, 0.5), (0.7, 0.7), (0.35, 0.7), (0.85, 0.7), (0.6, 0.5), (0.3, 0.6), (1.2, 0.6)]
    for raw, thr in pairs:
        assert normalised_score(raw, thr) == _old_scalar(raw, thr), (raw, thr)  # bit for bit
    assert normalised_score(0.35, 0.7) == 0.25 and normalised_score(0.85, 0.7) == pytest.approx(0.75)
    assert normalised_score(0.7, 0.7) == 0.5 and normalised_score(1.2, 0.6) == 1.0


def test_batched_and_single_normalisation_are_one_function() -> None:
    raw = torch.rand(500, dtype=torch.float64)
    thr = torch.rand(500, dtype=torch.float64) * 0.98 + 0.01
    batched = normalise(raw, thr).tolist()
    assert batched == [normalised_score(r, t) for r, t in zip(raw.tolist(), thr.tolist(), strict=True)]
    pinned = normalise(torch.tensor([0.0, 0.35, 0.7, 0.85, 1.0], dtype=torch.float64),
                       torch.full((5,), 0.7, dtype=torch.float64))
    assert pinned.tolist() == [0.0, 0.25, 0.5, _old_scalar(0.85, 0.7), 1.0]


def test_verdict_and_override() -> None:
    assert verdict(0.71, 0.7) is True and verdict(0.7, 0.7) is False  # strictly above
    assert verdict(torch.tensor([0.5, 0.9]), torch.tensor([0.6, 0.6])).tolist() == [False, True]
    assert with_threshold(0.6, 0.5) == (_old_scalar(0.6, 0.5), True)
    assert with_threshold(0.6, 0.8) == (_old_scalar(0.6, 0.8), False)
    assert with_threshold(0.6, 0.6) == (0.5, False)
    for raw in np.linspace(0, 1, 41):  # the verdict and the normalised score agree on which side of 0.5
        s, bad = with_threshold(float(raw), 0.37)
        assert bad == (s > 0.5)


def test_heat_ramp_colours_as_before() -> None:
    rng = np.random.default_rng(1)
    for v in (rng.uniform(-0.5, 1.5, (64, 64)).astype(np.float32), np.linspace(0, 1, 257),
              rng.random((3, 5, 7))):
        assert np.array_equal(heat_colours(v), _old_colormap(v))
    stops = heat_colours(np.linspace(0, 1, len(HEAT_RAMP)))
    assert stops.tolist() == [list(c) for c in HEAT_RAMP] and stops.dtype == np.uint8


def test_prediction_columns_are_the_score_columns_in_order() -> None:
    maps = torch.rand(3, 8, 8) * 4
    scores = ImageScores(raw=torch.tensor([0.2, 0.8, 0.5]), threshold=torch.tensor([0.6, 0.6, 0.5]),
                         normalized_score=torch.tensor([0.1667, 0.75, 0.5]),
                         is_anomalous=torch.tensor([False, True, False]))
    pred = Prediction(maps, torch.tensor([0.1, 0.9, 0.4]), scores)
    cols = pred.columns()
    assert cols.shape == (3, len(ScoreColumns._fields)) and cols.dtype == torch.float32
    rows = [ScoreColumns.unpack(row) for row in cols.tolist()]
    assert [r.is_anomalous for r in rows] == [False, True, False]
    for name, want in [("text_score", pred.text_scores), ("score", scores.raw), ("threshold", scores.threshold),
                       ("normalized_score", scores.normalized_score), ("map_max", maps.flatten(1).amax(1))]:
        assert [getattr(r, name) for r in rows] == want.tolist(), name
    host = pred.to_host(maps=False)
    assert torch.equal(host.scores.raw, scores.raw) and torch.equal(host.scores.is_anomalous, scores.is_anomalous)
