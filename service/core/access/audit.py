"""The audit trail's events: who changed what, when, and what it was before and after.

An event never holds a secret: keys appear by name, stores by kind. Events are appended by the service only (there
is no API to change or delete one); retention removes those older than a setting.

Conventions (docs/security.md, "Audit trail"): the target is a class or key name; `before` None means it did not
exist, `after` None that it is gone. A class's first registration is one `class.created` event (its shots in
`after`), never also `shots.added`; shots removed are a `shots.replaced` (the console removes shots by registering
the rest). Class events carry `class_state` (shot hashes and count, thresholds), threshold events
`threshold_state`, key events the key's public record.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Literal, get_args

__all__ = ["ACTIONS", "AuditAction", "AuditEvent", "AuditQuery", "AuditSink", "class_state", "threshold_state",
           "time_ordered_id"]

log = logging.getLogger("sowa.audit")

# every kind of change the trail records (a test holds that each happens in a scripted sequence)
AuditAction = Literal["class.created", "shots.added", "shots.replaced", "threshold.set", "threshold.reset",
                      "class.deleted", "key.added", "key.revoked", "record.reviewed", "model.activated",
                      "model.shadow"]
ACTIONS: tuple[str, ...] = get_args(AuditAction)


@dataclass(frozen=True)
class AuditEvent:
    actor: str  # the key's name (SOWA_API_KEY for the configured one, anonymous when no key is configured)
    action: str  # one of ACTIONS
    target: str  # what changed: a class name, a key name
    before: dict[str, Any] | None = None  # what matters of it before the change (None: it did not exist)
    after: dict[str, Any] | None = None  # and after (None: it is gone)
    time: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: time_ordered_id())

    # the stores' column order (sqlite.py, postgres.py): a row is these, `before` and `after` as the store's JSON
    COLUMNS: ClassVar[str] = "id, time, actor, action, target, before, after"

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> AuditEvent:
        """An event from a row; `before` and `after` as JSON text (SQLite) or already decoded (psycopg's jsonb)."""
        before, after = (json.loads(v) if isinstance(v, str) else v for v in row[5:7])
        return cls(actor=row[2], action=row[3], target=row[4], before=before, after=after, time=row[1], id=row[0])

    def row(self, encode: Callable[[dict[str, Any]], Any]) -> tuple[Any, ...]:
        """The event as a row, `before` and `after` through `encode` (None stays None)."""
        return (self.id, self.time, self.actor, self.action, self.target,
                None if self.before is None else encode(self.before),
                None if self.after is None else encode(self.after))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_last_id = 0
_id_lock = threading.Lock()


def time_ordered_id() -> str:
    """A UUIDv7-shaped hex id: time-ordered to the millisecond, so ids sort as events happened (uuid.uuid7
    arrives with Python 3.14). Within one process strictly increasing: two events in one millisecond keep their
    order (the random bits would otherwise order them by chance), as `GET /audit` pages by id."""
    global _last_id
    ms = int(time.time() * 1000)
    rand = uuid.uuid4().int & ((1 << 74) - 1)
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    with _id_lock:
        if value <= _last_id and _last_id >> 80 == ms:  # same millisecond: count on from the last one
            value = _last_id + 1
        _last_id = value
    return f"{value:032x}"


def class_state(shots: Sequence[str], threshold_override: float | None,
                calibrated_threshold: float | None) -> dict[str, Any]:
    """What a class event records of a class: its shots (sha256, in order) and thresholds (the calibrated one None
    where this replica did not hold the class as stored)."""
    return {"shots": list(shots), "shot_count": len(shots), **threshold_state(threshold_override,
                                                                              calibrated_threshold)}


def threshold_state(threshold_override: float | None, calibrated_threshold: float | None) -> dict[str, Any]:
    """What a threshold event records: the override (None: none), the calibrated threshold, and the one served."""
    return {"threshold_override": threshold_override, "calibrated_threshold": calibrated_threshold,
            "threshold": calibrated_threshold if threshold_override is None else threshold_override}


@dataclass(frozen=True)
class AuditQuery:
    """Filters of `GET /audit`; each None matches everything. `after`: keyset paging, events older than the id."""

    actor: str | None = None
    action: str | None = None
    target: str | None = None
    since: float | None = None
    until: float | None = None
    after: str | None = None
    limit: int = 100

    def where(self, placeholder: str) -> tuple[str, list[Any]]:
        """The SQL WHERE clause of these filters and its parameters (`placeholder`: ? for SQLite, %s for
        psycopg); the column names are the stores' own."""
        clauses, params = [], []
        for column, value, op in (("actor", self.actor, "="), ("action", self.action, "="),
                                  ("target", self.target, "="), ("time", self.since, ">="),
                                  ("time", self.until, "<"), ("id", self.after, "<")):
            if value is not None:
                clauses.append(f"{column} {op} {placeholder}")
                params.append(value)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def pages(self, query: Callable[[AuditQuery], list[AuditEvent]], batch: int) -> Iterator[AuditEvent]:
        """Every event these filters match (the limit aside), newest first, asked of `query` a batch at a time
        (keyset paging: each batch after the last id seen)."""
        after = self.after
        while True:
            page = query(replace(self, after=after, limit=batch))
            yield from page
            if len(page) < batch:
                return
            after = page[-1].id


class AuditSink:
    """Where the service's changes append their events: `record` never raises, so a change that has been made
    stands when its event cannot be written (the store unreachable, locked or full). Such events wait in memory,
    at most `max_pending` (beyond, the oldest are dropped, logged in full at ERROR), and are written before any
    later event and by `flush` (the runtime calls it every minute), so the trail keeps its order; `on_failure`
    counts them (the sowa_audit_write_failures_total metric). Any thread; appends are serialised."""

    def __init__(self, append: Callable[[Sequence[AuditEvent]], None],
                 on_failure: Callable[[int], None] | None = None, max_pending: int = 10_000) -> None:
        self._append, self._on_failure = append, on_failure
        self._pending: collections.deque[AuditEvent] = collections.deque()
        self.max_pending = max_pending
        self.dropped = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Events not written yet."""
        return len(self._pending)

    def record(self, events: Sequence[AuditEvent]) -> bool:
        """Append `events` after any that wait; whether all are written now (blocking: a worker thread)."""
        with self._lock:
            self._pending.extend(events)
            return self._write(len(events))

    def flush(self, final: bool = False) -> int:
        """Try the waiting events again; how many still wait (blocking: a worker thread). `final`: the process is
        stopping, so what still fails is logged in full at ERROR (for an operator to re-enter) and let go."""
        with self._lock:
            self._write(0)
            if final:
                while self._pending:
                    self._drop(self._pending.popleft(), "the service stopped")
            return len(self._pending)

    def _drop(self, event: AuditEvent, why: str) -> None:
        self.dropped += 1
        log.error("audit trail: event not recorded (%s): %s", why, json.dumps(event.as_dict(), default=str))

    def _write(self, new: int) -> bool:
        if not self._pending:
            return True
        batch = list(self._pending)
        try:
            self._append(batch)
        except Exception as e:  # the change is made; only its record is late: never fail the request for it
            if new and self._on_failure is not None:
                self._on_failure(new)
            log.error("audit trail: %d event(s) not written yet (%s); retrying later", len(batch),
                      str(e).strip()[:200] or type(e).__name__)
            while len(self._pending) > self.max_pending:
                self._drop(self._pending.popleft(), f"over {self.max_pending} waiting")
            return False
        self._pending.clear()
        return True
