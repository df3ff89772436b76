"""The class store on a real PostgreSQL (Debian's, started by tests/postgres_server.py: one server per session, a
database per test): its schema versions, replicas that follow each other by LISTEN/NOTIFY, concurrent appends,
a replica killed -9 mid-registration, the database restarted under load, and the copy from a directory store.
The behaviour both backends share is in tests/service/core/test_store.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
import torch

from service.client import SowaClient, decode_raw_heatmap
from service.core.store import DirectoryStore, open_store
from service.core.store.postgres import SCHEMA_VERSION, PostgresStore, SchemaError
from sowa.server_process import ServerProcess
from tests.helpers import PARITY, REPO, wait_for, wait_for_async
from tests.in_process import serve_in_process
from tests.postgres_server import PostgresServer
from tests.service.core.test_store import _record, _shots

SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def test_schema_from_an_empty_database_and_a_newer_one_refused(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        assert store.recover() == {}
        with psycopg.connect(pg_url) as conn:
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            version = conn.execute("SELECT value FROM sowa_meta WHERE key = 'schema_version'").fetchone()
        assert tables == {"sowa_meta", "sowa_classes", "sowa_shots", "sowa_keys", "sowa_audit", "sowa_records",
                          "sowa_record_blobs", "sowa_class_models", "sowa_models", "sowa_model_files",
                          "sowa_model_state"}
        assert version == (str(SCHEMA_VERSION),)
        assert store.migrate() == SCHEMA_VERSION  # again: nothing to do
        shots = _shots(b"a")
        store.write(_record("gear", shots), shots)
    finally:
        store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE sowa_meta SET value = '99' WHERE key = 'schema_version'")
    newer = PostgresStore(pg_url, listen=False)
    try:
        with pytest.raises(SchemaError, match="version 99, newer than this service knows"):
            newer.recover()
    finally:
        newer.close()


def test_a_version_3_database_migrates_its_one_bank_per_class_to_a_bank_per_model(pg_url: str) -> None:
    """A class written by the release before model versions keeps its bank and override, as its model's."""
    from psycopg.types.json import Jsonb
    from safetensors.torch import save as save_tensors

    from service.core.store.postgres import MIGRATIONS

    record = _record("gear", _shots(b"a", b"b"), override=0.7)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE sowa_meta (key text PRIMARY KEY, value text NOT NULL)")
        for v in (1, 2, 3):
            conn.execute(MIGRATIONS[v])
        conn.execute("INSERT INTO sowa_meta VALUES ('schema_version', '3')")
        with conn.transaction():
            conn.execute("INSERT INTO sowa_classes (name, shots, bundle_fingerprint, calibration, bank, bank_shots, "
                         "threshold_override, created, updated) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                         ("gear", list(record.shots), "fp-1",
                          Jsonb(dataclasses.asdict(record.memory.calibration)),
                          save_tensors({"features": record.memory.bank.features}), 2, 0.7, 100.0, 200.0))
            for digest, data in _shots(b"a", b"b").items():
                conn.execute("INSERT INTO sowa_shots VALUES (%s, %s, %s)", ("gear", digest, data))
    store = PostgresStore(pg_url, listen=False)
    try:
        store.recover()
        back = store.read("gear", "fp-1")
        assert back.memory is not None and back.threshold_override == 0.7 and back.models == ("fp-1",)
        assert torch.equal(back.memory.bank.features, record.memory.bank.features)
        assert (back.created, back.updated) == (100.0, 200.0) and store.read("gear", "fp-2").memory is None
    finally:
        store.close()


@pytest.mark.slow
def test_a_store_that_is_down_answers_unavailable_and_catches_up(postgres: PostgresServer, pg_url: str) -> None:
    from service.core.errors import StoreUnavailableError

    a, b = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        a.recover(), b.recover()
        b.changes()
        postgres.stop("immediate")
        try:
            wait_for(lambda: b.error is not None, 10, "B's listener sees the store gone")
            shots = _shots(b"x")
            with pytest.raises(StoreUnavailableError) as e, a.lock("gear"):
                a.write(_record("gear", shots), shots)
            assert e.value.status == 503 and e.value.headers == {"Retry-After": "5"}
        finally:
            postgres.start()
        a.write(_record("gear", shots), shots)  # perhaps before B is back: the reconnect's diff finds it then
        assert b.wait_for_changes(15) and b.changes().changed == ("gear",)
        wait_for(lambda: b.error is None, 10, "B reconnected")
        assert b.reconnects >= 1
    finally:
        a.close(), b.close()


