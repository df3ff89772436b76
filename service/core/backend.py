"""Backend: where the model is, and `Backend.score`, the one path from a request's uploads to its results.

check the class -> admit (429 before any decoding) -> read the uploads -> stage (decode within the limits,
resize, onto the device or a worker's shared-memory slots) -> predict (batched, within the deadline) ->
post-process (per-request threshold, regions) -> record (an inspection record per image scored against a class,
on disk in the spool before the answer leaves: service/core/records/recorder.py). The steps and their
errors are this one method; a subclass says only where the model is: `LocalBackend` in this process,
`RemoteBackend` in an HTTP worker (service/workers/remote.py), which asks the engine process's LocalBackend over a
socket. So one request answers the same in either topology; the HTTP layer only parses the request before and
encodes the heatmaps after.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .batcher import DynamicBatcher, WorkItem
from .codecs import find_regions
from .engine import Engine, ImageResult
from .errors import DeadlineExceededError, NotReadyError, SowaError, UnprocessableError
from .records.record import Draft, Record, RecordMeta, Sampler, clean_filename
from .records.recorder import Recorder
from .registry import ClassRegistry, Generation
from .results import heat_thumbnail, override_threshold
from .staging import ImageStager
from .uploads import DecodeBudget, ImageSource, PixelLimits, StagedBatch, Upload, stage_uploads

__all__ = ["Backend", "LocalBackend", "ScoreOptions", "Scored", "ScoredImage"]


@dataclass(frozen=True)
class ScoreOptions:
    """What a request asks besides its images; every option travels to wherever the model is."""

    class_name: str | None = None  # None: zero-shot
    threshold: float | None = None  # this request's threshold on the raw score, instead of the class's
    need_maps: bool = True  # the answer encodes a heatmap: every map comes to the host, not only those with regions
    keep: bool = False  # record the results with their thumbnail and upload whatever the sampling, for the console
    record: bool | None = None  # record this request's images (None: as the service is set; keep=true: always)
    meta: RecordMeta = field(default_factory=RecordMeta)  # the client's part_id, station, tags for the records

    def check(self) -> None:
        if self.keep and not self.class_name:
            raise UnprocessableError("keep=true needs a class_name: kept results belong to a class")

    def records(self, default: bool) -> bool:
        """Whether this request's images are recorded: only against a class (zero-shot scores are no inspection)."""
        return bool(self.class_name) and (self.keep or (default if self.record is None else self.record))


@dataclass(frozen=True)
class ScoredImage:
    source: ImageSource
    result: ImageResult
    regions: list[dict[str, Any]] = field(default_factory=list)
    record_id: str | None = None  # the inspection record's id (None: not recorded, or not kept)
    record_kept: bool | None = None  # None: not recorded (record=false, zero-shot); False: its record was not kept


@dataclass(frozen=True)
class Scored:
    class_name: str | None
    images: list[ScoredImage]
    model: dict[str, Any]


