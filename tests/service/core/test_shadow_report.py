"""The shadow report's numbers: agreement, Pearson's r against numpy's, disagreements with their record ids."""

from __future__ import annotations

import numpy as np

from service.core.engine import ImageResult
from service.core.models.shadow import DISAGREEMENTS_KEPT, ClassAgreement, ShadowReport


def _result(score: float, flagged: bool) -> ImageResult:
    return ImageResult(anomaly_map=None, text_score=0.5, score=score, threshold=0.5, normalized_score=score,
                       is_anomalous=flagged, pixel_threshold=1.0)


def test_agreement_correlation_and_disagreements() -> None:
    rng = np.random.default_rng(0)
    x = rng.random(200)
    y = 0.8 * x + 0.2 * rng.random(200)
    c = ClassAgreement()
    for i, (a, b) in enumerate(zip(x, y, strict=True)):
        c.add(_result(a, a > 0.5), _result(b, b > 0.5), f"r{i}")
    differ = [i for i in range(200) if (x[i] > 0.5) != (y[i] > 0.5)]
    out = c.public()
    assert out["images"] == 200 and out["agreement"] == (200 - len(differ)) / 200
    assert abs(out["correlation"] - np.corrcoef(x, y)[0, 1]) < 1e-9
    assert out["flagged_serving"] == int((x > 0.5).sum()) and out["flagged_shadow"] == int((y > 0.5).sum())
    kept = differ[-DISAGREEMENTS_KEPT:]
    assert [d["record_id"] for d in out["disagreements"]] == [f"r{i}" for i in reversed(kept)]  # newest first
    assert all(d["serving_anomalous"] != d["shadow_anomalous"] for d in out["disagreements"])


def test_no_correlation_below_three_images_or_for_a_constant_score() -> None:
    c = ClassAgreement()
    c.add(_result(0.1, False), _result(0.2, False), None)
    c.add(_result(0.3, False), _result(0.2, False), None)
    assert c.correlation is None
    c.add(_result(0.6, True), _result(0.2, False), "x")
    assert c.correlation is None  # the shadow's score never moved
    report = ShadowReport("f" * 64, "v2", 0.5)
    report.classes["a"] = c
    report.latencies.extend([0.01, 0.02, 0.03])
    out = report.public("v1")
    assert out["agreement"] == 2 / 3 and out["serving"] == "v1" and out["latency_s"]["samples"] == 3
    assert abs(out["latency_s"]["p50"] - 0.02) < 1e-12
