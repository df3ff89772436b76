"""What crosses the worker-engine socket besides the messages: results with their maps, and errors.

Results travel as JSON numbers, their anomaly maps as one float32 payload holding only the maps the answer
needs (a heatmap was asked for, or the map reaches the pixel threshold and so can hold a region).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from model.inference import ScoreColumns

from ..core import errors
from ..core.engine import ImageResult
from ..core.records.record import Draft, Record

__all__ = ["drafts_from_wire", "drafts_to_wire", "error_from_wire", "error_to_wire", "results_from_wire",
           "results_to_wire"]


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


def drafts_to_wire(drafts: Sequence[Draft]) -> tuple[list[dict[str, Any]], bytes]:
    """JSON rows (the records' numbers) and one payload of each one's upload then its thumbnail."""
    rows, parts = [], []
    for d in drafts:
        row = asdict(d.record)
        row["tags"] = list(d.record.tags)
        row["image_len"] = -1 if d.image is None else len(d.image)
        row["thumbnail_len"] = -1 if d.thumbnail is None else len(d.thumbnail)
        rows.append(row)
        parts += [d.image or b"", d.thumbnail or b""]
    return rows, b"".join(parts)


def drafts_from_wire(rows: list[dict[str, Any]], payload: bytes) -> list[Draft]:
    out, at = [], 0
    for row in rows:
        row = dict(row)
        blobs = []
        for n in (int(row.pop("image_len")), int(row.pop("thumbnail_len"))):
            blob = None
            if n >= 0:
                blob, at = payload[at:at + n], at + n
            blobs.append(blob)
        row["tags"] = tuple(row["tags"])
        out.append(Draft(Record(**row), blobs[0], blobs[1]))
    if at != len(payload):
        raise errors.UnprocessableError(f"records' payload holds {len(payload)} bytes, {at} described")
    return out
