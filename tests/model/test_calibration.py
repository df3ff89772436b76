from __future__ import annotations

import math

import pytest
import torch

from model.calibration import DEFAULT_Z, calibrate, image_scores
from model.postprocess import normalise


def test_calibration_from_shot_maxima() -> None:
    cal = calibrate(torch.tensor([2.0, 2.2, 2.4, 2.6]), torch.tensor([0.2, 0.3, 0.4, 0.5]))
    assert cal.map_mean == pytest.approx(2.3)
    assert cal.map_std == pytest.approx(torch.tensor([2.0, 2.2, 2.4, 2.6]).std().item())
    assert cal.text_mean == pytest.approx(0.35)
    assert cal.threshold == pytest.approx(0.5 * (0.35 + 1 / (1 + math.exp(-DEFAULT_Z))))
    assert cal.shots == 4


def test_spread_floor_for_few_or_identical_shots() -> None:
    one = calibrate(torch.tensor([2.0]), torch.tensor([0.3]))
    same = calibrate(torch.tensor([2.0, 2.0]), torch.tensor([0.3, 0.3]))
    assert one.map_std == pytest.approx(0.1) and same.map_std == pytest.approx(0.1)  # 5% of the mean


def test_normalise_is_monotone_with_threshold_at_half() -> None:
    raw = torch.linspace(0, 1, 101, dtype=torch.float64)
    thr = torch.full_like(raw, 0.7)
    s = normalise(raw, thr)
    assert s[0] == 0 and s[-1] == 1
    assert (s[1:] >= s[:-1]).all()
    assert normalise(torch.tensor([0.7]), torch.tensor([0.7])).item() == pytest.approx(0.5)


def test_scores_mix_zero_shot_and_calibrated_images() -> None:
    cal = calibrate(torch.tensor([2.0, 2.2, 2.4]), torch.tensor([0.2, 0.2, 0.2]))
    text = torch.tensor([0.9, 0.3, 0.3])
    map_max = torch.tensor([5.0, 2.2, 9.0])
    s = image_scores(text, map_max, [None, cal, cal])
    assert s.raw[0] == pytest.approx(0.9) and s.threshold[0] == pytest.approx(0.5)
    assert s.raw[1] == pytest.approx(0.5 * (0.3 + 0.5))  # at the normal mean: sigmoid(0) = 0.5
    assert s.is_anomalous.tolist() == [True, False, True]
    assert ((s.normalized_score > 0.5) == s.is_anomalous).all()
    with pytest.raises(ValueError):
        image_scores(text, map_max, [None])


def test_threshold_override() -> None:
    cal = calibrate(torch.tensor([1.0, 1.1]), torch.tensor([0.1, 0.1]))
    assert cal.with_threshold(0.8).threshold == 0.8
    with pytest.raises(ValueError):
        cal.with_threshold(1.5)
