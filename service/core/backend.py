"""Backends: where `scoring.score` finds the model.

`LocalBackend` is this process: the class's memory from the registry, the batcher, the engine, the kept results.
HTTP worker processes use `RemoteBackend` (service/workers/remote.py), which asks the engine process's
LocalBackend over a socket. Both satisfy `Backend`, so the scoring path is the same code in either process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .batcher import DynamicBatcher, WorkItem
from .engine import Engine, ImageResult
from .registry import ClassRegistry
from .results import KeptResult, ResultStore
from .staging import ImageStager

__all__ = ["Backend", "LocalBackend"]


class Backend(Protocol):
    image_size: int
    stager: ImageStager  # puts a request's resized images where `predict` reads them

    async def check_class(self, name: str) -> None:
        """ClassNotFoundError (404) when the class is not registered; 422 for a malformed name."""

    def admit(self, count: int) -> None:
        """QueueFullError (429) when the queue has no room for `count` images, NotReadyError (503) when closing."""

    async def predict(self, images: torch.Tensor, class_name: str | None, deadline: float,
                      need_maps: bool = True) -> list[ImageResult]:
        """Results of (n, 3, S, S) uint8 images against `class_name` (None: zero-shot). Without `need_maps` only
        the maps that can hold a region come to the host."""

    async def keep(self, kept: Sequence[KeptResult]) -> None:
        """Keep results for the console (where the kept results live)."""

    def describe(self) -> dict[str, Any]:
        """The model being served, as answers report it."""


class LocalBackend:
    def __init__(self, engine: Engine, stager: ImageStager, registry: ClassRegistry, batcher: DynamicBatcher,
                 results: ResultStore) -> None:
        self.engine, self.stager, self.registry, self.batcher = engine, stager, registry, batcher
        self.results = results
        self.image_size = engine.image_size

    async def check_class(self, name: str) -> None:
        self.registry.get(name)

    def admit(self, count: int) -> None:
        self.batcher.check_room(count)

    async def predict(self, images: torch.Tensor, class_name: str | None, deadline: float, need_maps: bool = True,
                      hold_inputs: bool = False) -> list[ImageResult]:
        """Cancelling the call drops the request unless it is already on the device. With `hold_inputs` a
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

    async def keep(self, kept: Sequence[KeptResult]) -> None:
        for k in kept:
            self.results.add(k)

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()
