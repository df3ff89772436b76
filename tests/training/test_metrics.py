from __future__ import annotations

import numpy as np
import pytest

from training.metrics import aupro, aupro_sowa, auroc, average_precision, f1_max, pro_curve


def _case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[1, 5:12, 5:12] = True
    masks[2, 20:30, 2:6] = True
    masks[2, 2:4, 25:30] = True
    maps = rng.random((4, 32, 32)) + 0.8 * masks
    return masks, maps


def test_perfect_and_inverted_rankings() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert auroc(y, s) == 1.0 and average_precision(y, s) == 1.0 and f1_max(y, s) == 1.0
    assert auroc(y, -s) == 0.0
    masks, _ = _case()
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, -masks.astype(float)) == pytest.approx(0.0)


def test_invariant_under_increasing_transforms() -> None:
    masks, maps = _case(1)
    y = masks.reshape(4, -1).any(1)
    s = maps.reshape(4, -1).max(1)
    for f in (np.exp, lambda v: 3 * v + 7, lambda v: v ** 3):
        assert auroc(masks, f(maps)) == pytest.approx(auroc(masks, maps))
        assert f1_max(masks, f(maps)) == pytest.approx(f1_max(masks, maps))
        assert aupro(masks, f(maps)) == pytest.approx(aupro(masks, maps))
        assert average_precision(y, f(s)) == pytest.approx(average_precision(y, s))


def test_f1_max_by_hand_and_single_label_convention() -> None:
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.7, 0.1])
    # thresholds: >=0.9 -> P=1, R=.5, F1=.667; >=0.8 -> P=.5, R=.5; >=0.7 -> P=.667, R=1, F1=.8
    assert f1_max(y, s) == pytest.approx(0.8)
    assert auroc(np.zeros(5), np.arange(5)) == 0.0 and average_precision(np.ones(3), np.arange(3)) == 0.0
    with pytest.raises(ValueError):
        auroc(np.array([0, 1]), np.array([0.5, np.nan]))


def test_pro_curve_by_hand() -> None:
    # one 2x2 region in image 0, nothing anomalous in image 1; 4 + 8 = 12 normal pixels
    masks = np.zeros((2, 2, 4), dtype=bool)
    masks[0, :, :2] = True
    maps = np.zeros((2, 2, 4))
    maps[0, 0, 0], maps[0, 1, 1], maps[1, 0, 0] = 5.0, 4.0, 3.0  # two region pixels, then a false positive
    fpr, pro = pro_curve(masks, maps)
    assert np.allclose(fpr[:4], [0, 0, 0, 1 / 12]) and np.allclose(pro[:4], [0, 0.25, 0.5, 0.5])
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
    # up to FPR 0.3: PRO is 0.5 from 0 to 1/12, then rises linearly to 1 at FPR 1 (the tie of all zeros)
    at_03 = 0.5 + 0.5 * (0.3 - 1 / 12) / (1 - 1 / 12)
    expected = (0.5 / 12 + (0.3 - 1 / 12) * (0.5 + at_03) / 2) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected)


def test_regions_are_weighted_equally_whatever_their_size() -> None:
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 0:6, 0:6] = True  # 36 pixels
    masks[0, 8, 8] = True  # 1 pixel, its own 8-connected region
    maps = np.zeros((1, 10, 10))
    maps[0, 8, 8] = 1.0  # the small region is found, the big one not at all
    fpr, pro = pro_curve(masks, maps)
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0.0


def test_sowa_variant_tracks_the_official_one() -> None:
    masks, maps = _case(2)
    official, variant = aupro(masks, maps), aupro_sowa(masks, maps)
    assert 0 < official < 1 and 0 < variant <= 1
    assert np.isnan(aupro_sowa(masks, masks + 0.01 * maps))  # every kept FPR is 0: the reference divides by 0
    with pytest.raises(ValueError):
        aupro_sowa(np.zeros((1, 4, 4)), np.random.default_rng(0).random((1, 4, 4)))


def test_official_aupro_equals_a_brute_force_sweep() -> None:
    from scipy import ndimage

    masks, maps = _case(3)
    maps = np.round(maps, 2)  # ties included
    regions = [(i, lab == r) for i, m in enumerate(masks)
               for lab, n in [ndimage.label(m, structure=np.ones((3, 3)))] for r in range(1, n + 1)]
    points = [(0.0, 0.0)]
    for th in np.unique(maps)[::-1]:  # score >= th counts as anomalous
        binary = maps >= th
        points.append(((binary & ~masks).sum() / (~masks).sum(), np.mean([binary[i][r].mean() for i, r in regions])))
    fpr, pro = np.array(points).T
    below = fpr <= 0.3
    j = below.sum()
    x = np.r_[fpr[below], 0.3]
    y = np.r_[pro[below], pro[j - 1] + (0.3 - fpr[j - 1]) / (fpr[j] - fpr[j - 1]) * (pro[j] - pro[j - 1])]
    assert aupro(masks, maps) == pytest.approx(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / 0.3, abs=1e-9)