class Backend(ABC):
    image_size: int
    stager: ImageStager  # puts a request's resized images where `predict` reads them
    recording: bool = True  # the service's default for `ScoreOptions.record`
    sampler: Sampler = Sampler(0)  # which passed parts keep their images (set by each backend)

    async def score(self, read: Callable[[], Awaitable[Sequence[Upload]]], options: ScoreOptions, timeout_s: float,
                    limits: PixelLimits, budget: DecodeBudget, max_image_bytes: int = 0) -> Scored:
        """One request's results. `read` gives the uploads' bytes; it is called only once the class is known to
        exist, so an unknown class costs no reading. `timeout_s` bounds the wait for the device;
        `max_image_bytes`: a recorded upload larger than this is recorded without its image."""
        options.check()
        recording = options.records(self.recording)
        if options.class_name:
            await self.check_class(options.class_name)  # 404 (422 for a malformed name) before any work
        pin = self.pin()  # the model this request starts on, and finishes on whatever is activated meanwhile
        uploads = await read()
        self.admit(len(uploads))  # 429 before decoding: overload costs no decoding
        batch = await stage_uploads(uploads, limits, self.stager_for(pin), budget, thumbnails=recording)
        deadline = time.monotonic() + timeout_s
        need_maps = options.need_maps or options.keep
        answered: list[dict[str, Any]] = []  # the model that produced the results, as the predictor says
        try:
            results = await asyncio.wait_for(self.predict(batch.images, options.class_name, deadline, need_maps,
                                                          pin=pin, answered=answered), timeout_s)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            raise DeadlineExceededError(f"no result within {timeout_s:g} s") from None
        results = [override_threshold(r, options.threshold) for r in results]
        model = answered[0] if answered else self.describe()
        images, drafts = await asyncio.to_thread(_finish, batch, uploads, results, options, recording,
                                                 max_image_bytes, self.sampler, str(model.get("fingerprint", "")))
        ids: list[str | None] = []
        if drafts:
            ids = await self.record(drafts)
            images = [replace(im, record_id=i, record_kept=i is not None) for im, i in zip(images, ids, strict=True)]
        if options.class_name:
            self.shadow(pin, batch.images, uploads, options.class_name, results, ids)
        return Scored(options.class_name, images, model)

    def pin(self) -> Any:
        """What a request pins at its start so it finishes on the model it started on (None: nothing to pin)."""
        return None

    def stager_for(self, pin: Any) -> ImageStager:
        """The stager for a request's pinned model: its input size."""
        return self.stager

    def shadow(self, pin: Any, images: torch.Tensor, uploads: Sequence[Upload], class_name: str,
               results: list[ImageResult], record_ids: list[str | None]) -> None:
        """Hand an answered request to a shadow model, if one scores a share of traffic (never waits)."""
        return  # where the model is not in this process, its own backend does it

    @abstractmethod
    async def check_class(self, name: str) -> None:
        """ClassNotFoundError (404) when the class is not registered; 422 for a malformed name."""

    @abstractmethod
    def admit(self, count: int) -> None:
        """QueueFullError (429) when the queue has no room for `count` images, NotReadyError (503) when closing."""

    @abstractmethod
    async def predict(self, images: torch.Tensor, class_name: str | None, deadline: float,
                      need_maps: bool = True, *, pin: Any = None,
                      answered: list[dict[str, Any]] | None = None) -> list[ImageResult]:
        """Results of (n, 3, S, S) uint8 images against `class_name` (None: zero-shot). Without `need_maps` only
        the maps that can hold a region come to the host. `pin`: the model the request started on (`pin()`);
        `answered` gets the description of the model that produced the results."""

    @abstractmethod
    async def record(self, drafts: Sequence[Draft]) -> list[str | None]:
        """Spool the records (where the record store lives); each one's id, or None where it was not kept."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The model being served, as answers report it."""


def _finish(batch: StagedBatch, uploads: Sequence[Upload], results: list[ImageResult], options: ScoreOptions,
            recording: bool, max_image_bytes: int, sampler: Sampler, model: str
            ) -> tuple[list[ScoredImage], list[Draft]]:
    """Regions and, when recording, the records' drafts with the images the policy keeps (flagged parts, a sample
    of the passed, every one with keep=true): CPU work, a worker thread in the process that decoded."""
    images, drafts = [], []
    now = time.time()
    for i, (src, r) in enumerate(zip(batch.sources, results, strict=True)):
        regions = (find_regions(r.anomaly_map, r.pixel_threshold, src.width, src.height)
                   if r.anomaly_map is not None and r.may_hold_regions else [])
        images.append(ScoredImage(src, r, regions))
        if not recording or not options.class_name:
            continue
        image = thumb = None
        data = uploads[i][1]
        if (options.keep or sampler.keeps(r.is_anomalous)) and batch.thumbnails and batch.thumbnails[i] is not None:
            thumb = heat_thumbnail(batch.thumbnails[i], r.anomaly_map, 2.0 * r.pixel_threshold)
            image = data if len(data) <= max_image_bytes else None
        meta = options.meta
        drafts.append(Draft(Record(
            id="", time=now, class_name=options.class_name, revision="", model=model, threshold=r.threshold,
            threshold_per_request=options.threshold is not None, score=r.score, normalized_score=r.normalized_score,
            text_score=r.text_score, is_anomalous=r.is_anomalous, filename=clean_filename(src.name), width=src.width,
            height=src.height, regions=regions, part_id=meta.part_id, station=meta.station, tags=meta.tags,
            image_sha256=None if image is None else hashlib.sha256(image).hexdigest(),
            thumbnail_sha256=None if thumb is None else hashlib.sha256(thumb).hexdigest(),
            image_bytes=len(image or b"") + len(thumb or b"")), image, thumb))
    return images, drafts


