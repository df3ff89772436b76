"""The `sowa demo` product: procedural, seeded images of one part and its defects.

A part is a textured plate with a round boss (pose and lighting jitter per image); defects are drawn on top and
their mask is exactly the changed pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["DEFECT_KINDS", "Sample", "make_part", "with_defect"]

DEFECT_KINDS = ("scratch", "stain", "missing")


@dataclass(frozen=True)
class Sample:
    image: Image.Image  # RGB
    mask: np.ndarray  # (H, W) bool, True where the defect changed a pixel
    kind: str  # "good" or a defect kind


def make_part(rng: np.random.Generator, size: int = 224, jitter: float = 1.0) -> Image.Image:
    """A normal part: brushed-metal plate, a boss near the centre; `jitter` scales pose, texture-phase and
    lighting variation (0: every part identical but for surface grain; 1: a loosely fixtured camera)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(-0.15, 0.15) * jitter
    brushed = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi * 40 + rng.uniform(0, 6.28) * jitter)
    grain = np.asarray(Image.fromarray((rng.random((size // 4, size // 4)) * 255).astype(np.uint8))
                       .resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    light = (1.0 + rng.uniform(-0.15, 0.1) * jitter) * (0.9 + 0.2 * x)
    plate = (0.55 + 0.05 * brushed + 0.08 * (grain - 0.5)) * light
    rgb = np.stack([plate * 0.95, plate, plate * 1.05], axis=-1)
    img = Image.fromarray(np.clip(rgb * 255, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cx, cy = (size / 2 + rng.uniform(-0.03, 0.03, 2) * size * jitter)
    r = size * 0.22
    tone = int(105 + rng.uniform(-10, 10) * jitter)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(tone, tone + 10, tone + 30), outline=(40, 40, 50), width=3)
    draw.ellipse([cx - r * 0.35, cy - r * 0.35, cx + r * 0.35, cy + r * 0.35], fill=(30, 30, 35))
    return img


def with_defect(part: Image.Image, rng: np.random.Generator, kind: str) -> Sample:
    """Draw one defect of `kind` on a copy of `part`."""
    size = part.width
    layer = part.copy()
    draw = ImageDraw.Draw(layer)
    if kind == "scratch":
        x0, y0 = rng.uniform(0.15, 0.6, 2) * size
        length, theta = rng.uniform(0.2, 0.35) * size, rng.uniform(0, np.pi)
        draw.line([x0, y0, x0 + length * np.cos(theta), y0 + length * np.sin(theta)], fill=(20, 18, 15),
                  width=max(3, size // 50))
    elif kind == "stain":
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        r = rng.uniform(0.04, 0.08) * size
        blob = Image.new("L", part.size, 0)
        ImageDraw.Draw(blob).ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=255)
        blob = blob.filter(ImageFilter.GaussianBlur(r / 4))
        stain = Image.new("RGB", part.size, (150, 75, 20))
        layer = Image.composite(stain, layer, blob.point(lambda v: int(v * 0.8)))
    elif kind == "missing":
        cx, cy = size / 2, size / 2
        r = size * 0.23
        start = rng.uniform(0, 360)
        draw.pieslice([cx - r, cy - r, cx + r, cy + r], start, start + 50, fill=tuple(
            int(v) for v in np.asarray(part)[2, 2]))
    else:
        raise ValueError(f"unknown defect kind '{kind}' (known: {', '.join(DEFECT_KINDS)})")
    mask = np.any(np.asarray(layer) != np.asarray(part), axis=-1)
    return Sample(layer, mask, kind)
