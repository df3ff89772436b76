"""The audit trail over HTTP: a scripted sequence of changes by two keys (operate, admin) and the configured key,
then `GET /audit` holds every change in order, with its actor and what mattered before and after; its filters,
its keyset pages and its export (CSV, JSON Lines) agree; nothing in it is a secret; retention prunes at start; a
change whose event cannot be written stands, and its event lands once the store is back; with PostgreSQL the
trail is in the database and a second replica reads it."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import time
from pathlib import Path

import psycopg
import pytest

from service.core.access.audit import ACTIONS, AuditEvent
from service.core.access.sqlite import SqliteAccessStore
from service.core.runtime import LocalRuntime
from tests.helpers import PARITY, wait_for_async
from tests.in_process import InProcess, serve_in_process

pytestmark = pytest.mark.anyio

ADMIN_KEY = "configured-admin-key"
ADMIN = {"X-API-Key": ADMIN_KEY}
SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


async def _key(s: InProcess, name: str, role: str, headers: dict[str, str]) -> dict[str, str]:
    r = await s.http.post("/keys", json={"name": name, "role": role}, headers=headers)
    assert r.status_code == 201, r.text
    return {"X-API-Key": r.json()["key"]}


async def _shots(s: InProcess, name: str) -> list[str]:
    r = await s.http.get(f"/classes/{name}/shots", headers=ADMIN)
    return [x["sha256"] for x in r.json()["shots"]]


async def _all(s: InProcess, headers: dict[str, str], **params: object) -> list[dict]:
    """Every event the filters match, walked a page of `limit` at a time."""
    events: list[dict] = []
    after = None
    while True:
        r = await s.http.get("/audit", params={**params, **({"after": after} if after else {})}, headers=headers)
        assert r.status_code == 200, r.text
        page = r.json()
        events += page["events"]
        if page["next"] is None:
            return events
        assert page["next"] == page["events"][-1]["id"]
        after = page["next"]


def _parse_csv(text: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text)))
    return [{**r, "time": float(r["time"]), "before": json.loads(r["before"]) if r["before"] else None,
             "after": json.loads(r["after"]) if r["after"] else None} for r in rows]


async def test_every_change_is_recorded_in_order_with_who_and_before_after(bundle: Path, tmp_path: Path) -> None:
    async with serve_in_process(bundle, tmp_path / "data", api_key=ADMIN_KEY, auth_failures_per_minute=10_000) as s:
        ops = await _key(s, "ops", "operate", ADMIN)
        boss = await _key(s, "boss", "admin", ADMIN)
        viewer = await _key(s, "viewer", "inspect", ADMIN)
        start = time.time()

        # the scripted sequence: every kind of change a class and a key can go through
        assert (await s.http.post("/classes/widget/shots", files=_files(SHOTS[:2]), headers=ops)).status_code == 200
        created = await _shots(s, "widget")
        first = (await s.http.get("/classes/widget", headers=ops)).json()
        assert (await s.http.post("/classes/widget/shots", files=_files(SHOTS[2:]), headers=ops)).status_code == 200
        appended = await _shots(s, "widget")
        r = await s.http.post("/classes/widget/shots", files=_files(SHOTS[1:]), data={"mode": "replace"},
                              headers=ops)
        assert r.status_code == 200, r.text
        replaced = await _shots(s, "widget")
        calibrated = r.json()["calibrated_threshold"]
        assert (await s.http.patch("/classes/widget", json={"threshold": 0.7}, headers=ops)).status_code == 200
        assert (await s.http.patch("/classes/widget", json={"threshold": None}, headers=ops)).status_code == 200
        scored = await s.http.post("/predict", files=_files(TESTS[:1]), data={"class_name": "widget", "keep": "true",
                                                                              "heatmap": "none"}, headers=ops)
        assert scored.status_code == 200, scored.text
        rid = scored.json()["results"][0]["result_id"]
        r = await s.http.post("/classes/widget/shots/from-results", json={"result_ids": [rid]}, headers=ops)
        assert r.status_code == 200, r.text
        from_results = await _shots(s, "widget")
        last = r.json()["class_info"]
        r = await s.http.post(f"/records/{rid}/review", json={"verdict": "good", "note": "fine"}, headers=ops)
        assert r.status_code == 200, r.text
        assert (await s.http.delete("/classes/widget", headers=boss)).status_code == 200
        temp = await s.http.post("/keys", json={"name": "temp", "role": "inspect"}, headers=boss)
        assert temp.status_code == 201
        assert (await s.http.delete("/keys/temp", headers=boss)).status_code == 200

        # only an admin reads the trail
        for who in (viewer, ops):
            r = await s.http.get("/audit", headers=who)
            assert r.status_code == 403 and "needs the admin role" in r.json()["error"]["message"]
            assert (await s.http.get("/audit/export", headers=who)).status_code == 403

        events = (await s.http.get("/audit", params={"limit": 1000}, headers=boss)).json()["events"]
        assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)  # newest first
        story = [(e["actor"], e["action"], e["target"]) for e in reversed(events)]
        assert story == [
            ("SOWA_API_KEY", "key.added", "ops"), ("SOWA_API_KEY", "key.added", "boss"),
            ("SOWA_API_KEY", "key.added", "viewer"),
            ("ops", "class.created", "widget"), ("ops", "shots.added", "widget"), ("ops", "shots.replaced", "widget"),
            ("ops", "threshold.set", "widget"), ("ops", "threshold.reset", "widget"),
            ("ops", "shots.added", "widget"), ("ops", "record.reviewed", rid), ("boss", "class.deleted", "widget"),
            ("boss", "key.added", "temp"), ("boss", "key.revoked", "temp")]
        # every kind of change happened, and was recorded (model versions' in tests/service/test_model_versions.py)
        assert {a for _, a, _ in story} == set(ACTIONS) - {"model.activated", "model.shadow"}
        by = {(e["action"], i): e for i, e in enumerate(reversed(events))}
        cr, add, rep, tset, treset, add2, review, dele = (by[k] for k in sorted(by, key=lambda k: k[1])[3:11])
        assert review["before"] == {"review": None, "note": None}
        assert review["after"] == {"review": "good", "note": "fine", "class_name": "widget"}

        assert cr["before"] is None
        assert cr["after"] == {"shots": created, "shot_count": 2, "threshold_override": None,
                               "calibrated_threshold": first["calibrated_threshold"],
                               "threshold": first["calibrated_threshold"]}
        assert add["before"]["shots"] == created and add["after"]["shots"] == appended and len(appended) == 3
        assert rep["before"]["shots"] == appended and rep["after"]["shots"] == replaced == appended[1:]
        assert rep["after"]["calibrated_threshold"] == calibrated
        assert tset["before"] == {"threshold_override": None, "calibrated_threshold": calibrated,
                                  "threshold": calibrated}
        assert tset["after"] == {"threshold_override": 0.7, "calibrated_threshold": calibrated, "threshold": 0.7}
        assert treset["before"] == tset["after"] and treset["after"] == tset["before"]
        assert add2["before"]["shots"] == replaced and add2["after"]["shots"] == from_results
        assert add2["after"]["shot_count"] == 3
        assert add2["after"]["calibrated_threshold"] == last["calibrated_threshold"]
        assert dele["before"]["shots"] == from_results and dele["after"] is None
        revoked = events[0]
        assert revoked["before"]["name"] == "temp" and revoked["before"]["role"] == "inspect"
        assert revoked["after"] is None and events[1]["before"] is None and events[1]["after"]["created_by"] == "boss"
        assert all(start - 60 < e["time"] <= time.time() for e in events)

        # filters
        assert [e["action"] for e in await _all(s, boss, actor="boss")] == ["key.revoked", "key.added",
                                                                             "class.deleted"]
        assert len(await _all(s, boss, action="shots.added")) == 2
        assert [e["action"] for e in await _all(s, boss, target="temp")] == ["key.revoked", "key.added"]
        assert await _all(s, boss, actor="nobody") == []
        middle = events[5]["time"]
        assert await _all(s, boss, since=middle) == [e for e in events if e["time"] >= middle]
        assert await _all(s, boss, until=middle) == [e for e in events if e["time"] < middle]
        assert await _all(s, boss, actor="ops", action="threshold.set") == [tset]
        for bad in ({"action": "class.renamed"}, {"limit": 0}, {"limit": 1001}, {"after": "xyz"},
                    {"since": -1}, {"actor": "a\x01b"}, {"actr": "ops"}):
            r = await s.http.get("/audit", params=bad, headers=boss)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (bad, r.text)

        # keyset pages: any page size walks every event once, in order
        for size in (1, 3, 5, 13, 14):
            assert await _all(s, boss, limit=size) == events
        r = (await s.http.get("/audit", params={"limit": 4, "after": events[3]["id"]}, headers=boss)).json()
        assert r["events"] == events[4:8] and r["next"] == events[7]["id"]
        r = (await s.http.get("/audit", params={"limit": 5, "after": events[7]["id"]}, headers=boss)).json()
        assert r["events"] == events[8:13] and r["next"] is None

        # the export equals the query, as CSV and as JSON Lines, filtered or not
        texts = []
        for params in ({}, {"actor": "ops"}, {"action": "key.added", "until": events[0]["time"] + 1},
                       {"after": events[2]["id"]}, {"actor": "nobody"}):
            expected = await _all(s, boss, **params)
            r = await s.http.get("/audit/export", params={**params, "format": "jsonl"}, headers=boss)
            assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
            assert "attachment" in r.headers["content-disposition"]
            assert [json.loads(line) for line in r.text.splitlines()] == expected
            texts.append(r.text)
            r = await s.http.get("/audit/export", params={**params, "format": "csv"}, headers=boss)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
            assert r.text.splitlines()[0] == "id,time,actor,action,target,before,after"
            assert _parse_csv(r.text) == expected
            texts.append(r.text)
        for bad in ({"format": "xml"}, {"limit": 5}):
            assert (await s.http.get("/audit/export", params=bad, headers=boss)).status_code == 422

        # no secret anywhere in the trail: no key, no key's stored hash, not the configured key
        stored = await asyncio.to_thread(s.app.state.runtime.access.list_keys)
        secrets = [ADMIN_KEY, temp.json()["key"], *(h["X-API-Key"] for h in (ops, boss, viewer)),
                   *(k.secret_sha256 for k in stored), *(k.key_id for k in stored)]
        assert not [x for x in secrets for t in texts if x in t]
        metrics = (await s.http.get("/metrics")).text
        assert "sowa_audit_write_failures_total 0.0" in metrics


async def test_retention_prunes_old_events_at_start_and_keeps_new_ones(bundle: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    now = time.time()
    store = SqliteAccessStore(data / "access.sqlite3")  # written before the service starts, as a past one would
    events = [AuditEvent("old-key", "threshold.set", f"c{i}", {"threshold_override": None}, None, now - days * 86400)
              for i, days in enumerate((400, 31, 29, 1))]
    store.append(events)
    store.close()
    async with serve_in_process(bundle, data, audit_retention_days=30) as s:
        kept = [events[2].id, events[3].id]

        async def pruned() -> bool:
            r = await s.http.get("/audit", params={"actor": "old-key"})
            return sorted(e["id"] for e in r.json()["events"]) == sorted(kept)

        await wait_for_async(pruned, 10, "events over 30 days old pruned at start")
        runtime = s.app.state.runtime
        # and again later: an event that ages past the setting meanwhile goes, the recent one stays
        await asyncio.to_thread(runtime.access.append, [AuditEvent("old-key", "class.deleted", "x", None, None,
                                                                   now - 45 * 86400)])
        assert await asyncio.to_thread(runtime.prune_audit) == 1
        assert await pruned()


async def test_a_change_stands_when_its_event_cannot_be_written_and_the_event_lands_later(
        bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LocalRuntime, "audit_flush_s", 0.2)  # the retry loop, at test speed
    data = tmp_path / "data"
    async with serve_in_process(bundle, data) as s:
        runtime = s.app.state.runtime
        opened = runtime.access  # still the keys' store; closed once the service is
        # the trail's writes on the same database, giving up on a lock at once instead of after 10 s
        runtime.access = SqliteAccessStore(data / "access.sqlite3", timeout_s=0.05)
        holder = sqlite3.connect(data / "access.sqlite3", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the database
        try:
            r = await s.http.post("/classes/widget/shots", files=_files(SHOTS[:2]))
            assert r.status_code == 200, r.text  # the change stands
            r = await s.http.patch("/classes/widget", json={"threshold": 0.6})
            assert r.status_code == 200 and r.json()["threshold"] == 0.6
            assert runtime.audit.pending == 2
            assert "sowa_audit_write_failures_total 2.0" in (await s.http.get("/metrics")).text
            assert (await s.http.get("/audit")).json()["events"] == []  # readers are not blocked (WAL)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await wait_for_async(lambda: runtime.audit.pending == 0, 10, "the waiting events written")
        events = (await s.http.get("/audit")).json()["events"]
        assert [(e["actor"], e["action"]) for e in events] == [("anonymous", "threshold.set"),
                                                              ("anonymous", "class.created")]
        assert "sowa_audit_write_failures_total 2.0" in (await s.http.get("/metrics")).text  # counted once each
    opened.close()


async def test_with_postgresql_the_trail_is_in_the_database_and_another_replica_reads_it(
        bundle: Path, tmp_path: Path, pg_url: str) -> None:
    # a password in the URL (the test server trusts loopback, so any works): it must appear nowhere in the trail
    password = "store-pass-9f3e1c"
    url = pg_url.replace("://", f"://sowa:{password}@", 1) if "@" not in pg_url else \
        pg_url.replace("@", f":{password}@", 1)
    async with serve_in_process(bundle, tmp_path / "a", store=url, api_key=ADMIN_KEY) as a, \
            serve_in_process(bundle, tmp_path / "b", store=url, api_key=ADMIN_KEY) as b:
        ops = await _key(a, "ops", "operate", ADMIN)
        assert (await a.http.post("/classes/widget/shots", files=_files(SHOTS[:2]), headers=ops)).status_code == 200
        assert (await a.http.patch("/classes/widget", json={"threshold": 0.8}, headers=ops)).status_code == 200
        seen = await _all(b, ADMIN)
        assert [(e["actor"], e["action"], e["target"]) for e in reversed(seen)] == [
            ("SOWA_API_KEY", "key.added", "ops"), ("ops", "class.created", "widget"),
            ("ops", "threshold.set", "widget")]
        assert seen[0]["after"]["threshold_override"] == 0.8
        export = (await b.http.get("/audit/export", params={"format": "csv"}, headers=ADMIN)).text
        assert _parse_csv(export) == seen
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT id, actor, action, target, before::text, after::text FROM sowa_audit "
                            "ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [e["id"] for e in reversed(seen)]
    text = export + json.dumps(seen) + repr(rows)
    assert password not in text and pg_url not in text and ops["X-API-Key"] not in text
