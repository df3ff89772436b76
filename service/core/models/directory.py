"""DirectoryModelRepository: model versions as files under the data directory, shared by replicas through the
file system (beside a directory class store).

    models/<fingerprint>/        one bundle: its weight files and sowa.json, as they were added
    models/repository.json       {format_version, versions: {fingerprint: {...}}, state: {...}}
    models/.incoming-<random>/   a bundle being copied in (renamed to its fingerprint once complete)

A version added with `copy=False` (the service's configured `--bundle`, at start-up) is not copied: repository.json
records where it is (`path`), so a large bundle is not on the disk twice; it must stay there to be served again.
    locks/models.lock            the flock every change of repository.json is made under

A bundle is copied to an incoming folder, fsynced and checked there (so what is stored is what was checked, even
if the source changes meanwhile), then renamed into place, and only then listed in repository.json: a crash leaves
a folder nobody lists (replaced by the next add of it) or an incoming one (removed once an hour old), never a
listed version with missing files. repository.json is replaced whole (model.files.atomic_write) under the lock,
read-modify-write, so replicas never lose each other's changes. `state()` is read every second by each replica's
follow loop: it is parsed again only when the file's (mtime_ns, size, inode) changed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from model.files import atomic_write, fsync_dir

from ..errors import ConflictError, ModelNotFoundError, SowaError
from .repository import (
    ModelVersion,
    ServingState,
    bundle_files,
    check_bundle,
    check_label,
    check_state_changes,
    clean_leftovers,
    find_version,
    manifest_of,
    removal_conflict,
)

__all__ = ["FORMAT_VERSION", "DirectoryModelRepository"]

log = logging.getLogger("sowa.models")

FORMAT_VERSION = 1
INDEX = "repository.json"
_INCOMING = ".incoming-"
_TRASH = ".trash-"

Signature = tuple[int, int, int] | None


class DirectoryModelRepository:
    """The `ModelRepository` of one data directory (see the module docstring)."""

    kind = "directory"

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "models"
        self.lock_path = Path(data_dir) / "locks" / "models.lock"
        self._cache: tuple[Signature, dict[str, Any]] = (None, _empty())
        self._cache_lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean()

    # -- reading ----------------------------------------------------------------------------------------------
    def _doc(self) -> dict[str, Any]:
        """repository.json as it is now, parsed again only when the file changed."""
        path = self.root / INDEX
        try:
            st = path.stat()
            sig: Signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            sig = None
        with self._cache_lock:
            if sig is not None and self._cache[0] == sig:
                return self._cache[1]
        doc = self._load()
        with self._cache_lock:
            self._cache = (sig, doc)
        return doc

    def _load(self) -> dict[str, Any]:
        path = self.root / INDEX
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return _empty()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SowaError(f"{path}: unreadable model repository index: {e}") from None
        if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
            raise SowaError(f"{path}: format_version {doc.get('format_version') if isinstance(doc, dict) else None!r}"
                            f" is not supported (this version reads {FORMAT_VERSION})")
        doc.setdefault("versions", {})
        doc.setdefault("state", {})
        return doc

    def _versions(self, doc: dict[str, Any]) -> list[ModelVersion]:
        versions = [_version(fp, v) for fp, v in doc["versions"].items()]
        return sorted(versions, key=lambda v: (v.added, v.fingerprint))

    def list(self) -> list[ModelVersion]:
        return self._versions(self._doc())

    def resolve(self, version: str) -> ModelVersion:
        return find_version(self.list(), version)

    def state(self) -> ServingState:
        return ServingState.from_dict(self._doc()["state"])

    def path(self, fingerprint: str) -> Path:
        entry = self._doc()["versions"].get(fingerprint)
        if entry is None:
            raise ModelNotFoundError(f"no model version {fingerprint[:16]!r}")
        folder = Path(entry["path"]) if entry.get("path") else self.root / fingerprint
        if not folder.is_dir():
            raise SowaError(f"{folder}: the bundle of model {fingerprint[:16]} is missing from the repository")
        return folder

    # -- writing (read-modify-write under the flock) ----------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Hold the lock and yield repository.json freshly read; what the body changes in it is written back."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            doc = self._load()
            before = json.dumps(doc, sort_keys=True)
            yield doc
            text = json.dumps(doc, indent=2, sort_keys=True)
            if json.dumps(doc, sort_keys=True) != before:
                atomic_write(self.root / INDEX, lambda tmp: Path(tmp).write_text(text + "\n"))
        finally:
            os.close(fd)  # releases the flock

    def add(self, bundle_dir: Path, label: str | None, actor: str, verify: bool = True,
            copy: bool = True) -> ModelVersion:
        """See `ModelRepository.add`; `copy=False` records the bundle where it is instead of copying it."""
        check_label(label)
        bundle_dir = Path(bundle_dir)
        info = manifest_of(bundle_dir)
        fp = info.fingerprint
        existing = self._doc()["versions"]
        if fp in existing:
            return self._relabel(fp, label)
        self._label_free(existing, label, fp)
        if not copy:
            checked, size = check_bundle(bundle_dir, verify)
            with self._locked() as doc:
                if fp not in doc["versions"]:
                    self._label_free(doc["versions"], label, fp)
                    v = ModelVersion.from_info(checked, label, time.time(), actor, size)
                    doc["versions"][fp] = {**_entry(v), "path": str(bundle_dir.resolve())}
                    log.info("models: added %s (%s, %d px) by %s, where it is", v.version, fp[:16], v.image_size,
                             actor)
                    return v
            return self._relabel(fp, label)
        incoming = self.root / f"{_INCOMING}{uuid.uuid4().hex}"
        try:
            incoming.mkdir()
            for name in bundle_files(info):
                shutil.copyfile(bundle_dir / name, incoming / name)
                with open(incoming / name, "rb+") as f:
                    os.fsync(f.fileno())
            fsync_dir(incoming)
            copied, size = check_bundle(incoming, verify)  # what is stored is what was checked
            if copied.fingerprint != fp:
                raise ConflictError(f"{bundle_dir}: the bundle changed while it was added; add it again")
            with self._locked() as doc:
                if fp in doc["versions"]:  # another replica added it meanwhile
                    shutil.rmtree(incoming, ignore_errors=True)
                else:
                    self._label_free(doc["versions"], label, fp)
                    folder = self.root / fp
                    if folder.exists():  # a crash left it unlisted: this copy replaces it
                        self._trash(folder)
                    os.replace(incoming, folder)
                    fsync_dir(self.root)
                    v = ModelVersion.from_info(copied, label, time.time(), actor, size)
                    doc["versions"][fp] = _entry(v)
                    log.info("models: added %s (%s, %d px) by %s", v.version, fp[:16], v.image_size, actor)
                    return v
        finally:
            if incoming.exists():
                shutil.rmtree(incoming, ignore_errors=True)
        return self._relabel(fp, label)

    def _relabel(self, fp: str, label: str | None) -> ModelVersion:
        """The stored version of `fp`, given `label` when one is asked for."""
        with self._locked() as doc:
            entry = doc["versions"].get(fp)
            if entry is None:
                raise ModelNotFoundError(f"model version {fp[:16]} was removed while it was added; add it again")
            if label is not None and entry.get("label") != label:
                self._label_free(doc["versions"], label, fp)
                entry["label"] = label
            return _version(fp, entry)

    @staticmethod
    def _label_free(versions: dict[str, Any], label: str | None, fp: str) -> None:
        if label is None:
            return
        for other, entry in versions.items():
            if other != fp and entry.get("label") == label:
                raise ConflictError(f"model label {label!r} is taken by version {other[:16]}")

    def remove(self, fingerprint: str) -> bool:
        with self._locked() as doc:
            entry = doc["versions"].get(fingerprint)
            if entry is None:
                return False
            state = ServingState.from_dict(doc["state"])
            removal_conflict(state, fingerprint, entry.get("label") or fingerprint[:16])
            del doc["versions"][fingerprint]
            if state.previous == fingerprint:  # nothing to roll back to any more
                doc["state"] = {**state.to_dict(), "previous": None, "revision": state.revision + 1}
        folder = self.root / fingerprint
        if folder.exists():
            self._trash(folder)
        return True

    def set_state(self, expect_revision: int | None = None, **changes: Any) -> ServingState:
        with self._locked() as doc:
            state = check_state_changes(ServingState.from_dict(doc["state"]), set(doc["versions"]), expect_revision,
                                        changes)
            doc["state"] = state.to_dict()
        return state

    def subscribe(self, callback: Callable[[], None]) -> bool:
        return False  # nothing pushed: replicas look at the cached state every sync interval

    def close(self) -> None:
        """Nothing held open between calls."""

    # -- upkeep -----------------------------------------------------------------------------------------------
    def _trash(self, folder: Path) -> None:
        """Remove a bundle folder: renamed away first (atomic), then deleted."""
        trash = self.root / f"{_TRASH}{uuid.uuid4().hex}"
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _clean(self) -> None:
        """Remove what a crash left: interrupted removals, and copies in an add that stopped long ago."""
        clean_leftovers(self.root)


def _empty() -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "versions": {}, "state": ServingState().to_dict()}


def _version(fp: str, entry: dict[str, Any]) -> ModelVersion:
    return ModelVersion(**{k: v for k, v in entry.items() if k in _FIELDS}, fingerprint=fp)


_FIELDS = {f.name for f in fields(ModelVersion)} - {"fingerprint"}


def _entry(v: ModelVersion) -> dict[str, Any]:
    return {k: val for k, val in v.public().items() if k not in ("fingerprint", "version")}
