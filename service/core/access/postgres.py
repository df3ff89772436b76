"""PostgresAccessStore: keys and the audit trail as tables in the class store's database (sowa_keys, sowa_audit,
created by its schema migrations), key changes pushed to every replica by NOTIFY on `sowa_keys`.

A listener thread LISTENs on its own connection and tells the KeyRing at once; after a lost connection it tells
it again, so a revocation made meanwhile is picked up as soon as the database is back. A key and its audit event
are one transaction. Trouble reaching the database is a StoreUnavailableError (503 + Retry-After).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from ..errors import KeyExistsError, KeyNotFoundError
from ..pg_pool import listen, pooled
from ..store.postgres import migrate, redact
from .audit import AuditEvent, AuditQuery
from .keys import KeyRecord

__all__ = ["KEYS_CHANNEL", "PostgresAccessStore"]

log = logging.getLogger("sowa.access")
KEYS_CHANNEL = "sowa_keys"


class PostgresAccessStore:
    kind = "postgresql"

    def __init__(self, url: str, timeout_s: float = 3.0, listen: bool = True) -> None:
        self.url, self.timeout_s = url, timeout_s
        self._conninfo = make_conninfo(url, connect_timeout=max(1, int(timeout_s)), keepalives=1,
                                       keepalives_idle=5, keepalives_interval=2, keepalives_count=2,
                                       tcp_user_timeout=10_000)
        self.pool = ConnectionPool(self._conninfo, min_size=1, max_size=2, timeout=timeout_s, open=True,
                                   kwargs={"autocommit": True}, check=ConnectionPool.check_connection,
                                   name="sowa-access")
        self._version = 0  # bumped by every key change this replica makes or hears of
        self._subscribers: list[Callable[[], None]] = []
        self._stop = threading.Event()
        with self._conn("opening") as conn:
            migrate(conn)
        self._listener: threading.Thread | None = None
        if listen:
            self._listening = threading.Event()
            self._listener = threading.Thread(target=self._listen, name="sowa-access-listener", daemon=True)
            self._listener.start()
            self._listening.wait(timeout_s * 3)

    def __repr__(self) -> str:
        return f"PostgresAccessStore({redact(self.url)})"

    def _conn(self, what: str) -> AbstractContextManager[psycopg.Connection]:
        return pooled(self.pool, "the access store", what)

    def _listen(self) -> None:
        listen(self._conninfo, KEYS_CHANNEL, self._stop, self._listening, self._changed,
               "access store: the key-change listener", log)

    def _changed(self) -> None:
        self._version += 1
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:
                log.exception("access store: key-change callback failed")

    # -- keys ----------------------------------------------------------------------------------------------------
    def list_keys(self) -> list[KeyRecord]:
        with self._conn("reading keys") as conn:
            rows = conn.execute(f"SELECT {KeyRecord.COLUMNS} FROM sowa_keys ORDER BY created").fetchall()
        return [KeyRecord.from_row(r) for r in rows]

    def keys_version(self) -> object:
        return self._version

    def subscribe_keys(self, callback: Callable[[], None]) -> bool:
        """Key changes arrive by NOTIFY (`keys_version` only counts them)."""
        self._subscribers.append(callback)
        return True

    def add_key(self, record: KeyRecord, event: AuditEvent) -> None:
        with self._conn(f"key {record.name}") as conn, conn.transaction():
            try:
                conn.execute(f"INSERT INTO sowa_keys ({KeyRecord.COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, "
                             "%s)", record.row())
            except psycopg.errors.UniqueViolation:
                raise KeyExistsError(f"a key named '{record.name}' exists (names are never reused, revoked "
                                     "included); choose another name") from None
            self._insert(conn, [event])
            conn.execute("SELECT pg_notify(%s, %s)", (KEYS_CHANNEL, record.name))
        self._changed()

    def revoke_key(self, name: str, by: str, event: AuditEvent) -> KeyRecord:
        with self._conn(f"revoking key {name}") as conn, conn.transaction():
            row = conn.execute(f"UPDATE sowa_keys SET revoked = %s, revoked_by = %s WHERE name = %s AND revoked IS "
                               f"NULL RETURNING {KeyRecord.COLUMNS}", (event.time, by, name)).fetchone()
            if row is None:
                raise KeyNotFoundError(f"no active key named '{name[:64]}'")
            self._insert(conn, [event])
            conn.execute("SELECT pg_notify(%s, %s)", (KEYS_CHANNEL, name))
        self._changed()
        return KeyRecord.from_row(row)

    # -- audit ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _insert(conn: psycopg.Connection, events: Sequence[AuditEvent]) -> None:
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO sowa_audit ({AuditEvent.COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                            [e.row(Jsonb) for e in events])

    def append(self, events: Sequence[AuditEvent]) -> None:
        if events:
            with self._conn("the audit trail") as conn, conn.transaction():
                self._insert(conn, events)

    def query(self, q: AuditQuery) -> list[AuditEvent]:
        clause, params = q.where("%s")
        with self._conn("reading the audit trail") as conn:
            rows = conn.execute(f"SELECT {AuditEvent.COLUMNS} FROM sowa_audit{clause} "
                                "ORDER BY id DESC LIMIT %s", (*params, q.limit)).fetchall()
        return [AuditEvent.from_row(r) for r in rows]

    def iter_events(self, q: AuditQuery, batch: int = 1000) -> Iterator[AuditEvent]:
        return q.pages(self.query, batch)

    def prune(self, before: float) -> int:
        with self._conn("pruning the audit trail") as conn:
            return conn.execute("DELETE FROM sowa_audit WHERE time < %s", (before,)).rowcount

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self.pool.close()
