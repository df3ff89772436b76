"""The API behind the console, in-process (FastAPI TestClient): kept results and their bounds, the scores behind a
threshold, kept images made shots by id, the per-request threshold, the API key, /ui without it."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from model.calibration import calibrate, image_scores
from service.core.engine import ImageResult
from service.core.results import override_threshold
from service.core.settings import Settings
from service.http.app import create_app
from tests.helpers import PARITY

SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))
KEY = "console-test-key"
HEADERS = {"X-API-Key": KEY}


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _client(bundle: Path, data: Path, **settings: object) -> Iterator[TestClient]:
    app = create_app(Settings(bundle=bundle, data_dir=data, device="cpu", warmup=False, sync_interval_s=0,
                              allowed_hosts=["testserver"], **settings))  # TestClient's name for the app
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, c.get("/readyz").json()
            time.sleep(0.05)
        yield c


@pytest.fixture(scope="module")
def client(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data = tmp_path_factory.mktemp("console-api-data")
    yield from _client(bundle, data, api_key=KEY, results_per_class=3, max_shots_per_class=8)


@pytest.fixture(scope="module")
def widget(client: TestClient) -> dict:
    r = client.post("/classes/widget/shots", files=_files(SHOTS), data={"mode": "replace"}, headers=HEADERS)
    assert r.status_code == 200, r.text
    return r.json()


def test_kept_results_are_views_of_the_records(client: TestClient, widget: dict) -> None:
    r = client.post("/predict", files=_files(TESTS[:1]), data={"class_name": "widget"}, headers=HEADERS)
    plain = r.json()["results"][0]
    assert r.status_code == 200 and plain["result_id"] is None and plain["record_id"]  # recorded, not asked to keep
    listed = client.get("/classes/widget/results", headers=HEADERS).json()["results"]
    assert [g["id"] for g in listed] == [plain["record_id"]]  # one notion: the class's records
    ids = []
    for p in TESTS:
        body = client.post("/predict", files=_files([p]), data={"class_name": "widget", "keep": "true"},
                           headers=HEADERS).json()
        assert body["results"][0]["result_id"] == body["results"][0]["record_id"]
        ids.append(body["results"][0]["result_id"])
    got = client.get("/classes/widget/results?thumbnails=true&limit=3", headers=HEADERS).json()["results"]
    assert [g["id"] for g in got] == ids[:0:-1]  # newest first
    assert client.get(f"/results/{ids[0]}", headers=HEADERS).status_code == 200  # records are not dropped
    missing = client.get(f"/results/{'0' * 32}", headers=HEADERS)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "result_not_found"
    thumb = Image.open(io.BytesIO(client.get(f"/results/{ids[-1]}/thumbnail", headers=HEADERS).content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 128
    assert got[0]["thumbnail"] and got[0]["image_kept"] and got[0]["filename"] == TESTS[-1].name


def test_keep_without_a_class_is_refused(client: TestClient) -> None:
    r = client.post("/predict", files=_files(TESTS[:1]), data={"keep": "true"}, headers=HEADERS)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert "class_name" in r.json()["error"]["message"]


def test_threshold_override_per_request(client: TestClient, widget: dict) -> None:
    plain = client.post("/predict", files=_files(TESTS), data={"class_name": "widget"}, headers=HEADERS).json()
    scores = [r["score"] for r in plain["results"]]
    assert all(r["threshold"] == pytest.approx(widget["threshold"]) for r in plain["results"])
    t = float(np.median(scores))
    low = client.post("/predict", files=_files(TESTS), data={"class_name": "widget", "threshold": str(t)},
                      headers=HEADERS).json()
    for a, b in zip(plain["results"], low["results"], strict=True):
        assert b["score"] == a["score"] and b["threshold"] == t
        assert b["is_anomalous"] == (a["score"] > t)
        assert (b["normalized_score"] > 0.5) == b["is_anomalous"]
    assert client.get("/classes/widget", headers=HEADERS).json()["threshold"] == widget["threshold"]  # not stored
    for bad in ("0", "1", "-0.2", "x"):
        r = client.post("/predict", files=_files(TESTS[:1]), data={"class_name": "widget", "threshold": bad},
                        headers=HEADERS)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_override_threshold_matches_the_model_normalisation() -> None:
    r = ImageResult(np.zeros((2, 2), np.float32), 0.3, 0.6, 0.7, 0.43, False, 2.0)
    assert override_threshold(r, None) is r
    o = override_threshold(r, 0.5)
    assert o.is_anomalous and o.threshold == 0.5 and o.normalized_score == pytest.approx(0.5 + 0.5 * 0.1 / 0.5)


def test_scores_hold_the_calibration_and_recent(client: TestClient, widget: dict) -> None:
    client.post("/predict", files=_files(TESTS[:2]), data={"class_name": "widget", "keep": "true"},
                headers=HEADERS)
    s = client.get("/classes/widget/scores?bins=10", headers=HEADERS).json()
    assert s["threshold"] == widget["threshold"] and s["calibrated_threshold"] == widget["calibrated_threshold"]
    assert len(s["shots"]) == len(SHOTS) and s["calibration"]["shots_recorded"]
    assert all(0 < x["score"] < 1 for x in s["shots"])
    recent = client.get("/classes/widget/results?limit=3", headers=HEADERS).json()["results"]  # results_per_class
    assert [r["id"] for r in s["recent"]] == [r["id"] for r in recent]
    h = s["histogram"]
    assert len(h["edges"]) == 11 and sum(h["shots"]) == len(SHOTS) and sum(h["recent"]) == len(recent)
    assert h["edges"][0] <= min(s["threshold"], *[x["score"] for x in s["shots"]])
    assert client.get("/classes/nope/scores", headers=HEADERS).json()["error"]["code"] == "class_not_found"


def test_shot_scores_are_the_leave_one_out_online_scores() -> None:
    maxima, text = torch.tensor([2.0, 2.2, 2.6]), torch.tensor([0.2, 0.3, 0.4])
    cal = calibrate(maxima, text)
    assert cal.shot_map_max == pytest.approx((2.0, 2.2, 2.6)) and cal.shot_text_scores == pytest.approx((0.2, 0.3, 0.4))
    assert cal.shot_scores() == pytest.approx(image_scores(text, maxima, [cal] * 3).raw.tolist(), abs=1e-6)
    assert hash(cal) == hash(calibrate(maxima, text))  # lists from JSON become tuples: still hashable


def test_old_class_json_without_shot_scores_still_loads(bundle: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for c in _client(bundle, data):
        assert c.post("/classes/old/shots", files=_files(SHOTS)).status_code == 200
    manifest = data / "classes" / "old" / "class.json"
    m = json.loads(manifest.read_text())
    (cal,) = (e["calibration"] for e in m["models"].values())  # the one model's
    assert len(cal["shot_map_max"]) == len(SHOTS)
    del cal["shot_map_max"], cal["shot_text_scores"]
    manifest.write_text(json.dumps(m))
    for c in _client(bundle, data):
        info = c.get("/classes/old").json()
        assert info["threshold"] == pytest.approx(cal["threshold"])
        s = c.get("/classes/old/scores").json()
        assert s["shots"] == [] and not s["calibration"]["shots_recorded"]


def test_shots_from_results(client: TestClient, widget: dict) -> None:
    before = client.get("/classes/widget", headers=HEADERS).json()
    body = client.post("/predict", files=_files(TESTS[:1]), data={"class_name": "widget", "keep": "true"},
                       headers=HEADERS).json()
    rid = body["results"][0]["result_id"]
    r = client.post("/classes/widget/shots/from-results", json={"result_ids": [rid]}, headers=HEADERS)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["previous"]["shots"] == before["shots"] and out["class_info"]["shots"] == before["shots"] + 1
    assert out["added"] == [rid] and out["calibration"]["shots"] == before["shots"] + 1
    assert out["class_info"]["calibrated_threshold"] == out["calibration"]["threshold"]
    # the same image uploaded as a shot is the same shot: nothing new
    again = client.post("/classes/widget/shots", files=_files(TESTS[:1]), headers=HEADERS).json()
    assert again["shots"] == before["shots"] + 1
    missing = client.post("/classes/widget/shots/from-results", json={"result_ids": ["f" * 32]}, headers=HEADERS)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "result_not_found"
    empty = client.post("/classes/widget/shots/from-results", json={"result_ids": []}, headers=HEADERS)
    assert empty.status_code == 422 and empty.json()["error"]["code"] == "invalid_request"
    client.post("/classes/other/shots", files=_files(SHOTS[:2]), headers=HEADERS)
    wrong = client.post("/classes/other/shots/from-results", json={"result_ids": [rid]}, headers=HEADERS)
    assert wrong.status_code == 422 and "widget" in wrong.json()["error"]["message"]
    client.post("/classes/widget/shots", files=_files(SHOTS), data={"mode": "replace"}, headers=HEADERS)


def test_shots_by_hash(client: TestClient, widget: dict) -> None:
    listed = client.get("/classes/widget/shots", headers=HEADERS).json()["shots"]
    assert len(listed) == widget["shots"]
    r = client.get(f"/classes/widget/shots/{listed[0]['sha256']}", headers=HEADERS)
    assert r.headers["content-type"] == "image/png" and hashlib.sha256(r.content).hexdigest() == listed[0]["sha256"]
    thumb = client.get(f"/classes/widget/shots/{listed[0]['sha256']}?thumbnail=true", headers=HEADERS)
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 128
    missing = client.get(f"/classes/widget/shots/{'0' * 64}", headers=HEADERS)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "shot_not_found"
    # the stored PNGs uploaded again are the same shots: what the console does to delete some
    again = client.post("/classes/widget/shots", files=[("images", (f"{h['sha256']}.png", client.get(
        f"/classes/widget/shots/{h['sha256']}", headers=HEADERS).content, "image/png")) for h in listed[1:]],
        data={"mode": "replace"}, headers=HEADERS).json()
    assert again["shots"] == len(listed) - 1
    assert client.get("/classes/widget/shots", headers=HEADERS).json()["shots"] == listed[1:]
    client.post("/classes/widget/shots", files=_files(SHOTS), data={"mode": "replace"}, headers=HEADERS)


def test_api_key_guards_the_new_api_but_not_the_console_files(client: TestClient) -> None:
    for method, path in [("GET", "/classes/widget/results"), ("GET", "/classes/widget/scores"),
                         ("GET", "/results/abc"), ("POST", "/classes/widget/shots/from-results"),
                         ("GET", "/classes/widget/shots"), ("GET", f"/classes/widget/shots/{'0' * 64}")]:
        r = client.request(method, path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path
    page = client.get("/ui/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert client.get("/ui", follow_redirects=False).status_code in (307, 308)
    for asset in ("app.js", "style.css"):
        assert client.get(f"/ui/{asset}").status_code == 200
    assert client.get("/ui/config.json").json()["api_key_required"] is True
    assert "http" not in "".join(line for line in page.text.splitlines() if "src=" in line or "href=" in line
                                 if "http://www.w3.org" not in line)  # nothing from elsewhere


def test_console_colours_maps_with_the_models_ramp(client: TestClient) -> None:
    """One ramp: the console takes its stops from /ui/config.json (read before its first page), which serves the
    model's definition, also behind thumbnails and `sowa demo`."""
    from model.postprocess import HEAT_RAMP

    assert client.get("/ui/config.json").json()["heat_ramp"] == [list(rgb) for rgb in HEAT_RAMP]
    js = client.get("/ui/app.js").text
    assert "RAMP = config.heat_ramp" in js and "[120, 0, 140]" not in js  # no second copy of the stops


def test_openapi_documents_the_new_api(client: TestClient) -> None:
    doc = client.get("/openapi.json", headers=HEADERS).json()
    paths = doc["paths"]
    assert {"/classes/{name}/results", "/classes/{name}/scores", "/classes/{name}/shots/from-results",
            "/classes/{name}/shots/{sha256}",
            "/results/{result_id}", "/results/{result_id}/thumbnail"} <= set(paths)
    form = doc["components"]["schemas"]["Body_predict_predict_post"]["properties"]
    assert {"keep", "threshold"} <= set(form)




def test_console_lists_every_audit_action(client: TestClient) -> None:
    """The audit page's action filter comes from the service's own list (record.reviewed included), not a copy."""
    from service.core.access.audit import ACTIONS

    assert client.get("/ui/config.json").json()["audit_actions"] == list(ACTIONS)
    assert "record.reviewed" in ACTIONS
    assert "AUDIT_ACTIONS" not in client.get("/ui/app.js").text
