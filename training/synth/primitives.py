"""Building blocks shared by textures, objects and defects: value noise, pixel grids, pose, lighting, distances.

Everything is float32 numpy, vectorised over the whole image (or a defect's window); colours are RGB in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

__all__ = ["Procedural", "box", "cover", "fractal", "grid", "lighting", "rotate", "smooth_noise", "standardise",
           "to_uint8"]


def grid(h: int, w: int, y0: float = 0.0, x0: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (Y, X), each (h, w) float32, starting at (y0, x0)."""
    y = np.arange(h, dtype=np.float32) + np.float32(y0)
    x = np.arange(w, dtype=np.float32) + np.float32(x0)
    return np.broadcast_to(y[:, None], (h, w)), np.broadcast_to(x[None, :], (h, w))


def rotate(ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates relative to (cy, cx), rotated by -theta: a shape drawn in them appears rotated by +theta."""
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    dy, dx = ys - np.float32(cy), xs - np.float32(cx)
    return c * dy - s * dx, c * dx + s * dy


def _taps(n: int, cell: float, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice index and quintic-faded weight of each of n pixels (C2-smooth value noise)."""
    t = (np.arange(n, dtype=np.float64) + offset) / cell
    i = np.floor(t).astype(np.int64)
    f = t - i
    return i, (f * f * f * (f * (f * 6 - 15) + 10)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float | None = None) -> np.ndarray:
    """Value noise in [0, 1] with lattice spacing (cell_y, cell_x) pixels, at a random phase. Separable
    gathers rather than matmuls: no BLAS threads, which crawl on a busy 2-core machine."""
    cell_x = cell_y if cell_x is None else cell_x
    iy, fy = _taps(h, cell_y, rng.uniform(0, cell_y))
    ix, fx = _taps(w, cell_x, rng.uniform(0, cell_x))
    lattice = rng.random((int(iy[-1]) + 2, int(ix[-1]) + 2), dtype=np.float32)
    rows = lattice[:, ix] * (1 - fx) + lattice[:, ix + 1] * fx
    return rows[iy] * (1 - fy)[:, None] + rows[iy + 1] * fy[:, None]


def fractal(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 4, gain: float = 0.5) -> np.ndarray:
    """Octaves of value noise (the Perlin-noise look), standardised to zero mean and unit deviation."""
    total = np.zeros((h, w), dtype=np.float32)
    amp = 1.0
    for _ in range(octaves):
        total += np.float32(amp) * smooth_noise(rng, h, w, max(cell, 1.0))
        cell, amp = cell / 2, amp * gain
    return standardise(total)


def standardise(a: np.ndarray) -> np.ndarray:
    return ((a - a.mean()) / (a.std() + 1e-6)).astype(np.float32)


def cover(distance: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage of a shape from its signed distance in pixels (negative inside)."""
    return np.clip(0.5 - distance / np.float32(soft), 0, 1).astype(np.float32)


def lighting(rng: np.random.Generator, h: int, w: int, gain: float, slope: float) -> np.ndarray:
    """(h, w, 1) multiplicative light: overall gain 1 +- `gain`, a linear falloff of up to `slope` in a random
    direction (a fixtured lamp whose brightness drifts a little)."""
    Y, X = grid(h, w)
    a = rng.uniform(0, 2 * np.pi)
    ramp = (X / w - 0.5) * np.float32(np.cos(a)) + (Y / h - 0.5) * np.float32(np.sin(a))
    g = 1 + rng.uniform(-gain, gain)
    return (np.float32(g) * (1 + np.float32(rng.uniform(0, slope)) * ramp))[..., None].astype(np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def box(v: np.ndarray, u: np.ndarray, cv: float, cu: float, hv: float, hu: float, r: float = 0.0) -> np.ndarray:
    """Signed distance to a rounded box centred at (cv, cu) with half sizes (hv, hu) and corner radius r."""
    qv, qu = np.abs(v - np.float32(cv)) - np.float32(hv - r), np.abs(u - np.float32(cu)) - np.float32(hu - r)
    outside = np.sqrt(np.maximum(qv, 0) ** 2 + np.maximum(qu, 0) ** 2)
    return outside + np.minimum(np.maximum(qv, qu), 0) - np.float32(r)


T = TypeVar("T")


@dataclass(frozen=True)
class Procedural(Generic[T]):
    """A category's generator: `design(rng)` once per class (colours, scale, layout), then
    `render(rng, size, design)` per image with its per-image jitter."""

    design: Callable[[np.random.Generator], dict]
    render: Callable[[np.random.Generator, int, dict], T]
