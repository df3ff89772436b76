"""Area under the per-region-overlap curve (AUPRO), two definitions.

`aupro` is the official MVTec AD definition (Bergmann et al.): ground-truth regions are the 8-connected
components of every mask; at each threshold, PRO is the mean over all regions of the fraction of the region
above the threshold, and FPR is pooled over all normal pixels of all images. The curve is exact (one point per
distinct score), integrated with the trapezoid rule up to FPR 0.3 (interpolated there) and divided by 0.3.

`aupro_sowa` is the research code's variant (SOWA_SPEC.md §9), kept so numbers compare with its paper: 200
evenly spaced thresholds, FPR averaged per image, points with FPR < 0.3 kept, their FPRs rescaled to [0, 1] by
their own min and max, then the area.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc

__all__ = ["aupro", "aupro_sowa", "pro_curve"]

_EIGHT = np.ones((3, 3), dtype=bool)


def _inputs(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(masks).astype(bool)
    a = np.asarray(maps, dtype=np.float64)
    if m.shape != a.shape or m.ndim != 3:
        raise ValueError(f"masks and maps must both be (N, H, W), got {m.shape} and {a.shape}")
    return m, a


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, PRO) points, one per distinct score, from the highest threshold down; starts at (0, 0)."""
    m, a = _inputs(masks, maps)
    fp_step = np.zeros(a.shape)
    pro_step = np.zeros(a.shape)
    negatives = (~m).sum()
    if negatives == 0:
        raise ValueError("no normal pixel at all: FPR is undefined")
    fp_step[~m] = 1.0 / negatives
    labelled = [ndimage.label(mask, structure=_EIGHT) for mask in m]
    regions = sum(n for _, n in labelled)
    if regions == 0:
        raise ValueError("no anomalous region at all: PRO is undefined")
    for i, (labels, n) in enumerate(labelled):
        if n:
            areas = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
            inside = labels > 0
            pro_step[i][inside] = 1.0 / (regions * areas[labels[inside]])
    order = np.argsort(a.ravel(), kind="stable")[::-1]
    scores = a.ravel()[order]
    fpr = np.cumsum(fp_step.ravel()[order])
    pro = np.cumsum(pro_step.ravel()[order])
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # thresholds between values
    return np.r_[0.0, fpr[last_of_each_score]], np.r_[0.0, pro[last_of_each_score]]


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Official MVTec AUPRO up to `max_fpr`, normalised to [0, 1]."""
    fpr, pro = pro_curve(masks, maps)
    keep = fpr <= max_fpr
    x, y = fpr[keep], pro[keep]
    if x[-1] < max_fpr and keep.sum() < fpr.size:  # interpolate the curve at max_fpr
        j = keep.sum()
        t = (max_fpr - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x = np.r_[x, max_fpr]
        y = np.r_[y, pro[j - 1] + t * (pro[j] - pro[j - 1])]
    return float(auc(x, y) / max_fpr)


def aupro_sowa(masks: np.ndarray, maps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """The research code's AUPRO (`cal_pro_score`), for comparison with its published numbers."""
    m, a = _inputs(masks, maps)
    negatives = (~m).sum(axis=(1, 2))
    usable = negatives > 0  # an image that is all defect has no FPR; the reference would produce NaN
    labelled = [ndimage.label(mask, structure=_EIGHT) for mask in m]
    regions = [(i, labels == r) for i, (labels, n) in enumerate(labelled) for r in range(1, n + 1)]
    if not regions:
        raise ValueError("no anomalous region at all: PRO is undefined")
    lo, hi = a.min(), a.max()
    if hi <= lo:
        raise ValueError("all map values are equal: there is no threshold to sweep")
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / max_step):
        binary = a > th
        pros.append(np.mean([binary[i][r].mean() for i, r in regions]))
        fp = (binary & ~m).sum(axis=(1, 2))
        fprs.append(np.mean(fp[usable] / negatives[usable]))
    pros_a, fprs_a = np.asarray(pros), np.asarray(fprs)
    keep = fprs_a < expect_fpr
    if keep.sum() < 2:
        raise ValueError("fewer than two thresholds with FPR below the limit")
    x = fprs_a[keep]
    if x.max() == x.min():  # e.g. a perfect map: the reference divides by zero here
        return float("nan")
    x = (x - x.min()) / (x.max() - x.min())
    return float(auc(x, pros_a[keep]))
