"""Procedural textures: a class-level design (colours, scale, grain direction) and per-image renders.

Per-image variation is what a camera sees over a uniform material: a random phase (another spot of the same
sheet), a few percent of scale, a degree or two of rotation, mild lighting drift, and fresh stochastic grain.
"""

from __future__ import annotations

import numpy as np

from .primitives import Procedural, cover, fractal, grid, lighting, rotate, smooth_noise

__all__ = ["TEXTURES", "Texture"]

ROTATION = np.deg2rad(2.0)  # per-image rotation jitter (radians)
SCALE = 0.03  # per-image scale jitter (relative)
LIGHT_GAIN, LIGHT_SLOPE = 0.06, 0.06


def _colour(rng: np.random.Generator, base: tuple[float, float, float], spread: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(base, dtype=np.float32) + rng.uniform(-spread, spread, 3).astype(np.float32), 0, 1)


def _frame(rng: np.random.Generator, size: int, period: float, angle: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Pattern coordinates in periods: the design angle plus jitter, a random phase, scale jitter."""
    Y, X = grid(size, size)
    theta = angle + rng.uniform(-ROTATION, ROTATION)
    v, u = rotate(Y, X, size / 2, size / 2, theta)
    p = np.float32(period * (1 + rng.uniform(-SCALE, SCALE)))
    return v / p + np.float32(rng.uniform(0, 8)), u / p + np.float32(rng.uniform(0, 8))


def _lit(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    return rgb * lighting(rng, rgb.shape[0], rgb.shape[1], LIGHT_GAIN, LIGHT_SLOPE)


def woven_design(rng: np.random.Generator) -> dict:
    return {"warp": _colour(rng, (0.62, 0.55, 0.42)), "weft": _colour(rng, (0.50, 0.44, 0.34)),
            "period": rng.uniform(14, 17) / 256, "angle": rng.uniform(-0.05, 0.05)}


def woven(rng: np.random.Generator, size: int, d: dict) -> np.ndarray:
    """Plain weave: threads alternate over and under, each shaded like a cylinder, with fibre fuzz."""
    v, u = _frame(rng, size, d["period"] * size, d["angle"])
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    over = ((iu + iv) % 2 == 0)[..., None]
    warp = np.sqrt(np.sin(np.pi * fu)) * (0.8 + 0.2 * np.sin(np.pi * fv))
    weft = np.sqrt(np.sin(np.pi * fv)) * (0.8 + 0.2 * np.sin(np.pi * fu))
    rgb = np.where(over, d["warp"] * (0.35 + 0.75 * warp[..., None]), d["weft"] * (0.35 + 0.75 * weft[..., None]))
    fuzz = fractal(rng, size, size, 3.0, octaves=2)[..., None]
    return _lit(rng, rgb * (1 + 0.05 * fuzz))


def wood_design(rng: np.random.Generator) -> dict:
    return {"light": _colour(rng, (0.78, 0.58, 0.36)), "dark": _colour(rng, (0.50, 0.32, 0.17)),
            "period": rng.uniform(20, 26) / 256, "angle": rng.uniform(-0.08, 0.08)}


def wood(rng: np.random.Generator, size: int, d: dict) -> np.ndarray:
    """Flat-sawn board: growth rings as wavy bands across the grain, fibre streaks along it."""
    v, _u = _frame(rng, size, d["period"] * size, d["angle"])
    wobble = fractal(rng, size, size, size / 3, octaves=3) * 0.35
    ring = (0.5 + 0.5 * np.sin(2 * np.pi * (v + wobble))) ** 3
    streaks = smooth_noise(rng, size, size, 1.5, size / 4) - 0.5
    t = np.clip(ring + 0.35 * streaks, 0, 1)[..., None]
    return _lit(rng, d["light"] * (1 - t) + d["dark"] * t)


def carpet_design(rng: np.random.Generator) -> dict:
    return {"colour": _colour(rng, (0.30, 0.36, 0.55), 0.1), "period": rng.uniform(6, 8) / 256}


def carpet(rng: np.random.Generator, size: int, d: dict) -> np.ndarray:
    """Cut-pile carpet: a lattice of tufts, each a rounded bump, with dense fibre noise and mottling."""
    v, u = _frame(rng, size, d["period"] * size)
    tufts = np.sin(np.pi * (u % 1)) * np.sin(np.pi * (v % 1))
    fibres = fractal(rng, size, size, 2.0, octaves=2)
    mottle = fractal(rng, size, size, size / 5, octaves=2)
    shade = 0.55 + 0.45 * tufts + 0.12 * fibres + 0.05 * mottle
    return _lit(rng, d["colour"][None, None, :] * shade[..., None] * 1.25)


def metal_design(rng: np.random.Generator) -> dict:
    return {"colour": _colour(rng, (0.66, 0.68, 0.72), 0.04), "band": rng.uniform(0.3, 0.7)}


def metal(rng: np.random.Generator, size: int, d: dict) -> np.ndarray:
    """Brushed steel: long streaks along x, fine scratches, a soft specular band across the sheet."""
    streaks = smooth_noise(rng, size, size, 1.0, size / 3) - 0.5
    fine = smooth_noise(rng, size, size, 1.0, size / 12) - 0.5
    Y, _X = grid(size, size)
    band_y = (d["band"] + rng.uniform(-0.05, 0.05)) * size
    band = np.exp(-(((Y - band_y) / (0.25 * size)) ** 2))
    shade = 0.78 + 0.22 * streaks + 0.12 * fine + 0.18 * band
    return _lit(rng, d["colour"][None, None, :] * shade[..., None])


def tiles_design(rng: np.random.Generator) -> dict:
    return {"tile": _colour(rng, (0.80, 0.82, 0.86), 0.05), "grout": _colour(rng, (0.35, 0.34, 0.33), 0.04),
            "period": rng.uniform(56, 66) / 256, "grout_width": rng.uniform(0.07, 0.09)}


def tiles(rng: np.random.Generator, size: int, d: dict) -> np.ndarray:
    """Square ceramic tiles: per-tile shade, glaze speckle and a bevel, separated by grout lines."""
    period = d["period"] * size
    v, u = _frame(rng, size, period)
    iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - iu, v - iv
    edge = np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv)) * period  # pixels to the nearest grout line
    grout = 1 - cover(d["grout_width"] * period / 2 - edge)
    shades = 1 + 0.04 * rng.standard_normal((16, 16)).astype(np.float32)
    tile_shade = shades[iu % 16, iv % 16]
    bevel = 1 - 0.12 * np.exp(-np.maximum(edge - d["grout_width"] * period / 2, 0) / 2.0)
    speckle = 1 + 0.04 * fractal(rng, size, size, 1.5, octaves=2)
    tile = d["tile"] * (tile_shade * bevel * speckle)[..., None]
    grout_rgb = d["grout"] * (1 + 0.1 * fractal(rng, size, size, 2.0, octaves=2))[..., None]
    return _lit(rng, tile * (1 - grout[..., None]) + grout_rgb * grout[..., None])


def leather_design(rng: np.random.Generator) -> dict:
    return {"colour": _colour(rng, (0.45, 0.28, 0.17), 0.06), "cell": rng.uniform(9, 12) / 256}


def leather(rng: np.random.Generator, size: int, d: dict) -> np.ndarray:
    """Grained leather: an embossed fractal relief lit from the top left, with sparse dark pores."""
    height = fractal(rng, size, size, d["cell"] * size, octaves=3)
    gy, gx = np.gradient(height)
    relief = 1 + 0.9 * (gx + gy)
    pores = np.clip(fractal(rng, size, size, 1.2, octaves=1) - 2.0, 0, None)
    shade = np.clip(relief, 0.4, 1.6) * 0.85 * (1 - 0.5 * pores) + 0.04 * height
    return _lit(rng, d["colour"][None, None, :] * shade[..., None] * 1.15)


Texture = Procedural[np.ndarray]  # a texture category: renders an (S, S, 3) float image


TEXTURES: dict[str, Texture] = {
    "woven": Texture(woven_design, woven),
    "wood": Texture(wood_design, wood),
    "carpet": Texture(carpet_design, carpet),
    "metal": Texture(metal_design, metal),
    "tiles": Texture(tiles_design, tiles),
    "leather": Texture(leather_design, leather),
}
