"""Heatmap colours and evaluation strips (image | ground truth | heatmap overlay).

Every strip uses one fixed colour scale, so strips of different images, classes, K and bundles compare directly:
map values from 0 (black) to the number of stages S (white), i.e. a mean of 1 per stage; higher values saturate.
Final maps live on the reference scale (zero-shot part in (0, S), k-shot part in [0, 2S]), see docs/evaluation.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from model.postprocess import heat_colours
from model.preprocess import load_image

__all__ = ["colormap", "heat_overlay", "save_strip", "strip"]

colormap = heat_colours  # values in [0, 1] -> RGB uint8 on the ramp the service and the console use too


def heat_overlay(image: Image.Image, heat: np.ndarray, vmax: float, alpha: float = 0.5) -> Image.Image:
    """`heat` (H, W) in map units over `image` (resized to H x W), coloured on the fixed scale [0, vmax]."""
    h, w = heat.shape
    base = image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    return Image.blend(base, Image.fromarray(colormap(np.asarray(heat, dtype=np.float32) / vmax)), alpha)


def strip(image: Image.Image, mask: np.ndarray, heat: np.ndarray, vmax: float) -> Image.Image:
    """image | ground-truth mask | heatmap overlay, each at the map's size (H x 3W)."""
    h, w = heat.shape
    out = Image.new("RGB", (3 * w, h))
    out.paste(image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC), (0, 0))
    out.paste(Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).convert("RGB"), (w, 0))
    out.paste(heat_overlay(image, heat, vmax), (2 * w, 0))
    return out


def save_strip(path: Path, image_path: Path, mask: np.ndarray, heat: np.ndarray, vmax: float,
               text: dict[str, str] | None = None) -> None:
    """Write the strip of one test image as a PNG; the colour scale and `text` go into its tEXt chunks."""
    info = PngInfo()
    for key, value in {"sowa:scale": f"0..{vmax:g} map units, black to white", **(text or {})}.items():
        info.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip(load_image(image_path), mask, heat, vmax).save(path, pnginfo=info)
