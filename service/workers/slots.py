"""Shared-memory image slots: where a worker puts a request's resized uint8 images for the engine to read.

A worker owns one segment of `slots` images of (3, S, S) uint8 and hands out contiguous runs of slots, one run
per request, so the engine sees a request's images as one (n, 3, S, S) tensor without a copy. A run is given back
when the engine's reply for it arrives: the engine never touches a run after replying, so no slot is written
while it is being read.
"""

from __future__ import annotations

import contextlib
import sys
from multiprocessing import shared_memory

import numpy as np
import torch

__all__ = ["SharedCounter", "SlotSegment"]


def _attach(name: str) -> shared_memory.SharedMemory:
    """Attach without taking ownership: the creator unlinks the segment. The processes that attach are the
    engine and its spawned workers, which share one resource tracker, so an attach registers nothing new there:
    the creator's unlink unregisters the name once, and what a killed process left is unlinked when the tracker
    stops (with the server). Unregistering here would drop the creator's registration instead."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    return shared_memory.SharedMemory(name=name)


class SlotSegment:
    def __init__(self, slots: int, size: int, name: str | None = None) -> None:
        """Create a segment of `slots` images of side `size` (name None), or attach to the segment `name`."""
        self.slots, self.size = slots, size
        nbytes = slots * 3 * size * size
        if name is None:
            self._shm = shared_memory.SharedMemory(create=True, size=nbytes)
            self.owner = True
        else:
            self._shm = _attach(name)
            self.owner = False
            if self._shm.size < nbytes:
                raise ValueError(f"segment {name} holds {self._shm.size} bytes, {nbytes} expected")
        self._array = np.ndarray((slots, 3, size, size), dtype=np.uint8, buffer=self._shm.buf)
        self.images = torch.from_numpy(self._array)  # shares the segment's memory
        self._free = np.ones(slots, dtype=bool)

    @property
    def name(self) -> str:
        return self._shm.name

    @property
    def free_slots(self) -> int:
        return int(self._free.sum())

    def reserve(self, count: int) -> int | None:
        """The first slot of a free run of `count` slots, now taken; None when there is no such run."""
        if count < 1 or count > self.slots:
            return None
        # a run of `count` free slots starts where the window sum of free flags equals `count`
        windows = np.convolve(self._free.astype(np.int32), np.ones(count, dtype=np.int32), mode="valid")
        starts = np.flatnonzero(windows == count)
        if not starts.size:
            return None
        start = int(starts[0])
        self._free[start:start + count] = False
        return start

    def release(self, start: int, count: int) -> None:
        self._free[start:start + count] = True

    def array(self, start: int, count: int) -> np.ndarray:
        """The same slots as a numpy array, for writing them without torch's thread pool."""
        return self._array[start:start + count]

    def view(self, start: int, count: int) -> torch.Tensor:
        """Slots `start`..`start + count` as one (count, 3, S, S) uint8 tensor sharing the segment's memory."""
        return self.images[start:start + count]

    def close(self) -> None:
        """Detach (and, for the creator, remove the segment). Tensors viewing it must be gone by now."""
        self.images = torch.empty(0, dtype=torch.uint8)
        del self._array
        self._shm.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()

    def unlink(self) -> None:
        """Remove the segment's name without unmapping it here: the engine, for a worker that is gone, while a
        batch may still read the slots. The memory is freed once the last view of it is. Removing the name also
        drops it from the resource tracker the engine and its workers share, so it is removed once."""
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()


class SharedCounter:
    """One int64 in shared memory: the engine's count of queued images, which workers read to refuse a request
    before decoding it. Aligned 8-byte loads and stores are atomic on the CPUs we run on; one writer."""

    def __init__(self, name: str | None = None) -> None:
        self._shm = shared_memory.SharedMemory(create=True, size=8) if name is None else _attach(name)
        self.owner = name is None
        self._value = np.ndarray((1,), dtype=np.int64, buffer=self._shm.buf)
        if self.owner:
            self._value[0] = 0

    @property
    def name(self) -> str:
        return self._shm.name

    @property
    def value(self) -> int:
        return int(self._value[0])

    def set(self, value: int) -> None:
        self._value[0] = value

    def close(self) -> None:
        del self._value
        self._shm.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()
