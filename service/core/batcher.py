"""DynamicBatcher: one bounded queue in front of the device; batches formed across requests and classes.

A batch closes when it holds `max_batch_size` images or `max_wait_ms` after its first request arrived, or when the
next request started on another model than the batch's (a model switch happens between batches). While
the device runs a batch, new requests queue up, so load makes batches bigger by itself. Requests whose client
went away or whose deadline passed are dropped before the device; a failing batch fails only its own requests.
The batcher knows neither HTTP nor the registry: it calls an injected `run_batch(images, memories, need_maps, model)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model.inference import ClassMemory

from .errors import DeadlineExceededError, NotReadyError, QueueFullError
from .telemetry import Telemetry

__all__ = ["DynamicBatcher", "WorkItem", "admit"]

log = logging.getLogger("sowa.batcher")

# (each request's images, each image's class memory, whether each image's answer needs its map, the model the
# batch's requests started on: None for the active one) -> results
RunBatch = Callable[[Sequence[torch.Tensor], Sequence[ClassMemory | None], Sequence[bool], Any], Awaitable[list]]


@dataclass(eq=False)
class WorkItem:
    """One request's images, each image's class memory (or None), and where its results go."""

    images: torch.Tensor  # (n, 3, S, S) uint8, resized, staged on the engine's device (normalised there)
    memories: list[ClassMemory | None]
    deadline: float  # time.monotonic() after which the result is useless
    need_maps: bool = True  # the answer encodes heatmaps (else only maps that can hold a region come back)
    model: Any = None  # the model the request started on (a ServedModel; None: whichever is active); never mixed
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued: float = field(default_factory=time.monotonic)
    # set once the batcher is through with the item (run, dropped or failed): its images are no longer read, so
    # memory they live in (a worker's shared-memory slots) may be reused
    released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


def admit(queued: int, images: int, max_queue: int, max_wait_s: float, max_batch_size: int) -> None:
    """The one admission rule, wherever the queue's depth is read (the batcher itself, or an HTTP worker reading
    it from shared memory): 429 when `images` more would not fit, with a Retry-After of about the time the
    queue needs to drain (a batch's wait plus 50 ms a batch, at least 1 s)."""
    if queued + images > max_queue:
        retry = max(1, round(max_wait_s + 0.05 * queued / max_batch_size))
        raise QueueFullError(f"{queued} images are waiting (limit {max_queue}); retry later",
                             headers={"Retry-After": str(retry)})


class DynamicBatcher:
    def __init__(self, run_batch: RunBatch, max_batch_size: int, max_wait_ms: float, max_queue: int,
                 telemetry: Telemetry | None = None, on_depth: Callable[[int], None] | None = None,
                 max_in_flight: int = 2) -> None:
        """`on_depth(queued_images)` is told every change of the queue (worker processes read it to refuse
        requests before decoding them). `max_in_flight` batches run at once: while one's results come back and
        are answered, the next is already on the device."""
        if max_batch_size < 1 or max_queue < max_batch_size or max_wait_ms < 0:
            raise ValueError(f"need max_batch_size >= 1, max_queue >= max_batch_size and max_wait_ms >= 0, got "
                             f"{max_batch_size}, {max_queue}, {max_wait_ms}")
        self.run_batch, self.max_batch_size, self.max_queue = run_batch, max_batch_size, max_queue
        self.max_wait = max_wait_ms / 1000.0
        self.telemetry, self.on_depth = telemetry, on_depth
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._running: set[asyncio.Task] = set()
        self._queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        self._queued_images = 0
        self._carry: WorkItem | None = None  # an item that did not fit the last batch
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def queued_images(self) -> int:
        """Images submitted and not yet answered (queued, in a forming batch, or on the device)."""
        return self._queued_images

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet taken into a batch."""
        return self._queue.qsize() + (self._carry is not None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sowa-batcher")

    def check_room(self, images: int) -> None:
        """Refuse `images` more at once: 503 while shutting down, 429 when the queue has no room for them. Routes
        ask before decoding a request, so overload costs no decoding; `submit` asks again."""
        if self._closing:
            raise NotReadyError("the server is shutting down")
        admit(self._queued_images, images, self.max_queue, self.max_wait, self.max_batch_size)

    def submit(self, item: WorkItem) -> WorkItem:
        """Queue an item or refuse it at once (`check_room`)."""
        self.check_room(item.size)
        self._queued_images += item.size
        self._gauge()
        self._queue.put_nowait(item)
        return item

    async def close(self) -> None:
        """Refuse new work, finish what is queued, stop."""
        self._closing = True
        if self._task is not None:
            await self._queue.join()
            await asyncio.gather(*self._running, return_exceptions=True)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- the loop ---------------------------------------------------------------------------------------------
    async def _next(self, timeout: float | None) -> WorkItem | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if not self._queue.empty():  # already waiting: joins the batch whatever the window says
            return self._queue.get_nowait()
        if timeout is None:
            return await self._queue.get()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            return None

    def _done(self, item: WorkItem) -> None:
        self._queued_images -= item.size
        self._queue.task_done()
        item.released.set()
        self._gauge()

    def _gauge(self) -> None:
        if self.telemetry:
            self.telemetry.queue_depth.set(self._queued_images)
        if self.on_depth is not None:
            self.on_depth(self._queued_images)

    def _usable(self, item: WorkItem, now: float) -> bool:
        if item.future.done():  # cancelled: the client went away
            self._done(item)
            return False
        if now > item.deadline:
            item.future.set_exception(DeadlineExceededError("the request waited past its deadline"))
            self._done(item)
            return False
        return True

    async def _collect(self) -> list[WorkItem]:
        batch: list[WorkItem] = []
        images = 0
        close_at: float | None = None
        while images < self.max_batch_size:
            timeout = None if close_at is None else max(0.0, close_at - time.monotonic())
            item = await self._next(timeout)
            if item is None:
                break
            if not self._usable(item, time.monotonic()):
                continue
            if batch and (images + item.size > self.max_batch_size or item.model is not batch[0].model):
                self._carry = item  # opens the next batch
                break
            batch.append(item)
            images += item.size
            if close_at is None:  # the window opens when the first request arrived, not when it was taken
                close_at = item.enqueued + self.max_wait
        return batch

    async def _loop(self) -> None:
        while True:
            await self._in_flight.acquire()  # at most `max_in_flight` batches between launch and answer
            batch = await self._collect()
            now = time.monotonic()
            # once more at the door: a client may have left, or a deadline passed, while the batch filled up
            batch = [it for it in batch if self._usable(it, now)]
            if not batch:
                self._in_flight.release()
                continue
            if self.telemetry:
                self.telemetry.batch_size.observe(sum(it.size for it in batch))
                for it in batch:
                    self.telemetry.queue_wait.observe(now - it.enqueued)
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[WorkItem]) -> None:
        try:
            size = sum(it.size for it in batch)
            memories = [m for it in batch for m in it.memories]
            need_maps = [it.need_maps for it in batch for _ in range(it.size)]
            try:  # the tensors are joined by run_batch, on the device thread: no torch work on the event loop
                results = await self.run_batch([it.images for it in batch], memories, need_maps, batch[0].model)
                if len(results) != size:
                    raise RuntimeError(f"run_batch returned {len(results)} results for {size} images")
            except Exception as e:  # the batch fails alone; the loop goes on
                log.exception("batch of %d images failed", size)
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(e)
                    self._done(it)
                return
            start = 0
            for it in batch:
                if not it.future.done():
                    it.future.set_result(results[start:start + it.size])
                start += it.size
                self._done(it)
        finally:
            self._in_flight.release()
