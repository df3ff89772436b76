"""RemoteBackend: what an HTTP worker process calls instead of the engine: the engine process, over a Unix socket.

It implements the same `Backend` interface as the in-process one (service/core/backend.py), so `Backend.score`
runs the same steps in either process: the class check and the records are asked of the engine's own backend,
and admission reads the engine's queue depth from shared memory, through the batcher's own rule. A request's
images are copied into this worker's shared-memory slots (numpy's copy: no torch thread pool on the event loop)
and the engine reads them there; the run of slots is given back when the engine's reply arrives, also for a
request whose client left (the engine answers every request exactly once).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..core.backend import Backend
from ..core.batcher import admit
from ..core.class_names import check_class_name
from ..core.engine import ImageResult
from ..core.errors import NotReadyError, QueueFullError, SowaError
from ..core.records.record import Draft, Sampler
from ..core.settings import Settings
from ..core.staging import ImageStager
from ..core.uploads import Upload
from .protocol import Cancel, Check, Hello, Predict, Record, Reply, Shadow, parse, read_frame, to_frame
from .slots import SharedCounter, SlotSegment
from .wire import drafts_to_wire, error_from_wire, results_from_wire, results_to_wire

__all__ = ["RemoteBackend"]

log = logging.getLogger("sowa.frontend")


class RemoteBackend(Backend):
    def __init__(self, socket_path: str, slots: int, settings: Settings,
                 on_lost: Callable[[], None] | None = None) -> None:
        """`on_lost` is called once the engine connection is gone for good (the worker then stops)."""
        self.socket_path, self.slots, self.settings, self.on_lost = socket_path, slots, settings, on_lost
        self.recording, self.sampler = settings.records, Sampler(settings.record_sample_passed)  # this worker's share
        self.segment: SlotSegment | None = None
        self.description: dict[str, Any] = {}
        self.image_size = 0
        self.stager: ImageStager | None = None  # set by the worker app once the image size is known
        self._ids = itertools.count(1)
        # each request's future and its run of slots (with the segment it is in: a new model's input size brings a
        # new segment, while requests in the old one finish)
        self._pending: dict[int, tuple[asyncio.Future, tuple[SlotSegment, int, int] | None]] = {}
        self._old_segments: list[SlotSegment] = []
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._queued: Any = None  # the engine's queued-image count, in shared memory (admission before decoding)
        self.lost = False
        self.shadow_share, self.shadow_size = 0.0, 0  # as the engine's last answer said
        self._rng = random.Random()

    async def connect(self) -> None:
        """Open the socket, create this worker's slots, and learn the model's geometry from the engine. A failed
        attempt leaves nothing open (the caller may try again)."""
        try:
            reader, self._writer = await asyncio.open_unix_connection(self.socket_path)
            first = parse(await read_frame(reader))  # the engine speaks first: the image size and the model
            if not isinstance(first, Reply):
                raise ConnectionError(f"the engine opened with {first.op}, not its reply")
            self.description = first.result["model"]
            self.image_size = int(first.result["image_size"])
            self._queued = SharedCounter(first.result["queue_counter"])
            self.segment = SlotSegment(self.slots, self.image_size)
            self._writer.write(to_frame(Hello(self.segment.name, self.slots)))
            await self._writer.drain()
        except BaseException:
            await self.close()
            self._writer = None
            raise
        self._reader_task = asyncio.create_task(self._read(reader), name="sowa-remote-reader")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        if self.segment is not None:
            self.segment.close()
            self.segment = None
        for old in self._old_segments:
            old.close()
        self._old_segments.clear()

    def _resize(self, size: int) -> None:
        """The engine now serves a model of another input size: stage later requests at it, in a new segment of
        slots of that size (announced to the engine before any request uses it); the old one goes once the
        requests in it are answered."""
        if self.segment is None or self._writer is None or self.lost:
            return
        segment = SlotSegment(self.slots, size)
        self._writer.write(to_frame(Hello(segment.name, self.slots)))
        self._old_segments.append(self.segment)
        self.segment, self.image_size = segment, size
        if self.stager is not None:
            self.stager = ImageStager(self.stager.device, size, self.stager.decoder)
        log.info("the engine serves %d px images now: staging at that size", size)
        self._close_old_segments()

    def _close_old_segments(self) -> None:
        for old in [s for s in self._old_segments if s.free_slots == s.slots]:
            old.close()
            self._old_segments.remove(old)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await read_frame(reader)
                reply = parse(frame)
                if not isinstance(reply, Reply):
                    raise ValueError(f"unexpected {reply.op} from the engine")
                if reply.id == 0 and isinstance(reply.result, dict):  # news: the serving model's input size
                    if int(reply.result["image_size"]) != self.image_size:
                        self._resize(int(reply.result["image_size"]))
                    continue
                future, run = self._pending.pop(reply.id, (None, None))
                if run is not None:  # the engine is through with these slots
                    run[0].release(run[1], run[2])
                    self._close_old_segments()
                if future is None or future.done():
                    continue
                if reply.error is not None:
                    future.set_exception(error_from_wire(reply.error))
                else:
                    future.set_result((reply.result, frame.payload))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as e:
            log.error("lost the engine process: %s", e)
        finally:
            self.lost = True
            for future, _ in self._pending.values():
                if not future.done():
                    future.set_exception(NotReadyError("the engine process is gone", headers={"Retry-After": "5"}))
            self._pending.clear()
            if self.on_lost is not None:
                self.on_lost()

    def _send(self, message: Cancel | Check | Record | Predict, payload: bytes = b"") -> None:
        if self.lost or self._writer is None:
            raise NotReadyError("the engine process is gone", headers={"Retry-After": "5"})
        self._writer.write(to_frame(message, payload))

    async def _ask(self, message: Check | Record, payload: bytes = b"") -> Any:
        """Send a message that takes one reply, and wait for it (the engine answers every message once)."""
        future = asyncio.get_running_loop().create_future()
        self._pending[message.id] = (future, None)
        try:
            self._send(message, payload)
        except SowaError:
            self._pending.pop(message.id, None)
            raise
        result, _ = await future
        return result

    async def check_class(self, name: str) -> None:
        """A malformed name is refused here (422); whether the class exists the engine says (404), before this
        worker reads or decodes anything."""
        check_class_name(name)
        await self._ask(Check(next(self._ids), name))

    def admit(self, count: int) -> None:
        """Refuse a request before its images are decoded when the engine's queue has no room for them."""
        if self.lost or self._queued is None:
            raise NotReadyError("the engine process is gone", headers={"Retry-After": "5"})
        s = self.settings
        admit(self._queued.value, count, s.max_queue, s.max_wait_ms / 1000.0, s.max_batch_size)

    async def record(self, drafts: Sequence[Draft]) -> list[str | None]:
        """Records are spooled by the engine process (it owns the record store); the reply is their ids."""
        rows, payload = drafts_to_wire(drafts)
        return list(await self._ask(Record(next(self._ids), rows), payload))

    async def predict(self, images: torch.Tensor, class_name: str | None, deadline: float,
                      need_maps: bool = True, *, pin: Any = None,
                      answered: list[dict[str, Any]] | None = None) -> list[ImageResult]:
        """The engine's results for these images; `need_maps` False sends only the maps that can hold a region
        (no heatmap was asked for)."""
        if self.segment is None:
            raise NotReadyError("not connected to the engine process yet", headers={"Retry-After": "1"})
        count = int(images.shape[0])
        if int(images.shape[-1]) != self.segment.size:  # staged before the model's input size changed
            raise NotReadyError("the served model changed while this request was staged; retry",
                                headers={"Retry-After": "1"})
        start = self.segment.reserve(count)
        if start is None:
            raise QueueFullError(f"this worker has {self.segment.free_slots} free image slots, {count} needed; "
                                 "retry later", headers={"Retry-After": "1"})
        segment = self.segment
        np.copyto(segment.array(start, count), images.numpy())
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = (future, (segment, start, count))
        try:
            self._send(Predict(rid, start, count, class_name, deadline, need_maps))
        except SowaError:
            self._pending.pop(rid, None)
            segment.release(start, count)
            raise
        try:
            result, payload = await asyncio.shield(future)
        except asyncio.CancelledError:  # the client went away: the engine drops it unless it is on the device
            future.cancel()  # its reply is still awaited (for the slots), but nobody reads its outcome
            if not self.lost:
                self._send(Cancel(rid))
            raise
        model = result["model"]  # the model that produced them: the answer names it, and later requests too
        self.description = model
        self.shadow_share, self.shadow_size = float(result["shadow_share"]), int(result["shadow_size"])
        if int(result["image_size"]) != self.image_size:  # the size the engine's serving model takes now
            self._resize(int(result["image_size"]))
        if answered is not None:
            answered.append(model)
        return results_from_wire(result["rows"], payload, int(model["image_size"]))

    def shadow(self, pin: Any, images: torch.Tensor, uploads: Sequence[Upload], class_name: str,
               results: list[ImageResult], record_ids: list[str | None]) -> None:
        """Sample an answered request for the engine's shadow model, and send it there (never waited for)."""
        if self.shadow_share <= 0 or self._rng.random() >= self.shadow_share or self.lost:
            return
        rows, _ = results_to_wire(results, False)
        size = int(images.shape[-1])
        if self.shadow_size == size:
            payload, lengths = images.numpy().tobytes(), None
        else:  # the shadow takes another input size: the engine stages the uploads for it
            payload, lengths = b"".join(data for _, data in uploads), [len(data) for _, data in uploads]
        message = Shadow(next(self._ids), class_name, len(results), size, rows, list(record_ids), lengths)
        future = asyncio.get_running_loop().create_future()
        self._pending[message.id] = (future, None)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it: errors are dropped
        try:
            self._send(message, payload)
        except SowaError:
            self._pending.pop(message.id, None)

    def describe(self) -> dict:
        return dict(self.description)
