"""Recorder: records from answers to the store, durable before the answer leaves, batched off the request path.

    Backend.score ──record(drafts)──> writer thread: ids, frames, one append + fsync per batch (group commit)
                                        └─> the answer leaves once its batch is on disk (or says "not kept")
                  drainer thread: oldest spooled frames ──write(batch)──> RecordStore; drained segments deleted
                  sweeper thread: retention (RecordStore.sweep) every `sweep_interval_s`

When the store is unreachable (a database down, a full disk) the drainer waits and tries again; the spool holds
records up to `spool_max_bytes`. Past that bound a record is not kept: `record` says so (None for its id), the
`not_kept` counter counts it, and with `unrecordable="503"` the request fails instead (RecordsUnavailableError).
Reads see both halves: a record still in the spool is found by id and in queries (`pending`), so the console's
"keep, then make it a shot" works before the drainer has caught up.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..access.audit import time_ordered_id
from ..errors import RecordNotFoundError, RecordsUnavailableError, StoreUnavailableError
from .figures import PassedPart, ReviewedPart
from .record import Draft, Record
from .spool import Position, Spool, encode
from .store import RecordQuery, RecordStore, Retention, SweepResult

__all__ = ["Recorder", "RecorderStats"]

log = logging.getLogger("sowa.records")

DRAIN_BATCH = 1000  # records per store transaction at most
DRAIN_BYTES = 32 * 2**20  # and bytes of images
ROTATE_BYTES = 4 * 2**20  # a drained segment this large is closed and removed


@dataclass
class RecorderStats:
    written: int = 0  # records drained into the store
    not_kept: int = 0  # records past the spool's bound (or whose spooling failed)
    spooled: int = 0  # records appended to the spool
    batches: int = 0  # spool appends (fsyncs)
    swept_records: int = 0
    swept_images: int = 0


class _Job:
    __slots__ = ("drafts", "future", "loop")

    def __init__(self, drafts: list[Draft], loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        self.drafts, self.loop, self.future = drafts, loop, future


class Recorder:
    def __init__(self, open_store: Callable[[], RecordStore], spool: Spool, spool_max_bytes: int,
                 retention: Retention, sweep_interval_s: float = 60.0, unrecordable: str = "answer") -> None:
        """`open_store` is called (and called again after a failure) on the drainer thread: a database down at
        start-up is waited for while predictions go on."""
        self._open_store, self.spool, self.spool_max_bytes = open_store, spool, spool_max_bytes
        self.retention, self.sweep_interval_s, self.unrecordable = retention, sweep_interval_s, unrecordable
        self.store: RecordStore | None = None
        self.error: str | None = None  # why the store cannot be written now
        self.stats = RecorderStats()
        self._pending: OrderedDict[str, tuple[Record, Position]] = OrderedDict()  # spooled, not yet stored
        self._pending_bytes = 0
        self._reserved = 0  # bytes of jobs queued for the writer, counted against the bound already
        self._lock = threading.Lock()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._drain = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- life ------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Take up what an earlier run left in the spool, then start the threads (blocking: call in a thread)."""
        for pos, draft in self.spool.open():
            self._pending[draft.record.id] = (draft.record, pos)
            self._pending_bytes += pos.size
        if self._pending:
            log.info("records: %d left in the spool by the last run; draining them", len(self._pending))
        for name, target in (("writer", self._write_loop), ("drainer", self._drain_loop),
                             ("sweeper", self._sweep_loop)):
            t = threading.Thread(target=target, name=f"sowa-records-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._drain.set()

    def close(self, drain_timeout_s: float = 5.0) -> None:
        """Stop taking records, give the drainer a moment to empty the spool (what it leaves is drained at the next
        start), stop the threads, close the store."""
        self._jobs.put(None)
        deadline = time.monotonic() + drain_timeout_s
        while self._pending and self.store is not None and self.error is None and time.monotonic() < deadline:
            self._drain.set()
            time.sleep(0.02)
        self._stop.set()
        self._drain.set()
        for t in self._threads:
            t.join(timeout=10)
        self.spool.close(drained=not self._pending)
        if self.store is not None:
            self.store.close()

    # -- recording -------------------------------------------------------------------------------------------------
    async def record(self, drafts: Sequence[Draft]) -> list[str | None]:
        """Spool `drafts`; each one's record id once it is on disk, or None where it was not kept (the spool is
        full, or writing it failed). With unrecordable="503", RecordsUnavailableError instead of a None."""
        if not drafts:
            return []
        sized = [(d, len(d.image or b"") + len(d.thumbnail or b"") + 1024) for d in drafts]
        take: list[Draft] = []
        with self._lock:
            room = self.spool_max_bytes - self._pending_bytes - self._reserved
            for d, size in sized:
                if size <= room:
                    take.append(d)
                    room -= size
            self._reserved += sum(size for d, size in sized if any(d is t for t in take))
        ids: list[str | None] = [None] * len(drafts)
        if take:
            loop = asyncio.get_running_loop()
            future: asyncio.Future = loop.create_future()
            self._jobs.put(_Job(take, loop, future))
            try:
                spooled = await asyncio.shield(future)
            except OSError as e:
                log.error("records: the spool could not be written (%s): %d record(s) not kept", e, len(take))
                spooled = {}
            by_draft = iter(take)
            got = {id(d): spooled.get(id(d)) for d in by_draft}
            ids = [got.get(id(d)) for d in drafts]
        missing = sum(1 for i in ids if i is None)
        if missing:
            self.stats.not_kept += missing
            if self.unrecordable == "503":
                raise RecordsUnavailableError(
                    f"{missing} record(s) could not be kept: the record store is unreachable and the spool is full "
                    f"({self._pending_bytes} bytes waiting); the service is set to refuse unrecorded inspections",
                    headers={"Retry-After": "5"})
        return ids

    def _write_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            jobs = [job]
            while True:  # group commit: whatever queued meanwhile shares this append and its fsync
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)
                    break
                jobs.append(more)
            self._write(jobs)

    def _write(self, jobs: list[_Job]) -> None:
        drafts = [replace(d, record=replace(d.record, id=time_ordered_id())) for j in jobs for d in j.drafts]
        reserved = sum(len(d.image or b"") + len(d.thumbnail or b"") + 1024 for d in drafts)
        try:
            positions = self.spool.append([encode(d) for d in drafts])
        except OSError as e:
            with self._lock:
                self._reserved -= reserved
            for j in jobs:
                j.loop.call_soon_threadsafe(_settle, j.future, None, e)
            return
        with self._lock:
            self._reserved -= reserved
            for d, pos in zip(drafts, positions, strict=True):
                self._pending[d.record.id] = (d.record, pos)
                self._pending_bytes += pos.size
        self.stats.spooled += len(drafts)
        self.stats.batches += 1
        self._drain.set()
        at = 0
        for j in jobs:
            ids = {id(orig): drafts[at + k].record.id for k, orig in enumerate(j.drafts)}
            at += len(j.drafts)
            j.loop.call_soon_threadsafe(_settle, j.future, ids, None)

    # -- draining --------------------------------------------------------------------------------------------------
    def _drain_loop(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            self._drain.wait(0.5)
            self._drain.clear()
            while not self._stop.is_set():
                try:
                    if self.store is None:
                        self.store = self._open_store()
                    if not self._drain_once():
                        break
                    if self.error is not None:
                        log.warning("records: the store is back; draining the spool")
                    self.error, backoff = None, 0.2
                except Exception as e:
                    if self.error is None:
                        log.error("records: the store cannot be written (%s); the spool holds them", e)
                    self.error = f"{type(e).__name__}: {str(e).strip()[:300]}"
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 2.0)

    def _drain_once(self) -> bool:
        """Move the oldest spooled records into the store; False when there were none."""
        with self._lock:
            batch, size = [], 0
            for rid, (_, pos) in self._pending.items():
                if batch and (len(batch) >= DRAIN_BATCH or size + pos.size > DRAIN_BYTES):
                    break
                batch.append((rid, pos))
                size += pos.size
        if not batch:
            if self.spool.sizes.get(self.spool.current, 0) >= ROTATE_BYTES:
                self.spool.rotate()  # all drained: a fresh segment, so this one can go
            self._release_segments()
            return False
        drafts = self.spool.read_many([pos for _, pos in batch])
        store = self.store
        if store is None:
            raise RuntimeError("no store")
        store.write(drafts)
        with self._lock:
            for rid, pos in batch:
                if self._pending.pop(rid, None) is not None:
                    self._pending_bytes -= pos.size
        self.stats.written += len(batch)
        self._release_segments()
        return True

    def _release_segments(self) -> None:
        with self._lock:
            oldest = min((pos.segment for _, pos in self._pending.values()), default=self.spool.current)
        for seg in [s for s in list(self.spool.sizes) if s < min(oldest, self.spool.current)]:
            self.spool.release(seg)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.sweep_interval_s):
            self.sweep()

    def sweep(self) -> SweepResult:
        """Retention now (blocking); what it removed. A failure is logged and tried next time."""
        store = self.store
        if store is None:
            return SweepResult()
        try:
            result = store.sweep(self.retention, time.time())
        except Exception as e:
            log.error("records: retention sweep failed (%s); trying again in %g s", e, self.sweep_interval_s)
            return SweepResult()
        self.stats.swept_records += result.records_removed
        self.stats.swept_images += result.images_removed
        return result

    def wait_drained(self, timeout_s: float) -> bool:
        """Block until the spool is empty (tests, shutdown); whether it is."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            self._drain.set()
            time.sleep(0.01)
        return not self._pending

    # -- reads: the store, and what is still in the spool ------------------------------------------------------------
    @property
    def spooled(self) -> int:
        return len(self._pending)

    @property
    def spool_bytes(self) -> int:
        return self._pending_bytes

    def _store(self) -> RecordStore:
        if self.store is None:
            raise StoreUnavailableError(f"the record store is not reachable yet ({self.error or 'opening'})",
                                        headers={"Retry-After": "5"})
        return self.store

    def _spooled(self, record_id: str) -> tuple[Record, Position] | None:
        with self._lock:
            return self._pending.get(record_id)

    def get(self, record_id: str) -> Record:
        held = self._spooled(record_id)
        r = held[0] if held is not None else self._store().get(record_id)
        if r is None:
            raise RecordNotFoundError(f"no record '{record_id[:40]}' (never recorded, or removed by retention)")
        return r

    def image(self, record_id: str, thumbnail: bool = False) -> bytes | None:
        """The record's kept upload (or thumbnail); None when it has none (RecordNotFoundError when no record)."""
        held = self._spooled(record_id)
        if held is not None:
            d = self.spool.read(held[1])
            return d.thumbnail if thumbnail else d.image
        store = self._store()
        data = store.thumbnail(record_id) if thumbnail else store.image(record_id)
        if data is None:
            self.get(record_id)  # no record at all: 404 of its own kind
        return data

    def query(self, q: RecordQuery) -> list[Record]:
        with self._lock:
            held = [r for r, _ in self._pending.values() if q.matches(r)]
        stored = self._store().query(q) if (self.store is not None or not held) else []
        merged = {r.id: r for r in stored}
        merged.update({r.id: r for r in held})
        return sorted(merged.values(), key=lambda r: r.id, reverse=True)[:q.limit]

    def iter_records(self, q: RecordQuery, batch: int = 1000) -> Any:
        return self._store().iter_records(q, batch)

    def review(self, record_id: str, verdict: str, note: str | None, by: str, at: float) -> tuple[Record, Record]:
        """The record before and after its review. A record still in the spool is waited for (a few seconds),
        then 503: a review is written to the store, never to the spool."""
        deadline = time.monotonic() + 5
        while self._spooled(record_id) is not None and time.monotonic() < deadline:
            self._drain.set()
            time.sleep(0.02)
        before = self.get(record_id)
        if self._spooled(record_id) is not None:
            raise StoreUnavailableError("the record is not in the store yet (the store is unreachable); try again",
                                        headers={"Retry-After": "5"})
        after = self._store().review(record_id, verdict, note, by, at)
        if after is None:
            raise RecordNotFoundError(f"no record '{record_id[:40]}'")
        return before, after

    def reviewed_parts(self, class_name: str, limit: int) -> Sequence[ReviewedPart]:
        return self._store().reviewed_parts(class_name, limit)

    def passed_parts(self, class_name: str, limit: int) -> Sequence[PassedPart]:
        return self._store().passed_parts(class_name, limit)


def _settle(future: asyncio.Future, ids: dict[int, str] | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(ids)
