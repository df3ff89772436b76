"""Defects drawn on a normal render, and their masks: exactly the pixels whose 8-bit value changed.

Eight kinds, three size tiers. Blob-like kinds aim at an area (fraction of the image); thin kinds (scratch, scar)
at a length, so their area is smaller. On objects every kind but `warp` and `missing` stays on the object, and
its area is capped at half the object's. A drawn defect whose change is too small or too faint to be seen is
redrawn (same generator, so still deterministic).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .objects import Render
from .primitives import box, cover, rotate, to_uint8
from .regions import Window, blob, curve, edge_band, pick_centre, polyline_distance, window

__all__ = ["AREA", "KINDS", "LENGTH", "TIERS", "Defect", "Foreign", "add_defect"]

KINDS = ("perlin_blob", "cut_paste", "scar", "blend", "scratch", "stain", "missing", "warp")
TIERS = ("large", "medium", "small")
AREA = {"large": (0.05, 0.10), "medium": (0.01, 0.03), "small": (0.0015, 0.004)}  # fraction of the image area
LENGTH = {"large": (0.45, 0.65), "medium": (0.22, 0.35), "small": (0.07, 0.12)}  # thin kinds: fraction of the side
WIDTH = {"large": (3.0, 4.5), "medium": (2.0, 3.0), "small": (1.5, 2.2)}  # thin kinds: pixels at 256 px

ALPHA_FLOOR = 0.05  # softer coverage is clamped to zero: no halo of barely-changed pixels around a defect
REVERT = 2  # changes of at most this many grey levels are undone: invisible, and they would blur the mask
MIN_PIXELS = 6  # a defect changes at least a handful of pixels...
MIN_CONTRAST = 18  # ...by this many grey levels on average (largest channel), or it is redrawn
ATTEMPTS = 25

Foreign = Callable[[np.random.Generator, int], np.ndarray]  # (rng, size) -> a foreign texture, (S, S, 3) float


@dataclass(frozen=True)
class Defect:
    image: np.ndarray  # (S, S, 3) uint8
    mask: np.ndarray  # (S, S) bool: where `image` differs from the normal image it was drawn on
    kind: str
    tier: str


@dataclass(frozen=True)
class _Scene:
    image: np.ndarray
    foreground: np.ndarray
    background: np.ndarray | None
    foreign: Foreign
    size: int

    @property
    def is_object(self) -> bool:
        return self.background is not None


def add_defect(render: Render, rng: np.random.Generator, kind: str, tier: str, foreign: Foreign) -> Defect:
    """Draw one defect of `kind` and `tier` on `render`; redraw until it is visible (see module docstring)."""
    if kind not in _DRAW:
        raise ValueError(f"unknown defect kind '{kind}' (known: {', '.join(KINDS)})")
    if tier not in AREA:
        raise ValueError(f"unknown size tier '{tier}' (known: {', '.join(TIERS)})")
    scene = _Scene(render.image, render.foreground, render.background, foreign, render.image.shape[0])
    normal = to_uint8(render.image)
    best, best_score = None, -1.0
    for _ in range(ATTEMPTS):
        drawn, expected = _DRAW[kind](scene, rng, tier)
        image = to_uint8(drawn)
        diff = np.abs(image.astype(np.int16) - normal).max(axis=-1)
        faint = diff <= REVERT
        image[faint] = normal[faint]
        mask = ~faint
        changed = int(mask.sum())
        contrast = float(diff[mask].mean()) if changed else 0.0
        if changed >= max(MIN_PIXELS, 0.2 * expected) and contrast >= MIN_CONTRAST:
            return Defect(image, mask, kind, tier)
        if changed >= MIN_PIXELS and changed * contrast > best_score:
            best, best_score = Defect(image, mask, kind, tier), changed * contrast
    if best is None:
        raise RuntimeError(f"could not draw a visible '{kind}' defect in {ATTEMPTS} attempts")
    return best


def _area(scene: _Scene, rng: np.random.Generator, tier: str, object_share: float = 0.5) -> float:
    """The tier's area in pixels; on an object at most `object_share` of the object."""
    area = rng.uniform(*AREA[tier]) * scene.size**2
    if scene.is_object:
        area = min(area, object_share * float(scene.foreground.sum()))
    return max(area, 12.0)


def _thin(scene: _Scene, rng: np.random.Generator, tier: str, width_scale: float) -> tuple[float, float]:
    length = rng.uniform(*LENGTH[tier]) * scene.size
    return length, max(rng.uniform(*WIDTH[tier]) * width_scale * scene.size / 256, 1.2)


