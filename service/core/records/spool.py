"""Spool: the local append-only log a record is on disk in before its answer leaves (group commit).

Records are appended as frames to segment files (`<n>.spool` in the spool directory): length, CRC-32, then a JSON
header (the record) and the upload's and thumbnail's bytes. `append` writes a whole batch of frames and fsyncs
once: every request waiting meanwhile shares that one fsync. A frame whose write failed (a full disk) is cut off
again, so the log never holds half a frame that a later one follows; a crash mid-write leaves a torn last frame,
which `open` finds by its length or CRC and cuts (its answer was never sent: the fsync had not returned).

The drainer (recorder.py) reads frames back by position, `read(pos)`, and `release` drops segments wholly
drained. A segment is rotated at `segment_bytes`, so drained ones can go while the current one grows.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .record import Draft, Record

__all__ = ["Position", "Spool"]

log = logging.getLogger("sowa.records")

_HEAD = struct.Struct("!II")  # frame body bytes, CRC-32 of the body
_BODY = struct.Struct("!III")  # header JSON bytes, image bytes (+1; 0 = none), thumbnail bytes (+1; 0 = none)
MAX_FRAME = 256 * 2**20


@dataclass(frozen=True)
class Position:
    segment: int
    offset: int
    size: int  # the frame's bytes, head included


def encode(d: Draft) -> bytes:
    head = asdict(d.record)
    head["tags"] = list(d.record.tags)
    header = json.dumps(head, separators=(",", ":")).encode()
    image, thumb = d.image, d.thumbnail
    body = (_BODY.pack(len(header), 0 if image is None else len(image) + 1, 0 if thumb is None else len(thumb) + 1)
            + header + (image or b"") + (thumb or b""))
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


def decode(body: bytes) -> Draft:
    n_head, n_image, n_thumb = _BODY.unpack_from(body)
    at = _BODY.size
    head = json.loads(body[at:at + n_head])
    at += n_head
    image = thumb = None
    if n_image:
        image, at = body[at:at + n_image - 1], at + n_image - 1
    if n_thumb:
        thumb = body[at:at + n_thumb - 1]
    head["tags"] = tuple(head["tags"])
    return Draft(Record(**head), image, thumb)


class Spool:
    def __init__(self, directory: Path, segment_bytes: int = 64 * 2**20, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes, self.fsync = segment_bytes, fsync
        self._lock = threading.Lock()  # the writer's; `read` opens files of its own
        self.sizes: dict[int, int] = {}  # segment -> bytes written and synced
        self._current: int = 0
        self._file = None

    def path(self, segment: int) -> Path:
        return self.directory / f"{segment:012d}.spool"

    def open(self) -> Iterator[tuple[Position, Draft]]:
        """The frames left by an earlier run, in order (each segment's torn tail cut off); then a fresh segment
        takes new frames."""
        segments = sorted(int(p.stem) for p in self.directory.glob("*.spool") if p.stem.isdigit())
        for seg in segments:
            good = 0
            with open(self.path(seg), "rb") as f:
                data = f.read()
            while good + _HEAD.size <= len(data):
                n, crc = _HEAD.unpack_from(data, good)
                body = data[good + _HEAD.size:good + _HEAD.size + n]
                if n > MAX_FRAME or len(body) < n or zlib.crc32(body) != crc:
                    break
                try:
                    draft = decode(body)
                except (ValueError, TypeError, KeyError, struct.error) as e:
                    log.error("spool %s: unreadable frame at %d (%s); cutting there", seg, good, e)
                    break
                yield Position(seg, good, _HEAD.size + n), draft
                good += _HEAD.size + n
            if good < len(data):
                log.warning("spool segment %d: %d torn bytes at its end cut off (a crash mid-write: never "
                            "answered)", seg, len(data) - good)
                with open(self.path(seg), "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
            self.sizes[seg] = good
        self._current = (segments[-1] + 1) if segments else 1
        self._start_segment()

    def _start_segment(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.path(self._current), "ab")  # noqa: SIM115 - held open: the log's tail
        self.sizes[self._current] = 0
        self._sync_dir()

    def _sync_dir(self) -> None:
        if self.fsync:
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def append(self, frames: list[bytes]) -> list[Position]:
        """Write `frames` and sync once; their positions. On an error nothing of them stays (cut back) and it is
        raised: none of them is durable."""
        with self._lock:
            if self._file is None and self.sizes:  # a cut that could not reopen the tail: try again
                self._file = open(self.path(self._current), "ab")  # noqa: SIM115
            f, seg = self._file, self._current
            if f is None:
                raise RuntimeError("the spool is not open")
            start = at = self.sizes[seg]
            positions = []
            try:
                for frame in frames:
                    f.write(frame)
                    positions.append(Position(seg, at, len(frame)))
                    at += len(frame)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            except OSError:
                self._cut(start)
                raise
            self.sizes[seg] = at
            if at >= self.segment_bytes:
                self._current += 1
                self._start_segment()
            return positions

    def rotate(self) -> None:
        """Start a new segment, so the current one can be released once drained (the drainer calls it when
        everything is drained and the segment has grown: a restart then replays nothing)."""
        with self._lock:
            if self._file is not None and self.sizes.get(self._current, 0) > 0:
                self._current += 1
                self._start_segment()

    def _cut(self, size: int) -> None:
        """Back to `size` bytes after a failed write (the file object's buffer holds the rest: reopened). The cut
        is synced when the disk allows; either way no later frame is written after a partial one."""
        seg = self._current
        try:
            if self._file is not None:
                self._file.close()
        except OSError:
            pass  # its buffered bytes could not be written: nothing to keep of them
        self._file = None
        with open(self.path(seg), "r+b") as f:
            f.truncate(size)
            try:
                os.fsync(f.fileno())
            except OSError as e:
                log.warning("spool: the cut back to %d bytes is not synced yet (%s)", size, e)
        self._file = open(self.path(seg), "ab")  # noqa: SIM115

    def read(self, pos: Position) -> Draft:
        with open(self.path(pos.segment), "rb") as f:
            f.seek(pos.offset + _HEAD.size)
            return decode(f.read(pos.size - _HEAD.size))

    def read_many(self, positions: list[Position]) -> list[Draft]:
        out, files = [], {}
        try:
            for p in positions:
                f = files.get(p.segment) or files.setdefault(p.segment, open(self.path(p.segment), "rb"))  # noqa: SIM115
                f.seek(p.offset + _HEAD.size)
                out.append(decode(f.read(p.size - _HEAD.size)))
        finally:
            for f in files.values():
                f.close()
        return out

    def release(self, segment: int) -> None:
        """A segment wholly drained into the store: gone (never the one being written)."""
        with self._lock:
            if segment == self._current:
                return
            self.sizes.pop(segment, None)
        self.path(segment).unlink(missing_ok=True)

    @property
    def current(self) -> int:
        return self._current

    def close(self, drained: bool = False) -> None:
        """Close the log; `drained`: everything in it is in the store, so its segments go too."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if drained:
                for seg in list(self.sizes):
                    self.path(seg).unlink(missing_ok=True)
                self.sizes.clear()
