"""SqliteAccessStore: keys and the audit trail in one SQLite database in the data directory (WAL mode).

Replicas sharing the data directory share the database: SQLite locks it for each write, and `PRAGMA data_version`
tells a connection that another one committed, which is how a revocation reaches every replica (KeyRing looks
at it at most every quarter second). A key and its audit event are written in one transaction. A full disk is
an `InsufficientStorageError` (507) and leaves nothing half-written: the transaction rolls back.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import InsufficientStorageError, KeyExistsError, KeyNotFoundError, StoreUnavailableError
from ..sqlite_schema import migrate
from .audit import AuditEvent, AuditQuery
from .keys import KeyRecord

__all__ = ["SCHEMA_VERSION", "SqliteAccessStore"]

# version -> statements bringing the schema from version-1 to it; append, never edit a released one
MIGRATIONS = {
    1: """
        CREATE TABLE keys (
            name TEXT PRIMARY KEY, key_id TEXT NOT NULL UNIQUE, secret_sha256 TEXT NOT NULL, role TEXT NOT NULL,
            classes TEXT, created REAL NOT NULL, created_by TEXT NOT NULL, revoked REAL, revoked_by TEXT
        );
        CREATE TABLE audit (
            id TEXT PRIMARY KEY, time REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
            target TEXT NOT NULL, before TEXT, after TEXT
        );
        CREATE INDEX audit_time ON audit (time);
    """,
}
SCHEMA_VERSION = max(MIGRATIONS)
class SqliteAccessStore:
    kind = "sqlite"

    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one connection, used under a lock: every call is short, and data_version is per connection
        self._db = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        # data_version on a connection of its own: reading it never waits behind a write holding `_lock`, and
        # it moves with every commit of any other connection, this store's writes included
        self._version_db = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False,
                                           isolation_level=None)
        self._version_lock = threading.Lock()
        self._subscribers: list[Callable[[], None]] = []
        with self._guard("opening"):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a returned write survives a power loss
            migrate(self._db, MIGRATIONS, str(self.path))

    @contextmanager
    def _guard(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.OperationalError as e:
                text = str(e)
                if "full" in text or "disk I/O" in text:
                    raise InsufficientStorageError(f"the access store could not record {what}: the disk is full; "
                                                   "nothing was changed") from None
                if "locked" in text or "busy" in text:
                    raise StoreUnavailableError(f"the access store is busy ({what}); nothing was changed, try "
                                                "again", headers={"Retry-After": "1"}) from None
                raise

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._guard(what) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (a full disk, an I/O error)
                    db.execute("ROLLBACK")
                raise


    # -- keys ----------------------------------------------------------------------------------------------------
    def list_keys(self) -> list[KeyRecord]:
        with self._guard("reading keys") as db:
            rows = db.execute(f"SELECT {KeyRecord.COLUMNS} FROM keys ORDER BY created").fetchall()
        return [KeyRecord.from_row(r) for r in rows]

    def keys_version(self) -> object:
        with self._version_lock:
            return self._version_db.execute("PRAGMA data_version").fetchone()[0]

    def subscribe_keys(self, callback: Callable[[], None]) -> bool:
        """Told of this store's own key changes at once; other processes' show in `keys_version` (no push)."""
        self._subscribers.append(callback)
        return False

    def _changed(self) -> None:
        for callback in list(self._subscribers):
            callback()

    def add_key(self, record: KeyRecord, event: AuditEvent) -> None:
        with self._transaction(f"key {record.name}") as db:
            if db.execute("SELECT 1 FROM keys WHERE name = ?", (record.name,)).fetchone():
                raise KeyExistsError(f"a key named '{record.name}' exists (names are never reused, revoked "
                                     "included); choose another name")
            db.execute(f"INSERT INTO keys ({KeyRecord.COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", record.row())
            self._insert(db, [event])
        self._changed()

    def revoke_key(self, name: str, by: str, event: AuditEvent) -> KeyRecord:
        with self._transaction(f"revoking key {name}") as db:
            row = db.execute(f"SELECT {KeyRecord.COLUMNS} FROM keys WHERE name = ? AND revoked IS NULL",
                             (name,)).fetchone()
            if row is None:
                raise KeyNotFoundError(f"no active key named '{name[:64]}'")
            db.execute("UPDATE keys SET revoked = ?, revoked_by = ? WHERE name = ?", (event.time, by, name))
            self._insert(db, [event])
        self._changed()
        return KeyRecord.from_row(row)

    # -- audit ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _insert(db: sqlite3.Connection, events: Sequence[AuditEvent]) -> None:
        db.executemany(f"INSERT INTO audit ({AuditEvent.COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       [e.row(json.dumps) for e in events])

    def append(self, events: Sequence[AuditEvent]) -> None:
        if events:
            with self._transaction("the audit trail") as db:
                self._insert(db, events)

    def query(self, q: AuditQuery) -> list[AuditEvent]:
        clause, params = q.where("?")
        with self._guard("reading the audit trail") as db:
            rows = db.execute(f"SELECT {AuditEvent.COLUMNS} FROM audit{clause} "
                              "ORDER BY id DESC LIMIT ?", (*params, q.limit)).fetchall()
        return [AuditEvent.from_row(r) for r in rows]

    def iter_events(self, q: AuditQuery, batch: int = 1000) -> Iterator[AuditEvent]:
        return q.pages(self.query, batch)

    def prune(self, before: float) -> int:
        with self._transaction("pruning the audit trail") as db:
            return db.execute("DELETE FROM audit WHERE time < ?", (before,)).rowcount

    def close(self) -> None:
        with self._lock, self._version_lock:
            self._db.close()
            self._version_db.close()
