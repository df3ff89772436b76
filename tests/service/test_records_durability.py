"""Inspection records under faults, with real processes (the process is the point): kill -9 of the server under
load, PostgreSQL stopped under load, the record store's disk full, and an export of 100,000 records in bounded
memory. Every answer that carried a record id must find its record afterwards, and /predict never answers 5xx
because of the records."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
from PIL import Image

from service.core.records.record import Draft, Record
from service.core.records.sqlite import SqliteRecordStore
from sowa.server_process import ServerProcess
from tests.helpers import PARITY
from tests.postgres_server import PostgresServer

pytestmark = pytest.mark.slow

SHOTS = sorted(PARITY.glob("shots/*.png"))
TEST = sorted(PARITY.glob("test/*.png"))[0].read_bytes()


def _register(url: str) -> None:
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in SHOTS[:2]]
    r = httpx.post(url + "/classes/widget/shots", files=files, timeout=60)
    assert r.status_code == 200, r.text


class Load:
    """Clients sending /predict against the class until stopped: the ids of answered records, and every status."""

    def __init__(self, url: str, clients: int = 4, image: bytes = TEST, keep: bool = False) -> None:
        self.url, self.image, self.keep = url, image, keep
        self.ids: list[str] = []
        self.not_kept = 0
        self.statuses: list[int] = []
        self.errors = 0  # connections refused or cut (a killed server)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                try:
                    r = c.post(self.url + "/predict", files=[("images", ("p.png", self.image, "image/png"))],
                               data={"class_name": "widget", "heatmap": "none", "keep": str(self.keep).lower()})
                except httpx.HTTPError:
                    self.errors += 1
                    time.sleep(0.05)
                    continue
                self.statuses.append(r.status_code)
                if r.status_code == 200:
                    res = r.json()["results"][0]
                    if res["record_id"]:
                        self.ids.append(res["record_id"])
                    elif res["record_kept"] is False:
                        self.not_kept += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def _all_found(url: str, ids: list[str]) -> list[str]:
    """The ids GET /records/{id} does not find."""
    with httpx.Client(timeout=30) as c:
        return [i for i in ids if c.get(f"{url}/records/{i}").status_code != 200]


def test_kill_9_under_load_loses_no_answered_record(bundle: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = ServerProcess(bundle, data, tmp_path / "server.log").start()
    try:
        _register(srv.url)
        with Load(srv.url, clients=3) as load:
            _wait_for(lambda: len(load.ids) >= 20, 60, "20 recorded answers")
            srv.kill()  # mid-load: requests in flight, records in the spool not yet drained
            answered = list(load.ids)
        assert answered and all(s == 200 for s in load.statuses)
    finally:
        srv.stop()
    again = ServerProcess(bundle, data, tmp_path / "server2.log").start()
    try:
        _wait_for(lambda: _metric(again.url, "sowa_records_spooled") == 0, 30, "the spool drained")
        assert _all_found(again.url, answered) == []
    finally:
        again.stop()


def test_postgres_outage_under_load_loses_nothing_and_never_5xx(bundle: Path, tmp_path: Path,
                                                                 postgres: PostgresServer, pg_url: str) -> None:
    url, postgres_server = pg_url, postgres
    srv = ServerProcess(bundle, tmp_path / "data", tmp_path / "server.log", ["--store", url]).start()
    try:
        _register(srv.url)
        with Load(srv.url) as load:
            _wait_for(lambda: len(load.ids) >= 10, 60, "answers before the outage")
            postgres_server.stop()
            # 6 s rather than 30: the drainer retries every 2 s at most (its backoff's cap) and the spool holds
            # whatever arrives, so a longer outage only spools more of the same; 6 s spans several retries
            before = len(load.ids)
            time.sleep(6)
            during = len(load.ids) - before
            assert _metric(srv.url, "sowa_records_store_up") == 0
            assert _metric(srv.url, "sowa_records_spooled") > 0
            postgres_server.start()
            _wait_for(lambda: _metric(srv.url, "sowa_records_spooled") == 0, 60, "the spool drained")
            time.sleep(1)
        assert during > 0, "predictions went on during the outage"
        assert load.statuses and all(s == 200 for s in load.statuses), sorted(set(load.statuses))
        assert load.not_kept == 0
        _wait_for(lambda: _metric(srv.url, "sowa_records_spooled") == 0, 60, "the spool drained")
        with psycopg.connect(url) as conn:
            stored = {r[0] for r in conn.execute("SELECT id FROM sowa_records")}
        assert set(load.ids) <= stored and len(stored) == len(load.ids)
    finally:
        srv.stop()


def _noise_png(seed: int, size: int = 160) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_for_the_record_store_answers_cleanly(bundle: Path, tmp_path: Path) -> None:
    image = _noise_png(1)  # ~77 kB, kept with every record (keep=true): the small disk fills in a few dozen
    with _tmpfs(tmp_path / "records", "2m") as records:
        srv = ServerProcess(bundle, tmp_path / "data", tmp_path / "server.log",
                            ["--records-dir", str(records)]).start()
        try:
            _register(srv.url)
            with Load(srv.url, clients=2, image=image, keep=True) as load:
                _wait_for(lambda: load.not_kept >= 5, 120, "records refused for the full disk")
            assert all(s == 200 for s in load.statuses), sorted(set(load.statuses))  # it kept answering
            assert _metric(srv.url, "sowa_records_not_kept_total") >= load.not_kept
            # space again (the disk grows): recording resumes, and what was spooled reaches the store
            subprocess.run(["mount", "-o", "remount,size=64m", str(records)], check=True)
            r = httpx.post(srv.url + "/predict", files=[("images", ("p.png", image, "image/png"))],
                           data={"class_name": "widget", "keep": "true"}, timeout=60)
            assert r.status_code == 200 and r.json()["results"][0]["record_kept"] is True
            kept = [*load.ids, r.json()["results"][0]["record_id"]]
            _wait_for(lambda: _metric(srv.url, "sowa_records_spooled") == 0, 60, "the spool drained")
            assert _all_found(srv.url, kept) == []
            for rid in kept[-3:]:
                assert httpx.get(f"{srv.url}/records/{rid}/image", timeout=30).content == image
        finally:
            srv.stop()
        # nothing half-written: the database is consistent, no temporary image file is left, the spool reads whole
        import sqlite3

        with sqlite3.connect(records / "records.sqlite3") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert not list(records.rglob("*.tmp"))
        from service.core.records.spool import Spool

        assert list(Spool(records / "spool", fsync=False).open()) == []  # drained and removed at the stop
        assert "torn" not in (tmp_path / "server.log").read_text()  # a failed append was cut back, not left


def _records(n: int, start: float) -> Iterator[Draft]:
    for i in range(n):
        yield Draft(Record(id=f"{int((start + i) * 1000):012x}{i:020x}", time=start + i, class_name="widget",
                           revision="r", model="m", threshold=0.5, threshold_per_request=False, score=0.4,
                           normalized_score=0.4, text_score=0.1, is_anomalous=i % 7 == 0, filename=f"p{i}.png",
                           width=64, height=64, part_id=f"P-{i}", tags=("line1",)))


def test_export_of_100000_records_streams_in_bounded_memory(bundle: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = SqliteRecordStore(data / "records")
    drafts = list(_records(100_000, time.time() - 200_000))
    for i in range(0, len(drafts), 20_000):
        store.write(drafts[i:i + 20_000])
    store.close()
    srv = ServerProcess(bundle, data, tmp_path / "server.log").start()
    try:
        for fmt in ("csv", "parquet"):
            small = httpx.get(srv.url + "/records/export", params={"format": fmt, "part_id": "P-1"}, timeout=60)
            assert small.status_code == 200  # warm: the first export imports its writer (pyarrow)
            srv.reset_peak_memory()
            base = srv.memory_kib("VmRSS")
            size = 0
            with httpx.stream("GET", srv.url + "/records/export", params={"format": fmt}, timeout=300) as r:
                assert r.status_code == 200
                head = b""
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    head = head or chunk
            growth_mib = (srv.memory_kib("VmHWM") - base) / 1024
            print(f"{fmt}: {size / 2**20:.1f} MiB exported, peak RSS growth {growth_mib:.1f} MiB")
            assert size > 2**20 and growth_mib < 8, (fmt, growth_mib)
            if fmt == "csv":
                assert head.startswith(b"id,time,class_name")
    finally:
        srv.stop()
