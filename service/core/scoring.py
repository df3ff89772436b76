"""`score`: the one path from a request's uploads to its results, whichever process the model is in.

check the class -> admit (429 before any decoding) -> read the uploads -> stage (decode within the limits,
resize, onto the device or a worker's shared-memory slots) -> predict (batched, within the deadline) ->
post-process (per-request threshold, regions; for `keep`, thumbnails and the kept results). A `Backend` says
where the model is: `LocalBackend` in this process, `RemoteBackend` in an HTTP worker (service/workers/); the
steps and their errors are the same code for both, so one request answers the same in either topology. The HTTP
layer only parses the request before and encodes the heatmaps after.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .backend import Backend
from .codecs import find_regions
from .engine import ImageResult
from .errors import DeadlineExceededError, UnprocessableError
from .results import KeptResult, make_kept, override_threshold
from .uploads import DecodeBudget, ImageSource, PixelLimits, StagedBatch, Upload, stage_uploads

__all__ = ["ScoreOptions", "Scored", "ScoredImage", "score"]


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


async def score(backend: Backend, read: Callable[[], Awaitable[Sequence[Upload]]], options: ScoreOptions,
                timeout_s: float, limits: PixelLimits, budget: DecodeBudget,
                max_image_bytes: int = 0) -> Scored:
    """One request's results. `read` gives the uploads' bytes; it is called only once the class is known to
    exist, so an unknown class costs no reading. `timeout_s` bounds the wait for the device; `max_image_bytes`:
    a kept upload larger than this is kept without its image."""
    options.check()
    if options.class_name:
        await backend.check_class(options.class_name)  # 404 (422 for a malformed name) before any work
    uploads = await read()
    backend.admit(len(uploads))  # 429 before decoding: overload costs no decoding
    batch = await stage_uploads(uploads, limits, backend.stager, budget, thumbnails=options.keep)
    deadline = time.monotonic() + timeout_s
    try:
        results = await asyncio.wait_for(
            backend.predict(batch.images, options.class_name, deadline, need_maps=options.need_maps or options.keep),
            timeout_s)
    except asyncio.TimeoutError:  # not the builtin before Python 3.11
        raise DeadlineExceededError(f"no result within {timeout_s:g} s") from None
    results = [override_threshold(r, options.threshold) for r in results]
    images, kept = await asyncio.to_thread(_finish, batch, uploads, results, options, max_image_bytes)
    if kept:
        await backend.keep(kept)
    return Scored(options.class_name, images, backend.describe())


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
