"""GET /classes/{name}/quality through the real app (in process): the figures from reviewed records match what the
records say, the suggestion applied through PATCH gives the suggested figures, only the current shots' records
count, bad parameters are refused; and the drift gauges on /metrics agree with the route's figure."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import PARITY
from tests.in_process import InProcess, serve_in_process

SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))
KEY = "quality-test-admin-key"
H = {"X-API-Key": KEY}

pytestmark = pytest.mark.anyio


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}-{p.name}", p.read_bytes(), "image/png")) for i, p in enumerate(paths)]


async def _quality(s: InProcess, **params: object) -> dict:
    r = await s.http.get("/classes/widget/quality", params=params, headers=H)
    assert r.status_code == 200, r.text
    return r.json()


def _drift_gauges(text: str) -> dict[tuple[str, str], float]:
    return {(m.name, m.labels["class_name"]): m.value for fam in text_string_to_metric_families(text)
            for m in fam.samples if m.name.startswith("sowa_score_drift")}


@pytest.mark.slow
async def test_quality_figures_from_reviewed_records(bundle: Path, tmp_path: Path) -> None:
    async with serve_in_process(bundle, tmp_path / "data", api_key=KEY) as s:
        r = await s.http.post("/classes/widget/shots", files=_files(SHOTS), headers=H)
        assert r.status_code == 200, r.text
        empty = await _quality(s)
        assert empty["reviewed"] == 0 and empty["suggested"] is None and empty["drift"]["ks"] is None
        # the shots eleven times over: 33 passed parts scoring below the shots' leave-one-out scores (they are
        # scored against themselves too), which is no drift toward the threshold
        r = await s.http.post("/predict", files=_files(SHOTS * 11), headers=H,
                              data={"class_name": "widget", "heatmap": "none"})
        assert r.status_code == 200 and not any(x["is_anomalous"] for x in r.json()["results"]), r.text
        assert s.app.state.runtime.records.wait_drained(10)  # the figures read the store, not the spool
        same = (await _quality(s))["drift"]
        assert (same["parts"], same["ks"], same["p_value"]) == (33, 0.0, 1.0)
        r = await s.http.post("/predict", files=_files(TESTS * 3), headers=H,
                              data={"class_name": "widget", "heatmap": "none"})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert s.app.state.runtime.records.wait_drained(10)

        # review the test images: as the station said, except one call turned around each way
        tests = results[:len(TESTS) * 3]
        flagged = [x for x in tests if x["is_anomalous"]]
        passed = [x for x in tests if not x["is_anomalous"]]
        assert flagged and passed, [x["score"] for x in tests]
        truth = {x["record_id"]: x["is_anomalous"] for x in tests}
        truth[flagged[0]["record_id"]] = False  # a false call
        truth[passed[0]["record_id"]] = True  # an escape
        for record_id, defective in truth.items():
            r = await s.http.post(f"/records/{record_id}/review", headers=H,
                                  json={"verdict": "defective" if defective else "good"})
            assert r.status_code == 200, r.text

        q = await _quality(s)
        scores = {x["record_id"]: x["score"] for x in tests}
        tp = sum(truth[i] and scores[i] > q["threshold"] for i in truth)
        fn = sum(truth[i] and scores[i] <= q["threshold"] for i in truth)
        fp = sum(not truth[i] and scores[i] > q["threshold"] for i in truth)
        tn = len(truth) - tp - fn - fp
        at = q["at_threshold"]
        assert (at["tp"], at["fn"], at["fp"], at["tn"]) == (tp, fn, fp, tn)
        assert fn >= 1 and fp >= 1  # the two turned-around calls
        assert at["escape_rate"] == pytest.approx(fn / (tp + fn))
        assert at["false_call_rate"] == pytest.approx(fp / (fp + tn))
        assert (q["reviewed"], q["defective"], q["other_calibration"]) == (len(truth), sum(truth.values()), 0)
        assert q["suggested"]["rule"] == "best_f1" and q["suggested"]["f1"] >= at["f1"]

        # an escape target: no escape at all, at the price of false calls
        strict = await _quality(s, escape_target=0)
        assert strict["suggested"]["rule"] == "escape_target" and strict["suggested"]["escape_rate"] == 0.0
        assert strict["best_f1"] == q["suggested"]

        # applying the suggestion is the class's PATCH; the figures at the threshold in force follow
        r = await s.http.patch("/classes/widget", json={"threshold": q["suggested"]["threshold"]}, headers=H)
        assert r.status_code == 200, r.text
        applied = await _quality(s)
        assert applied["at_threshold"] == {k: v for k, v in q["suggested"].items() if k != "rule"}
        assert applied["threshold_overridden"] is True

        # drift: the route's figure and the gauge agree (same records, same window)
        drift = applied["drift"]
        assert drift["parts"] >= 30 and drift["ks"] is not None and 0 <= drift["ks"] <= 1
        await asyncio.to_thread(s.app.state.runtime.refresh_drift)
        gauges = _drift_gauges((await s.http.get("/metrics")).text)
        assert gauges[("sowa_score_drift_ks", "widget")] == pytest.approx(drift["ks"])
        assert gauges[("sowa_score_drift_recent", "widget")] == drift["parts"]

        # new shots: every record was scored against the old ones, so none counts now
        r = await s.http.post("/classes/widget/shots", files=_files(TESTS[:1]), headers=H)
        assert r.status_code == 200, r.text
        after = await _quality(s)
        assert (after["reviewed"], after["other_calibration"]) == (0, len(truth))
        assert after["drift"]["parts"] == 0 and after["drift"]["series"] == []

        # refused
        for params, status in (({"escape_target": 1.5}, 422), ({"escape_target": "x"}, 422)):
            r = await s.http.get("/classes/widget/quality", params=params, headers=H)
            assert r.status_code == status and r.json()["error"]["code"] == "invalid_request", r.text
        r = await s.http.get("/classes/nothing/quality", headers=H)
        assert r.status_code == 404 and r.json()["error"]["code"] == "class_not_found"
        r = await s.http.get("/classes/widget/quality")
        assert r.status_code == 401
