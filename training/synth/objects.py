"""Procedural objects on a background, seen by a fixtured camera: a class-level design, per-image renders.

Shapes are signed distance fields in the object's own frame (pixels), so pose jitter is one rotation and shift
of the coordinates and edges come out anti-aliased. Per-image variation: a shift of up to 1.5 % of the image,
up to 3 degrees of rotation, +-6 % light and a 6 % gradient, fresh surface grain. A render also returns the object's
coverage and the bare background, which the `missing` defect shows through.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .primitives import Procedural, box, cover, fractal, grid, lighting, rotate

__all__ = ["OBJECTS", "Object", "Render"]

SHIFT = 0.015  # per-image shift jitter, fraction of the image side
ROTATION = np.deg2rad(3.0)
LIGHT_GAIN, LIGHT_SLOPE = 0.06, 0.06


@dataclass(frozen=True)
class Render:
    image: np.ndarray  # (S, S, 3) float32 in [0, 1]
    foreground: np.ndarray  # (S, S) bool: where the object is (the whole image for a texture)
    background: np.ndarray | None  # (S, S, 3) float32: the scene without the object; None for a texture


def _pose(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Object-frame coordinates (v down, u right) in pixels around a jittered centre."""
    Y, X = grid(size, size)
    cy, cx = size / 2 + rng.uniform(-SHIFT, SHIFT, 2) * size
    return rotate(Y, X, cy, cx, rng.uniform(-ROTATION, ROTATION))


def _scene(rng: np.random.Generator, size: int, colour: tuple[float, float, float], obj: np.ndarray,
           alpha: np.ndarray, grain: float = 0.03) -> Render:
    """Composite the object over a mottled background, light both the same way."""
    mottle = fractal(rng, size, size, size / 10, octaves=4)
    bg = np.asarray(colour, dtype=np.float32) * (1 + grain * mottle)[..., None]
    light = lighting(rng, size, size, LIGHT_GAIN, LIGHT_SLOPE)
    a = alpha[..., None]
    return Render((bg * (1 - a) + obj * a) * light, alpha > 0.5, bg * light)


def _metal_grain(rng: np.random.Generator, size: int) -> np.ndarray:
    return 1 + 0.04 * fractal(rng, size, size, 2.0, octaves=2)


def hexnut_design(rng: np.random.Generator) -> dict:
    return {"steel": np.array([0.70, 0.71, 0.74], np.float32) + rng.uniform(-0.04, 0.04, 3).astype(np.float32),
            "light_angle": rng.uniform(0, np.pi)}


def hexnut(rng: np.random.Generator, size: int, d: dict) -> Render:
    """Hex nut, top view: chamfered hexagon, turned face, threaded bore showing the dark table."""
    v, u = _pose(rng, size)
    r = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    apothem = 0.286 * size
    hexagon = np.max([np.abs(u * np.cos(a) + v * np.sin(a)) for a in (0.0, np.pi / 3, 2 * np.pi / 3)], axis=0)
    outer = np.maximum(hexagon - apothem, r - 0.318 * size)
    shape = np.maximum(outer, 0.13 * size - r)
    face = 0.78 + 0.1 * np.cos(2 * (phi - d["light_angle"])) + 0.03 * np.sin(2 * np.pi * r / 2.5)
    bevel = np.where(r > 0.27 * size, 0.62 + 0.12 * np.cos(phi - d["light_angle"]), 1.0)
    thread = np.where(r < 0.165 * size, 0.55 + 0.2 * np.sin(2 * np.pi * r / 3.0), 1.0)
    shade = face * bevel * thread * _metal_grain(rng, size)
    return _scene(rng, size, (0.16, 0.16, 0.18), d["steel"] * shade[..., None], cover(shape))


def pill_design(rng: np.random.Generator) -> dict:
    return {"cap": np.array([0.80, 0.28, 0.18], np.float32) + rng.uniform(-0.06, 0.06, 3).astype(np.float32),
            "body": np.array([0.93, 0.91, 0.84], np.float32)}


def pill(rng: np.random.Generator, size: int, d: dict) -> Render:
    """Two-tone capsule lying in a tray: cylinder shading, specular streak, seam and an imprinted ring."""
    v, u = _pose(rng, size)
    half, radius = 0.22 * size, 0.115 * size
    axis_dist = np.sqrt((u - np.clip(u, -half, half)) ** 2 + v * v)
    shape = axis_dist - radius
    z = np.sqrt(np.clip(1 - (axis_dist / radius) ** 2, 0, 1))
    highlight = 0.25 * np.exp(-(((v / radius + 0.45) / 0.15) ** 2)) * z
    seam = 1 - 0.35 * cover(np.abs(u) - 0.8)
    imprint = 1 - 0.25 * cover(np.abs(np.sqrt((u - 0.11 * size) ** 2 + v * v) - 0.04 * size) - 0.9)
    colour = np.where((u < 0)[..., None], d["cap"], d["body"])
    shade = (0.5 + 0.5 * z) * seam * imprint
    obj = colour * shade[..., None] + highlight[..., None]
    return _scene(rng, size, (0.52, 0.58, 0.66), obj, cover(shape))