def _mix(scene: _Scene, win: Window, alpha: np.ndarray, source: np.ndarray, on_object: bool = True) -> np.ndarray:
    """The image with `source` composited over `win` by `alpha` (clamped, and kept on the object)."""
    if scene.is_object and on_object:
        alpha = alpha * scene.foreground[win.rows, win.cols]
    alpha = np.where(alpha < ALPHA_FLOOR, 0, alpha)[..., None]
    out = scene.image.copy()
    out[win.rows, win.cols] = out[win.rows, win.cols] * (1 - alpha) + source * alpha
    return out


def _sample(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear samples of `image` at float coordinates (reflected at the border)."""
    return np.stack([ndimage.map_coordinates(image[..., c], [ys, xs], order=1, mode="reflect")
                     for c in range(3)], axis=-1)


def _luminance(image: np.ndarray) -> float:
    return float(image.mean())


def _curve_window(scene: _Scene, points: np.ndarray, width: float) -> Window:
    lo, hi = points.min(axis=0), points.max(axis=0)
    centre = (lo + hi) / 2
    return window(centre[0], centre[1], (hi - lo).max() / 2 + width + 2, scene.size)


def _perlin_blob(scene: _Scene, rng: np.random.Generator, tier: str) -> tuple[np.ndarray, float]:
    """An irregular island of another texture (the DRAEM recipe)."""
    area = _area(scene, rng, tier)
    cy, cx = pick_centre(rng, scene.foreground, margin=4)
    win, alpha = blob(rng, cy, cx, area, scene.size, irregular=0.6)
    return _mix(scene, win, alpha, scene.foreign(rng, scene.size)[win.rows, win.cols]), area


def _cut_paste(scene: _Scene, rng: np.random.Generator, tier: str) -> tuple[np.ndarray, float]:
    """A rectangle of the same image, from elsewhere, rotated and a little brighter or darker."""
    area = _area(scene, rng, tier)
    aspect = rng.uniform(1.0, 3.0)
    hu = np.sqrt(area * aspect) / 2
    hv = area / (4 * hu)
    cy, cx = pick_centre(rng, scene.foreground, margin=4)
    far = scene.foreground.copy()
    ys, xs = np.ogrid[: scene.size, : scene.size]
    far &= (ys - cy) ** 2 + (xs - cx) ** 2 > (hu + hv) ** 2
    sy, sx = pick_centre(rng, far if far.any() else scene.foreground, margin=4)
    win = window(cy, cx, np.hypot(hu, hv) + 2, scene.size)
    v, u = rotate(win.Y, win.X, cy, cx, rng.uniform(0, np.pi))
    alpha = cover(box(v, u, 0, 0, hv, hu))
    turn = rng.uniform(0.4, np.pi - 0.4) * rng.choice([-1, 1])
    dy, dx = win.Y - np.float32(cy), win.X - np.float32(cx)
    src_y = sy + np.cos(turn) * dy - np.sin(turn) * dx
    src_x = sx + np.sin(turn) * dy + np.cos(turn) * dx
    gain = 1 + rng.choice([-1, 1]) * rng.uniform(0.08, 0.18)
    return _mix(scene, win, alpha, _sample(scene.image, src_y, src_x) * np.float32(gain)), area


def _scar(scene: _Scene, rng: np.random.Generator, tier: str) -> tuple[np.ndarray, float]:
    """A thin irregular curve filled with the image shifted sideways, darkened or lightened (a healed cut)."""
    length, width = _thin(scene, rng, tier, 1.0)
    cy, cx = pick_centre(rng, scene.foreground, margin=4)
    points = curve(rng, cy, cx, length, wiggle=0.35)
    win = _curve_window(scene, points, width)
    alpha = cover(polyline_distance(win, points, width) - width / 2)
    shift, heading = rng.uniform(2, 4) * width, rng.uniform(0, 2 * np.pi)
    dy, dx = np.float32(shift * np.sin(heading)), np.float32(shift * np.cos(heading))
    source = _sample(scene.image, win.Y + dy, win.X + dx)
    tone = 0.55 if _luminance(scene.image[win.rows, win.cols]) > 0.4 else 1.7
    return _mix(scene, win, alpha, source * np.float32(tone)), length * width


def _blend(scene: _Scene, rng: np.random.Generator, tier: str) -> tuple[np.ndarray, float]:
    """A rounded patch of another texture, alpha-blended at half to four-fifths opacity with soft edges."""
    area = _area(scene, rng, tier)
    cy, cx = pick_centre(rng, scene.foreground, margin=4)
    win, alpha = blob(rng, cy, cx, area, scene.size, irregular=0.15, soft=max(1.0, 0.15 * np.sqrt(area / np.pi)))
    source = scene.foreign(rng, scene.size)[win.rows, win.cols]
    return _mix(scene, win, alpha * np.float32(rng.uniform(0.5, 0.8)), source), area


def _scratch(scene: _Scene, rng: np.random.Generator, tier: str) -> tuple[np.ndarray, float]:
    """A thin, nearly straight line: bright on dark surfaces, dark on light ones."""
    length, width = _thin(scene, rng, tier, 0.6)
    cy, cx = pick_centre(rng, scene.foreground, margin=4)
    points = curve(rng, cy, cx, length, wiggle=0.06)
    win = _curve_window(scene, points, width)
    alpha = cover(polyline_distance(win, points, width) - width / 2) * np.float32(rng.uniform(0.85, 1.0))
    bright = _luminance(scene.image[win.rows, win.cols]) < 0.5
    colour = np.array([0.95, 0.95, 0.92] if bright else [0.1, 0.09, 0.08], dtype=np.float32)
    return _mix(scene, win, alpha, np.broadcast_to(colour, (*win.shape, 3))), length * width


_STAINS = ((0.62, 0.45, 0.28), (0.72, 0.42, 0.25), (0.45, 0.45, 0.52))  # coffee, rust, oil: multiplied in


def _stain(scene: _Scene, rng: np.random.Generator, tier: str) -> tuple[np.ndarray, float]:
    """A soft-edged irregular spot: a darkening tint on light surfaces, a pale residue on dark ones."""
    area = _area(scene, rng, tier)
    cy, cx = pick_centre(rng, scene.foreground, margin=4)
    win, alpha = blob(rng, cy, cx, area, scene.size, irregular=0.35, soft=max(1.0, 0.2 * np.sqrt(area / np.pi)))
    under = scene.image[win.rows, win.cols]
    if _luminance(under) > 0.3:
        source = under * np.asarray(_STAINS[rng.integers(len(_STAINS))], dtype=np.float32)
    else:
        source = under * 0.3 + np.float32(0.55)
    return _mix(scene, win, alpha * np.float32(rng.uniform(0.7, 0.95)), source), area


def _missing(scene: _Scene, rng: np.random.Generator, tier: str) -> tuple[np.ndarray, float]:
    """Objects: a piece broken off at the rim, the background showing. Textures: a hole, dark backing."""
    area = _area(scene, rng, tier, object_share=0.25)
    if scene.is_object:
        radius = np.sqrt(2 * area / np.pi)  # about half of the blob lands off the object
        cy, cx = pick_centre(rng, edge_band(scene.foreground, int(radius / 2)), margin=2)
        win, alpha = blob(rng, cy, cx, 2 * area, scene.size, irregular=0.25)
        return _mix(scene, win, alpha, scene.background[win.rows, win.cols], on_object=False), area
    cy, cx = pick_centre(rng, scene.foreground, margin=4)
    win, alpha = blob(rng, cy, cx, area, scene.size, irregular=0.3)
    return _mix(scene, win, alpha, scene.image[win.rows, win.cols] * np.float32(0.15) + np.float32(0.02)), area


def _warp(scene: _Scene, rng: np.random.Generator, tier: str) -> tuple[np.ndarray, float]:
    """A smooth local displacement (push, twist or bulge) with compact support, centred on structure."""
    area = _area(scene, rng, tier)
    radius = max(np.sqrt(area / np.pi), 3.0)
    lum = scene.image.mean(axis=-1)
    gy, gx = np.gradient(lum)
    busy = np.hypot(gy, gx)
    busy = scene.foreground & (busy >= np.quantile(busy[scene.foreground], 0.75))
    cy, cx = pick_centre(rng, busy if busy.any() else scene.foreground, margin=int(radius / 2))
    win = window(cy, cx, radius + 1, scene.size)
    dy, dx = win.Y - np.float32(cy), win.X - np.float32(cx)
    bump = np.clip(1 - (dy * dy + dx * dx) / np.float32(radius**2), 0, 1) ** 2
    mode = rng.integers(3)
    if mode == 0:  # push along a direction
        a, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.5) * radius
        src_y, src_x = win.Y - amp * bump * np.sin(a), win.X - amp * bump * np.cos(a)
    elif mode == 1:  # twist about the centre
        t = rng.uniform(0.8, 1.6) * rng.choice([-1, 1]) * bump
        src_y, src_x = cy + np.cos(t) * dy - np.sin(t) * dx, cx + np.sin(t) * dy + np.cos(t) * dx
    else:  # bulge: magnify the middle
        k = 1 - rng.uniform(0.35, 0.55) * bump
        src_y, src_x = cy + dy * k, cx + dx * k
    source = _sample(scene.image, src_y.astype(np.float32), src_x.astype(np.float32))
    return _mix(scene, win, (bump > 0).astype(np.float32), source, on_object=False), np.pi * radius**2


_DRAW: dict[str, Callable[[_Scene, np.random.Generator, str], tuple[np.ndarray, float]]] = {
    "perlin_blob": _perlin_blob,
    "cut_paste": _cut_paste,
    "scar": _scar,
    "blend": _blend,
    "scratch": _scratch,
    "stain": _stain,
    "missing": _missing,
    "warp": _warp,
}