@pytest.mark.slow
def test_after_a_long_outage_the_store_answers_as_soon_as_the_server_is_back(postgres: PostgresServer,
                                                                            pg_url: str) -> None:
    """psycopg_pool retries a lost connection at 1, 2, 4, 8 ... s: after an outage of 8 s its next attempt is
    seconds after the server came back. The listener's reconnect renews the pool, so the store answers at once."""
    from service.core.errors import StoreUnavailableError

    store = PostgresStore(pg_url, timeout_s=2.0)
    try:
        store.recover()
        store.changes()
        postgres.stop("immediate")
        try:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:  # in use during the outage: the pool's backoff grows
                with contextlib.suppress(StoreUnavailableError):
                    store.changes()
                time.sleep(0.2)
        finally:
            postgres.start()
        wait_for(lambda: store.error is None, 10, "the listener reconnected")
        start = time.monotonic()
        store.changes()  # raised StoreUnavailableError (PoolTimeout) before the pool was renewed
        assert time.monotonic() - start < 3.0  # a new connection to a server just up; the old pool waits 8 s
    finally:
        store.close()


def test_a_lock_held_too_long_elsewhere_answers_unavailable(pg_url: str) -> None:
    from service.core.errors import StoreUnavailableError

    a, b = PostgresStore(pg_url), PostgresStore(pg_url, lock_timeout_s=0.5)
    try:
        a.recover(), b.recover()
        with a.lock("gear"), pytest.raises(StoreUnavailableError, match="being changed by another replica"), \
                b.lock("gear"):
            pass
        with b.lock("gear"):  # free again once A let go
            pass
    finally:
        a.close(), b.close()


@pytest.mark.anyio
async def test_two_replicas_register_on_one_predict_on_the_other(bundle: Path, tmp_path: Path, pg_url: str) -> None:
    async with serve_in_process(bundle, tmp_path / "a", store=pg_url) as a, \
            serve_in_process(bundle, tmp_path / "b", store=pg_url) as b:
        assert (await b.client.ready()).store == "postgresql"

        async def known(c: object, name: str, shots: int | None = None) -> bool:
            r = await c.http.get(f"/classes/{name}")
            return r.status_code == 200 and (shots is None or r.json()["shots"] == shots)

        await a.client.register_shots("widget", SHOTS)
        took = await wait_for_async(lambda: known(b, "widget", 3), 1.0, "B serves the class A registered")
        assert took < 1.0
        pa = await a.client.predict(TESTS, class_name="widget", heatmap="raw")
        pb = await b.client.predict(TESTS, class_name="widget", heatmap="raw")
        assert [r.score for r in pa.results] == [r.score for r in pb.results]
        assert all(np.array_equal(decode_raw_heatmap(x.heatmap), decode_raw_heatmap(y.heatmap))
                   for x, y in zip(pa.results, pb.results, strict=True))
        await b.client.set_threshold("widget", 0.77)
        await wait_for_async(lambda: _threshold(a, "widget", 0.77), 1.0, "A sees B's threshold")
        await a.client.delete_class("widget")
        await wait_for_async(lambda: _gone(b, "widget"), 1.0, "B sees A's delete")
        # nothing on local files but each replica's own record spool (records/spool: what an answer waits for)
        local = {p.relative_to(tmp_path).parts[1:3] for p in tmp_path.rglob("*") if p.is_file()}
        assert local <= {("records", "spool")}, local
        # every replica answers from the same records: each sees the other's
        assert a.app.state.runtime.records.wait_drained(10) and b.app.state.runtime.records.wait_drained(10)
        for x, y, scored in ((a, b, pa), (b, a, pb)):
            for r in scored.results:
                assert (await y.http.get(f"/records/{r.record_id}")).json()["class_name"] == "widget", x
        metrics = await b.client.metrics()
        assert _metric(metrics, "sowa_store_up") == 1 and _metric(metrics, "sowa_store_notifications_total") >= 2


async def _threshold(svc: object, name: str, value: float) -> bool:
    r = await svc.http.get(f"/classes/{name}")
    return r.status_code == 200 and r.json()["threshold"] == value


