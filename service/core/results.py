"""Recent results, kept in memory only when a client asks (`keep=true` on /predict): what the console shows.

Bounded three ways, oldest dropped first: `per_class` results per class (a ring buffer), `max_classes` classes
(the class kept least recently goes whole) and `max_bytes` in all (thumbnails and kept uploads). Nothing is kept
for a request without `keep=true`, so production traffic holds nothing here.

Each kept result holds its numbers, a small JPEG thumbnail (at most `THUMB_SIZE` px a side) with the heatmap blended
over it, and the upload's own bytes as sent when they fit in `max_image_bytes`. The upload, not a re-encoded
image: decoding it again gives exactly the RGB image the class would have stored had the client uploaded it as a
shot (same PNG, same content hash), and it is usually smaller than that PNG. The model-size image would not do:
a shot is stored at its own resolution, so banks can be rebuilt for a bundle of another input size.
"""

from __future__ import annotations

import io
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from model.postprocess import heat_colours, with_threshold

from .engine import ImageResult
from .errors import ResultNotFoundError
from .uploads import THUMB_SIZE, ImageSource

__all__ = ["THUMB_SIZE", "KeptResult", "ResultStore", "make_kept",
           "override_threshold", "thumbnail_jpeg"]

@dataclass(frozen=True)
class KeptResult:
    id: str
    class_name: str
    filename: str
    width: int
    height: int
    score: float
    normalized_score: float
    text_score: float
    threshold: float
    is_anomalous: bool
    time: float
    regions: list[dict] = field(default_factory=list)
    thumbnail: bytes = b""  # JPEG, heatmap blended over the image
    image: bytes | None = None  # the upload as sent; None when it was over the store's `max_image_bytes`

    @property
    def nbytes(self) -> int:
        return len(self.thumbnail) + len(self.image or b"") + 512  # + the numbers, roughly

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "class_name": self.class_name, "filename": self.filename, "width": self.width,
                "height": self.height, "score": self.score, "normalized_score": self.normalized_score,
                "text_score": self.text_score, "threshold": self.threshold, "is_anomalous": self.is_anomalous,
                "time": self.time, "regions": self.regions, "image_kept": self.image is not None}


def override_threshold(r: ImageResult, threshold: float | None) -> ImageResult:
    """The result as if its class's threshold were `threshold` (a per-request override): the raw score is
    unchanged, its normalised score and the verdict follow the threshold (`model.postprocess.with_threshold`)."""
    if threshold is None:
        return r
    normalized_score, is_anomalous = with_threshold(r.score, threshold)
    return replace(r, threshold=threshold, normalized_score=normalized_score, is_anomalous=is_anomalous)


def _thumbnail(img: Image.Image, anomaly_map: np.ndarray, vmax: float) -> bytes:
    img = img.copy()
    img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BILINEAR)
    rgb = Image.fromarray(heat_colours(anomaly_map / max(vmax, 1e-12))).resize(img.size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    Image.blend(img.convert("RGB"), rgb, 0.45).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def thumbnail_jpeg(png: bytes) -> bytes:
    """A stored shot (PNG bytes) as a JPEG at most `THUMB_SIZE` px a side."""
    with Image.open(io.BytesIO(png)) as img:
        small = img.convert("RGB")
    small.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_kept(class_name: str, source: ImageSource, data: bytes, thumbnail: Image.Image | None, r: ImageResult,
              regions: list[dict], max_image_bytes: int) -> KeptResult:
    """A result to keep. `thumbnail` is the upload made small while it was decoded for scoring (uploads.py), so
    keeping decodes nothing again; the heatmap is blended over it here (CPU: call from a worker thread)."""
    if thumbnail is None or r.anomaly_map is None:
        raise ValueError("a kept result needs the image's thumbnail and its anomaly map")
    thumb = _thumbnail(thumbnail, r.anomaly_map, 2.0 * r.pixel_threshold)
    return KeptResult(uuid.uuid4().hex, class_name, source.name, source.width, source.height, r.score,
                      r.normalized_score, r.text_score, r.threshold, r.is_anomalous, time.time(), regions, thumb,
                      data if len(data) <= max_image_bytes else None)


class ResultStore:
    """Kept results by id and by class, oldest dropped first within each bound. Used from the event loop only."""

    def __init__(self, per_class: int = 500, max_classes: int = 32, max_bytes: int = 128 * 2**20,
                 max_image_bytes: int = 4 * 2**20) -> None:
        self.per_class, self.max_classes = per_class, max_classes
        self.max_bytes, self.max_image_bytes = max_bytes, max_image_bytes
        self._all: OrderedDict[str, KeptResult] = OrderedDict()  # insertion order: oldest first
        self._by_class: dict[str, deque[str]] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._all)

    def add(self, result: KeptResult) -> None:
        ids = self._by_class.get(result.class_name)
        if ids is None:
            while len(self._by_class) >= self.max_classes:
                stalest = min(self._by_class, key=lambda c: self._all[self._by_class[c][-1]].time)
                self.forget_class(stalest)
            ids = self._by_class[result.class_name] = deque()
        ids.append(result.id)
        self._all[result.id] = result
        self.nbytes += result.nbytes
        while len(ids) > self.per_class:
            self._drop(ids[0])
        while self.nbytes > self.max_bytes and len(self._all) > 1:
            self._drop(next(iter(self._all)))

    def _drop(self, result_id: str) -> None:
        r = self._all.pop(result_id)
        self.nbytes -= r.nbytes
        ids = self._by_class[r.class_name]
        ids.remove(result_id)  # the class's oldest in practice: O(1)
        if not ids:
            del self._by_class[r.class_name]

    def get(self, result_id: str) -> KeptResult:
        r = self._all.get(result_id)
        if r is None:
            raise ResultNotFoundError(f"no kept result '{result_id[:40]}' (never kept, or dropped as older "
                                      "results made room)")
        return r

    def recent(self, class_name: str, limit: int | None = None) -> list[KeptResult]:
        """The class's kept results, newest first."""
        ids = self._by_class.get(class_name, ())
        out = [self._all[i] for i in reversed(ids)]
        return out if limit is None else out[:limit]

    def forget_class(self, class_name: str) -> None:
        for result_id in list(self._by_class.get(class_name, ())):
            self._drop(result_id)

    def stats(self) -> dict[str, int]:
        return {"results": len(self._all), "classes": len(self._by_class), "bytes": self.nbytes,
                "per_class": self.per_class, "max_classes": self.max_classes, "max_bytes": self.max_bytes,
                "max_image_bytes": self.max_image_bytes}
