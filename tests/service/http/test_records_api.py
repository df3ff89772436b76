"""Inspection records through the real app (in process): /predict records every image scored against a class, the
answer names the record, and GET /records, its filters and pages, one record with its image and thumbnail, exports,
reviews (audited), a good part as a shot, hostile metadata, and records surviving a restart with the kept-result
views (threshold page, /results, from-results) reading them."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import PARITY
from tests.in_process import InProcess, serve_in_process

SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))
KEY = "records-test-admin-key"
H = {"X-API-Key": KEY}

pytestmark = pytest.mark.anyio


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


async def _register(s: InProcess) -> None:
    r = await s.http.post("/classes/widget/shots", files=_files(SHOTS[:2]), headers=H)
    assert r.status_code == 200, r.text


async def _predict(s: InProcess, paths: list[Path], **data: object) -> dict:
    r = await s.http.post("/predict", files=_files(paths), headers=H,
                          data={"class_name": "widget", "heatmap": "none", **data})
    assert r.status_code == 200, r.text
    return r.json()


def _drained(s: InProcess) -> None:
    assert s.app.state.runtime.records.wait_drained(10)


@pytest.mark.slow
async def test_records_answer_query_review_export_and_survive_a_restart(bundle: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serve_in_process(bundle, data, api_key=KEY, record_sample_passed=1) as s:
        await _register(s)
        first = await _predict(s, TESTS[:3], part_id="P-4711", station="st<1>", tags=["line1,night", "shift:a"])
        ids = [r["record_id"] for r in first["results"]]
        assert all(ids) and all(r["record_kept"] is True for r in first["results"])
        assert len(set(ids)) == 3 and ids == sorted(ids)  # time-ordered
        zero = await s.http.post("/predict", files=_files(TESTS[:1]), headers=H, data={"heatmap": "none"})
        assert zero.json()["results"][0]["record_id"] is None  # zero-shot: no inspection of a class
        off = await _predict(s, TESTS[:1], record="false")
        assert off["results"][0]["record_id"] is None and off["results"][0]["record_kept"] is None

        # readable at once (from the spool or the store), then from the store
        one = (await s.http.get(f"/records/{ids[0]}", headers=H)).json()
        assert one["part_id"] == "P-4711" and one["station"] == "st<1>" and one["tags"] == ["line1", "night", "shift:a"]
        assert one["class_name"] == "widget" and one["model"] == first["model"]["fingerprint"]
        assert one["threshold"] == first["results"][0]["threshold"] and one["threshold_per_request"] is False
        assert one["score"] == first["results"][0]["score"] and one["image_kept"] and one["thumbnail_kept"]
        info = (await s.http.get("/classes/widget", headers=H)).json()
        assert one["revision"] == s.app.state.runtime.registry.get("widget").revision and len(info) > 0
        _drained(s)
        img = await s.http.get(f"/records/{ids[0]}/image", headers=H)
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        assert img.content == TESTS[0].read_bytes()  # the upload as sent
        thumb = await s.http.get(f"/records/{ids[0]}/thumbnail", headers=H)
        assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"

        # a per-request threshold is recorded as such
        own = await _predict(s, TESTS[:1], threshold="0.99", tags="x")
        rec = (await s.http.get(f"/records/{own['results'][0]['record_id']}", headers=H)).json()
        assert rec["threshold"] == 0.99 and rec["threshold_per_request"] is True and rec["is_anomalous"] is False

        # filters and keyset pages, newest first
        everything = (await s.http.get("/records", headers=H)).json()["records"]
        assert [r["id"] for r in everything] == sorted((r["id"] for r in everything), reverse=True)
        assert len(everything) == 4
        page1 = (await s.http.get("/records", params={"limit": 3}, headers=H)).json()
        page2 = (await s.http.get("/records", params={"limit": 3, "before": page1["next"]}, headers=H)).json()
        assert [r["id"] for r in page1["records"] + page2["records"]] == [r["id"] for r in everything]
        assert page2["next"] is None
        for params, expected in (({"part_id": "P-4711"}, 3), ({"tag": "night"}, 3), ({"tag": "x"}, 1),
                                 ({"tag": "nigh"}, 0), ({"station": "st<1>"}, 3), ({"class_name": "other"}, 0),
                                 ({"verdict": "pass"}, sum(not r["is_anomalous"] for r in everything)),
                                 ({"reviewed": "true"}, 0), ({"since": everything[0]["time"]}, 1),
                                 ({"until": everything[-1]["time"]}, 0)):
            got = (await s.http.get("/records", params=params, headers=H)).json()["records"]
            assert len(got) == expected, (params, got)

        # review: who and when, audited; the filters see it
        r = await s.http.post(f"/records/{ids[1]}/review", json={"verdict": "defective", "note": "<b>scratch</b>"},
                              headers=H)
        assert r.status_code == 200, r.text
        assert r.json()["review"] == "defective" and r.json()["reviewed_by"] == "SOWA_API_KEY"
        assert r.json()["review_note"] == "<b>scratch</b>" and r.json()["reviewed_at"] > 0
        reviewed = (await s.http.get("/records", params={"reviewed": "true"}, headers=H)).json()["records"]
        assert [x["id"] for x in reviewed] == [ids[1]]
        events = (await s.http.get("/audit", params={"action": "record.reviewed"}, headers=H)).json()["events"]
        assert [(e["target"], e["after"]["review"]) for e in events] == [(ids[1], "defective")]
        assert (await s.http.post(f"/records/{ids[1]}/review", json={"verdict": "meh"}, headers=H)).status_code == 422
        assert (await s.http.post(f"/records/{'0' * 32}/review", json={"verdict": "good"},
                                  headers=H)).status_code == 404
        assert (await s.http.get("/records/not-an-id", headers=H)).status_code == 422
        for bad in ({"part": "P-4711"}, {"verdict": "maybe"}, {"limit": 1001}, {"tag": "a b"}):
            r = await s.http.get("/records", params=bad, headers=H)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", bad
        assert (await s.http.get("/records/export?part=1", headers=H)).status_code == 422  # never everything

        # the threshold page reads the class's records
        recent = (await s.http.get("/classes/widget/scores", headers=H)).json()["recent"]
        assert [r["id"] for r in recent] == [r["id"] for r in everything]

        # a defective part never becomes a shot; a good one does, in one call (a new revision of the class)
        assert (await s.http.post(f"/records/{ids[1]}/shot", headers=H)).status_code == 422
        made = await s.http.post(f"/records/{ids[2]}/shot", headers=H)
        assert made.status_code == 200, made.text
        assert made.json()["class_info"]["shots"] == 3 and made.json()["added"] == [ids[2]]
        assert (await s.http.get(f"/records/{ids[2]}", headers=H)).json()["review"] == "good"

        # exports: CSV (formula-looking text made inert) and Parquet
        csv_r = await s.http.get("/records/export", params={"format": "csv"}, headers=H)
        rows = list(csv.DictReader(io.StringIO(csv_r.text)))
        assert csv_r.headers["content-type"].startswith("text/csv") and len(rows) == 4
        pq_r = await s.http.get("/records/export", params={"format": "parquet", "part_id": "P-4711"}, headers=H)
        table = pq.read_table(io.BytesIO(pq_r.content))
        assert table.num_rows == 3 and set(table.column("part_id").to_pylist()) == {"P-4711"}
        kept_ids = ids
        last = (await _predict(s, TESTS[:1]))["results"][0]["record_id"]

    # a restart: the records, their images and the kept-result views are still there
    async with serve_in_process(bundle, data, api_key=KEY) as s:
        again = (await s.http.get("/records", params={"part_id": "P-4711"}, headers=H)).json()["records"]
        assert sorted(r["id"] for r in again) == sorted(kept_ids)
        result = await s.http.get(f"/results/{kept_ids[0]}", headers=H)
        assert result.status_code == 200 and result.json()["image_kept"] and result.json()["thumbnail"]
        listed = (await s.http.get("/classes/widget/results", headers=H)).json()["results"]
        assert {r["id"] for r in listed} >= set(kept_ids[:1])
        scores = (await s.http.get("/classes/widget/scores", headers=H)).json()
        assert scores["recent"][0]["id"] == last and len(scores["recent"]) == 5  # from the records, after a restart
        r = await s.http.post("/classes/widget/shots/from-results", json={"result_ids": [kept_ids[0]]}, headers=H)
        assert r.status_code == 200, r.text


@pytest.mark.slow
async def test_hostile_metadata_is_refused_or_inert(bundle: Path, tmp_path: Path) -> None:
    async with serve_in_process(bundle, tmp_path / "data", api_key=KEY) as s:
        await _register(s)
        for data, words in (({"part_id": "x" * 129}, "part_id"), ({"part_id": "a\x00b"}, "control"),
                            ({"station": "a\u202eb"}, "control"), ({"part_id": " pad"}, "white space"),
                            ({"tags": ["ok", "bad tag"]}, "tag"),
                            ({"tags": ",".join(f"t{i}" for i in range(17))}, "tags"),
                            ({"tags": "<script>"}, "tag"), ({"tags": "x" * 65}, "tag")):
            r = await s.http.post("/predict", files=_files(TESTS[:1]), headers=H,
                                  data={"class_name": "widget", **data})
            assert r.status_code == 422, (data, r.text)
            assert words in r.json()["error"]["message"] or r.json()["error"]["code"] == "invalid_request", data
        html = '<img src=x onerror="alert(1)">'
        r = await s.http.post("/predict", headers=H, data={"class_name": "widget", "part_id": html, "heatmap": "none"},
                              files=[("images", ("=cmd|' /C calc'!A0\x07.png", TESTS[0].read_bytes(), "image/png"))])
        assert r.status_code == 200, r.text
        rid = r.json()["results"][0]["record_id"]
        rec = await s.http.get(f"/records/{rid}", headers=H)
        assert rec.headers["content-type"] == "application/json" and rec.json()["part_id"] == html  # data, as text
        assert "\x07" not in rec.json()["filename"]  # control characters of a file name are not kept
        rows = list(csv.reader(io.StringIO((await s.http.get("/records/export", headers=H)).text)))
        assert rows[1][rows[0].index("filename")].startswith("'=")  # a spreadsheet will not run it


async def test_metrics_count_records(bundle: Path, tmp_path: Path) -> None:
    async with serve_in_process(bundle, tmp_path / "data", api_key=KEY) as s:
        await _register(s)
        await _predict(s, TESTS[:2])
        _drained(s)
        await asyncio.sleep(0)
        text = (await s.http.get("/metrics")).text
        assert "sowa_records_written_total 2.0" in text and "sowa_records_spooled 0.0" in text
        assert "sowa_records_not_kept_total 0.0" in text and "sowa_records_store_up 1.0" in text


@pytest.mark.slow
async def test_retention_keeps_its_bounds_while_serving(bundle: Path, tmp_path: Path) -> None:
    budget = 40_000  # bytes of kept images and thumbnails: a handful of records' worth
    async with serve_in_process(bundle, tmp_path / "data", api_key=KEY, records_max_count=12,
                                record_images_max_mb=budget / 2**20, records_sweep_s=0.2) as s:
        await _register(s)
        recorder = s.app.state.runtime.records
        for _ in range(10):  # 20 records, each keeping its upload and thumbnail
            await _predict(s, TESTS[:2], keep="true")
            await asyncio.sleep(0.05)
        _drained(s)
        await asyncio.sleep(0.6)  # a sweep or two
        stats = await asyncio.to_thread(recorder.store.stats)
        assert stats["records"] <= 12 and 0 < stats["image_bytes"] <= budget, stats
        newest = (await s.http.get("/records", params={"limit": 1}, headers=H)).json()["records"][0]
        assert newest["image_kept"]  # the oldest went first
        assert recorder.stats.swept_records >= 8 and recorder.stats.swept_images > 0


async def test_past_the_spool_bound_answers_say_not_kept_or_503(bundle: Path, tmp_path: Path) -> None:
    for unrecordable, status in (("answer", 200), ("503", 503)):
        async with serve_in_process(bundle, tmp_path / unrecordable, api_key=KEY, unrecordable=unrecordable) as s:
            await _register(s)
            recorder = s.app.state.runtime.records
            recorder.spool_max_bytes = 0  # as if the store had been unreachable until the spool filled up
            r = await s.http.post("/predict", files=_files(TESTS[:2]), headers=H,
                                  data={"class_name": "widget", "heatmap": "none"})
            assert r.status_code == status, r.text
            if status == 200:
                assert [(x["record_id"], x["record_kept"]) for x in r.json()["results"]] == [(None, False)] * 2
            else:
                assert r.json()["error"]["code"] == "records_unavailable" and r.headers["Retry-After"]
            zero = await s.http.post("/predict", files=_files(TESTS[:1]), headers=H, data={"heatmap": "none"})
            assert zero.status_code == 200  # zero-shot is never recorded: unaffected
            assert "sowa_records_not_kept_total 2.0" in (await s.http.get("/metrics")).text
