"""EngineServer: the engine process's side of the worker socket. It serves the in-process backend (LocalBackend)
to the workers' RemoteBackends: class checks, predictions, records.

Per connection (one worker): the engine says hello first (image size, the model, its queue counter), the worker
answers with its slot segment, then requests flow. Each request runs as a task; its one reply is written when
it ends, whatever the outcome, and only once the batcher is through with its slots. A worker that disconnects
has its requests cancelled, and its segment is removed once none of them can touch it any more: a worker killed
with kill -9 cannot remove it itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable

import torch

from ..core.backend import LocalBackend
from ..core.errors import ClientClosedError, SowaError, UnprocessableError
from .protocol import Cancel, Check, Hello, Predict, Record, Reply, Shadow, parse, read_frame, to_frame
from .slots import SharedCounter, SlotSegment
from .wire import drafts_from_wire, error_to_wire, results_from_wire, results_to_wire

__all__ = ["EngineServer"]

log = logging.getLogger("sowa.frontend")


class EngineServer:
    def __init__(self, backend: LocalBackend, socket_path: str, queue_counter: SharedCounter) -> None:
        self.backend, self.socket_path, self.counter = backend, socket_path, queue_counter
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._connection, self.socket_path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def announce(self) -> None:
        """Tell every worker the input size the serving model takes now (after a switch): an answer to no request
        (id 0), which a worker reads as news. A request it staged at the old size before this arrives finishes on
        the old model (its generation is kept a while)."""
        for writer in list(self._writers):
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.write(to_frame(Reply(0, {"image_size": self.backend.image_size})))

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: dict[int, asyncio.Task] = {}
        segments: list[SlotSegment] = []
        try:
            writer.write(to_frame(Reply(0, {"image_size": self.backend.image_size, "model": self.backend.describe(),
                                            "queue_counter": self.counter.name})))
            hello = parse(await read_frame(reader))
            if not isinstance(hello, Hello):
                raise ValueError(f"expected hello, got {hello.op}")
            segment = SlotSegment(hello.slots, self.backend.image_size, name=hello.segment)
            segments = [segment]
            self._writers.add(writer)
            while True:
                frame = await read_frame(reader)
                message = parse(frame)
                if isinstance(message, Hello):  # a new segment, at the serving model's new input size
                    segment = SlotSegment(message.slots, self.backend.image_size, name=message.segment)
                    segments.append(segment)
                    continue
                if isinstance(message, Predict):
                    work = self._predict(message, segment)
                elif isinstance(message, Check | Record | Shadow):
                    work = self._answer(message, frame.payload)
                else:
                    if isinstance(message, Cancel) and message.id in tasks:
                        tasks[message.id].cancel()
                    continue
                tasks[message.id] = asyncio.create_task(self._reply(message.id, work, writer, tasks))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker stopped (or was killed): its requests go with it
        except Exception:
            log.exception("worker connection failed")
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            self._writers.discard(writer)
            for seg in segments:
                # the worker is gone: its name goes now (one that stopped cleanly removed it already), its memory
                # once nothing views it, never under a batch the device may still be reading
                seg.unlink()
            writer.close()

    async def _predict(self, m: Predict, segment: SlotSegment) -> tuple[Reply, bytes]:
        if not (m.start >= 0 and m.start + m.count <= segment.slots):
            raise UnprocessableError(f"slots {m.start}..{m.start + m.count} outside the segment")
        answered: list[dict] = []
        results = await self.backend.predict(segment.view(m.start, m.count), m.class_name, m.deadline,
                                             need_maps=m.need_maps, answered=answered, hold_inputs=True)
        rows, payload = results_to_wire(results, m.need_maps)
        # the model that answered, the input size the serving model takes now (the worker stages at it), and the
        # share of answered requests a shadow model wants (the worker samples them)
        return Reply(m.id, {"rows": rows, "model": answered[0], "image_size": self.backend.image_size,
                            "shadow_share": self.backend.shadow_share,
                            "shadow_size": self.backend.shadow_size}), payload

    async def _answer(self, m: Check | Record | Shadow, payload: bytes) -> tuple[Reply, bytes]:
        if isinstance(m, Check):
            await self.backend.check_class(m.class_name)
            return Reply(m.id), b""
        if isinstance(m, Shadow):
            self._shadow(m, payload)
            return Reply(m.id), b""
        return Reply(m.id, await self.backend.record(drafts_from_wire(m.records, payload))), b""

    def _shadow(self, m: Shadow, payload: bytes) -> None:
        uploads: list[tuple[str, bytes]] = []
        if m.upload_lengths is not None:  # the shadow's input size differs: it stages the uploads itself
            if sum(m.upload_lengths) != len(payload) or len(m.upload_lengths) != m.count:
                raise UnprocessableError("a shadow frame whose uploads do not add up")
            offsets = [0, *itertools.accumulate(m.upload_lengths)]
            uploads = [(f"upload-{i}", payload[a:b]) for i, (a, b) in enumerate(itertools.pairwise(offsets))]
            images = torch.zeros(m.count, 3, m.size, m.size, dtype=torch.uint8)  # the size the worker staged at
        elif len(payload) != m.count * 3 * m.size * m.size:
            raise UnprocessableError(f"a shadow frame of {len(payload)} bytes for {m.count} images of {m.size} px")
        else:
            images = torch.frombuffer(bytearray(payload), dtype=torch.uint8).reshape(m.count, 3, m.size, m.size)
        self.backend.shadow_sampled(images, uploads, m.class_name, results_from_wire(m.results, b"", m.size),
                                    m.record_ids)

    async def _reply(self, message_id: int, work: Awaitable[tuple[Reply, bytes]], writer: asyncio.StreamWriter,
                     tasks: dict[int, asyncio.Task]) -> None:
        """Run one message's work and write its one reply, whatever the outcome."""
        payload = b""
        try:
            reply, payload = await work
        except asyncio.CancelledError:
            reply = Reply(message_id, error=error_to_wire(ClientClosedError("the client went away")))
        except SowaError as e:
            reply = Reply(message_id, error=error_to_wire(e))
        except Exception as e:  # a bug: this request answers 500, the connection lives on
            log.exception("request %d failed", message_id)
            reply = Reply(message_id, error=error_to_wire(SowaError(f"internal error ({type(e).__name__})")))
        finally:
            tasks.pop(message_id, None)
        with contextlib.suppress(ConnectionError, RuntimeError):  # the worker may be gone already
            writer.write(to_frame(reply, payload))
