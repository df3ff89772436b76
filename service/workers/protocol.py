"""Frames between HTTP workers and the engine process: a JSON header and a binary payload, length-prefixed.

The scoring path takes this socket (`Backend.score` through RemoteBackend): a class check, the
prediction, and the records of a request's images; every other route a worker forwards to the engine process's own
HTTP server (proxy.py). Images never travel in frames: a worker writes them into its shared-memory slots
(slots.py) and names the slots; only a request sampled for a shadow model sends its images again, in a `Shadow`
frame, after its answer. The payload carries what does not fit JSON: the anomaly maps (float32) of a
reply. Every message is one frozen dataclass; `Frame.header["op"]` says which. Both ends are processes of one
server, started together, so nothing here is untrusted input; sizes are bounded all the same.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["MAX_PAYLOAD", "Cancel", "Check", "Frame", "Hello", "Message", "Predict", "Record", "Reply", "Shadow",
           "encode", "parse", "read_frame", "to_frame"]

_LENGTHS = struct.Struct("!II")  # header bytes, payload bytes
MAX_HEADER = 16 * 2**20
MAX_PAYLOAD = 2**31 - 1


@dataclass(frozen=True)
class Frame:
    header: dict[str, Any]
    payload: bytes = b""


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _LENGTHS.pack(len(head), len(payload)) + head + payload


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """The next frame; `asyncio.IncompleteReadError` when the peer has gone."""
    n_head, n_payload = _LENGTHS.unpack(await reader.readexactly(_LENGTHS.size))
    if n_head > MAX_HEADER or n_payload > MAX_PAYLOAD:
        raise ValueError(f"frame too large: header {n_head} bytes, payload {n_payload} bytes")
    header = json.loads(await reader.readexactly(n_head))
    payload = await reader.readexactly(n_payload) if n_payload else b""
    return Frame(header, payload)


@dataclass(frozen=True)
class Hello:
    """A worker's first frame: the shared-memory segment holding its image slots."""

    segment: str
    slots: int
    op: str = "hello"


@dataclass(frozen=True)
class Predict:
    """Score `count` images staged in slots `start`..`start + count` of the worker's segment."""

    id: int
    start: int
    count: int
    class_name: str | None
    deadline: float  # time.monotonic(), the same clock in every process of one host
    need_maps: bool  # the answer encodes a heatmap: send every map, not only those that can hold a region
    op: str = "predict"


@dataclass(frozen=True)
class Check:
    """Is `class_name` registered? The reply is empty, or the error a single process would raise."""

    id: int
    class_name: str
    op: str = "check"


@dataclass(frozen=True)
class Record:
    """Record these inspections (the engine process owns the record store): one row of numbers each; the payload
    holds each row's upload (`image_len`, -1 for none) then its thumbnail (`thumbnail_len`), in order. The reply
    is each record's id (None where it was not kept), sent once the records are in the spool."""

    id: int
    records: list[dict[str, Any]]
    op: str = "record"


@dataclass(frozen=True)
class Shadow:
    """A request the worker sampled for the shadow model, once answered: the payload holds its `count` staged
    images ((count, 3, size, size) uint8), or, when the shadow takes another input size, the uploads as sent
    (`upload_lengths` bytes each, in order: the engine stages them at the shadow's size); `results` are the
    serving model's numbers (wire rows without maps), `record_ids` its records'. The reply is empty and comes at
    once: the shadow scores it later, or drops it."""

    id: int
    class_name: str
    count: int
    size: int
    results: list[dict[str, Any]]
    record_ids: list[str | None]
    upload_lengths: list[int] | None = None
    op: str = "shadow"


@dataclass(frozen=True)
class Cancel:
    """The client of request `id` went away: drop it if it has not reached the device."""

    id: int
    op: str = "cancel"


@dataclass(frozen=True)
class Reply:
    """The one answer to request `id`: `result` (JSON) or `error` ({code, status, message, headers})."""

    id: int
    result: Any = None
    error: dict[str, Any] | None = None
    op: str = "reply"


_MESSAGES: dict[str, type] = {"hello": Hello, "predict": Predict, "check": Check, "record": Record, "cancel": Cancel,
                             "reply": Reply, "shadow": Shadow}
Message = Hello | Predict | Check | Record | Shadow | Cancel | Reply


def to_frame(message: Message, payload: bytes = b"") -> bytes:
    return encode(asdict(message), payload)


def parse(frame: Frame) -> Message:
    cls = _MESSAGES.get(frame.header.get("op"))
    if cls is None:
        raise ValueError(f"unknown message {frame.header.get('op')!r}")
    return cls(**frame.header)
