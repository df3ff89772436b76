"""Kept results: the console's view of the inspection records (service/core/records/), and the pictures they keep.

There is one notion: a record. `keep=true` on /predict records the request with its upload and thumbnail whatever
the sampling says, and its `result_id` is the record's id; the threshold page, the inspect page's "this one is good"
and `POST /classes/{name}/shots/from-results` read records, so they survive a restart.

A record's thumbnail is a small JPEG (at most `THUMB_SIZE` px a side) with the heatmap blended over it; the upload
is kept as sent, not re-encoded: decoding it again gives exactly the RGB image the class would have stored had the
client uploaded it as a shot (same PNG, same content hash), and it is usually smaller than that PNG.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
from PIL import Image

from model.postprocess import heat_colours, with_threshold

from .engine import ImageResult
from .uploads import THUMB_SIZE

__all__ = ["THUMB_SIZE", "heat_thumbnail", "override_threshold", "thumbnail_jpeg"]

def override_threshold(r: ImageResult, threshold: float | None) -> ImageResult:
    """The result as if its class's threshold were `threshold` (a per-request override): the raw score is
    unchanged, its normalised score and the verdict follow the threshold (`model.postprocess.with_threshold`)."""
    if threshold is None:
        return r
    normalized_score, is_anomalous = with_threshold(r.score, threshold)
    return replace(r, threshold=threshold, normalized_score=normalized_score, is_anomalous=is_anomalous)


def heat_thumbnail(img: Image.Image, anomaly_map: np.ndarray | None, vmax: float) -> bytes:
    """`img` (the upload made small while it was decoded, uploads.py) as a JPEG with the heatmap blended over it;
    without a map (it did not come to the host: nothing in it reaches a region) the image alone. CPU: a thread."""
    img = img.copy()
    img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BILINEAR)
    img = img.convert("RGB")
    if anomaly_map is not None:
        rgb = Image.fromarray(heat_colours(anomaly_map / max(vmax, 1e-12))).resize(img.size, Image.Resampling.BILINEAR)
        img = Image.blend(img, rgb, 0.45)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def thumbnail_jpeg(png: bytes) -> bytes:
    """A stored shot (PNG bytes) as a JPEG at most `THUMB_SIZE` px a side."""
    with Image.open(io.BytesIO(png)) as img:
        small = img.convert("RGB")
    small.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
