"""ClassRegistry: the product classes, their shots and banks, in memory on the device and on disk.

Layout under `data_dir/classes/<name>/`:

    class.json            name, shot hashes, bundle fingerprint, calibration, threshold override, bank hash
    shots/<sha256>.png    each shot as decoded RGB (lossless), so banks can be rebuilt for another bundle
    bank.safetensors      the bank features (S, K*L, D) for the bundle named in class.json

Every file is written to a temporary name, fsynced and renamed; class.json goes last, so a crash at any point
leaves either the old class or the new one. A 2xx on registration is sent only after class.json is on disk.
On start, a class whose bank was computed with another bundle, or whose bank file is damaged, is rebuilt from
its shots; a class whose shots are damaged is refused and reported, never served half-right.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import io
import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.calibration import Calibration
from model.files import atomic_write, fsync_dir, sha256_file
from model.inference import ClassMemory
from model.memory_bank import MemoryBank

from .engine import Engine
from .errors import ClassNotFoundError, UnprocessableError

__all__ = ["CLASS_NAME", "ClassEntry", "ClassRegistry", "check_class_name"]

log = logging.getLogger("sowa.registry")

T = TypeVar("T")
CLASS_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
FORMAT_VERSION = 1


def check_class_name(name: str) -> str:
    if not CLASS_NAME.fullmatch(name):
        raise UnprocessableError(f"invalid class name {name[:80]!r}: use 1-64 characters of a-z, 0-9, '_', '.', "
                                 "'-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class ClassEntry:
    """An immutable snapshot of a class: routes hand it to the batcher as it is."""

    name: str
    memory: ClassMemory
    shots: tuple[str, ...]  # sha256 of each shot file, in registration order
    threshold_override: float | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    @property
    def calibration(self) -> Calibration:
        cal = self.memory.calibration
        return cal if self.threshold_override is None else cal.with_threshold(self.threshold_override)

    @property
    def serving_memory(self) -> ClassMemory:
        """The memory with the effective threshold, as predictions should use it."""
        return ClassMemory(self.memory.bank, self.calibration)

    def info(self) -> dict[str, Any]:
        cal = self.calibration
        return {
            "name": self.name, "shots": len(self.shots), "bank_vectors": int(self.memory.bank.features.shape[1]),
            "bank_bytes": self.memory.bank.nbytes, "threshold": cal.threshold,
            "calibrated_threshold": self.memory.calibration.threshold,
            "threshold_overridden": self.threshold_override is not None, "pixel_threshold": cal.pixel_threshold,
            "created": self.created, "updated": self.updated,
        }


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class ClassRegistry:
    def __init__(self, data_dir: Path, engine: Engine, max_shots: int) -> None:
        self.root = Path(data_dir) / "classes"
        self.engine, self.max_shots = engine, max_shots
        self._classes: dict[str, ClassEntry] = {}
        self.locks = Path(data_dir) / "locks"
        self._lock = asyncio.Lock()  # one mutation at a time; reads take snapshots without waiting
        self._seen: dict[str, tuple[int, int, int] | None] = {}  # class.json signatures, for change detection
        self.refused: dict[str, str] = {}  # classes on disk that could not be restored, and why

    # -- reads ------------------------------------------------------------------------------------------------
    def get(self, name: str) -> ClassEntry:
        entry = self._classes.get(check_class_name(name))
        if entry is None:
            raise ClassNotFoundError(f"class '{name}' is not registered")
        return entry

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def bank_bytes(self) -> int:
        return sum(e.memory.bank.nbytes for e in self._classes.values())

    def shot_png(self, name: str, digest: str) -> bytes:
        """One shot of a class (a hash in its `shots`), as the PNG it is stored as (any thread). ValueError when the
        file does not match its hash."""
        if digest not in self.get(name).shots:
            raise KeyError(digest)
        data = (self.root / name / "shots" / f"{digest}.png").read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"shot {digest} of class '{name}' does not match its hash")
        return data

    # -- mutations: serialised by an asyncio lock in this process, and by a file lock across replicas ----------
    # Locking and disk work run on worker threads; only the model's fit runs on the engine thread.
    async def add_shots(self, name: str, images: list[Image.Image], mode: str) -> ClassEntry:
        check_class_name(name)
        async with self._lock:
            entry = await asyncio.to_thread(self._locked, name, self._register, name, images, mode)
            self._remember(entry)
            return entry

    async def set_threshold(self, name: str, threshold: float | None) -> ClassEntry:
        self.get(name)
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise UnprocessableError(f"threshold must be in (0, 1), got {threshold}")
        async with self._lock:
            entry = await asyncio.to_thread(self._locked, name, self._set_threshold, name, threshold)
            self._remember(entry)
            return entry

    async def delete(self, name: str) -> None:
        self.get(name)
        async with self._lock:
            await asyncio.to_thread(self._locked, name, self._delete, name)
            self._set(name, None)
            self._seen.pop(name, None)

    def _set(self, name: str, entry: ClassEntry | None) -> None:
        """The one place `_classes` changes: a replaced or removed bank also leaves the device."""
        old = self._classes.pop(name, None) if entry is None else self._classes.get(name)
        if entry is not None:
            self._classes[name] = entry
        if old is not None and (entry is None or entry.memory.bank is not old.memory.bank):
            self.engine.banks.forget(old.memory.bank)

    def _remember(self, entry: ClassEntry) -> None:
        self._set(entry.name, entry)
        self._seen[entry.name] = _signature(self.root / entry.name / "class.json")
        self.refused.pop(entry.name, None)

    def _locked(self, name: str, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` holding the class's file lock: replicas sharing the data directory take turns."""
        self.locks.mkdir(parents=True, exist_ok=True)
        with open(self.locks / f"{name}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                return fn(*args)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _fit(self, images: list[Image.Image]) -> ClassMemory:
        return self.engine.call_blocking(self.engine.fit, images)

    # -- disk (worker threads, under the class's file lock) -----------------------------------------------------
    def _register(self, name: str, images: list[Image.Image], mode: str) -> ClassEntry:
        if mode not in ("append", "replace"):
            raise UnprocessableError(f"mode must be 'append' or 'replace', got {mode!r}")
        folder = self.root / name
        try:
            current = _read_manifest(folder)  # the disk's word: another replica may have changed the class
        except ValueError as e:
            if mode == "append":
                raise UnprocessableError(f"class '{name}' is damaged on disk ({e}); register it with "
                                         "mode=replace") from None
            current = None
        hashes = list(current["shots"]) if (current and mode == "append") else []
        encoded = []
        for img in images:
            data = _png_bytes(img)
            digest = hashlib.sha256(data).hexdigest()  # content-addressed: the same shot twice is one shot
            if digest not in hashes:  # a duplicate would be its own nearest neighbour and void the calibration
                hashes.append(digest)
                encoded.append((digest, data))
        if len(hashes) > self.max_shots:
            raise UnprocessableError(f"class '{name}' would have {len(hashes)} shots, more than the limit of "
                                     f"{self.max_shots}")
        shots_dir = folder / "shots"
        new_folder = not folder.exists()
        shots_dir.mkdir(parents=True, exist_ok=True)
        if new_folder:
            fsync_dir(self.root)
        for digest, data in encoded:
            atomic_write(shots_dir / f"{digest}.png", lambda tmp, d=data: Path(tmp).write_bytes(d))
        memory = self._fit([self._read_shot(folder, h) for h in hashes])
        entry = ClassEntry(name, memory, tuple(hashes), current["threshold_override"] if current else None,
                           float(current["created"]) if current else time.time(), time.time())
        self._write_bank_and_manifest(folder, entry)
        referenced = set(hashes)
        for stale in shots_dir.glob("*.png"):  # shots no longer referenced (replace mode, failed attempts)
            if stale.stem not in referenced:
                stale.unlink(missing_ok=True)
        return entry

    def _set_threshold(self, name: str, threshold: float | None) -> ClassEntry:
        folder = self.root / name
        current = self._restore_one(folder, write=False)  # as on disk now, bank included
        if current is None:
            raise ClassNotFoundError(f"class '{name}' is not registered")
        entry = replace(current, threshold_override=threshold, updated=time.time())
        self._write_bank_and_manifest(folder, entry)
        return entry

    def _delete(self, name: str) -> None:
        folder = self.root / name
        if not folder.is_dir():
            raise ClassNotFoundError(f"class '{name}' is not registered")
        trash = self.root / f".trash-{name}-{uuid.uuid4().hex}"
        folder.rename(trash)  # atomic: the class is gone from disk at once
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def _read_shot(self, folder: Path, digest: str) -> Image.Image:
        path = folder / "shots" / f"{digest}.png"
        if sha256_file(path) != digest:
            raise ValueError(f"shot {path.name} does not match its hash")
        with Image.open(path) as img:
            return img.convert("RGB")

    def _write_bank_and_manifest(self, folder: Path, entry: ClassEntry) -> None:
        bank = folder / "bank.safetensors"
        features = entry.memory.bank.features.detach().to("cpu").contiguous()
        atomic_write(bank, lambda tmp: save_file({"features": features}, tmp))
        self._write_manifest(folder, entry, sha256_file(bank))

    def _write_manifest(self, folder: Path, entry: ClassEntry, bank_sha256: str) -> None:
        manifest = {
            "format_version": FORMAT_VERSION, "name": entry.name, "shots": list(entry.shots),
            "bundle_fingerprint": self.engine.info.fingerprint, "bank_sha256": bank_sha256,
            "bank_shots": entry.memory.bank.shots, "calibration": asdict(entry.memory.calibration),
            "threshold_override": entry.threshold_override, "created": entry.created, "updated": entry.updated,
        }
        atomic_write(folder / "class.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))

    async def sync(self) -> None:
        """Pick up what other replicas sharing the data directory added, changed or deleted.

        Change detection is a stat of every class.json (written last, atomically, so a changed one means a
        complete class); only changed classes are read.
        """
        async with self._lock:
            present = await asyncio.to_thread(self._scan)
            for name in set(self._seen) - set(present):
                self._set(name, None)
                self._seen.pop(name, None)
                self.refused.pop(name, None)
            for name, sig in present.items():
                if self._seen.get(name, ()) == sig:
                    continue
                try:  # read-only: the replica that changed the class wrote it; rebuilding here writes nothing
                    entry = await asyncio.to_thread(self._restore_one, self.root / name, False)
                except Exception as e:  # e.g. caught mid-delete; the next scan settles it
                    self.refused[name] = str(e)
                    self._set(name, None)
                    entry = None
                if entry is not None:
                    self._set(name, entry)
                    self.refused.pop(name, None)
                self._seen[name] = sig

    def _scan(self) -> dict[str, tuple[int, int, int] | None]:
        if not self.root.is_dir():
            return {}
        return {d.name: _signature(d / "class.json") for d in self.root.iterdir()
                if CLASS_NAME.fullmatch(d.name) and (d / "class.json").is_file()}

    def restore(self) -> None:
        """Load every class on disk (a worker thread; banks of another bundle are rebuilt and written back under
        the class's file lock). Damaged classes are refused."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".trash-"):
                shutil.rmtree(folder, ignore_errors=True)  # a delete interrupted by a crash
                continue
            if not folder.is_dir():
                continue
            if not CLASS_NAME.fullmatch(folder.name):
                self.refused[folder.name] = "directory name is not a valid class name"
                continue
            try:
                entry = self._locked(folder.name, self._restore_one, folder, True)
            except Exception as e:  # any damage refuses this class only
                self.refused[folder.name] = str(e)
                self._seen[folder.name] = _signature(folder / "class.json")  # retried when class.json changes
                log.error("class %s not restored: %s", folder.name, e)
                continue
            if entry is not None:
                self._remember(entry)

    def _restore_one(self, folder: Path, write: bool) -> ClassEntry | None:
        """The class as stored in `folder`; its bank is rebuilt from the shots when it was computed with another
        bundle or is damaged, and written back only when `write` (the caller then holds the file lock)."""
        if not CLASS_NAME.fullmatch(folder.name):
            raise ValueError("directory name is not a valid class name")
        m = _read_manifest(folder)
        if m is None:
            if not (folder / "shots").exists():
                return None  # a registration that crashed before its first manifest: nothing was promised
            raise ValueError("class.json is missing")
        shots = tuple(str(h) for h in m["shots"])
        entry_args = (m.get("threshold_override"), float(m["created"]), float(m["updated"]))
        bank_path = folder / "bank.safetensors"
        same_bundle = m.get("bundle_fingerprint") == self.engine.info.fingerprint
        if same_bundle and bank_path.is_file() and sha256_file(bank_path) == m.get("bank_sha256"):
            try:
                bank = self.engine.host_bank(MemoryBank(load_file(str(bank_path))["features"], int(m["bank_shots"])))
                return ClassEntry(folder.name, ClassMemory(bank, Calibration(**m["calibration"])), shots,
                                  *entry_args)
            except (SafetensorError, KeyError, TypeError, ValueError) as e:
                log.warning("class %s: bank unreadable (%s), rebuilding from shots", folder.name, e)
        else:
            log.info("class %s: bank from another bundle or damaged, rebuilding from its %d shots", folder.name,
                     len(shots))
        entry = ClassEntry(folder.name, self._fit([self._read_shot(folder, h) for h in shots]), shots, *entry_args)
        if write:
            self._write_bank_and_manifest(folder, entry)
        return entry


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """A class's class.json, checked; None when there is none. ValueError when it is damaged."""
    path = folder / "class.json"
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        ok = (m.get("format_version") == FORMAT_VERSION and m.get("name") == folder.name
              and isinstance(m.get("shots"), list) and all(isinstance(h, str) for h in m["shots"]))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"class.json unreadable: {e}") from None
    if not ok:
        raise ValueError("class.json has another format or names another class")
    return m
