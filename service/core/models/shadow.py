"""Shadow scoring: a candidate model scores a sampled share of answered requests, and how it compares.

The candidate is loaded beside the serving model with every class's bank (prepared as for an activation, so a
later activation finds them stored). `Backend.score` hands each answered request to `ShadowScorer` once its results
and records are made; a sampled one joins the shadow's own small batcher, which forms batches as the main one does
and runs them on the engine thread between the serving batches. Its queue is bounded and it has one batch in flight,
so under load the shadow's work is what is dropped (counted), never a live request's time. A request's images are
reused when the candidate has the serving model's input size, else decoded again at the candidate's size on a
worker thread. Shadow batches wait to fill (SHADOW_WAIT_MS) and go to the device only while the live queue is
shallow.

Per class the report holds the verdict agreement, the correlation of the raw scores, the latest parts on which the
verdicts differ (with their record ids, so they can be reviewed); and the candidate's latency, per request from its
sampling to its scores (the shadow's queue included) and per batch on the device. It lives in memory, per
replica, from the moment the shadow started: a restart or a new shadow starts a new report.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..batcher import DynamicBatcher, WorkItem
from ..engine import Engine, ImageResult
from ..errors import NotReadyError, QueueFullError, SowaError
from ..registry import ClassRegistry, Generation
from ..uploads import DecodeBudget, PixelLimits, Upload, stage_uploads

__all__ = ["ClassAgreement", "ShadowReport", "ShadowScorer"]

log = logging.getLogger("sowa.models")

DISAGREEMENTS_KEPT = 50  # per class, the latest
SHADOW_WAIT_MS = 1000.0  # how long a shadow batch waits to fill up: a small batch costs nearly a full one
SHADOW_YIELD_S = 2.0  # how long a shadow batch waits for the live queue to ebb before it is dropped
LATENCIES_KEPT = 2000


@dataclass
class ClassAgreement:
    """One class's comparison: sums for the Pearson correlation, and the latest disagreements."""

    images: int = 0
    agree: int = 0
    flagged_serving: int = 0
    flagged_shadow: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # x, y, xx, yy, xy over raw scores
    disagreements: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=DISAGREEMENTS_KEPT))

    def add(self, serving: ImageResult, shadow: ImageResult, record_id: str | None) -> None:
        self.images += 1
        self.agree += serving.is_anomalous == shadow.is_anomalous
        self.flagged_serving += serving.is_anomalous
        self.flagged_shadow += shadow.is_anomalous
        x, y = serving.score, shadow.score
        for i, v in enumerate((x, y, x * x, y * y, x * y)):
            self.sums[i] += v
        if serving.is_anomalous != shadow.is_anomalous:
            self.disagreements.append({
                "record_id": record_id, "time": time.time(), "serving_score": x, "shadow_score": y,
                "serving_anomalous": serving.is_anomalous, "shadow_anomalous": shadow.is_anomalous,
                "serving_normalized": serving.normalized_score, "shadow_normalized": shadow.normalized_score})

    @property
    def correlation(self) -> float | None:
        """Pearson's r of the two models' raw scores (None below 3 images or with a constant score)."""
        n = self.images
        if n < 3:
            return None
        sx, sy, sxx, syy, sxy = self.sums
        vx, vy = n * sxx - sx * sx, n * syy - sy * sy
        if vx <= 0 or vy <= 0:
            return None
        return (n * sxy - sx * sy) / math.sqrt(vx * vy)

    def public(self) -> dict[str, Any]:
        return {"images": self.images, "agreement": self.agree / self.images if self.images else None,
                "correlation": self.correlation, "flagged_serving": self.flagged_serving,
                "flagged_shadow": self.flagged_shadow, "disagreements": list(reversed(self.disagreements))}


