"""Threshold-free ranking metrics on scores against binary labels (images or flattened pixels).

scikit-learn computes them; the research code's convention for a class with a single label value (0.0, not an
error) is kept, so tables compare with its paper.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

__all__ = ["auroc", "average_precision", "f1_max"]


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.size} and {s.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    return None if y.all() or not y.any() else (y, s)  # one label value: the research code reports 0.0


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    checked = _check(labels, scores)
    return 0.0 if checked is None else float(roc_auc_score(*checked))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    checked = _check(labels, scores)
    return 0.0 if checked is None else float(average_precision_score(*checked))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over every threshold of the precision-recall curve (non-finite points dropped)."""
    checked = _check(labels, scores)
    if checked is None:
        return 0.0
    precision, recall, _ = precision_recall_curve(*checked)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))
