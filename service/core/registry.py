"""ClassRegistry: the product classes in memory, their banks fitted by the engine, kept durable by a ClassStore.

The registry decides what a class is (its shots, fitted memory, threshold override) and serves snapshots of it;
the store (`service/core/store/`) keeps the records and tells what other replicas changed. A 2xx on registration is
sent only after the store has the class. On start, a class whose bank was computed with another bundle, or whose
bank is damaged, is rebuilt from its shots; a class whose shots are damaged is refused and reported, never served
half-right.

Every change is also an audit event (service/core/access/audit.py), built under the class's store lock from what
the store held before and wrote after, and handed to the `audit` sink once the class is written: the event records
a change that happened, so a failed audit write never undoes it (the sink keeps and retries the event).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from PIL import Image

from model.calibration import Calibration
from model.inference import ClassMemory

from .access.audit import AuditEvent, AuditSink, class_state, threshold_state
from .class_names import check_class_name
from .engine import Engine
from .errors import (
    DISK_FULL_ERRNOS,
    ClassDamagedError,
    ClassNotFoundError,
    InsufficientStorageError,
    StoreUnavailableError,
    TooManyClassesError,
    UnprocessableError,
)
from .records.record import shots_revision
from .results import thumbnail_jpeg
from .served_model import ServedModel
from .store.base import ClassRecord, ClassStore

__all__ = ["ClassEntry", "ClassRegistry", "Generation"]

log = logging.getLogger("sowa.registry")

T = TypeVar("T")


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
    def revision(self) -> str:
        """Which calibration scores the class's parts (records name it): a digest of its shots."""
        return shots_revision(self.shots)

    @property
    def serving_memory(self) -> ClassMemory:
        """The memory with the effective threshold, as predictions should use it."""
        return ClassMemory(self.memory.bank, self.calibration, self.name)  # the name picks its prompt class

    def info(self) -> dict[str, Any]:
        cal = self.calibration
        return {
            "name": self.name, "shots": len(self.shots), "bank_vectors": int(self.memory.bank.features.shape[1]),
            "bank_bytes": self.memory.bank.nbytes, "threshold": cal.threshold,
            "calibrated_threshold": self.memory.calibration.threshold,
            "threshold_overridden": self.threshold_override is not None, "pixel_threshold": cal.pixel_threshold,
            "created": self.created, "updated": self.updated,
        }