def pcb_design(rng: np.random.Generator) -> dict:
    """The board's fixed layout (chip, pads, L-shaped traces), in fractions of the image side."""
    chip = (rng.uniform(-0.08, 0.0), rng.uniform(-0.1, 0.05))  # (v, u) centre
    pads, traces = [], []
    for _ in range(10):  # pads along the board's edges
        if rng.random() < 0.5:
            pv, pu = rng.choice([-0.27, 0.27]), rng.uniform(-0.32, 0.32)
        else:
            pv, pu = rng.uniform(-0.25, 0.25), rng.choice([-0.35, 0.35])
        pads.append((pv, pu))
        sv, su = chip[0] + rng.uniform(-0.05, 0.05), chip[1] + rng.choice([-0.09, 0.09])  # a pin of the chip
        traces += [(sv, su, sv, pu), (sv, pu, pv, pu)]  # horizontal then vertical leg
    return {"chip": chip, "pads": pads, "traces": traces}


def pcb(rng: np.random.Generator, size: int, d: dict) -> Render:
    """Green circuit board: copper traces under solder mask, gold pads, a black chip with pins, mounting holes."""
    v, u = _pose(rng, size)
    s = np.float32(size)
    board = box(v, u, 0, 0, 0.36 * s, 0.42 * s, 0.03 * s)
    w = 0.007 * s
    trace = np.min([box(v, u, (a + c) / 2 * s, (b + e) / 2 * s, abs(c - a) / 2 * s + w, abs(e - b) / 2 * s + w)
                    for a, b, c, e in d["traces"]], axis=0)
    pad = np.min([np.sqrt((v - pv * s) ** 2 + (u - pu * s) ** 2) for pv, pu in d["pads"]], axis=0)
    cv, cu = d["chip"][0] * s, d["chip"][1] * s
    chip = box(v, u, cv, cu, 0.09 * s, 0.08 * s, 0.005 * s)
    pins = box(v, u, cv, cu, 0.075 * s, 0.095 * s)
    pin_rows = np.abs(((v - cv) / (0.025 * s)) % 1 - 0.5) - 0.22  # comb of pins along the chip's sides
    corner = np.sqrt((np.abs(v) - 0.3 * s) ** 2 + (np.abs(u) - 0.36 * s) ** 2)
    rgb = np.broadcast_to(np.array([0.10, 0.38, 0.18], np.float32), (size, size, 3)).copy()
    rgb = _paint(rgb, cover(trace), (0.20, 0.55, 0.26))
    rgb = _paint(rgb, cover(pad - 0.02 * s), (0.86, 0.72, 0.32))
    rgb = _paint(rgb, cover(pad - 0.008 * s), (0.05, 0.05, 0.05))
    rgb = _paint(rgb, cover(np.maximum(pins, pin_rows * 0.025 * s)), (0.75, 0.75, 0.78))
    rgb = _paint(rgb, cover(chip), (0.08, 0.08, 0.09))
    rgb = _paint(rgb, cover(np.abs(corner - 0.025 * s) - 0.007 * s), (0.86, 0.72, 0.32))
    rgb *= (1 + 0.05 * fractal(rng, size, size, 2.0, octaves=2))[..., None]
    shape = np.maximum(board, 0.018 * s - corner)  # holes at the corners show the table
    return _scene(rng, size, (0.14, 0.14, 0.17), rgb, cover(shape))


