"""A class's figures from its records (service/core/records/figures.py): only the current calibration counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from service.core.records.drift import DriftMonitor
from service.core.records.figures import PassedPart, ReviewedPart, class_figures, refresh_drift


@dataclass
class Records:
    """The two reads, over lists (the record store answers them from its tables)."""

    reviewed: list[ReviewedPart] = field(default_factory=list)
    passed: list[PassedPart] = field(default_factory=list)

    def reviewed_parts(self, class_name: str, limit: int) -> Sequence[ReviewedPart]:
        return self.reviewed[-limit:]

    def passed_parts(self, class_name: str, limit: int) -> Sequence[PassedPart]:
        return self.passed[-limit:]


def test_figures_count_the_current_calibration_only() -> None:
    good, bad = [0.1, 0.2, 0.3, 0.6], [0.4, 0.7, 0.8]
    records = Records(
        reviewed=[ReviewedPart(s, False, "r2") for s in good] + [ReviewedPart(s, True, "r2") for s in bad]
        + [ReviewedPart(0.99, False, "r1")] * 5,  # reviewed against the shots before: left out
        passed=[PassedPart(float(t), 0.45 if t >= 200 else 0.15, "r2") for t in range(400)]
        + [PassedPart(500.0, 0.01, "r1")])
    f = class_figures(records, "a", "r2", 0.5, [0.1, 0.2], escape_target=None)
    assert (f["reviewed"], f["defective"], f["good"], f["other_calibration"]) == (7, 3, 4, 5)
    assert f["at_threshold"]["fp"] == 1 and f["at_threshold"]["fn"] == 1
    assert f["suggested"]["threshold"] == pytest.approx(0.35)
    d = f["drift"]
    assert d["ks"] == 1.0 and d["parts"] == 200  # the last 200 passed parts, all at 0.45, above both shots
    assert [(p["until"], p["ks"]) for p in d["series"]] == [(199.0, 0.5), (399.0, 1.0)]


def test_no_records_no_figures() -> None:
    f = class_figures(Records(), "a", "r1", 0.5, [0.1, 0.2])
    assert f["reviewed"] == 0 and f["suggested"] is None and f["at_threshold"]["f1"] is None
    assert f["drift"] == {"window": 200, "min_parts": 30, "ks": None, "p_value": None, "parts": 0, "series": []}


def test_refresh_drift_reads_the_current_calibration_of_each_active_class() -> None:
    records = Records(passed=[PassedPart(float(t), 0.45, "r2") for t in range(40)]
                      + [PassedPart(100.0 + t, 0.15, "r1") for t in range(40)])  # newer, but of the old shots
    monitor = DriftMonitor(window=100, min_recent=30)
    classes = {"a": ("r2", [0.1, 0.2], 0.5)}
    refresh_drift(monitor, records, lambda n: ["gone", "a"], classes.get)
    [figure] = monitor.figures()
    assert (figure.class_name, figure.recent, figure.ks) == ("a", 40, 1.0)
    classes["a"] = ("r3", [0.1, 0.2], 0.5)  # shots changed: no passed part scored with them yet
    refresh_drift(monitor, records, lambda n: ["a"], classes.get)
    assert monitor.figures() == []
