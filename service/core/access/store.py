"""AccessStore: where keys and the audit trail persist, beside the classes and shared by the same replicas.

`SqliteAccessStore` (sqlite.py) for the directory class store: one SQLite database in the data directory, in WAL
mode, which replicas sharing the directory share too. `PostgresAccessStore` (postgres.py) for the PostgreSQL class
store: tables in the same database (created by its schema migrations), key changes pushed by NOTIFY. All methods
block: the service calls them on worker threads, except `keys_version`, cheap enough for the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from .audit import AuditEvent, AuditQuery
from .keys import KeyRecord

__all__ = ["AccessStore", "open_access"]


class AccessStore(Protocol):
    kind: str  # "sqlite" or "postgresql"

    def list_keys(self) -> list[KeyRecord]:
        """Every key, revoked ones included, oldest first."""
        ...

    def keys_version(self) -> object:
        """Changes whenever a key is added or revoked, by any replica (compared, never read)."""
        ...

    def subscribe_keys(self, callback: Callable[[], None]) -> bool:
        """Call `callback` when a key changes: at once for this store's own writes, and for other replicas' where
        the store pushes them (PostgreSQL). Whether it does (if not, `keys_version` is to be polled), as
        `ClassStore.subscribe` answers."""
        ...

    def add_key(self, record: KeyRecord, event: AuditEvent) -> None:
        """Store a new key and its audit event together; KeyExistsError if the name is taken (revoked included)."""
        ...

    def revoke_key(self, name: str, by: str, event: AuditEvent) -> KeyRecord:
        """Mark a key revoked, with its audit event; KeyNotFoundError for an unknown or already revoked name."""
        ...

    def append(self, events: Sequence[AuditEvent]) -> None:
        """Append audit events (durable when this returns)."""
        ...

    def query(self, q: AuditQuery) -> list[AuditEvent]:
        """Events matching `q`, newest first, at most `q.limit`."""
        ...

    def iter_events(self, q: AuditQuery, batch: int = 1000) -> Iterator[AuditEvent]:
        """Every event matching `q` (its limit ignored), newest first, read `batch` at a time (exports)."""
        ...

    def prune(self, before: float) -> int:
        """Remove events older than `before` (retention); how many."""
        ...

    def close(self) -> None: ...


def open_access(store_url: str) -> AccessStore:
    """The access store beside the class store at `store_url` (a directory, file://DIR or postgresql://...)."""
    from ..store.open import directory_of, is_postgres_url

    if is_postgres_url(store_url):
        from .postgres import PostgresAccessStore

        return PostgresAccessStore(store_url)
    from .sqlite import SqliteAccessStore

    return SqliteAccessStore(Path(directory_of(store_url)) / "access.sqlite3")