class LocalBackend(Backend):
    """The model in this process: the class's memory from the registry, the batcher, the engine, the records."""

    def __init__(self, engine: Engine, registry: ClassRegistry, batcher: DynamicBatcher, recorder: Recorder,
                 recording: bool = True, sampler: Sampler | None = None) -> None:
        self.engine, self.registry, self.batcher = engine, registry, batcher
        self.recorder, self.recording, self.sampler = recorder, recording, sampler or Sampler(0)
        # a shadow model scoring a share of answered requests (service/core/models/shadow.py), when one is set
        self.shadower: Any = None  # a ShadowScorer: called with each answered request

    @property
    def image_size(self) -> int:  # type: ignore[override]
        return self.registry.generation.served.image_size

    def pin(self) -> Generation:
        return self.registry.generation

    @property
    def stager(self) -> ImageStager:  # type: ignore[override]
        """The serving model's: each model stages at its own input size."""
        return self.registry.generation.served.stager

    def stager_for(self, pin: Any) -> ImageStager:
        return pin.served.stager if isinstance(pin, Generation) else self.stager

    async def check_class(self, name: str) -> None:
        self.registry.get(name)

    def admit(self, count: int) -> None:
        self.batcher.check_room(count)

    def _generation_for(self, images: torch.Tensor, pin: Any) -> Generation:
        """The generation a request runs on: the one it pinned, else (a worker's request, staged at the size the
        worker knew) the current one or the one before the last switch, whichever its images fit."""
        if isinstance(pin, Generation):
            return pin
        size = int(images.shape[-1])
        current = self.registry.generation
        if current.served.image_size == size:
            return current
        previous = self.registry.previous
        if previous is not None and previous.served.image_size == size:
            return previous
        raise NotReadyError(f"the images were staged at {size} px for a model no longer served (now "
                            f"{current.served.image_size} px); retry", headers={"Retry-After": "1"})

    async def predict(self, images: torch.Tensor, class_name: str | None, deadline: float, need_maps: bool = True,
                      *, pin: Any = None, answered: list[dict[str, Any]] | None = None,
                      hold_inputs: bool = False) -> list[ImageResult]:
        """Cancelling the call drops the request unless it is already on the device. With `hold_inputs` a
        cancelled call returns only once the batcher is through with the images, so the caller may reuse their
        memory (a worker's slots) as soon as it returns."""
        generation = self._generation_for(images, pin)
        memory = None
        if class_name:
            entry = generation.classes.get(class_name)
            if entry is None:  # deleted since its check, or not in the generation it pinned: as the registry says
                entry = self.registry.get(class_name)
                current = self.registry.generation
                if generation is not current:  # registered after a switch: the new model, if the images fit it
                    if current.served.image_size != int(images.shape[-1]):
                        raise NotReadyError("the served model changed while this request was staged; retry",
                                            headers={"Retry-After": "1"})
                    generation = current
            memory = entry.serving_memory
        if answered is not None:
            answered.append(generation.served.describe())
        item = self.batcher.submit(WorkItem(images, [memory] * int(images.shape[0]), deadline=deadline,
                                            need_maps=need_maps, model=generation.served))
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

    def shadow(self, pin: Any, images: torch.Tensor, uploads: Sequence[Upload], class_name: str,
               results: list[ImageResult], record_ids: list[str | None]) -> None:
        if self.shadower is not None and isinstance(pin, Generation):
            self.shadower(pin, images, uploads, class_name, results, record_ids)

    @property
    def shadow_share(self) -> float:
        """The share of answered requests a shadow model scores (0: none shadows)."""
        return float(getattr(self.shadower, "share", 0.0)) if self.shadower is not None else 0.0

    @property
    def shadow_size(self) -> int:
        """The input size of the shadow model (0: none shadows)."""
        return self.shadower.generation.served.image_size if self.shadower is not None else 0

    def shadow_sampled(self, images: torch.Tensor, uploads: Sequence[Upload], class_name: str,
                       results: list[ImageResult], record_ids: list[str | None]) -> None:
        """A request an HTTP worker answered and sampled for the shadow: its images as staged there, or its
        uploads when the shadow takes another input size."""
        if self.shadower is None:
            return
        try:
            pin = self._generation_for(images, None)
        except SowaError:
            return  # staged for a model no longer served
        self.shadower(pin, images, uploads, class_name, results, record_ids, sampled=True)

    async def record(self, drafts: Sequence[Draft]) -> list[str | None]:
        """Spool the records, each naming its class's revision now (the shots it was scored against: a class
        changed between the batch and this moment is the rare case where it names the newer one)."""
        revisions: dict[str, str] = {}
        named = []
        for d in drafts:
            name = d.record.class_name
            if name not in revisions:
                try:
                    revisions[name] = self.registry.get(name).revision
                except SowaError:  # deleted meanwhile: the record stays, its revision unknown
                    revisions[name] = ""
            named.append(replace(d, record=replace(d.record, revision=revisions[name])))
        return await self.recorder.record(named)

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()
