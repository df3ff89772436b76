"""What crosses the worker-engine socket besides the messages: results with their maps, and errors.

Results travel as JSON numbers, their anomaly maps as one float32 payload holding only the maps the answer
needs (a heatmap was asked for, or the map reaches the pixel threshold and so can hold a region).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core import errors
from ..core.engine import ImageResult

__all__ = ["error_from_wire", "error_to_wire", "results_from_wire", "results_to_wire"]

_FIELDS = ("text_score", "score", "threshold", "normalized_score", "is_anomalous", "pixel_threshold", "map_max")


def results_to_wire(results: list[ImageResult], need_maps: bool) -> tuple[list[dict[str, Any]], bytes]:
    """JSON rows and the maps' payload; a map goes only where `need_maps` or it can hold a region."""
    rows, maps = [], []
    for r in results:
        row = {f: getattr(r, f) for f in _FIELDS}
        row["has_map"] = r.anomaly_map is not None and (need_maps or r.may_hold_regions)
        if row["has_map"]:
            maps.append(np.ascontiguousarray(r.anomaly_map, dtype="<f4").tobytes())
        rows.append(row)
    return rows, b"".join(maps)


def results_from_wire(rows: list[dict[str, Any]], payload: bytes, size: int) -> list[ImageResult]:
    maps = np.frombuffer(payload, dtype="<f4").reshape(-1, size, size) if payload else None
    out, k = [], 0
    for row in rows:
        anomaly_map = None
        if row["has_map"]:
            assert maps is not None
            anomaly_map, k = maps[k], k + 1
        out.append(ImageResult(anomaly_map=anomaly_map, **{f: row[f] for f in _FIELDS}))
    return out


def error_to_wire(e: errors.SowaError) -> dict[str, Any]:
    return {"code": e.code, "status": e.status, "message": e.message, "headers": e.headers}


def error_from_wire(d: dict[str, Any]) -> errors.SowaError:
    """The same error class where the code names one (so handlers map it the same way), else a plain one with
    the engine's status and code."""
    for cls in _error_classes(errors.SowaError):
        if cls.code == d["code"] and cls.status == d["status"]:
            return cls(d["message"], headers=d.get("headers"))
    e = errors.SowaError(d["message"], headers=d.get("headers"))
    e.status, e.code = int(d["status"]), str(d["code"])
    return e


def _error_classes(root: type) -> list[type]:
    found = [root]
    for sub in root.__subclasses__():
        found += _error_classes(sub)
    return found
