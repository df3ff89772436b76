"""SeenVersions: the version (a file signature, a row revision) of each class a store last reported or wrote, so
that `changes()` reports each change by another replica once and never the store's own writes."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

from .base import StoreChanges

__all__ = ["SeenVersions"]

V = TypeVar("V")


class SeenVersions(Generic[V]):
    def __init__(self) -> None:
        self._seen: dict[str, V] = {}
        self._lock = threading.Lock()

    def diff(self, present: Mapping[str, V]) -> StoreChanges:
        """What differs from the versions seen last, which `present` then becomes."""
        with self._lock:
            deleted = tuple(sorted(set(self._seen) - set(present)))
            changed = tuple(sorted(n for n, v in present.items() if n not in self._seen or self._seen[n] != v))
            self._seen = dict(present)
        return StoreChanges(changed, deleted)

    def saw(self, name: str, version: V) -> None:
        """This store wrote `name` at `version`: not a change to report."""
        with self._lock:
            self._seen[name] = version

    def forget(self, names: Iterable[str]) -> None:
        """Seen no more: deleted by this store, or to be reported again as changed (the store's `unsee`)."""
        with self._lock:
            for name in names:
                self._seen.pop(name, None)
