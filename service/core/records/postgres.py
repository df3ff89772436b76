"""PostgresRecordStore: records as rows in the class store's database, read and written by every replica.

Tables (schema version 3 of service/core/store/postgres.py, which migrates them on start):

    sowa_records        one row per record (the columns of Record; regions as JSON text, tags as ',a,b,')
    sowa_record_blobs   images and thumbnails, content-addressed (digest -> bytes), shared by the records naming them

A batch is one transaction (blobs, then rows, `ON CONFLICT DO NOTHING`): replaying it is harmless. Connection
trouble is a StoreUnavailableError; the recorder keeps the batch in its spool and tries again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool

from ..pg_pool import pooled
from ..store.postgres import migrate, redact
from .figures import PassedPart, ReviewedPart
from .record import COLUMNS, NAMES, Draft, Record
from .store import RecordQuery, Retention, SweepResult, iter_pages

__all__ = ["PostgresRecordStore"]

_SWEEP_STEP = 5000


class PostgresRecordStore:
    kind = "postgresql"

    def __init__(self, url: str, timeout_s: float = 3.0) -> None:
        self.url = url
        conninfo = make_conninfo(url, connect_timeout=max(1, int(timeout_s)), keepalives=1, keepalives_idle=5,
                                 keepalives_interval=2, keepalives_count=2, tcp_user_timeout=10_000,
                                 application_name="sowa-records")
        self.pool = ConnectionPool(conninfo, min_size=1, max_size=3, timeout=timeout_s, open=False,
                                   kwargs={"autocommit": True}, check=ConnectionPool.check_connection,
                                   name="sowa-records")
        self.pool.open(wait=False)
        with self._conn("opening") as conn:
            migrate(conn)

    def __repr__(self) -> str:
        return f"PostgresRecordStore({redact(self.url)})"

    def _conn(self, what: str) -> AbstractContextManager[psycopg.Connection]:
        return pooled(self.pool, "the record store", what, writes=False)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._conn("reading records") as conn:
            return conn.execute(sql, params).fetchall()

    # -- writes ------------------------------------------------------------------------------------------------
    def write(self, drafts: Sequence[Draft]) -> None:
        blobs = {hashlib.sha256(b).hexdigest(): b for d in drafts for b in (d.image, d.thumbnail) if b is not None}
        marks = ", ".join(["%s"] * len(NAMES))
        with self._conn("writing records") as conn, conn.transaction(), conn.cursor() as cur:
            if blobs:
                cur.executemany("INSERT INTO sowa_record_blobs (digest, data) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                                list(blobs.items()))
            cur.executemany(f"INSERT INTO sowa_records ({COLUMNS}) VALUES ({marks}) ON CONFLICT (id) DO NOTHING",
                            [d.record.row() for d in drafts])

    def review(self, record_id: str, verdict: str, note: str | None, by: str, at: float) -> Record | None:
        with self._conn("reviewing a record") as conn:
            row = conn.execute(f"UPDATE sowa_records SET review = %s, review_note = %s, reviewed_by = %s, "
                               f"reviewed_at = %s WHERE id = %s RETURNING {COLUMNS}",
                               (verdict, note, by, at, record_id)).fetchone()
        return None if row is None else Record.from_row(row)

    # -- reads -------------------------------------------------------------------------------------------------
    def get(self, record_id: str) -> Record | None:
        rows = self._read(f"SELECT {COLUMNS} FROM sowa_records WHERE id = %s", (record_id,))
        return Record.from_row(rows[0]) if rows else None

    def query(self, q: RecordQuery) -> list[Record]:
        where, params = q.where("%s")
        rows = self._read(f"SELECT {COLUMNS} FROM sowa_records{where} ORDER BY id DESC LIMIT %s", (*params, q.limit))
        return [Record.from_row(r) for r in rows]

    def iter_records(self, q: RecordQuery, batch: int = 1000) -> Iterator[Record]:
        return iter_pages(self.query, q, batch)

    def _blob(self, record_id: str, column: str) -> bytes | None:
        rows = self._read(f"SELECT b.data FROM sowa_records r JOIN sowa_record_blobs b ON b.digest = r.{column} "
                          "WHERE r.id = %s", (record_id,))
        return bytes(rows[0][0]) if rows else None

    def image(self, record_id: str) -> bytes | None:
        return self._blob(record_id, "image_sha256")

    def thumbnail(self, record_id: str) -> bytes | None:
        return self._blob(record_id, "thumbnail_sha256")

    def reviewed_parts(self, class_name: str, limit: int) -> list[ReviewedPart]:
        rows = self._read("SELECT score, review, revision || '/' || model FROM sowa_records "  # see scored_with
                          "WHERE class_name = %s AND review IS NOT NULL ORDER BY id DESC LIMIT %s", (class_name, limit))
        return [ReviewedPart(s, r == "defective", rev) for s, r, rev in rows]

    def passed_parts(self, class_name: str, limit: int) -> list[PassedPart]:
        rows = self._read("SELECT time, score, revision || '/' || model FROM sowa_records "  # see scored_with
                          "WHERE class_name = %s AND NOT is_anomalous ORDER BY id DESC LIMIT %s", (class_name, limit))
        return [PassedPart(t, s, rev) for t, s, rev in reversed(rows)]

    def stats(self) -> dict[str, int]:
        (n, b), = self._read("SELECT count(*), coalesce(sum(image_bytes) FILTER (WHERE image_sha256 IS NOT NULL), 0) "
                             "FROM sowa_records")
        return {"records": int(n), "image_bytes": int(b)}

    # -- retention ---------------------------------------------------------------------------------------------
    def sweep(self, policy: Retention, now: float) -> SweepResult:
        records = images = 0
        with self._conn("retention") as conn:
            while True:
                (n,), = conn.execute("SELECT count(*) FROM sowa_records").fetchall()
                excess = max(0, n - policy.max_records)
                with conn.transaction():
                    gone = conn.execute(
                        "DELETE FROM sowa_records WHERE id IN (SELECT id FROM sowa_records WHERE time < %s "
                        "UNION ALL (SELECT id FROM sowa_records ORDER BY id LIMIT %s) LIMIT %s) "
                        "RETURNING image_sha256, thumbnail_sha256",
                        (now - policy.max_age_s, excess, _SWEEP_STEP)).fetchall()
                    self._drop_unused(conn, gone)
                records += len(gone)
                if len(gone) < _SWEEP_STEP:
                    break
            while True:
                (total,), = conn.execute("SELECT coalesce(sum(image_bytes), 0) FROM sowa_records "
                                         "WHERE image_sha256 IS NOT NULL").fetchall()
                rows = conn.execute("SELECT id, image_bytes, time FROM sowa_records WHERE image_sha256 IS NOT NULL "
                                    "ORDER BY id LIMIT %s", (_SWEEP_STEP,)).fetchall()
                cut, freed = [], 0
                for rid, size, t in rows:
                    if t >= now - policy.image_max_age_s and total - freed <= policy.image_max_bytes:
                        break
                    cut.append(rid)
                    freed += size
                if not cut:
                    break
                with conn.transaction():
                    gone = conn.execute("UPDATE sowa_records r SET image_sha256 = NULL, thumbnail_sha256 = NULL, "
                                        "image_bytes = 0 FROM (SELECT id, image_sha256, thumbnail_sha256 FROM "
                                        "sowa_records WHERE id = ANY(%s) FOR UPDATE) old WHERE r.id = old.id "
                                        "RETURNING old.image_sha256, old.thumbnail_sha256", (cut,)).fetchall()
                    self._drop_unused(conn, gone)
                images += len(cut)
        return SweepResult(records, images)

    @staticmethod
    def _drop_unused(conn: psycopg.Connection, digests: Sequence[tuple]) -> None:
        found = list({d for row in digests for d in row if d})
        if found:
            conn.execute("DELETE FROM sowa_record_blobs b WHERE b.digest = ANY(%s) AND NOT EXISTS (SELECT 1 FROM "
                         "sowa_records r WHERE r.image_sha256 = b.digest OR r.thumbnail_sha256 = b.digest)", (found,))

    def close(self) -> None:
        self.pool.close()