@dataclass(eq=False)
class Generation:
    """The classes as one model serves them. A request pins the generation current at its start and finishes on
    it; a model switch makes a new generation (`ClassRegistry.switch`), and changes to classes go to the current
    one."""

    served: ServedModel
    classes: dict[str, ClassEntry]


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def _disk_full_is_507(name: str) -> Iterator[None]:
    """A full disk (or quota, or file size limit) while storing a class: 507 with Retry-After, not a 500. The
    store has removed what the failed write wrote; the class in memory is the old one."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL_ERRNOS:
            raise
        log.error("class %s: not stored, the disk is full (%s)", name, e)
        raise InsufficientStorageError(f"class '{name}' was not stored: no space left for its files "
                                       f"({e.strerror}); nothing changed, retry later") from None


def _damaged(name: str, why: str) -> ClassDamagedError:
    return ClassDamagedError(f"class '{name}' is damaged on disk ({why}); register it again with mode=replace, "
                             f"or DELETE /classes/{name}")


def _open_png(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


class ClassRegistry:
    def __init__(self, store: ClassStore, engine: Engine, max_shots: int, max_classes: int = 10_000,
                 audit: AuditSink | None = None) -> None:
        self.store, self.engine, self.max_shots, self.max_classes = store, engine, max_shots, max_classes
        self.audit = audit  # where each change's event goes (None: not recorded, e.g. a tool without a trail)
        self.generation = Generation(engine.active, {})
        self.previous: Generation | None = None  # the generation before the last switch: its requests finish on it
        self._classes: dict[str, ClassEntry] = self.generation.classes  # the current generation's classes
        self._lock = asyncio.Lock()  # one mutation at a time; reads take snapshots without waiting
        self.refused: dict[str, str] = {}  # stored classes that could not be restored, and why
        self._names: list[str] | None = None  # sorted names, for paging; None after a change
        # shot thumbnails by content hash (immutable, so never stale), for the class list: about 4 KiB each
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()

    # -- reads ------------------------------------------------------------------------------------------------
    def get(self, name: str) -> ClassEntry:
        entry = self._classes.get(check_class_name(name))
        if entry is None:
            if name in self.refused:  # stored but damaged: say so, and how to get out of it
                raise _damaged(name, self.refused[name])
            raise ClassNotFoundError(f"class '{name}' is not registered")
        return entry

    def names(self) -> list[str]:
        if self._names is None:
            self._names = sorted(self._classes)
        return list(self._names)

    def page(self, after: str | None, limit: int,
             visible: Callable[[str], bool] | None = None) -> tuple[list[ClassEntry], str | None, int]:
        """Up to `limit` classes in name order, from the first after `after` (any string: a class deleted since
        the previous page needs no care); the cursor of the next page, None on the last; and how many classes
        there are. `visible`: only the names it accepts (a key limited to some classes)."""
        names = self._names if self._names is not None else self.names()
        if visible is not None:
            names = [n for n in names if visible(n)]
        start = 0 if after is None else bisect.bisect_right(names, after)
        chosen = names[start:start + limit]
        entries = [self._classes[n] for n in chosen]
        return entries, (chosen[-1] if start + limit < len(names) else None), len(names)

    def shot_thumbnail(self, name: str, digest: str) -> bytes:
        """One shot of a class as a JPEG thumbnail (any thread), the last 256 made kept in memory."""
        with self._thumbs_lock:
            if digest in self._thumbs:
                self._thumbs.move_to_end(digest)
                return self._thumbs[digest]
        thumb = thumbnail_jpeg(self.shot_png(name, digest))
        with self._thumbs_lock:
            self._thumbs[digest] = thumb
            while len(self._thumbs) > 256:
                self._thumbs.popitem(last=False)
        return thumb

    def __len__(self) -> int:
        return len(self._classes)

    def bank_bytes(self) -> int:
        """What the classes' host banks really hold (page-locked blocks are rounded up on a GPU)."""
        return sum(self.engine.banks.host_bytes(e.memory.bank) for e in self._classes.values())

    def shot_png(self, name: str, digest: str) -> bytes:
        """One shot of a class (a hash in its `shots`), as the PNG it is stored as (any thread). ValueError when the
        stored file does not match its hash."""
        if digest not in self.get(name).shots:
            raise KeyError(digest)
        return self.store.read_shot(name, digest)

    # -- mutations: serialised by an asyncio lock in this process, and by the store's lock across replicas -----
    # Locking and store work run on worker threads; only the model's fit runs on the engine thread.
    async def add_shots(self, name: str, images: list[Image.Image], mode: str, actor: str) -> ClassEntry:
        """Register shots (`mode` append or replace); `actor`: who, as the audit trail names them."""
        check_class_name(name)
        async with self._lock:
            self._check_room(name)  # before any fitting; again under the store lock, where the store has its say
            with _disk_full_is_507(name):
                entry = await asyncio.to_thread(self._locked, name, self._register, name, images, mode, actor)
            self._remember(entry)
            return entry

    async def set_threshold(self, name: str, threshold: float | None, actor: str) -> ClassEntry:
        if check_class_name(name) in self.refused:
            raise _damaged(name, self.refused[name])
        self.get(name)
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise UnprocessableError(f"threshold must be in (0, 1), got {threshold}")
        async with self._lock:
            with _disk_full_is_507(name):
                entry = await asyncio.to_thread(self._locked, name, self._set_threshold, name, threshold, actor)
            self._remember(entry)
            return entry

    async def delete(self, name: str, actor: str) -> None:
        """Remove a class, served or refused (a damaged class is deleted like any other)."""
        if check_class_name(name) not in self.refused:
            self.get(name)
        async with self._lock:
            if not await asyncio.to_thread(self._locked, name, self._delete, name, actor):
                self.refused.pop(name, None)
                raise ClassNotFoundError(f"class '{name}' is not registered")
            self._set(name, None)
            self.refused.pop(name, None)

    def _check_room(self, name: str) -> None:
        """TooManyClassesError when `name` would be a class beyond `max_classes` (the caller holds `_lock`, so the
        count holds still). Counted as this replica holds them: replicas registering new classes at once may each
        pass the last room, by at most one class each."""
        if name not in self._classes and name not in self.refused and len(self._classes) >= self.max_classes:
            raise TooManyClassesError(f"class '{name}' was not registered: the service holds {len(self._classes)} "
                                      f"classes, its limit (max_classes); delete one first, nothing was changed")

    def _set(self, name: str, entry: ClassEntry | None) -> None:
        """The one place `_classes` changes: a replaced or removed bank also leaves the device."""
        old = self._classes.pop(name, None) if entry is None else self._classes.get(name)
        if entry is not None:
            self._classes[name] = entry
        if (old is None) != (entry is None):
            self._names = None  # a class came or went
        if old is not None and (entry is None or entry.memory.bank is not old.memory.bank):
            self.engine.banks.forget(old.memory.bank)
            del old
            self.engine.banks.release_host_cache()

    def _remember(self, entry: ClassEntry) -> None:
        self._set(entry.name, entry)
        self.refused.pop(entry.name, None)

    def _locked(self, name: str, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` holding the class's store lock: replicas sharing the store take turns."""
        with self.store.lock(name):
            return fn(*args)

    def _fit(self, images: list[Image.Image], name: str, served: ServedModel | None = None) -> ClassMemory:
        served = served or self.generation.served
        return self.engine.call_blocking(self.engine.fit, images, name, served)

    def _audit(self, actor: str, action: str, name: str, before: dict[str, Any] | None,
               after: dict[str, Any] | None) -> None:
        """Hand a change's event to the sink, once the change is stored (a worker thread; never raises)."""
        if self.audit is not None:
            self.audit.record([AuditEvent(actor, action, name, before, after)])

    def _before(self, name: str, shots: tuple[str, ...], override: float | None) -> dict[str, Any]:
        """A class as the store held it: its calibrated threshold is known when this replica holds the same shots."""
        held = self._classes.get(name)
        calibrated = held.memory.calibration.threshold if held is not None and held.shots == shots else None
        return class_state(shots, override, calibrated)

    def _record(self, entry: ClassEntry) -> ClassRecord:
        return ClassRecord(entry.name, entry.shots, entry.memory, entry.threshold_override, entry.created,
                           entry.updated, self.generation.served.fingerprint)

    # -- store work (worker threads, under the class's store lock) ----------------------------------------------
    def _register(self, name: str, images: list[Image.Image], mode: str, actor: str) -> ClassEntry:
        if mode not in ("append", "replace"):
            raise UnprocessableError(f"mode must be 'append' or 'replace', got {mode!r}")
        if mode == "append" and name in self.refused:
            raise _damaged(name, self.refused[name])
        damaged = None
        try:
            current = self.store.read(name, None)  # the store's word: another replica may have changed the class
        except ValueError as e:
            if mode == "append":
                raise _damaged(name, str(e)) from None
            current, damaged = None, str(e)
        if current is None:
            self._check_room(name)
        hashes = list(current.shots) if (current and mode == "append") else []
        new: dict[str, bytes] = {}
        for img in images:
            data = _png_bytes(img)
            digest = hashlib.sha256(data).hexdigest()  # content-addressed: the same shot twice is one shot
            if digest not in hashes:  # a duplicate would be its own nearest neighbour and void the calibration
                hashes.append(digest)
                new[digest] = data
        if len(hashes) > self.max_shots:
            raise UnprocessableError(f"class '{name}' would have {len(hashes)} shots, more than the limit of "
                                     f"{self.max_shots}")
        # fitted on the PNGs as stored, so a later rebuild from the shots gives the same bank
        memory = self._fit([_open_png(new[h]) if h in new else self._stored_shot(name, h) for h in hashes], name)
        entry = ClassEntry(name, memory, tuple(hashes), current.threshold_override if current else None,
                           current.created if current else time.time(), time.time())
        self.store.write(self._record(entry), new)
        # a first registration is `class.created` (its shots in `after`); a damaged class replaced was there before
        if current is None and damaged is None and name not in self.refused:
            action, before = "class.created", None
        else:
            action = "shots.added" if mode == "append" else "shots.replaced"
            before = ({"damaged": damaged or self.refused.get(name, "unreadable")} if current is None
                      else self._before(name, current.shots, current.threshold_override))
        self._audit(actor, action, name, before,
                    class_state(entry.shots, entry.threshold_override, memory.calibration.threshold))
        return entry

    def _stored_shot(self, name: str, digest: str) -> Image.Image:
        """A shot already stored, for an append; a missing or damaged one is the class's damage, named (409)."""
        try:
            return _open_png(self.store.read_shot(name, digest))
        except OSError as e:
            if e.errno in DISK_FULL_ERRNOS:
                raise
            raise _damaged(name, f"shot {digest[:12]}: {e}") from None
        except ValueError as e:
            raise _damaged(name, f"shot {digest[:12]}: {e}") from None

    def _set_threshold(self, name: str, threshold: float | None, actor: str) -> ClassEntry:
        loaded = self._load(name)  # as stored now, bank included
        if loaded is None:
            raise ClassNotFoundError(f"class '{name}' is not registered")
        old = loaded[0]
        entry = replace(old, threshold_override=threshold, updated=time.time())
        self.store.write(self._record(entry), {})
        calibrated = old.memory.calibration.threshold
        self._audit(actor, "threshold.set" if threshold is not None else "threshold.reset", name,
                    threshold_state(old.threshold_override, calibrated), threshold_state(threshold, calibrated))
        return entry

    def _delete(self, name: str, actor: str) -> bool:
        held = self._classes.get(name)
        before = (self._before(name, held.shots, held.threshold_override) if held is not None
                  else {"damaged": self.refused.get(name, "unreadable")})
        deleted = self.store.delete(name)
        if deleted:
            self._audit(actor, "class.deleted", name, before, None)
        return deleted

    def _load(self, name: str, served: ServedModel | None = None) -> tuple[ClassEntry, bool] | None:
        """The class as stored, for `served` (default: the serving model), and whether its bank had to be rebuilt
        from the shots (none stored for that model, or damaged); None when there is none."""
        served = served or self.generation.served
        record = self.store.read(name, served.fingerprint)
        if record is None:
            return None
        memory = None
        if record.memory is not None:
            try:
                memory = ClassMemory(self.engine.host_bank(record.memory.bank, served), record.memory.calibration)
            except (TypeError, ValueError) as e:
                log.warning("class %s: bank unusable (%s)", name, e)
        rebuilt = memory is None
        if memory is None:
            log.info("class %s: no bank for model %s, or a damaged one: rebuilding from its %d shots", name,
                     served.version, len(record.shots))
            memory = self._fit([_open_png(self.store.read_shot(name, h)) for h in record.shots], name, served)
        return ClassEntry(name, memory, record.shots, record.threshold_override, record.created,
                          record.updated), rebuilt

    async def prepare_class(self, name: str, served: ServedModel) -> tuple[ClassEntry, bool] | None:
        """One class for a model being prepared (or shadowing), under the class's store lock: its entry and whether
        its bank was fitted here; None when the class is gone."""
        return await asyncio.to_thread(self._locked, name, self._prepare_one, name, served)

    def _prepare_one(self, name: str, served: ServedModel) -> tuple[ClassEntry, bool] | None:
        """A class for a model being prepared (the caller holds the class's store lock): its stored bank for that
        model, or one fitted from the shots and stored beside the other models' banks, so no replica fits it
        again."""
        loaded = self._load(name, served)
        if loaded is not None and loaded[1]:
            self.store.write_bank(name, served.fingerprint, loaded[0].memory, loaded[0].shots)
        return loaded

    def _restore_one(self, name: str) -> ClassEntry | None:
        """Load a class at start-up; a rebuilt bank is written back (the caller holds the store lock)."""
        loaded = self._load(name)
        if loaded is None:
            return None
        entry, rebuilt = loaded
        if rebuilt:
            self.store.write(self._record(entry), {})
        return entry

    # -- model versions: prepare a model's classes beside the serving ones, then switch ------------------------------
    async def prepare(self, served: ServedModel, progress: Callable[[int, int, int], None] | None = None
                      ) -> dict[str, ClassEntry]:
        """Every class's entry for `served`, built while the current model goes on serving: read from the store,
        or fitted from the stored shots (on the engine thread, between batches) and stored. `progress(done, total,
        fitted)` is told after each class. A class that fails is left out and is fitted again by `switch`."""
        names = self.names()
        prepared: dict[str, ClassEntry] = {}
        fitted = 0
        for i, name in enumerate(names):
            try:
                loaded = await self.prepare_class(name, served)
            except StoreUnavailableError:
                raise
            except Exception as e:  # damaged, or deleted meanwhile: `switch` settles it under the lock
                log.warning("class %s: not prepared for model %s (%s)", name, served.version, e)
                loaded = None
            if loaded is not None:
                prepared[name] = loaded[0]
                fitted += loaded[1]
            if progress is not None:
                progress(i + 1, len(names), fitted)
        return prepared

    async def switch(self, served: ServedModel, prepared: dict[str, ClassEntry]) -> int:
        """Serve `served` from now on, with the classes `prepare` made for it. Under the registry's lock, so no
        registration is half on one model: classes changed, added or deleted while preparing are caught up first.
        The engine's active model and the classes change together, between two batches (a request already
        started finishes on the generation it pinned). The number of classes caught up."""
        async with self._lock:
            caught_up = 0
            for name, entry in list(self._classes.items()):
                have = prepared.get(name)
                if have is not None and have.shots == entry.shots:
                    continue
                loaded = await self.prepare_class(name, served)
                if loaded is None:
                    prepared.pop(name, None)
                else:
                    prepared[name] = loaded[0]
                caught_up += 1
            for name in [n for n in prepared if n not in self._classes]:
                del prepared[name]  # deleted while preparing
            old = self.generation
            self.previous, self.generation = old, Generation(served, prepared)
            self._classes, self._names = prepared, None
            self.engine.active = served
            for entry in old.classes.values():  # the old banks leave the device; requests holding them finish
                self.engine.banks.forget(entry.memory.bank)
            self.engine.banks.release_host_cache()
            return caught_up

    def forget_previous(self) -> None:
        """Drop the generation before the last switch once no request can still be on it."""
        self.previous = None

    # -- start-up and replicas ------------------------------------------------------------------------------------
    def restore(self) -> None:
        """Load every stored class (a worker thread, before serving). Damaged classes are refused, and retried
        when the store reports them changed."""
        self.refused.update(self.store.recover())
        for name in self.store.changes().changed:  # the first report names every class
            try:
                entry = self._locked(name, self._restore_one, name)
            except Exception as e:  # any damage refuses this class only
                self.refused[name] = str(e)
                log.error("class %s not restored: %s", name, e)
                continue
            if entry is not None:
                self._remember(entry)

    async def sync(self) -> None:
        """Pick up what other replicas sharing the store added, changed or deleted; only changed classes are read."""
        async with self._lock:
            changes = await asyncio.to_thread(self.store.changes)
            for name in changes.deleted:
                self._set(name, None)
                self.refused.pop(name, None)
            for i, name in enumerate(changes.changed):
                try:  # read-only: the replica that changed the class wrote it; rebuilding here writes nothing
                    loaded = await asyncio.to_thread(self._load, name)
                except StoreUnavailableError:
                    # the store went away: keep serving what we hold; what is not read yet is reported again, so
                    # the next look (the retry, or the reconnect's) reads it
                    self.store.unsee(changes.changed[i:])
                    raise
                except Exception as e:  # e.g. caught mid-delete; the next report settles it
                    self.refused[name] = str(e)
                    self._set(name, None)
                    continue
                if loaded is not None:
                    self._remember(loaded[0])

    async def follow(self, interval: float, sweep_every: float = 60.0) -> None:
        """The sync loop: replicas share one store, so follow what the others register or delete. A store that
        pushes changes (`subscribe`, PostgreSQL's LISTEN/NOTIFY) wakes it; others are looked at every
        `interval` s, a look that costs the directory store one small read while nothing changed. Every
        `sweep_every` s it also has the store remove what crashed writes left."""
        next_sweep = time.monotonic() + sweep_every
        pushed = asyncio.Event()
        loop = asyncio.get_running_loop()
        # called on the store's listener thread
        pushes = self.store.subscribe(lambda: loop.call_soon_threadsafe(pushed.set))
        if pushes:
            pushed.set()  # a first look at once: what changed between restore() and now (the warm-up) is found
        retry = 0.0  # seconds until the next look after one the store could not answer
        while True:
            if not pushes:
                await asyncio.sleep(interval)
            else:  # a push, or the retry's time
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(pushed.wait(), retry or None)
                pushed.clear()  # before the sync: a change during it wakes the loop again
            try:
                await self.sync()
                retry = 0.0
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + sweep_every
                    await asyncio.to_thread(self.store.sweep)
            except StoreUnavailableError as e:  # pushed changes are announced once: look again until it works
                retry = min(max(retry * 2, 0.25), 5.0)
                log.warning("class sync: %s; looking again in %.2f s", e, retry)
            except Exception:  # a failed look must not stop the next one
                log.exception("class sync failed")
