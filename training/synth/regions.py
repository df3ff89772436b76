"""Defect regions: where on the image a defect goes and what shape it has (irregular blobs, thin curves).

A region lives in a window (a pair of slices) around its centre, so a small defect costs a small window.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from scipy import ndimage

from .primitives import cover, grid, rotate, smooth_noise, standardise

__all__ = ["Window", "blob", "curve", "edge_band", "pick_centre", "polyline_distance", "window"]


@dataclass(frozen=True)
class Window:
    rows: slice
    cols: slice
    Y: np.ndarray  # (h, w) float32 image coordinates of the window's pixels
    X: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.Y.shape


def window(cy: float, cx: float, half: float, size: int) -> Window:
    """The square window of half side `half` around (cy, cx), clipped to the image."""
    y0, x0 = max(int(cy - half), 0), max(int(cx - half), 0)
    y1, x1 = min(int(np.ceil(cy + half)) + 1, size), min(int(np.ceil(cx + half)) + 1, size)
    Y, X = grid(y1 - y0, x1 - x0, y0, x0)
    return Window(slice(y0, y1), slice(x0, x1), Y, X)


def pick_centre(rng: np.random.Generator, allowed: np.ndarray, margin: int = 0) -> tuple[float, float]:
    """A random pixel of `allowed` (bool image), at least `margin` pixels from the image border when possible."""
    inner = allowed.copy()
    if margin:
        inner[:margin], inner[-margin:], inner[:, :margin], inner[:, -margin:] = False, False, False, False
    ys, xs = np.nonzero(inner if inner.any() else allowed)
    i = rng.integers(len(ys))
    return float(ys[i]), float(xs[i])


def edge_band(foreground: np.ndarray, width: int) -> np.ndarray:
    """Foreground pixels within `width` pixels of the background: where a missing piece can break off."""
    return foreground & ~ndimage.binary_erosion(foreground, iterations=max(width, 1), border_value=1)


def blob(rng: np.random.Generator, cy: float, cx: float, area: float, size: int, irregular: float,
         soft: float = 1.0) -> tuple[Window, np.ndarray]:
    """An elliptic blob of about `area` pixels whose outline a fractal noise pushes in and out by up to
    `irregular` of its radius (0.6: Perlin-like islands and bays); alpha in [0, 1] over its window."""
    aspect = rng.uniform(0.5, 2.0)
    a = np.sqrt(area / np.pi * aspect)
    b = area / (np.pi * a)
    win = window(cy, cx, (1 + irregular) * max(a, b) + soft + 2, size)
    v, u = rotate(win.Y, win.X, cy, cx, rng.uniform(0, np.pi))
    rho = np.sqrt((u / np.float32(a)) ** 2 + (v / np.float32(b)) ** 2)
    h, w = win.shape
    # clipped at +1 so that the outline stays inside the window: never a straight cut along its border
    noise = np.minimum(standardise(_smooth(rng, h, w, max(min(a, b) / 1.5, 1.5))), 1) if irregular else 0
    distance = (rho - 1 - np.float32(irregular) * noise) * np.float32(np.sqrt(a * b))
    return win, cover(distance, soft)


def _smooth(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    return smooth_noise(rng, h, w, cell) + 0.5 * smooth_noise(rng, h, w, cell / 2)


def curve(rng: np.random.Generator, cy: float, cx: float, length: float, wiggle: float) -> np.ndarray:
    """(n, 2) points (y, x) of a random-walk curve of `length` pixels from (cy, cx); `wiggle` is the heading's
    random turn per step in radians (0: straight)."""
    n = max(int(length / 4), 3)
    step = length / n
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, wiggle, n))
    steps = np.stack([np.sin(heading), np.cos(heading)], axis=1) * step
    return np.vstack([[cy, cx], np.array([cy, cx]) + np.cumsum(steps, axis=0)])


def polyline_distance(win: Window, points: np.ndarray, reach: float) -> np.ndarray:
    """Distance in pixels from each window pixel to the polyline through `points`, exact up to `reach` pixels
    (infinite beyond): each segment is measured only over its own padded bounding box."""
    out = np.full(win.shape, np.inf, dtype=np.float32)
    y0, x0 = win.rows.start, win.cols.start
    for a, b in pairwise(points):
        lo = np.floor(np.minimum(a, b) - reach).astype(int) - (y0, x0)
        hi = np.ceil(np.maximum(a, b) + reach).astype(int) + 1 - (y0, x0)
        rows = slice(max(lo[0], 0), min(hi[0], out.shape[0]))
        cols = slice(max(lo[1], 0), min(hi[1], out.shape[1]))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            continue
        py, px = win.Y[rows, cols] - np.float32(a[0]), win.X[rows, cols] - np.float32(a[1])
        ab = (b - a).astype(np.float32)
        t = np.clip((py * ab[0] + px * ab[1]) / max(float(ab @ ab), 1e-6), 0, 1)
        d = np.sqrt((py - t * ab[0]) ** 2 + (px - t * ab[1]) ** 2)
        np.minimum(out[rows, cols], d, out=out[rows, cols])
    return out
