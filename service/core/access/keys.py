"""API keys: made once, stored hashed, looked up in constant time, revoked everywhere within a second.

A key reads `sowa_<id>_<secret>`: the id (public, 8 bytes of hex) finds the stored record, whose SHA-256 of the
secret is compared in constant time. The secret is 32 random bytes, so a plain hash is enough (no password
stretching: nothing about it can be guessed), and it is shown once, when the key is made. `KeyRing` keeps the
active keys in memory and reloads them when the store says they changed: pushed by PostgreSQL, or seen in
SQLite's data version, looked at no more often than every `recheck_s`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from .roles import LEGACY_KEY_NAME, Principal, Role

__all__ = ["KEY_NAME", "KeyRecord", "KeyRing", "new_key", "parse_key"]

KEY_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")  # a key's name: what the audit trail shows
RESERVED_NAMES = frozenset({"anonymous"})  # what the audit trail calls an open service's callers
log = logging.getLogger("sowa.access")
_KEY = re.compile(r"^sowa_([0-9a-f]{16})_([A-Za-z0-9_\-]{43})$")


@dataclass(frozen=True)
class KeyRecord:
    """A key as stored: never its secret, only the secret's hash."""

    name: str
    key_id: str
    secret_sha256: str
    role: Role
    classes: str | None  # a class-name pattern, or None for all classes
    created: float
    created_by: str
    revoked: float | None = None
    revoked_by: str | None = None

    # the stores' column order (sqlite.py, postgres.py): a row is the fields in this order
    COLUMNS: ClassVar[str] = "name, key_id, secret_sha256, role, classes, created, created_by, revoked, revoked_by"

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> KeyRecord:
        return cls(row[0], row[1], row[2], Role(row[3]), *row[4:])

    def row(self) -> tuple[Any, ...]:
        return (self.name, self.key_id, self.secret_sha256, self.role.value, self.classes, self.created,
                self.created_by, self.revoked, self.revoked_by)

    @property
    def principal(self) -> Principal:
        return Principal(self.name, self.role, self.classes)

    def public(self) -> dict[str, object]:
        """What listing a key shows (no hash either)."""
        return {"name": self.name, "role": self.role.value, "classes": self.classes, "created": self.created,
                "created_by": self.created_by, "revoked": self.revoked, "revoked_by": self.revoked_by}


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(name: str, role: Role, classes: str | None, created_by: str) -> tuple[str, KeyRecord]:
    """A fresh key: the text to hand out (shown once) and the record to store."""
    if name in RESERVED_NAMES:
        raise ValueError(f"key name {name!r} is reserved: the audit trail uses it for callers without a key")
    if not KEY_NAME.match(name):
        raise ValueError(f"key name {name[:80]!r}: use 1-64 of a-z, 0-9, '_', '.', '-', starting with a letter "
                         "or digit")
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    return (f"sowa_{key_id}_{secret}",
            KeyRecord(name, key_id, _sha256(secret), role, classes, time.time(), created_by))


def parse_key(text: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    m = _KEY.match(text)
    return (m.group(1), m.group(2)) if m else None


class KeySource(Protocol):
    """What a KeyRing reads of an KeySource (store.py)."""

    def list_keys(self) -> list[KeyRecord]: ...

    def keys_version(self) -> object: ...

    def subscribe_keys(self, callback: Callable[[], None]) -> bool: ...


class KeyRing:
    """The keys a request may present: the stored active ones, and the configured `SOWA_API_KEY` (an admin).

    `authenticate` runs on the event loop and never waits on the store: it reads the snapshot in memory. A
    change is loaded off the loop: at once in the thread that made it (a store's own writes) or heard of it (a
    PostgreSQL push), or, for a store without push (SQLite), in a thread started when the store's version is seen
    to move, looked at no more often than every `recheck_s`. A reload that fails keeps the previous snapshot and
    is tried again."""

    def __init__(self, legacy_key: str | None = None, recheck_s: float = 0.25) -> None:
        self.store: KeySource | None = None
        self.recheck_s = recheck_s
        self._legacy = legacy_key.encode() if legacy_key else None
        self._by_id: dict[str, KeyRecord] = {}
        self._any_stored = False  # revoked keys count: revoking the last one must not open the service
        self._version: object = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._reloading = threading.Event()
        self._pushed = False  # other processes' changes arrive through the store's callback: no polling

    def attach(self, store: KeySource) -> None:
        """Take keys from `store` from now on (blocking: call from a worker thread)."""
        self._pushed = store.subscribe_keys(self.invalidate)
        self.reload(store)
        self.store = store

    @property
    def loaded(self) -> bool:
        """Whether the stored keys are known: until then no request but the open ones can be answered."""
        return self.store is not None

    @property
    def required(self) -> bool:
        """Whether requests must carry a key: one is configured, or a key was ever stored (revoked ones too)."""
        self._refresh()
        return self._legacy is not None or self._any_stored

    def invalidate(self) -> None:
        """The store says keys changed: load them in this (the caller's) thread."""
        self._reload_safely()

    def reload(self, store: KeySource | None = None) -> None:
        store = store or self.store
        if store is None:
            return
        with self._lock:
            version = store.keys_version()
            records = store.list_keys()
            self._by_id = {k.key_id: k for k in records if k.revoked is None}
            self._any_stored = bool(records)
            self._version, self._checked = version, time.monotonic()

    def _reload_safely(self) -> None:
        try:
            self.reload()
        except Exception:  # the store unreachable: keep the snapshot, look again at the next change or check
            log.exception("keys: reload failed; serving the keys loaded before")
            self._version = None
        finally:
            self._reloading.clear()

    def _refresh(self) -> None:
        store = self.store
        if store is None or self._pushed or time.monotonic() - self._checked < self.recheck_s:
            return
        self._checked = time.monotonic()
        if self._reloading.is_set():
            return
        try:
            moved = self._version is None or store.keys_version() != self._version
        except Exception:
            log.exception("keys: the store's version could not be read")
            return
        if moved:
            self._reloading.set()
            threading.Thread(target=self._reload_safely, name="sowa-keys-reload", daemon=True).start()

    def authenticate(self, presented: str) -> Principal | None:
        """The principal a presented key stands for, or None (unknown, malformed or revoked)."""
        self._refresh()
        if self._legacy is not None and hmac.compare_digest(presented.encode(), self._legacy):
            return Principal(LEGACY_KEY_NAME, Role.ADMIN)
        parsed = parse_key(presented)
        if parsed is None:
            return None
        record = self._by_id.get(parsed[0])
        if record is None or not hmac.compare_digest(_sha256(parsed[1]), record.secret_sha256):
            return None
        return record.principal
