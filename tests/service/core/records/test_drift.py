"""Score drift per class (service/core/records/drift.py) and its gauges on /metrics (service/core/telemetry.py)."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.core.records.drift import DriftMonitor, drift_series, ks_drift
from service.core.telemetry import Telemetry


def test_ks_worked_by_hand() -> None:
    # reference CDF steps 0.5 at 0.1 and 1 at 0.3; recent steps 0.5 at 0.2 and 1 at 0.4: the reference's lies 0.5 above
    # at 0.1 and at 0.3
    f = ks_drift("bottle", [0.1, 0.3, 0.9], 0.5, [0.2] * 15 + [0.4] * 15)
    assert f is not None
    assert f.ks == pytest.approx(0.5)
    assert f.reference == 2  # 0.9 is above the threshold: passed parts never are
    assert f.recent == 30 and f.recent_median == pytest.approx(0.3) and f.reference_median == pytest.approx(0.2)


def test_same_scores_give_zero_and_apart_give_one() -> None:
    same = ks_drift("a", [0.1, 0.2, 0.3], 0.5, [0.1, 0.2, 0.3] * 10)
    apart = ks_drift("a", [0.1, 0.2, 0.3], 0.5, [0.45] * 30)
    assert same is not None and apart is not None
    assert same.ks == 0.0 and same.p_value == pytest.approx(1.0)
    assert apart.ks == 1.0 and apart.p_value < 1e-3


def test_only_an_upward_shift_counts() -> None:
    down = ks_drift("a", [0.1, 0.2, 0.3], 0.5, [0.05] * 30)  # parts even more like the shots: no harm
    assert down is not None and down.ks == 0.0 and down.p_value == 1.0


def test_a_shift_is_told_from_chance() -> None:
    rng = np.random.default_rng(1)
    shots = rng.normal(0.30, 0.02, 16)
    steady = ks_drift("a", shots, 0.4, rng.normal(0.30, 0.02, 200))
    shifted = ks_drift("a", shots, 0.4, rng.normal(0.35, 0.02, 200))  # 2.5 standard deviations up
    assert steady is not None and shifted is not None
    assert steady.ks < 0.35 and steady.p_value > 0.05
    assert shifted.ks > 0.7 and shifted.p_value < 1e-6


def test_no_figure_without_enough_parts_or_a_reference() -> None:
    assert ks_drift("a", [0.1], 0.5, [0.1] * 29) is None  # fewer than 30 recent
    assert ks_drift("a", [0.6, 0.7], 0.5, [0.1] * 30) is None  # no shot at or below the threshold
    assert ks_drift("a", [], 0.5, [0.1] * 30) is None  # a calibration stored before shot scores were kept


def test_monitor_keeps_the_most_recently_active_classes_only() -> None:
    monitor = DriftMonitor(window=40, min_recent=30, max_classes=3)
    asked: list[tuple[str, int]] = []
    active = ["e", "d", "c", "b", "a"]  # most recent first

    def recent(name: str, n: int) -> list[float]:
        asked.append((name, n))
        return [] if name == "c" else [0.45] * n  # c has too few parts

    def reference(name: str) -> tuple[list[float], float] | None:
        return None if name == "d" else ([0.1, 0.2], 0.5)  # d was deleted

    monitor.refresh(lambda n: active[:n + 2], recent, reference)  # a source returning more than asked is cut
    assert [f.class_name for f in monitor.figures()] == ["e"]
    assert asked == [("e", 40), ("c", 40)]
    monitor.refresh(lambda n: ["b", "a"], recent, reference)
    assert [f.class_name for f in monitor.figures()] == ["a", "b"]  # the last refresh replaces the whole set
    assert monitor.get("e") is None and monitor.get("a").ks == 1.0


def test_monitor_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="window >= min_recent"):
        DriftMonitor(window=10, min_recent=30)


def test_gauges_on_metrics() -> None:
    telemetry = Telemetry()
    monitor = DriftMonitor(window=30, min_recent=30, max_classes=2)
    telemetry.track_drift(monitor)
    assert b"sowa_score_drift_ks{" not in telemetry.render()  # no class yet: no series
    monitor.refresh(lambda n: ["bottle", "cable"], lambda name, n: [0.45] * n if name == "bottle" else [0.15] * n,
                    lambda name: ([0.1, 0.2], 0.5))
    samples = {(s.name, s.labels["class_name"]): s.value for fam in text_string_to_metric_families(
        telemetry.render().decode()) for s in fam.samples if s.name.startswith("sowa_score_drift")}
    assert samples[("sowa_score_drift_ks", "bottle")] == 1.0
    assert samples[("sowa_score_drift_ks", "cable")] == 0.5  # all 0.15: 0.1 is below, 0.2 above
    assert samples[("sowa_score_drift_recent", "bottle")] == 30.0
    assert samples[("sowa_score_drift_pvalue", "bottle")] < 0.01  # exact: 1 / C(32, 2) = 0.002
    assert len(samples) == 6


def test_series_cuts_windows_back_from_the_newest_part() -> None:
    # 75 parts: 0.15 for the first 45, then 0.45; windows of 30 from the newest: [45, 75) apart, [15, 45) at 0.15,
    # [0, 15) under 30 parts and left out
    scores = [0.15] * 45 + [0.45] * 30
    points = drift_series("a", [0.1, 0.2], 0.5, [float(i) for i in range(75)], scores, window=30, min_recent=30)
    assert [(p["until"], p["parts"], p["ks"]) for p in points] == [(44.0, 30, 0.5), (74.0, 30, 1.0)]
    assert drift_series("a", [0.1], 0.5, [], []) == []
    with pytest.raises(ValueError, match="2 times but 1 scores"):
        drift_series("a", [0.1], 0.5, [1.0, 2.0], [0.1])
