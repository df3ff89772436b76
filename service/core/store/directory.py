"""DirectoryStore: classes as files under `data_dir`, shared by replicas through the file system.

Layout (FORMAT_VERSION 2):

    classes/<name>/class.json          name, shot hashes, times, and per model (bundle fingerprint): its bank's hash
                                       and calibration, its threshold override
    classes/<name>/shots/<sha256>.png  each shot as decoded RGB (lossless), so banks can be rebuilt for any bundle
    classes/<name>/banks/<sha256>.safetensors
                                       one bank's features (S, K*L, D), named by their content's hash; one per model
                                       that served the class with its current shots
    classes/.generation                a random token, replaced after every write and delete: the change marker
    locks/<name>.lock                  the per-class flock replicas take turns on; removed, under the lock, once
                                       the class is gone (a lock is taken on the file the path names at the time)

A version-1 folder (one `bank.safetensors` and one fingerprint in class.json) reads as a class with that one
model's bank, and is written as version 2 at its next change.

Every file is written to a temporary name, fsynced and renamed; class.json goes last, so a crash at any point
leaves either the old class or the new one: a bank file is new (content-addressed) and only class.json names it.
Deletes rename the folder away first (atomic), then remove it. Changes are found by a stat of every class.json
(written last, so a changed one means a complete class), but only when the change marker moved since the last
look, or `rescan_s` passed (a writer that does not replace the marker: an older release, a hand edit): an idle look
is one read of one small file, however many classes there are. The marker is read before the scan and replaced
after the write, so a change is never missed between the two.

A write that fails (a full disk) removes what it wrote: the shots and bank file it added, the folder of a first
registration. What a crash leaves instead (temporary files, bank files class.json does not name, a first
registration's folder without class.json: never a class, its 2xx was never sent) is removed at start-up by
`recover`, under each class's lock, and logged; while serving, `sweep` does the same for classes whose lock is free.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save

from model.calibration import Calibration
from model.files import atomic_write, fsync_dir, sha256_file
from model.inference import ClassMemory
from model.memory_bank import MemoryBank

from ..class_names import is_class_name
from .base import ClassRecord, StoreChanges, checked_shot
from .seen import SeenVersions

__all__ = ["FORMAT_VERSION", "DirectoryStore"]

log = logging.getLogger("sowa.registry")

FORMAT_VERSION = 2
_KEPT_BANK = ".bank.safetensors.kept"  # version 1: the previous bank while a write replaced it
_LEGACY_BANK = "bank.safetensors"  # version 1: the one bank
Signature = tuple[int, int, int] | None
_MARKER = ".generation"


def _signature(path: Path) -> Signature:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class DirectoryStore:
    """The `ClassStore` of one data directory (see the module docstring for its layout)."""

    kind = "directory"
    error: str | None = None  # a local directory is never unreachable: its failures are each call's own
    reconnects = 0
    notifications = 0  # nothing is pushed: the sync loop looks every sync_interval_s

    def __init__(self, data_dir: Path, rescan_s: float = 60.0) -> None:
        self.root = Path(data_dir) / "classes"
        self.locks = Path(data_dir) / "locks"
        self.rescan_s = rescan_s
        self._seen: SeenVersions[Signature] = SeenVersions()  # class.json signatures as last reported or written
        self._marker: bytes | None = None  # the change marker as the last scan found it (None: scan next time)
        self._next_scan = 0.0

    def close(self) -> None:
        """Nothing held open between calls."""

    def subscribe(self, callback: Callable[[], None]) -> bool:
        return False  # a file system pushes nothing portable (inotify misses other hosts' NFS writes)

    def _folder(self, name: str) -> Path:
        if not is_class_name(name):  # checked again here: a name never becomes a path unchecked
            raise ValueError(f"invalid class name {name[:80]!r}")
        return self.root / name

    # -- start-up and change detection ------------------------------------------------------------------------
    def recover(self) -> dict[str, str]:
        self.root.mkdir(parents=True, exist_ok=True)
        refused = {}
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".trash-"):
                log.warning("removing %s: a delete interrupted by a crash", folder.name)
                shutil.rmtree(folder, ignore_errors=True)
            elif not folder.is_dir():
                continue
            elif not is_class_name(folder.name):
                refused[folder.name] = "directory name is not a valid class name"
            else:
                with self.lock(folder.name):  # a replica writing this class now finishes first
                    self._recover_class(folder)
        return refused

    def sweep(self) -> int:
        """`recover`'s clean-up while serving, for classes nobody is writing (their lock is free right now): what
        a crashed replica left goes without a restart, and so do lock files of classes that are gone (left by
        an older release, or a delete without the lock). The sync loop calls it now and then; returns the number
        of class folders it cleaned."""
        cleaned = 0
        if not self.root.is_dir():
            return 0
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".trash-"):
                shutil.rmtree(folder, ignore_errors=True)  # a delete's own rmtree may be at it too: either wins
                continue
            if not (is_class_name(folder.name) and _leftovers(folder)):
                continue
            with self._try_lock(folder.name) as locked:
                if locked and _leftovers(folder):
                    self._recover_class(folder)
                    cleaned += 1
        if self.locks.is_dir():
            for lock in self.locks.glob("*.lock"):
                if is_class_name(lock.stem) and not (self.root / lock.stem).exists():
                    with self._try_lock(lock.stem):
                        pass  # released with its class gone: the file goes (see `_flock`)
        return cleaned

    @contextmanager
    def _try_lock(self, name: str) -> Iterator[bool]:
        with self._flock(name, blocking=False) as locked:
            yield locked

    def _recover_class(self, folder: Path) -> None:
        """Remove what a crash in `write` left in one class folder (the caller holds its lock)."""
        if not (folder / "class.json").is_file():
            log.warning("class %s: removing its folder, a first registration interrupted before its class.json "
                        "(%d files)", folder.name, sum(1 for p in folder.rglob("*") if p.is_file()))
            shutil.rmtree(folder, ignore_errors=True)
            fsync_dir(self.root)
            return
        kept = folder / _KEPT_BANK
        if kept.is_file():
            bank = folder / "bank.safetensors"
            try:
                want = json.loads((folder / "class.json").read_text()).get("bank_sha256")
            except (OSError, ValueError, AttributeError):
                want = None
            if want is not None and sha256_file(kept) == want and (not bank.is_file() or sha256_file(bank) != want):
                log.warning("class %s: putting back the bank an interrupted write replaced", folder.name)
                os.replace(kept, bank)
            else:
                kept.unlink(missing_ok=True)
        for tmp in [*folder.glob(".*.tmp"), *folder.glob("shots/.*.tmp"), *folder.glob("banks/.*.tmp")]:
            log.warning("class %s: removing %s, left by an interrupted write", folder.name,
                        tmp.relative_to(folder))
            tmp.unlink(missing_ok=True)
        try:
            m = _read_manifest(folder)
        except ValueError:
            return  # damaged: refused at restore, its files kept for a look
        if m is not None:
            for path in _unreferenced_banks(folder, m):
                log.warning("class %s: removing %s, a bank no model of class.json names", folder.name,
                            path.relative_to(folder))
                path.unlink(missing_ok=True)

    def changes(self) -> StoreChanges:
        marker = self._read_marker()  # before the scan: a write whose marker comes later is found next time
        if marker is not None and marker == self._marker and time.monotonic() < self._next_scan:
            return StoreChanges()
        changes = self._seen.diff(self._scan())
        self._marker, self._next_scan = marker, time.monotonic() + self.rescan_s
        return changes

    def _read_marker(self) -> bytes | None:
        try:
            return (self.root / _MARKER).read_bytes()
        except FileNotFoundError:
            return None

    def _moved(self) -> None:
        """Replace the change marker (after a write or a delete): replicas' next look scans. Not fsynced: after a
        crash every replica's first look scans anyway, and a torn token is still a new one."""
        tmp = self.root / f".{_MARKER}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(uuid.uuid4().bytes)
        os.replace(tmp, self.root / _MARKER)

    def _scan(self) -> dict[str, Signature]:
        if not self.root.is_dir():
            return {}
        return {d.name: _signature(d / "class.json") for d in self.root.iterdir()
                if is_class_name(d.name) and (d / "class.json").is_file()}

    def unsee(self, names: Iterable[str]) -> None:
        self._seen.forget(names)

    # -- reads ------------------------------------------------------------------------------------------------
    def read(self, name: str, fingerprint: str | None) -> ClassRecord | None:
        folder = self._folder(name)
        m = _read_manifest(folder)
        if m is None:
            return None
        entry = m["models"].get(fingerprint) if fingerprint is not None else None
        memory = self._read_memory(folder, entry) if entry is not None and entry.get("bank_sha256") else None
        try:
            times = float(m["created"]), float(m["updated"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"class.json has no valid times: {e}") from None
        return ClassRecord(name, tuple(m["shots"]), memory, entry.get("threshold_override") if entry else None,
                           *times, fingerprint if memory is not None and fingerprint else "",
                           tuple(fp for fp, e in m["models"].items() if e.get("bank_sha256")))

    def _read_memory(self, folder: Path, entry: dict[str, Any]) -> ClassMemory | None:
        bank_path = _bank_path(folder, entry)
        if not bank_path.is_file() or sha256_file(bank_path) != entry.get("bank_sha256"):
            return None
        try:
            bank = MemoryBank(load_file(str(bank_path))["features"], int(entry["bank_shots"]))
            return ClassMemory(bank, Calibration(**entry["calibration"]))
        except (SafetensorError, KeyError, TypeError, ValueError) as e:
            log.warning("class %s: bank unreadable (%s)", folder.name, e)
            return None

    def read_shot(self, name: str, digest: str) -> bytes:
        return checked_shot((self._folder(name) / "shots" / f"{digest}.png").read_bytes(), digest)

    # -- writes (the caller holds `lock(name)`) ----------------------------------------------------------------
    def write(self, record: ClassRecord, shots: Mapping[str, bytes]) -> None:
        if record.memory is None:
            raise ValueError("a class is written with its memory")
        folder = self._folder(record.name)
        shots_dir = folder / "shots"
        old = _read_manifest(folder) if (folder / "class.json").is_file() else None
        first = old is None  # no class yet: a failure removes the whole folder
        models = {fp: dict(e) for fp, e in (old["models"] if old else {}).items()}
        if old is not None and tuple(old["shots"]) != tuple(record.shots):
            # other models' banks were fitted on other shots: they go; their threshold overrides stay
            models = {fp: {"threshold_override": e["threshold_override"]} for fp, e in models.items()
                      if e.get("threshold_override") is not None}
        added: list[Path] = []
        try:
            new_folder = not folder.exists()
            shots_dir.mkdir(parents=True, exist_ok=True)
            if new_folder:
                fsync_dir(self.root)
            for digest, data in shots.items():
                path = shots_dir / f"{digest}.png"
                existed = path.exists()
                atomic_write(path, lambda tmp, d=data: Path(tmp).write_bytes(d))
                if not existed:
                    added.append(path)
            models[record.bundle_fingerprint] = {**self._write_bank_file(folder, record.memory, added),
                                                 "threshold_override": record.threshold_override}
            self._write_manifest(folder, record.name, record.shots, record.created, record.updated, models)
        except BaseException:
            self._undo_write(folder, first, added)
            raise
        self._written(folder, record.name, models)
        referenced = set(record.shots)
        for stale in shots_dir.glob("*.png"):  # shots no longer referenced (replace mode, failed attempts)
            if stale.stem not in referenced:
                stale.unlink(missing_ok=True)

    def write_bank(self, name: str, fingerprint: str, memory: ClassMemory, shots: tuple[str, ...]) -> bool:
        """Store one more model's bank for a class whose shots are still `shots` (the caller holds its lock); False,
        nothing written, when the class is gone or its shots changed. Other replicas see class.json change and
        read the class again (for their own model: its bank is not fitted again)."""
        folder = self._folder(name)
        m = _read_manifest(folder)
        if m is None or tuple(m["shots"]) != tuple(shots):
            return False
        models = {fp: dict(e) for fp, e in m["models"].items()}
        added: list[Path] = []
        try:
            entry = {**self._write_bank_file(folder, memory, added),
                     "threshold_override": models.get(fingerprint, {}).get("threshold_override")}
            models[fingerprint] = entry
            self._write_manifest(folder, name, m["shots"], m["created"], m["updated"], models)
        except BaseException:
            self._undo_write(folder, False, added)
            raise
        self._written(folder, name, models)
        return True

    def drop_model(self, fingerprint: str) -> int:
        """Remove one model's banks from every class (its threshold overrides stay); how many classes had one."""
        dropped = 0
        for name in self._scan():
            with self.lock(name):
                folder = self._folder(name)
                try:
                    m = _read_manifest(folder)
                except ValueError:
                    continue
                entry = m["models"].get(fingerprint) if m else None
                if m is None or entry is None or not entry.get("bank_sha256"):
                    continue
                models = {fp: dict(e) for fp, e in m["models"].items()}
                override = entry.get("threshold_override")
                if override is None:
                    del models[fingerprint]
                else:
                    models[fingerprint] = {"threshold_override": override}
                self._write_manifest(folder, name, m["shots"], m["created"], m["updated"], models)
                self._written(folder, name, models)
                dropped += 1
        return dropped

    def _write_bank_file(self, folder: Path, memory: ClassMemory, added: list[Path]) -> dict[str, Any]:
        """A bank's file under banks/, named by its hash (a new file, or the same bytes already there); its entry."""
        features = memory.bank.features.detach().to("cpu").contiguous()
        data = save({"features": features})  # serialised by Python: a full disk is then an OSError with its errno
        digest = hashlib.sha256(data).hexdigest()
        path = folder / "banks" / f"{digest}.safetensors"
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
            added.append(path)
        return {"bank_sha256": digest, "bank_shots": memory.bank.shots, "calibration": asdict(memory.calibration)}

    def _write_manifest(self, folder: Path, name: str, shots: Sequence[str], created: float, updated: float,
                        models: dict[str, dict[str, Any]]) -> None:
        manifest = {"format_version": FORMAT_VERSION, "name": name, "shots": list(shots), "created": created,
                    "updated": updated, "models": models}
        atomic_write(folder / "class.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))

    def _written(self, folder: Path, name: str, models: dict[str, dict[str, Any]]) -> None:
        """After class.json is written: not a change to report to ourselves; replicas' next look scans; the bank
        files (and a version-1 bank) no model names any more go."""
        self._seen.saw(name, _signature(folder / "class.json"))
        self._moved()
        for path in _unreferenced_banks(folder, {"models": models, "format_version": FORMAT_VERSION}):
            path.unlink(missing_ok=True)
        (folder / _KEPT_BANK).unlink(missing_ok=True)

    def _undo_write(self, folder: Path, first: bool, added: list[Path]) -> None:
        """A failed write: remove what it wrote, so the old class (or no class) is what is on disk."""
        try:
            if first:
                shutil.rmtree(folder, ignore_errors=True)
                return
            for path in added:
                path.unlink(missing_ok=True)
        except OSError:
            log.exception("class %s: cleaning up after a failed write failed; start-up will finish it", folder.name)

    def delete(self, name: str) -> bool:
        folder = self._folder(name)
        if not folder.is_dir():
            return False
        trash = self.root / f".trash-{name}-{uuid.uuid4().hex}"
        folder.rename(trash)  # atomic: the class is gone from disk at once
        fsync_dir(self.root)
        self._seen.forget([name])
        self._moved()
        shutil.rmtree(trash, ignore_errors=True)
        return True

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with self._flock(self._folder(name).name, blocking=True):
            yield

    @contextmanager
    def _flock(self, name: str, blocking: bool) -> Iterator[bool]:
        """Hold locks/<name>.lock (False: it is busy, when not `blocking`). The file is removed on release when the
        class is gone (deleted, or a first registration that failed), so locks do not outlive classes. A waiter
        may then hold a file no longer at the path: it checks, once it has the lock, that the path still names
        the file it locked, and starts again if not; so two holders never lock different files of one name."""
        path = self.locks / f"{name}.lock"
        while True:
            self.locks.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False  # someone is writing this class
                    return
                try:
                    if not _same_file(f.fileno(), path):
                        continue  # removed (or replaced) while we waited: lock the file there now
                    try:
                        yield True
                    finally:
                        if not (self.root / name).exists():  # under the lock: nobody can be creating it now
                            path.unlink(missing_ok=True)
                    return
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _leftovers(folder: Path) -> bool:
    """Whether a class folder holds what an interrupted write leaves (see `_recover_class`): one listing of the
    folder and one of its shots, as the sweep looks at every class."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if "class.json" not in names or _KEPT_BANK in names or any(_is_tmp(n) for n in names):
        return True
    for sub in ("shots", "banks"):
        try:
            if any(_is_tmp(n) for n in os.listdir(folder / sub)):
                return True
        except FileNotFoundError:
            pass
    return False


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # atomic_write's temporary names


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """A class's class.json, checked, with `models` as version 2 has it (a version-1 file's one bank becomes its one
    model, marked `legacy`); None when there is none. ValueError when it is damaged."""
    path = folder / "class.json"
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        ok = (m.get("format_version") in (1, FORMAT_VERSION) and m.get("name") == folder.name
              and isinstance(m.get("shots"), list) and all(isinstance(h, str) for h in m["shots"]))
        if ok and m["format_version"] == 1:
            m["models"] = {str(m.get("bundle_fingerprint") or ""): {
                "bank_sha256": m.get("bank_sha256"), "bank_shots": m.get("bank_shots"),
                "calibration": m.get("calibration"), "threshold_override": m.get("threshold_override"),
                "legacy": True}}
        ok = ok and isinstance(m.get("models"), dict) and all(isinstance(e, dict) for e in m["models"].values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"class.json unreadable: {e}") from None
    if not ok:
        raise ValueError("class.json has another format or names another class")
    return m


def _bank_path(folder: Path, entry: dict[str, Any]) -> Path:
    if entry.get("legacy"):
        return folder / _LEGACY_BANK
    return folder / "banks" / f"{entry.get('bank_sha256')}.safetensors"


def _unreferenced_banks(folder: Path, m: dict[str, Any]) -> list[Path]:
    """Bank files no model of `m` names (and a version-1 bank once nothing reads it)."""
    named = {e.get("bank_sha256") for e in m["models"].values() if not e.get("legacy")}
    out = [p for p in (folder / "banks").glob("*.safetensors") if p.stem not in named]
    if not any(e.get("legacy") for e in m["models"].values()) and (folder / _LEGACY_BANK).exists():
        out.append(folder / _LEGACY_BANK)
    return out