def _paint(rgb: np.ndarray, alpha: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    a = alpha[..., None]
    return rgb * (1 - a) + np.asarray(colour, dtype=np.float32) * a


def bottlecap_design(rng: np.random.Generator) -> dict:
    return {"colour": np.array([0.78, 0.14, 0.12], np.float32) + rng.uniform(-0.06, 0.06, 3).astype(np.float32),
            "ridges": int(rng.integers(30, 36))}


def bottlecap(rng: np.random.Generator, size: int, d: dict) -> Render:
    """Crown cap, top view: knurled skirt, domed face, an embossed ring and a printed emblem."""
    v, u = _pose(rng, size)
    r = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    rim, face = 0.34 * size, 0.29 * size
    skirt = 0.72 + 0.28 * np.cos(d["ridges"] * phi)
    dome = 0.85 + 0.15 * (1 - np.clip(r / face, 0, 1) ** 2)
    ring = 1 + 0.2 * np.exp(-(((r - 0.21 * size) / 1.3) ** 2)) - 0.2 * np.exp(-(((r - 0.21 * size - 2.5) / 1.3) ** 2))
    shade = np.where(r > face, skirt, dome * ring)
    emblem = np.maximum(cover(r - 0.035 * size), cover(np.abs(r - 0.085 * size) - 0.018 * size))  # dot in a ring
    obj = d["colour"] * shade[..., None]
    obj = obj * (1 - emblem[..., None]) + np.float32(0.92) * emblem[..., None]
    obj *= (1 + 0.03 * fractal(rng, size, size, 2.0, octaves=2))[..., None]
    return _scene(rng, size, (0.74, 0.74, 0.72), obj, cover(r - rim))


def screw_design(rng: np.random.Generator) -> dict:
    return {"steel": np.array([0.74, 0.74, 0.76], np.float32) + rng.uniform(-0.03, 0.03, 3).astype(np.float32),
            "pitch": rng.uniform(0.026, 0.032)}


def screw(rng: np.random.Generator, size: int, d: dict) -> Render:
    """Machine screw lying on a plate, side view: rounded head, threaded shank, pointed tip."""
    v, u = _pose(rng, size)
    s = np.float32(size * 1.2)  # the layout below is in fractions of 1.2 image sides
    head = box(v, u, 0, -0.30 * s, 0.1 * s, 0.045 * s, 0.025 * s)
    thread_phase = (u + 0.35 * v) / (d["pitch"] * s)
    radius = np.where(u < 0.26 * s, 0.042 * s, 0.042 * s - (u - 0.26 * s) * 0.42)
    radius = radius * (1 + 0.07 * np.cos(2 * np.pi * thread_phase) * (u > -0.22 * s))
    shank = np.maximum(np.abs(v) - radius, np.maximum(-0.26 * s - u, u - 0.35 * s))
    shape = np.minimum(head, shank)
    z_shank = np.sqrt(np.clip(1 - (v / np.maximum(radius, 1)) ** 2, 0, 1))
    z_head = np.sqrt(np.clip(1 - (v / (0.1 * s)) ** 2, 0, 1))
    threads = np.where(u > -0.22 * s, 0.75 + 0.25 * np.cos(2 * np.pi * thread_phase), 1.0)
    shade = np.where(head < shank, 0.45 + 0.55 * z_head, (0.4 + 0.6 * z_shank) * threads) * _metal_grain(rng, size)
    return _scene(rng, size, (0.25, 0.27, 0.31), d["steel"] * shade[..., None], cover(shape))


def transistor_design(rng: np.random.Generator) -> dict:
    return {"body": np.array([0.10, 0.10, 0.11], np.float32), "marks": rng.uniform(0.04, 0.1, 3)}


def transistor(rng: np.random.Generator, size: int, d: dict) -> Render:
    """TO-220 package on a board: metal tab with a hole, black body with a marking, three tinned legs."""
    v, u = _pose(rng, size)
    s = np.float32(size)
    tab = np.maximum(box(v, u, -0.28 * s, 0, 0.08 * s, 0.17 * s, 0.01 * s),
                     0.045 * s - np.sqrt((v + 0.28 * s) ** 2 + u * u))
    body = box(v, u, -0.07 * s, 0, 0.14 * s, 0.17 * s, 0.008 * s)
    legs = np.min([box(v, u, 0.23 * s, k * 0.1 * s, 0.17 * s, 0.02 * s) for k in (-1, 0, 1)], axis=0)
    leg_u = (u + 0.1 * s) % (0.1 * s) - 0.05 * s  # across each leg, for its cylinder shading
    marks = np.min([box(v, u, (-0.12 + 0.05 * k) * s, -0.03 * s, 0.008 * s, w * s) for k, w in enumerate(d["marks"])],
                   axis=0)
    obj = np.empty((size, size, 3), np.float32)
    obj[:] = np.array([0.72, 0.73, 0.75], np.float32) * (0.8 + 0.2 * np.cos(np.pi * leg_u / (0.04 * s)))[..., None]
    obj = _paint(obj, cover(tab), (0.70, 0.70, 0.72))
    obj = _paint(obj, cover(body), tuple(d["body"]))
    obj = _paint(obj, cover(marks), (0.75, 0.75, 0.75))
    obj *= _metal_grain(rng, size)[..., None]
    alpha = np.maximum(np.maximum(cover(tab), cover(body)), cover(legs))
    return _scene(rng, size, (0.84, 0.80, 0.66), obj, alpha)


Object = Procedural[Render]  # an object category: renders the object in its scene


OBJECTS: dict[str, Object] = {
    "hexnut": Object(hexnut_design, hexnut),
    "pill": Object(pill_design, pill),
    "pcb": Object(pcb_design, pcb),
    "bottlecap": Object(bottlecap_design, bottlecap),
    "screw": Object(screw_design, screw),
    "transistor": Object(transistor_design, transistor),
}
