"""Maps in, JSON-ready values out: heatmap encodings and anomalous regions (uploads are decoded in uploads.py).

Pure CPU functions, called from worker threads so the event loop never decodes or encodes.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["find_regions", "png_heatmap", "raw_heatmap"]

MAX_REGIONS = 32  # bounds the response size whatever the map looks like


def raw_heatmap(anomaly_map: np.ndarray) -> dict:
    """The map at model resolution, reference scale, as little-endian float32 in base64."""
    a = np.ascontiguousarray(anomaly_map, dtype="<f4")
    return {"format": "raw", "dtype": "float32", "shape": list(a.shape),
            "data": base64.b64encode(a.tobytes()).decode("ascii")}


def png_heatmap(anomaly_map: np.ndarray, width: int, height: int, vmax: float) -> dict:
    """8-bit greyscale PNG at the original image size; 0 -> 0, `vmax` -> 255 (the pixel threshold is 128)."""
    a = np.clip(anomaly_map / max(vmax, 1e-12), 0.0, 1.0) * 255.0
    img = Image.fromarray(np.rint(a).astype(np.uint8), mode="L")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return {"format": "png", "width": width, "height": height, "scale": [0.0, float(vmax)],
            "data": base64.b64encode(buf.getvalue()).decode("ascii")}


def find_regions(anomaly_map: np.ndarray, threshold: float, width: int, height: int) -> list[dict]:
    """8-connected areas of the map above `threshold`: bounding boxes in original-image pixels
    [x0, y0, x1, y1) with their peak map value and area fraction, strongest first."""
    mask = anomaly_map > threshold
    if not mask.any():
        return []
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    idx = np.arange(1, n + 1)
    peaks = ndimage.maximum(anomaly_map, labels, idx)
    areas = ndimage.sum_labels(mask, labels, idx)
    boxes = ndimage.find_objects(labels)
    sy, sx = height / anomaly_map.shape[0], width / anomaly_map.shape[1]
    regions = []
    for peak, area, (ys, xs) in sorted(zip(peaks, areas, boxes, strict=True), key=lambda r: -r[0])[:MAX_REGIONS]:
        regions.append({
            "box": [int(np.floor(xs.start * sx)), int(np.floor(ys.start * sy)),
                    int(np.ceil(xs.stop * sx)), int(np.ceil(ys.stop * sy))],
            "peak": float(peak),
            "area": float(area / mask.size),
        })
    return regions
