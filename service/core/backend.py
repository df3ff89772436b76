"""Backend: where the model is, and `Backend.score`, the one path from a request's uploads to its results.

check the class -> admit (429 before any decoding) -> read the uploads -> stage (decode within the limits,
resize, onto the device or a worker's shared-memory slots) -> predict (batched, within the deadline) ->
post-process (per-request threshold, regions; for `keep`, thumbnails and the kept results). The steps and their
errors are this one method; a subclass says only where the model is: `LocalBackend` in this process,
`RemoteBackend` in an HTTP worker (service/workers/remote.py), which asks the engine process's LocalBackend over a
socket. So one request answers the same in either topology; the HTTP layer only parses the request before and
encodes the heatmaps after.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .batcher import DynamicBatcher, WorkItem
from .codecs import find_regions
from .engine import Engine, ImageResult
from .errors import DeadlineExceededError, UnprocessableError
from .registry import ClassRegistry
from .results import KeptResult, ResultStore, make_kept, override_threshold
from .staging import ImageStager
from .uploads import DecodeBudget, ImageSource, PixelLimits, StagedBatch, Upload, stage_uploads

__all__ = ["Backend", "LocalBackend", "ScoreOptions", "Scored", "ScoredImage"]


@dataclass(frozen=True)
class ScoreOptions:
    """What a request asks besides its images; every option travels to wherever the model is."""

    class_name: str | None = None  # None: zero-shot
    threshold: float | None = None  # this request's threshold on the raw score, instead of the class's
    need_maps: bool = True  # the answer encodes a heatmap: every map comes to the host, not only those with regions
    keep: bool = False  # keep the results (numbers, thumbnail, the upload) for the console

    def check(self) -> None:
        if self.keep and not self.class_name:
            raise UnprocessableError("keep=true needs a class_name: kept results belong to a class")


@dataclass(frozen=True)
class ScoredImage:
    source: ImageSource
    result: ImageResult
    regions: list[dict[str, Any]] = field(default_factory=list)
    result_id: str | None = None  # the kept result's id (keep=true)


@dataclass(frozen=True)
class Scored:
    class_name: str | None
    images: list[ScoredImage]
    model: dict[str, Any]


class Backend(ABC):
    image_size: int
    stager: ImageStager  # puts a request's resized images where `predict` reads them

    async def score(self, read: Callable[[], Awaitable[Sequence[Upload]]], options: ScoreOptions, timeout_s: float,
                    limits: PixelLimits, budget: DecodeBudget, max_image_bytes: int = 0) -> Scored:
        """One request's results. `read` gives the uploads' bytes; it is called only once the class is known to
        exist, so an unknown class costs no reading. `timeout_s` bounds the wait for the device;
        `max_image_bytes`: a kept upload larger than this is kept without its image."""
        options.check()
        if options.class_name:
            await self.check_class(options.class_name)  # 404 (422 for a malformed name) before any work
        uploads = await read()
        self.admit(len(uploads))  # 429 before decoding: overload costs no decoding
        batch = await stage_uploads(uploads, limits, self.stager, budget, thumbnails=options.keep)
        deadline = time.monotonic() + timeout_s
        need_maps = options.need_maps or options.keep
        try:
            results = await asyncio.wait_for(self.predict(batch.images, options.class_name, deadline, need_maps),
                                             timeout_s)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            raise DeadlineExceededError(f"no result within {timeout_s:g} s") from None
        results = [override_threshold(r, options.threshold) for r in results]
        images, kept = await asyncio.to_thread(_finish, batch, uploads, results, options, max_image_bytes)
        if kept:
            await self.keep(kept)
        return Scored(options.class_name, images, self.describe())

    @abstractmethod
    async def check_class(self, name: str) -> None:
        """ClassNotFoundError (404) when the class is not registered; 422 for a malformed name."""

    @abstractmethod
    def admit(self, count: int) -> None:
        """QueueFullError (429) when the queue has no room for `count` images, NotReadyError (503) when closing."""

    @abstractmethod
    async def predict(self, images: torch.Tensor, class_name: str | None, deadline: float,
                      need_maps: bool = True) -> list[ImageResult]:
        """Results of (n, 3, S, S) uint8 images against `class_name` (None: zero-shot). Without `need_maps` only
        the maps that can hold a region come to the host."""

    @abstractmethod
    async def keep(self, kept: Sequence[KeptResult]) -> None:
        """Keep results for the console (where the kept results live)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The model being served, as answers report it."""


def _finish(batch: StagedBatch, uploads: Sequence[Upload], results: list[ImageResult], options: ScoreOptions,
            max_image_bytes: int) -> tuple[list[ScoredImage], list[KeptResult]]:
    """Regions and, for `keep`, the kept results (CPU work: a worker thread, in the process that decoded)."""
    images, kept = [], []
    for i, (src, r) in enumerate(zip(batch.sources, results, strict=True)):
        regions = (find_regions(r.anomaly_map, r.pixel_threshold, src.width, src.height)
                   if r.anomaly_map is not None and r.may_hold_regions else [])
        result_id = None
        if options.keep and options.class_name:
            k = make_kept(options.class_name, src, uploads[i][1], batch.thumbnails[i], r, regions, max_image_bytes)
            kept.append(k)
            result_id = k.id
        images.append(ScoredImage(src, r, regions, result_id))
    return images, kept


class LocalBackend(Backend):
    """The model in this process: the class's memory from the registry, the batcher, the engine, the kept
    results."""

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
