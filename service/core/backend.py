"""Backends: what the predict route calls to turn a staged batch into results.

`LocalBackend` does it in this process: the class's memory from the registry, the batcher, the engine. HTTP
worker processes (service/workers/) use `RemoteBackend`, which sends the batch to the engine process's
LocalBackend; both satisfy `Backend`, so the route is the same code in either process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol

import torch

from .batcher import DynamicBatcher, WorkItem
from .engine import Engine, ImageResult
from .registry import ClassRegistry
from .staging import ImageStager

__all__ = ["Backend", "LocalBackend"]


class Backend(Protocol):
    image_size: int
    stager: ImageStager  # puts a request's resized images where `predict` reads them

    def check_class(self, name: str) -> None: ...

    def admit(self, count: int) -> None: ...

    async def predict(self, images: torch.Tensor, class_name: str | None, deadline: float,
                      need_maps: bool = True) -> list[ImageResult]: ...

    def describe(self) -> dict[str, Any]: ...


class LocalBackend:
    def __init__(self, engine: Engine, stager: ImageStager, registry: ClassRegistry,
                 batcher: DynamicBatcher) -> None:
        self.engine, self.stager, self.registry, self.batcher = engine, stager, registry, batcher
        self.image_size = engine.image_size

    def check_class(self, name: str) -> None:
        """404 (422 for a malformed name) before any work when the class is not registered."""
        self.registry.get(name)

    def admit(self, count: int) -> None:
        """Refuse `count` images before they are decoded when the queue has no room (429) or is closing (503)."""
        self.batcher.check_room(count)

    async def predict(self, images: torch.Tensor, class_name: str | None, deadline: float, need_maps: bool = True,
                      hold_inputs: bool = False) -> list[ImageResult]:
        """Results of one request's (n, 3, S, S) uint8 images against `class_name` (None: zero-shot).

        Without `need_maps` only the maps that can hold a region come to the host.
        Cancelling the call drops the request unless it is already on the device. With `hold_inputs` a
        cancelled call returns only once the batcher is through with the images, so the caller may reuse their
        memory (a worker's slots) as soon as it returns."""
        memory = self.registry.get(class_name).serving_memory if class_name else None
        item = self.batcher.submit(WorkItem(images, [memory] * int(images.shape[0]), deadline=deadline,
                                            need_maps=need_maps))
        try:
            return await asyncio.shield(item.future)
        except asyncio.CancelledError:
            item.future.cancel()
            if hold_inputs:
                # bounded: past its deadline the batcher drops the item anyway
                limit = max(0.0, deadline - time.monotonic()) + 5
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(item.released.wait()), limit)
            raise

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

