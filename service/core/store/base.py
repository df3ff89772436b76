"""ClassStore: what the registry needs from persistence, and nothing about how a backend keeps it.

The registry holds classes in memory and decides what to fit; a store keeps their records durable and shared
between replicas: a directory (`directory.py`) or PostgreSQL (`postgres.py`: rows, advisory locks, LISTEN/NOTIFY
for changes). Both implement every member of `ClassStore`, each a no-op where a backend has nothing to do, so
callers never probe for one. All methods are blocking: the registry calls them on worker threads. Names are
checked by the registry first, and again by every store: a name never reaches a path or a query unchecked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar, Protocol

from model.inference import ClassMemory

__all__ = ["ClassRecord", "ClassStore", "StoreChanges", "checked_shot"]


def checked_shot(data: bytes, digest: str) -> bytes:
    """A stored shot's bytes, once they match the content hash they are stored under (ValueError if not)."""
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"shot {digest[:12]} does not match its hash")
    return data


@dataclass(frozen=True)
class ClassRecord:
    """One class as stored, as one model sees it: its manifest, and that model's memory (bank and calibration)
    when it is stored and usable, and that model's threshold override. Banks and overrides are per model (bundle
    fingerprint): models served one after another each keep theirs (service/core/models/)."""

    name: str
    shots: tuple[str, ...]  # sha256 of each shot's PNG bytes, in registration order
    memory: ClassMemory | None  # None when read without a fingerprint, or none stored for it, or damaged
    threshold_override: float | None  # the model's own override (None: its calibrated threshold holds)
    created: float
    updated: float
    bundle_fingerprint: str  # the bundle `memory` was computed with ("" when there is no memory)
    models: tuple[str, ...] = ()  # the fingerprints holding a bank fitted on these shots


@dataclass(frozen=True)
class StoreChanges:
    """Classes written or removed (by any replica) since the store last reported."""

    changed: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()


class ClassStore(Protocol):
    """What the registry, the runtime and telemetry use of a store. Not runtime-checkable: an isinstance check
    would compare names only (tests/service/core/test_store.py compares signatures and behaviour instead)."""

    kind: ClassVar[str]  # "directory" or "postgresql", as /readyz names it
    error: str | None  # why the store cannot be reached now (None while it can, always for a directory)
    reconnects: int  # times the store came back after a loss (0 for a directory)
    notifications: int  # changes other replicas pushed (0 for a store that does not push)

    def recover(self) -> dict[str, str]:
        """At start: finish what a crash interrupted (an interrupted delete); return stored entries that cannot be
        classes, with the reason (they are refused, never served)."""
        ...

    def sweep(self) -> int:
        """`recover`'s clean-up while serving, for classes nobody is writing; the sync loop calls it now and then.
        The number of classes it cleaned (0 for a store whose writes leave nothing behind)."""
        ...

    def subscribe(self, callback: Callable[[], None]) -> bool:
        """Have `callback` called (on any thread) whenever another replica changed something. False when this
        store cannot push changes: the caller then looks at `changes()` every so often instead."""
        ...

    def changes(self) -> StoreChanges:
        """What changed since the last call; the first call reports every class, as changed. The store's own
        writes and deletes are not reported back, and each change is reported once."""
        ...

    def unsee(self, names: Iterable[str]) -> None:
        """Report these classes again, as changed, at the next `changes()`: the caller could not act on them
        (the store went away while it read them)."""
        ...

    def read(self, name: str, fingerprint: str | None) -> ClassRecord | None:
        """The class's record, or None when there is none. Its memory is loaded only when it was computed with
        bundle `fingerprint` and is intact. ValueError when the record itself is damaged."""
        ...

    def read_shot(self, name: str, digest: str) -> bytes:
        """A stored shot's PNG bytes, checked against its hash (ValueError when they do not match)."""
        ...

    def write(self, record: ClassRecord, shots: Mapping[str, bytes]) -> None:
        """Store a class atomically: the new shots (digest -> PNG bytes), then the memory and threshold override of
        model `record.bundle_fingerprint`, then the manifest. A crash at any point leaves the old record or the new
        one. Shots the record no longer names go; with other shots than before, other models' banks go too (their
        threshold overrides stay); with the same shots, they stay."""
        ...

    def write_bank(self, name: str, fingerprint: str, memory: ClassMemory, shots: tuple[str, ...]) -> bool:
        """Store one more model's bank for a class whose stored shots are `shots` (the caller holds its lock), its
        override untouched; False, nothing written, when the class is gone or its shots changed."""
        ...

    def drop_model(self, fingerprint: str) -> int:
        """Remove one model's banks from every class (their overrides stay); how many classes had one."""
        ...

    def delete(self, name: str) -> bool:
        """Remove a class at once (False when there was none)."""
        ...

    def lock(self, name: str) -> AbstractContextManager[None]:
        """Mutual exclusion per class across every replica sharing this store: held for read-modify-write."""
        ...

    def close(self) -> None:
        """Release what the store holds open (connections, threads); later calls fail. Idempotent."""
        ...