@dataclass
class ShadowReport:
    """What a shadow has seen since it started, on this replica."""

    fingerprint: str
    version: str
    share: float
    started: float = field(default_factory=time.time)
    sampled: int = 0  # images handed to the shadow
    scored: int = 0
    dropped: int = 0  # sampled but not scored: the shadow's queue was full (load), or its class not ready yet
    failed: int = 0
    classes: dict[str, ClassAgreement] = field(default_factory=dict)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES_KEPT))  # per request, queue included
    batches: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=LATENCIES_KEPT))  # (s, images)

    def public(self, serving_version: str) -> dict[str, Any]:
        lat = np.array(self.latencies) if self.latencies else None
        batch_s = np.array([b[0] for b in self.batches]) if self.batches else None
        total = ClassAgreement()
        for c in self.classes.values():
            total.images += c.images
            total.agree += c.agree
            total.flagged_serving += c.flagged_serving
            total.flagged_shadow += c.flagged_shadow
            total.sums = [a + b for a, b in zip(total.sums, c.sums, strict=True)]
        return {
            "version": self.version, "fingerprint": self.fingerprint, "serving": serving_version,
            "share": self.share, "started": self.started, "sampled": self.sampled, "scored": self.scored,
            "dropped": self.dropped, "failed": self.failed,
            "agreement": total.agree / total.images if total.images else None, "correlation": total.correlation,
            "latency_s": None if lat is None else {
                "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                "mean": float(lat.mean()), "samples": int(lat.size)},
            "batch_s": None if batch_s is None else {  # the candidate's own time on the device, per batch
                "p50": float(np.percentile(batch_s, 50)), "p95": float(np.percentile(batch_s, 95)),
                "per_image": float(batch_s.sum() / sum(b[1] for b in self.batches)), "batches": int(batch_s.size)},
            "classes": {name: c.public() for name, c in sorted(self.classes.items())},
        }


class ShadowScorer:
    """`LocalBackend.shadower` while a shadow runs: samples answered requests and scores them on the candidate."""

    def __init__(self, engine: Engine, registry: ClassRegistry, generation: Generation, share: float,
                 serving: DynamicBatcher, limits: PixelLimits, budget: DecodeBudget,
                 refit: Callable[[str], None], on_scored: Callable[[int, int], None] | None = None) -> None:
        """`serving`: the live requests' batcher (the shadow yields to it); `refit(name)`: prepare a class again for
        the candidate (its shots changed since); `on_scored(scored, dropped)`: telemetry."""
        self.engine, self.registry, self.generation = engine, registry, generation
        self.share, self.limits, self.budget, self.refit, self.on_scored = share, limits, budget, refit, on_scored
        self.serving = serving
        self.report = ShadowReport(generation.served.fingerprint, generation.served.version, share)
        # its own batcher: full batches of shadow work (a small batch costs the device nearly as much as a full one),
        # one in flight, a queue of two batches; full means dropped
        size = serving.max_batch_size
        self.batcher = DynamicBatcher(self._run, size, max_wait_ms=SHADOW_WAIT_MS, max_queue=2 * size,
                                      max_in_flight=1)
        self._tasks: set[asyncio.Task] = set()
        self._rng = random.Random()

    def start(self) -> None:
        self.batcher.start()

    def keep(self, task: asyncio.Task) -> None:
        """Hold a task of this shadow's until it ends (`close` cancels what is left)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.batcher.close()

    async def _run(self, images: Sequence[torch.Tensor], memories: Sequence[Any], need_maps: Sequence[bool],
                   model: Any) -> list[ImageResult]:
        """A shadow batch goes to the device only while the live queue holds less than half a batch: under load the
        shadow's queue fills up and its work is dropped, never the live requests' time."""
        waited = 0.0
        while self.serving.queued_images > self.serving.max_batch_size // 2:
            if waited >= SHADOW_YIELD_S:
                raise QueueFullError("the live traffic kept the device busy: shadow batch dropped")
            await asyncio.sleep(0.005)
            waited += 0.005
        started = time.monotonic()
        results = await self.engine.run_batch(images, memories, need_maps, self.generation.served)
        self.report.batches.append((time.monotonic() - started, len(results)))
        return results

    def __call__(self, pin: Generation, images: torch.Tensor, uploads: Sequence[Upload], class_name: str,
                 results: list[ImageResult], record_ids: list[str | None], sampled: bool = False) -> None:
        """An answered request; `sampled`: already drawn (by an HTTP worker, which then sent its images)."""
        n = len(results)
        if not sampled and (self.share <= 0 or self._rng.random() >= self.share):
            return
        self.report.sampled += n
        entry = self.generation.classes.get(class_name)
        serving = pin.classes.get(class_name)
        if entry is None or serving is None or entry.shots != serving.shots:
            self._dropped(n)  # registered or changed since the shadow was prepared: prepare it, score later ones
            self.refit(class_name)
            return
        try:
            self.batcher.check_room(n)
        except SowaError:
            self._dropped(n)  # the shadow is behind: its work goes first
            return
        self.keep(asyncio.create_task(self._score(pin, images, uploads, class_name, results, record_ids, entry)))

    def _dropped(self, n: int) -> None:
        self.report.dropped += n
        if self.on_scored is not None:
            self.on_scored(0, n)

    async def _score(self, pin: Generation, images: torch.Tensor, uploads: Sequence[Upload], class_name: str,
                     results: list[ImageResult], record_ids: list[str | None], entry: Any) -> None:
        served = self.generation.served
        n = len(results)
        started = time.monotonic()
        try:
            if served.image_size != pin.served.image_size:  # another input size: its own preprocessing
                if not uploads:  # sent by a worker, which keeps no uploads
                    raise NotReadyError("the shadow takes another input size than the request was staged at")
                images = (await stage_uploads(uploads, self.limits, served.stager, self.budget)).images
            item = self.batcher.submit(WorkItem(images, [entry.serving_memory] * n, deadline=started + 30.0,
                                                need_maps=False, model=served))
            shadow = await item.future
        except SowaError as e:
            self._dropped(n)
            log.debug("shadow: %d image(s) of %s not scored (%s)", n, class_name, e.message)
            return
        except Exception:
            self.report.failed += n
            log.exception("shadow: scoring %d image(s) of %s failed", n, class_name)
            return
        latency = time.monotonic() - started
        agreement = self.report.classes.setdefault(class_name, ClassAgreement())
        ids = record_ids if len(record_ids) == n else [None] * n
        for a, b, rid in zip(results, shadow, ids, strict=True):
            agreement.add(a, b, rid)
        self.report.scored += n
        self.report.latencies.append(latency)
        if self.on_scored is not None:
            self.on_scored(n, 0)
