"""Drift: how far a class's recently passed scores have moved up from its calibration, as a few bounded gauges.

The figure is the one-sided two-sample Kolmogorov-Smirnov statistic D+ (scipy.stats.ks_2samp, alternative
"greater": the recent scores lie above the reference) between

    reference  the calibration's scores of the shots (leave-one-out, Calibration.shot_scores), those at or below
               the threshold in force: passed parts are cut at the threshold, so the reference is cut the same way
    recent     the scores of the class's last `window` passed parts

D+ is the largest amount by which the reference's empirical distribution function lies above the recent one's: 0
when the recent scores are no higher, 1 when every one is above every reference score. KS rather than
the population stability index: a class has few shots (often 1 to 16), and PSI's bins would be mostly empty, its
figure then set by the smoothing constant that keeps log(0) away; KS needs no bins and no constant, and reads the
same whatever the score range. Its p-value is exported beside it, so an alert can ask for a shift that is both
large (D) and not chance (p), with as many shots as the class has: with 4 shots a D of 0.6 is still chance.

One-sided, upwards, for two reasons. The harm of drift is passed parts creeping toward the threshold: more false
calls, and defects standing out less. And shots are scored leave-one-out (against K-1 others) while line parts are
scored against all K, so an unchanged line scores a little below its shots: a two-sided figure would report that
bias as drift (parts just like the shots would show the most), the upward one does not.

Label cardinality is bounded: a figure is kept for at most `max_classes` classes, those most recently active
(a class's latest record time); the rest drop out of /metrics until they are active again. The figures are
computed by `refresh`, which a background task runs every minute (never on a request), and read at scrape time
(service/core/telemetry.py's `track_drift`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import ks_2samp

__all__ = ["DEFAULT_MAX_CLASSES", "DEFAULT_MIN_RECENT", "DEFAULT_WINDOW", "ClassDrift", "DriftMonitor", "drift_series",
           "ks_drift"]

DEFAULT_WINDOW = 200  # recent passed parts per class
DEFAULT_MIN_RECENT = 30  # fewer recent passed parts: no figure (D on a handful of parts is noise)
DEFAULT_MAX_CLASSES = 50  # classes with a figure on /metrics


@dataclass(frozen=True)
class ClassDrift:
    """One class's figure: KS D+ and its p-value, over `recent` passed parts against `reference` shot scores."""

    class_name: str
    ks: float
    p_value: float
    recent: int
    reference: int
    recent_median: float
    reference_median: float


def ks_drift(class_name: str, reference: Sequence[float], threshold: float, recent: Sequence[float],
             min_recent: int = DEFAULT_MIN_RECENT) -> ClassDrift | None:
    """The figure for one class, or None with fewer than `min_recent` recent scores or no reference score at or
    below the threshold (a calibration stored before shot scores were kept has none)."""
    ref = np.asarray(reference, dtype=np.float64)
    ref = ref[ref <= threshold]
    now = np.asarray(recent, dtype=np.float64)
    if ref.size == 0 or now.size < min_recent:
        return None
    result = ks_2samp(ref, now, alternative="greater", method="auto")  # F_ref > F_recent somewhere: recent higher
    return ClassDrift(class_name, float(result.statistic), float(result.pvalue), int(now.size), int(ref.size),
                      float(np.median(now)), float(np.median(ref)))


def drift_series(class_name: str, reference: Sequence[float], threshold: float, times: Sequence[float],
                 scores: Sequence[float], window: int = DEFAULT_WINDOW,
                 min_recent: int = DEFAULT_MIN_RECENT) -> list[dict[str, float | int]]:
    """The figure over time, for a chart: passed parts (times and scores, oldest first) cut into consecutive windows
    of `window` parts, the newest window ending at the newest part (the oldest may be short; one under `min_recent`
    is left out). Each point: the window's last time, its size, KS D and p-value."""
    if len(times) != len(scores):
        raise ValueError(f"{len(times)} times but {len(scores)} scores")
    points = []
    for end in range(len(scores), 0, -window):
        start = max(0, end - window)
        figure = ks_drift(class_name, reference, threshold, scores[start:end], min_recent)
        if figure is not None:
            points.append({"until": float(times[end - 1]), "parts": figure.recent, "ks": figure.ks,
                           "p_value": figure.p_value})
    return points[::-1]


# what a refresh reads, as plain callables so the monitor knows no store:
ActiveClasses = Callable[[int], Sequence[str]]  # up to N class names, most recently active first
RecentPassed = Callable[[str, int], Sequence[float]]  # a class's last N passed scores
Reference = Callable[[str], "tuple[Sequence[float], float] | None"]  # shot scores and threshold; None: no class


class DriftMonitor:
    """The latest figure per active class, replaced whole by each `refresh` (readers never see half of one)."""

    def __init__(self, window: int = DEFAULT_WINDOW, min_recent: int = DEFAULT_MIN_RECENT,
                 max_classes: int = DEFAULT_MAX_CLASSES) -> None:
        if window < min_recent or min_recent < 2 or max_classes < 1:
            raise ValueError(f"need window >= min_recent >= 2 and max_classes >= 1, got window={window}, "
                             f"min_recent={min_recent}, max_classes={max_classes}")
        self.window, self.min_recent, self.max_classes = window, min_recent, max_classes
        self._figures: dict[str, ClassDrift] = {}
        self._lock = threading.Lock()

    def refresh(self, active: ActiveClasses, recent_passed: RecentPassed, reference: Reference) -> None:
        """Recompute every figure (blocking: run it in a thread). A read that raises leaves the last figures as
        they were (the caller logs it and tries again next time)."""
        figures: dict[str, ClassDrift] = {}
        for name in list(active(self.max_classes))[:self.max_classes]:
            ref = reference(name)
            if ref is None:  # deleted since its records were written
                continue
            shots, threshold = ref
            figure = ks_drift(name, shots, threshold, recent_passed(name, self.window), self.min_recent)
            if figure is not None:
                figures[name] = figure
        with self._lock:
            self._figures = figures

    def figures(self) -> list[ClassDrift]:
        with self._lock:
            return sorted(self._figures.values(), key=lambda f: f.class_name)

    def get(self, class_name: str) -> ClassDrift | None:
        with self._lock:
            return self._figures.get(class_name)