async def _gone(svc: object, name: str) -> bool:
    return (await svc.http.get(f"/classes/{name}")).status_code == 404


@pytest.mark.anyio
async def test_concurrent_appends_from_two_replicas_lose_nothing(bundle: Path, tmp_path: Path, pg_url: str) -> None:
    async with serve_in_process(bundle, tmp_path / "a", store=pg_url) as a, \
            serve_in_process(bundle, tmp_path / "b", store=pg_url) as b:
        await a.client.register_shots("gear", SHOTS[:1])
        # both replicas append at once, twice each: the advisory lock makes them take turns on the stored class
        appends = [(a, SHOTS[1]), (b, SHOTS[2]), (a, TESTS[0]), (b, TESTS[1])]
        await asyncio.gather(*(s.client.register_shots("gear", [shot], mode="append") for s, shot in appends))
        for s in (a, b):
            await wait_for_async(lambda s=s: _shots_are(s, "gear", 5), 2.0, "every append on both replicas")


@pytest.mark.anyio
@pytest.mark.parametrize("fails", ["changes", "read"])
async def test_a_catch_up_that_fails_is_tried_again(bundle: Path, tmp_path: Path, pg_url: str, fails: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A change is announced once: when the look it triggers fails (the store dropped the query that lists the
    changes, or the one that reads the class), the replica looks again rather than waiting for the next
    announcement, which may never come, and the class it could not read is still reported then."""
    from service.core.errors import StoreUnavailableError

    async with serve_in_process(bundle, tmp_path / "a", store=pg_url) as a, \
            serve_in_process(bundle, tmp_path / "b", store=pg_url) as b:
        store = b.app.state.runtime.store
        real, failures = getattr(store, fails), []

        def failing_once_on_widget(*args: object) -> object:
            if fails == "read" and args[0] == "widget" and not failures:
                failures.append(fails)
                raise StoreUnavailableError("the class store cannot be reached (injected)")
            got = real(*args)
            if fails == "changes" and "widget" in got.changed and not failures:  # the look that would see it
                store.unsee(["widget"])  # as if the query had never answered
                failures.append(fails)
                raise StoreUnavailableError("the class store cannot be reached (injected)")
            return got

        monkeypatch.setattr(store, fails, failing_once_on_widget)
        await a.client.register_shots("widget", SHOTS)
        await wait_for_async(lambda: _shots_are(b, "widget", 3), 2.0, "B has the class after a failed look")
        assert failures == [fails]


async def _shots_are(svc: object, name: str, n: int) -> bool:
    r = await svc.http.get(f"/classes/{name}")
    return r.status_code == 200 and r.json()["shots"] == n


@pytest.mark.anyio
@pytest.mark.slow
async def test_the_database_restarted_under_load(bundle: Path, tmp_path: Path, postgres: PostgresServer,
                                                 pg_url: str) -> None:
    async with serve_in_process(bundle, tmp_path / "a", store=pg_url) as a, \
            serve_in_process(bundle, tmp_path / "b", store=pg_url) as b:
        await a.client.register_shots("widget", SHOTS)
        await wait_for_async(lambda: _shots_are(b, "widget", 3), 2.0, "B has the class")
        statuses: list[int] = []
        stop = asyncio.Event()

        async def load(svc: object) -> None:
            while not stop.is_set():
                r = await svc.http.post("/predict", data={"class_name": "widget", "heatmap": "none"},
                                        files=[("images", ("t.png", TESTS[0].read_bytes(), "image/png"))])
                statuses.append(r.status_code)

        loads = [asyncio.ensure_future(load(s)) for s in (a, b, b)]
        await asyncio.to_thread(postgres.stop, "immediate")
        try:
            for s in (a, b):
                await wait_for_async(lambda s=s: _store_error(s), 10, "the replica says the store is gone")
            assert _metric(await b.client.metrics(), "sowa_store_up") == 0
            r = await a.http.post("/classes/widget/shots", data={"mode": "replace"},
                                  files=[("images", ("s.png", SHOTS[0].read_bytes(), "image/png"))])
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
            assert int(r.headers["Retry-After"]) >= 1
            ready = await b.http.get("/readyz")
            assert ready.status_code == 200, "a replica without its store still serves predictions"
        finally:
            await asyncio.to_thread(postgres.start)
        for s in (a, b):
            await wait_for_async(lambda s=s: _store_ok(s), 15, "the replica reconnected")
        stop.set()
        await asyncio.gather(*loads)
        assert statuses and set(statuses) == {200}, set(statuses)
        assert (await a.client.get_class("widget")).shots == 3  # the refused replace changed nothing
        await a.client.register_shots("widget", SHOTS[:1], mode="replace")
        await wait_for_async(lambda: _shots_are(b, "widget", 1), 1.0, "B follows A again after the restart")
        assert _metric(await b.client.metrics(), "sowa_store_reconnects_total") >= 1


async def _store_error(svc: object) -> bool:
    return (await svc.http.get("/readyz")).json()["store_error"] is not None


async def _store_ok(svc: object) -> bool:
    return (await svc.http.get("/readyz")).json()["store_error"] is None


@pytest.mark.slow
def test_kill_9_during_a_registration_leaves_the_old_class(bundle: Path, tmp_path: Path, pg_url: str) -> None:
    env = {"SOWA_STORE": pg_url}
    srv = ServerProcess(bundle, tmp_path / "data", tmp_path / "a.log", env=env).start()
    try:
        with SowaClient(srv.url) as c:
            c.register_shots("widget", SHOTS)
            before = c.predict(TESTS, class_name="widget", heatmap="none")
        with psycopg.connect(pg_url) as blocker:
            # the registration's transaction runs up to its write of the class row and waits there, its shots
            # already inserted: then the replica dies
            blocker.execute("LOCK TABLE sowa_classes IN SHARE ROW EXCLUSIVE MODE")
            posting = threading.Thread(target=_post_quietly, args=(srv.url, SHOTS[:1]), daemon=True)
            posting.start()

            def waiting() -> bool:
                with psycopg.connect(pg_url) as conn:
                    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                        "AND query LIKE 'INSERT INTO sowa_classes%'").fetchone()[0] == 1

            wait_for(waiting, 30, "the registration waits inside its transaction")
            srv.kill()
            blocker.rollback()
        posting.join(10)
        srv = ServerProcess(bundle, tmp_path / "data", tmp_path / "b.log", env=env).start()
        with SowaClient(srv.url) as c:
            info = c.get_class("widget")
            assert info.shots == 3  # the old class, whole: the killed transaction committed nothing
            after = c.predict(TESTS, class_name="widget", heatmap="none")
            assert [r.score for r in after.results] == [r.score for r in before.results]
            assert c.register_shots("widget", SHOTS[:1], mode="replace").shots == 1  # no lock left behind
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM sowa_shots").fetchone()[0] == 1
    finally:
        srv.stop()


def _post_quietly(url: str, shots: list[Path]) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
        httpx.post(f"{url}/classes/widget/shots", data={"mode": "replace"}, timeout=60,
                   files=[("images", (p.name, p.read_bytes(), "image/png")) for p in shots])


@pytest.mark.slow
def test_sowa_store_migrate_copies_a_directory_store(tmp_path: Path, pg_url: str) -> None:
    directory = DirectoryStore(tmp_path / "data")
    directory.recover()
    for name, payloads in (("gear", (b"g1", b"g2")), ("belt", (b"b1",))):
        shots = _shots(*payloads)
        directory.write(_record(name, shots, override=0.4 if name == "gear" else None), shots)
    cmd = [sys.executable, "-m", "sowa", "store", "migrate", "--from", str(tmp_path / "data"), "--to", pg_url]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "2 classes copied" in out.stdout
    store = open_store(pg_url)
    try:
        store.recover()
        assert store.changes().changed == ("belt", "gear")
        for name in ("gear", "belt"):
            want, got = directory.read(name, "fp-1"), store.read(name, "fp-1")
            assert got.shots == want.shots and got.threshold_override == want.threshold_override
            assert (got.created, got.updated, got.bundle_fingerprint) == (want.created, want.updated, "fp-1")
            assert got.memory.calibration == want.memory.calibration
            assert np.array_equal(got.memory.bank.features.numpy(), want.memory.bank.features.numpy())
            assert all(store.read_shot(name, h) == directory.read_shot(name, h) for h in want.shots)
        again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert again.returncode == 2 and "already holds" in again.stderr  # never overwrites without --replace
    finally:
        store.close()
