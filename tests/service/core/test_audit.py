"""The audit trail's parts with a real SQLite access store: ids in order, the state a class event records, the
sink that never fails a change (its events wait and land in order), queries and retention."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.core.access.audit import AuditEvent, AuditQuery, AuditSink, class_state, threshold_state, time_ordered_id
from service.core.access.sqlite import SqliteAccessStore


def test_ids_are_strictly_increasing_within_a_process() -> None:
    ids = [time_ordered_id() for _ in range(20_000)]  # many per millisecond
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 32 and i[12] == "7" for i in ids)  # UUIDv7-shaped


def test_class_and_threshold_state() -> None:
    assert class_state(["a" * 64, "b" * 64], None, 0.4) == {
        "shots": ["a" * 64, "b" * 64], "shot_count": 2, "threshold_override": None, "calibrated_threshold": 0.4,
        "threshold": 0.4}
    assert threshold_state(0.7, 0.4) == {"threshold_override": 0.7, "calibrated_threshold": 0.4, "threshold": 0.7}


def test_the_sink_keeps_what_it_cannot_write_and_writes_it_first_later(tmp_path: Path) -> None:
    path = tmp_path / "access.sqlite3"
    store = SqliteAccessStore(path, timeout_s=0.05)
    failed: list[int] = []
    sink = AuditSink(store.append, failed.append, max_pending=3)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the database
    events = [AuditEvent("k", "threshold.set", f"c{i}") for i in range(5)]
    assert not sink.record(events[:2]) and not sink.record(events[2:3])  # never raises
    assert sink.pending == 3 and failed == [2, 1] and sink.flush() == 3
    assert not sink.record(events[3:])  # beyond max_pending: the oldest go (logged in full)
    assert sink.pending == 3 and sink.dropped == 2
    holder.execute("ROLLBACK")
    assert sink.flush() == 0
    assert sink.record([]) and store.query(AuditQuery()) == list(reversed(events[2:]))
    assert failed == [2, 1, 2]  # flushes count nothing again: each event counts once
    holder.execute("BEGIN IMMEDIATE")
    sink.record([AuditEvent("k", "class.deleted", "c9")])
    assert sink.flush(final=True) == 0 and sink.dropped == 3  # stopping: what still fails is let go, logged
    holder.execute("ROLLBACK")
    store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteAccessStore]:
    s = SqliteAccessStore(tmp_path / "access.sqlite3")
    yield s
    s.close()


def test_query_filters_pages_and_prune(store: SqliteAccessStore) -> None:
    now = time.time()
    events = [AuditEvent(f"a{i % 2}", "shots.added" if i % 3 else "class.created", f"t{i % 4}", None, {"i": i},
                         now - (10 - i) * 86400) for i in range(10)]
    store.append(events)
    newest = list(reversed(events))
    assert store.query(AuditQuery(limit=1000)) == newest
    assert store.query(AuditQuery(actor="a1", limit=1000)) == [e for e in newest if e.actor == "a1"]
    assert store.query(AuditQuery(action="class.created", target="t0", limit=1000)) == [
        e for e in newest if e.action == "class.created" and e.target == "t0"]
    assert store.query(AuditQuery(since=events[3].time, until=events[6].time, limit=1000)) == newest[4:7]
    assert list(store.iter_events(AuditQuery(limit=1), batch=3)) == newest  # every batch, the limit ignored
    assert list(store.iter_events(AuditQuery(after=events[5].id), batch=2)) == newest[5:]
    assert store.prune(now - 5.5 * 86400) == 5  # retention: older than the cut go, newer stay
    assert store.query(AuditQuery(limit=1000)) == newest[:5]
