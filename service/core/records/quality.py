"""How well a class's threshold does on the line, from reviewed inspections: pure functions over numbers.

A reviewed part is a `(score, defective)` pair: the raw score the station gave it and what a person said it was.
The station flags a part when `score > threshold` (model/calibration.py's verdict). "Positive" means defective:

    confusion      tp = defective flagged, fn = defective passed (escapes), fp = good flagged (false calls),
                   tn = good passed
    escape rate    fn / (tp + fn)    the share of defective parts that passed       (None without defective parts)
    false-call     fp / (fp + tn)    the share of good parts that were flagged      (None without good parts)
    precision      tp / (tp + fp)    (None when nothing was flagged)
    recall         tp / (tp + fn)    = 1 - escape rate
    F1             2 tp / (2 tp + fp + fn)

The suggested threshold is chosen among the thresholds that give different verdicts on the reviewed parts: one
in each gap between two neighbouring distinct scores (its midpoint, so a score a little off either neighbour gets
the same verdict), one below the lowest score and one above the highest. Either the best F1 (ties: the lower
escape rate, as an escape costs more than a false call on most lines), or, given an escape-rate target, the
lowest false-call rate among the thresholds whose escape rate is at most the target (ties: the lower escape
rate). The sweep is one sort and two `searchsorted`, O(n log n) for n reviewed parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Confusion", "Suggestion", "confusion", "report", "suggest_threshold", "sweep"]


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass(frozen=True)
class Confusion:
    """The four counts at one threshold, and the rates they give (None where a rate divides by zero)."""

    threshold: float
    tp: int  # defective, flagged
    fp: int  # good, flagged: a false call
    fn: int  # defective, passed: an escape
    tn: int  # good, passed

    @property
    def escape_rate(self) -> float | None:
        return _ratio(self.fn, self.tp + self.fn)

    @property
    def false_call_rate(self) -> float | None:
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float | None:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def as_dict(self) -> dict[str, float | int | None]:
        return {"threshold": self.threshold, "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
                "escape_rate": self.escape_rate, "false_call_rate": self.false_call_rate,
                "precision": self.precision, "recall": self.recall, "f1": self.f1}


@dataclass(frozen=True)
class Suggestion:
    """A threshold and what it would have done on the reviewed parts; `rule` says how it was chosen."""

    rule: str  # "best_f1" or "escape_target"
    confusion: Confusion

    @property
    def threshold(self) -> float:
        return self.confusion.threshold


def _arrays(scores: Sequence[float], defective: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    d = np.asarray(defective, dtype=bool).reshape(-1)
    if s.shape != d.shape:
        raise ValueError(f"{s.size} scores but {d.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s, d


def confusion(scores: Sequence[float], defective: Sequence[bool], threshold: float) -> Confusion:
    """The confusion at `threshold` (a part is flagged when its score is above it)."""
    s, d = _arrays(scores, defective)
    flagged = s > threshold
    return Confusion(threshold=float(threshold), tp=int(np.sum(flagged & d)), fp=int(np.sum(flagged & ~d)),
                     fn=int(np.sum(~flagged & d)), tn=int(np.sum(~flagged & ~d)))


def candidates(scores: np.ndarray) -> np.ndarray:
    """Thresholds giving every distinct set of verdicts on `scores`, ascending, inside (0, 1) when the scores are
    (the service's threshold must be): below the lowest, the midpoint of each gap, above the highest."""
    u = np.unique(scores)
    if u.size == 0:
        return u
    low = u[0] / 2 if u[0] > 0 else u[0] - 0.5
    high = (u[-1] + 1) / 2 if u[-1] < 1 else u[-1] + 0.5
    return np.concatenate([[low], (u[:-1] + u[1:]) / 2, [high]])


def sweep(scores: Sequence[float], defective: Sequence[bool]) -> list[Confusion]:
    """The confusion at every candidate threshold, ascending."""
    s, d = _arrays(scores, defective)
    cuts = candidates(s)
    bad, good = np.sort(s[d]), np.sort(s[~d])
    # parts at or below a cut pass: searchsorted(side="right") counts them
    fn = np.searchsorted(bad, cuts, side="right")
    tn = np.searchsorted(good, cuts, side="right")
    return [Confusion(threshold=float(c), tp=int(bad.size - f), fp=int(good.size - t), fn=int(f), tn=int(t))
            for c, f, t in zip(cuts, fn, tn, strict=True)]


def suggest_threshold(scores: Sequence[float], defective: Sequence[bool],
                      escape_target: float | None = None) -> Suggestion | None:
    """The best-F1 threshold, or with `escape_target` (0..1) the lowest false-call rate whose escape rate is at most
    the target. None without at least one reviewed defective and one reviewed good part (one of the rates is then
    undefined)."""
    if escape_target is not None and not 0.0 <= escape_target <= 1.0:
        raise ValueError(f"escape_target must be in [0, 1], got {escape_target}")
    s, d = _arrays(scores, defective)
    if not d.any() or d.all():
        return None
    points = sweep(s, d)
    if escape_target is None:
        best = max(points, key=lambda c: (c.f1, -c.escape_rate))  # both defined: there are both kinds
        return Suggestion("best_f1", best)
    # never empty: the lowest cut flags every part, an escape rate of 0
    meeting = [c for c in points if c.escape_rate <= escape_target + 1e-12]
    best = min(meeting, key=lambda c: (c.false_call_rate, c.escape_rate))
    return Suggestion("escape_target", best)


def report(threshold: float, scores: Sequence[float], defective: Sequence[bool],
           escape_target: float | None = None) -> dict[str, object]:
    """What GET /classes/{name}/quality answers about reviewed parts: the counts, the confusion at `threshold` (the
    one in force), the suggested threshold (None without both kinds of part) and, with a target, also the best-F1
    one for comparison."""
    s, d = _arrays(scores, defective)
    suggested = suggest_threshold(s, d, escape_target)
    best_f1 = suggest_threshold(s, d) if escape_target is not None else suggested
    return {
        "reviewed": int(s.size), "defective": int(d.sum()), "good": int((~d).sum()),
        "at_threshold": confusion(s, d, threshold).as_dict(),
        "escape_target": escape_target,
        "suggested": None if suggested is None else {"rule": suggested.rule, **suggested.confusion.as_dict()},
        "best_f1": None if best_f1 is None else {"rule": best_f1.rule, **best_f1.confusion.as_dict()},
    }
