"""The audit trail's events: who changed what, when, and what it was before and after.

An event never holds a secret: keys appear by name, stores by kind. Events are appended by the service only (there
is no API to change or delete one); retention removes those older than a setting.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["ACTIONS", "AuditEvent", "AuditQuery", "time_ordered_id"]

# every kind of change the trail records (a test holds that each happens in a scripted sequence)
ACTIONS = ("class.created", "shots.added", "shots.replaced", "threshold.set", "threshold.reset", "class.deleted",
           "key.added", "key.revoked")


@dataclass(frozen=True)
class AuditEvent:
    actor: str  # the key's name (SOWA_API_KEY for the configured one, anonymous when no key is configured)
    action: str  # one of ACTIONS
    target: str  # what changed: a class name, a key name
    before: dict[str, Any] | None = None  # what matters of it before the change (None: it did not exist)
    after: dict[str, Any] | None = None  # and after (None: it is gone)
    time: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: time_ordered_id())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_ordered_id() -> str:
    """A UUIDv7-shaped hex id: time-ordered to the millisecond, so ids sort as events happened (uuid.uuid7
    arrives with Python 3.14)."""
    ms = int(time.time() * 1000)
    rand = uuid.uuid4().int & ((1 << 74) - 1)
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return f"{value:032x}"


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
