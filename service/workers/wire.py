"""What crosses the worker-engine socket besides the messages: results with their maps, and errors.

Results travel as JSON numbers, their anomaly maps as one float32 payload holding only the maps the answer
needs (a heatmap was asked for, or the map reaches the pixel threshold and so can hold a region).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from model.inference import ScoreColumns

from ..core import errors
from ..core.engine import ImageResult
from ..core.results import KeptResult

__all__ = ["error_from_wire", "error_to_wire", "kept_from_wire", "kept_to_wire", "results_from_wire", "results_to_wire"]

def results_to_wire(results: list[ImageResult], need_maps: bool) -> tuple[list[dict[str, Any]], bytes]:
    """JSON rows (`ScoreColumns` by name, the pixel threshold, whether a map follows) and the maps' payload; a
    map goes only where `need_maps` or it can hold a region."""
    rows, maps = [], []
    for r in results:
        row: dict[str, Any] = {**r.columns()._asdict(), "pixel_threshold": r.pixel_threshold}
        row["has_map"] = r.anomaly_map is not None and (need_maps or r.may_hold_regions)
        if row["has_map"]:
            maps.append(np.ascontiguousarray(r.anomaly_map, dtype="<f4").tobytes())
        rows.append(row)
    return rows, b"".join(maps)


def results_from_wire(rows: list[dict[str, Any]], payload: bytes, size: int) -> list[ImageResult]:
    n_maps = sum(1 for row in rows if row["has_map"])
    if len(payload) != n_maps * size * size * 4:  # a broken answer is the engine's fault: a 500, not a crash
        raise errors.SowaError(f"the engine's answer describes {n_maps} maps of {size}x{size} but carries "
                               f"{len(payload)} bytes")
    maps = np.frombuffer(payload, dtype="<f4").reshape(n_maps, size, size)
    out, k = [], 0
    for row in rows:
        anomaly_map = None
        if row["has_map"]:
            anomaly_map, k = maps[k], k + 1
        out.append(ImageResult.from_columns(ScoreColumns._make(row[f] for f in ScoreColumns._fields), anomaly_map,
                                            row["pixel_threshold"]))
    return out


def error_to_wire(e: errors.SowaError) -> dict[str, Any]:
    return {"code": e.code, "status": e.status, "message": e.message, "headers": e.headers}


def error_from_wire(d: dict[str, Any]) -> errors.SowaError:
    """The same error class where the code names one in `errors.BY_CODE` (so handlers map it the same way), else
    a plain one with the engine's status and code."""
    cls = errors.BY_CODE.get(d["code"])
    if cls is not None and cls.status == d["status"]:
        return cls(d["message"], headers=d.get("headers"))
    e = errors.SowaError(d["message"], headers=d.get("headers"))
    e.status, e.code = int(d["status"]), str(d["code"])
    return e


_KEPT_BYTES = ("thumbnail", "image")  # KeptResult's fields that travel in the payload, not the JSON


def kept_to_wire(kept: Sequence[KeptResult]) -> tuple[list[dict[str, Any]], bytes]:
    """JSON rows (the numbers) and one payload of each result's thumbnail then its upload."""
    rows, parts = [], []
    for k in kept:
        row = {f.name: getattr(k, f.name) for f in fields(k) if f.name not in _KEPT_BYTES}
        row["thumbnail_bytes"], row["image_bytes"] = len(k.thumbnail), -1 if k.image is None else len(k.image)
        rows.append(row)
        parts += [k.thumbnail, k.image or b""]
    return rows, b"".join(parts)


def kept_from_wire(rows: list[dict[str, Any]], payload: bytes) -> list[KeptResult]:
    out, at = [], 0
    for row in rows:
        row = dict(row)
        n_thumb, n_image = int(row.pop("thumbnail_bytes")), int(row.pop("image_bytes"))
        thumbnail, at = payload[at:at + n_thumb], at + n_thumb
        image = None
        if n_image >= 0:
            image, at = payload[at:at + n_image], at + n_image
        out.append(KeptResult(**row, thumbnail=thumbnail, image=image))
    if at != len(payload):
        raise errors.UnprocessableError(f"kept results' payload holds {len(payload)} bytes, {at} described")
    return out
