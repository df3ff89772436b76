"""RecordStore: where inspection records persist, behind one small interface with two backends.

`SqliteRecordStore` (sqlite.py) beside the directory class store: one SQLite database in the records directory (WAL
mode) and content-addressed image files. `PostgresRecordStore` (postgres.py) beside the PostgreSQL class store:
tables in the same database (schema version 3 of service/core/store/postgres.py), images as rows, readable by
every replica. All methods block (callers use worker threads). Writes are idempotent by record id, so the spool
may replay a batch after a crash without doubling anything.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import UnprocessableError
from .figures import PassedPart, ReviewedPart
from .record import Draft, Record

__all__ = ["RecordQuery", "RecordStore", "Retention", "SweepResult"]

MAX_PAGE = 1000


@dataclass(frozen=True)
class RecordQuery:
    """Filters of GET /records; every one optional. Newest first; `before` is the keyset cursor (the last id of
    the previous page)."""

    class_name: str | None = None
    since: float | None = None  # time >= since (Unix seconds)
    until: float | None = None  # time < until
    verdict: str | None = None  # "pass" | "fail"
    part_id: str | None = None
    station: str | None = None
    tag: str | None = None
    reviewed: bool | None = None
    review: str | None = None  # "good" | "defective"
    before: str | None = None  # ids below this one
    limit: int = 100

    def __post_init__(self) -> None:
        if self.verdict not in (None, "pass", "fail"):
            raise UnprocessableError(f"verdict must be pass or fail, not {self.verdict!r}")
        if not 1 <= self.limit <= 100_000:
            raise UnprocessableError(f"limit must be 1..100000, got {self.limit}")

    def where(self, mark: str) -> tuple[str, list[Any]]:
        """The SQL condition (with ` WHERE ` in front, or empty) and its parameters; `mark` is the driver's
        placeholder ('?' or '%s'). Tags are stored as ',a,b,', so a tag is a substring test for ',tag,'."""
        terms: list[str] = []
        params: list[Any] = []
        for column, value in (("class_name", self.class_name), ("part_id", self.part_id),
                              ("station", self.station), ("review", self.review)):
            if value is not None:
                terms.append(f"{column} = {mark}")
                params.append(value)
        if self.since is not None:
            terms.append(f"time >= {mark}")
            params.append(self.since)
        if self.until is not None:
            terms.append(f"time < {mark}")
            params.append(self.until)
        if self.verdict is not None:
            terms.append(f"is_anomalous = {mark}")
            params.append(self.verdict == "fail")
        if self.reviewed is not None:
            terms.append("review IS NOT NULL" if self.reviewed else "review IS NULL")
        if self.tag is not None:
            terms.append(f"strpos(tags, {mark}) > 0")  # PostgreSQL's; the SQLite store defines it
            params.append(f",{self.tag},")
        if self.before is not None:
            terms.append(f"id < {mark}")
            params.append(self.before)
        return (" WHERE " + " AND ".join(terms) if terms else ""), params

    def matches(self, r: Record) -> bool:
        """The same filter in Python: for records still in the spool (service/core/records/recorder.py)."""
        return ((self.class_name is None or r.class_name == self.class_name)
                and (self.part_id is None or r.part_id == self.part_id)
                and (self.station is None or r.station == self.station)
                and (self.review is None or r.review == self.review)
                and (self.since is None or r.time >= self.since) and (self.until is None or r.time < self.until)
                and (self.verdict is None or r.verdict == self.verdict)
                and (self.reviewed is None or (r.review is not None) == self.reviewed)
                and (self.tag is None or self.tag in r.tags) and (self.before is None or r.id < self.before))


@dataclass(frozen=True)
class Retention:
    """How long records last. Numbers: `max_age_s` and `max_records` (the oldest go first). Images (upload and
    thumbnail): `image_max_age_s` and `image_max_bytes` (the oldest first); a record whose image goes keeps its
    numbers."""

    max_age_s: float
    max_records: int
    image_max_age_s: float
    image_max_bytes: int


@dataclass(frozen=True)
class SweepResult:
    records_removed: int = 0
    images_removed: int = 0


class RecordStore(Protocol):
    kind: str  # "sqlite" or "postgresql"

    def write(self, drafts: Sequence[Draft]) -> None:
        """Store records with their images (ids given) in one transaction, images first; a record whose id is
        stored already is left as it is. Raises on any failure, having committed nothing."""
        ...

    def get(self, record_id: str) -> Record | None: ...

    def query(self, q: RecordQuery) -> list[Record]:
        """Records matching `q`, newest first, at most `q.limit`."""
        ...

    def iter_records(self, q: RecordQuery, batch: int = 1000) -> Iterator[Record]:
        """Every record matching `q` (its limit ignored), newest first, read `batch` at a time (exports)."""
        ...

    def image(self, record_id: str) -> bytes | None:
        """The upload as sent, when it is kept."""
        ...

    def thumbnail(self, record_id: str) -> bytes | None: ...

    def review(self, record_id: str, verdict: str, note: str | None, by: str, at: float) -> Record | None:
        """Record a review (replacing an earlier one); the record as it is now, None when there is none."""
        ...

    def reviewed_parts(self, class_name: str, limit: int) -> Sequence[ReviewedPart]:
        """The class's newest `limit` reviewed records (figures.RecordReads)."""
        ...

    def passed_parts(self, class_name: str, limit: int) -> Sequence[PassedPart]:
        """The class's newest `limit` passed records, oldest first (figures.RecordReads)."""
        ...

    def sweep(self, policy: Retention, now: float) -> SweepResult:
        """Enforce `policy` (in bounded steps, each its own transaction: serving goes on meanwhile)."""
        ...

    def stats(self) -> dict[str, int]:
        """{"records": n, "image_bytes": b}: what retention bounds."""
        ...

    def close(self) -> None: ...


def iter_pages(query: Any, q: RecordQuery, batch: int) -> Iterator[Record]:
    """Every record of `q` through `query` (a store's), `batch` at a time by keyset: bounded memory."""
    from dataclasses import replace

    page = replace(q, limit=min(batch, MAX_PAGE))
    while True:
        rows = query(page)
        yield from rows
        if len(rows) < page.limit:
            return
        page = replace(page, before=rows[-1].id)
