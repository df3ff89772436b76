"""A class's quality and drift figures, from its records: what GET /classes/{name}/quality answers.

The record store is read through `RecordReads`, the three reads these figures need (the record store implements
them). Only records scored with the class's current calibration by the serving model count (`scored_with`): a raw
score depends on the shots it was scored against and on the model, so a part reviewed before the shots changed, or
scored by another model version, says nothing about the threshold now (those are counted in `other_calibration`).
A threshold override does not change scores: records from before and after one count alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .drift import DEFAULT_MIN_RECENT, DEFAULT_WINDOW, DriftMonitor, drift_series, ks_drift
from .quality import report

__all__ = ["DRIFT_WINDOWS", "MAX_REVIEWED", "PassedPart", "RecordReads", "ReviewedPart", "class_figures",
           "refresh_drift", "scored_with"]

MAX_REVIEWED = 100_000  # the newest reviewed parts of a class that count: 1.6 MB of numbers at most
DRIFT_WINDOWS = 24  # points on the drift chart


def scored_with(revision: str, model: str) -> str:
    """What made a raw score, as the record stores report it: the class's revision (its shots) and the model's
    fingerprint as records name it (its first 16 hex digits)."""
    return f"{revision}/{model[:16]}"


@dataclass(frozen=True)
class ReviewedPart:
    score: float
    defective: bool  # the review: True = defective, False = good
    calibration: str  # what scored it: `scored_with(revision, model)` as the record names them


@dataclass(frozen=True)
class PassedPart:
    time: float
    score: float
    calibration: str


class RecordReads(Protocol):
    def reviewed_parts(self, class_name: str, limit: int) -> Sequence[ReviewedPart]:
        """The class's newest `limit` reviewed records (reviewed good or defective; skipped ones are not)."""

    def passed_parts(self, class_name: str, limit: int) -> Sequence[PassedPart]:
        """The class's newest `limit` records whose verdict was 'pass', oldest first."""


def class_figures(reads: RecordReads, class_name: str, calibration: str, threshold: float,
                  shot_scores: Sequence[float], escape_target: float | None = None,
                  window: int = DEFAULT_WINDOW) -> dict[str, Any]:
    """Quality from the reviewed parts at `threshold` (the one in force) and drift of the passed parts against
    `shot_scores`, both for the records scored with `calibration` (blocking: run it in a thread)."""
    parts = reads.reviewed_parts(class_name, MAX_REVIEWED)
    current = [p for p in parts if p.calibration == calibration]
    quality = report(threshold, [p.score for p in current], [p.defective for p in current], escape_target)
    passed = [p for p in reads.passed_parts(class_name, window * DRIFT_WINDOWS) if p.calibration == calibration]
    times, scores = [p.time for p in passed], [p.score for p in passed]
    latest = ks_drift(class_name, shot_scores, threshold, scores[-window:], DEFAULT_MIN_RECENT)
    return {
        **quality, "other_calibration": len(parts) - len(current),
        "drift": {
            "window": window, "min_parts": DEFAULT_MIN_RECENT,
            "ks": None if latest is None else latest.ks, "p_value": None if latest is None else latest.p_value,
            "parts": len(scores[-window:]),
            "series": drift_series(class_name, shot_scores, threshold, times, scores, window, DEFAULT_MIN_RECENT),
        },
    }


# a class as drift needs it: its revision (records.record.shots_revision), shot scores and threshold in force; None
# when it is gone
ClassReference = Callable[[str], "tuple[str, Sequence[float], float] | None"]


def refresh_drift(monitor: DriftMonitor, reads: RecordReads, active: Callable[[int], Sequence[str]],
                  reference: ClassReference) -> None:
    """One refresh of `monitor` from the records (blocking: the runtime runs it in a thread every minute): the
    passed parts of each recently active class scored with its current calibration, against its shots."""
    revisions: dict[str, str] = {}

    def shots(name: str) -> tuple[Sequence[float], float] | None:
        ref = reference(name)
        if ref is None:
            return None
        revisions[name] = ref[0]
        return ref[1], ref[2]

    def recent(name: str, limit: int) -> list[float]:
        return [p.score for p in reads.passed_parts(name, limit) if p.calibration == revisions[name]]

    monitor.refresh(active, recent, shots)
