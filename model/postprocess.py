"""What follows an image's raw online score, defined once for the model, training and the service:

- `normalise`: the 0..1 score, a monotone piecewise-linear map of the raw score sending the threshold to 0.5
  (batched tensors), and `normalised_score` for one image's Python floats;
- `verdict`: anomalous when the raw score is above the threshold (tensors or floats);
- `with_threshold`: an image's normalised score and verdict under another threshold (a per-request override);
- `HEAT_RAMP` and `heat_colours`: the heatmap colour ramp of evaluation strips, kept-result thumbnails, `sowa demo`
  and the console (which reads the stops from the service's /ui/config.json).

docs/scoring.md has the definitions.
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch

__all__ = ["HEAT_RAMP", "heat_colours", "normalise", "normalised_score", "verdict", "with_threshold"]

# black -> purple -> red -> yellow -> white (inferno-like), evenly spaced stops over [0, 1]
HEAT_RAMP: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (120, 0, 140), (230, 60, 30), (255, 210, 0), (255, 255, 255))
_RAMP = np.array(HEAT_RAMP, dtype=np.float32)

def normalise(raw: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Monotone map of raw scores in [0, 1] onto [0, 1] sending `threshold` to 0.5."""
    low = 0.5 * raw / threshold
    high = 0.5 + 0.5 * (raw - threshold) / (1.0 - threshold)
    return torch.where(raw <= threshold, low, high).clamp(0.0, 1.0)


def normalised_score(raw: float, threshold: float) -> float:
    """`normalise` for one image, through the same code in float64 (Python's float): the same number as the
    scalar formula, with no second implementation to drift from the batched one."""
    return float(normalise(torch.tensor(raw, dtype=torch.float64), torch.tensor(threshold, dtype=torch.float64)))


@overload
def verdict(raw: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor: ...
@overload
def verdict(raw: float, threshold: float) -> bool: ...
def verdict(raw: torch.Tensor | float, threshold: torch.Tensor | float) -> torch.Tensor | bool:
    """Anomalous: the raw score above the threshold (equivalently, the normalised score above 0.5); a bool tensor
    for tensors, a bool for floats."""
    return raw > threshold


def with_threshold(raw: float, threshold: float) -> tuple[float, bool]:
    """One image's normalised score and verdict under `threshold` instead of its class's: the raw score does
    not depend on the threshold, so no model call is needed."""
    return normalised_score(raw, threshold), verdict(raw, threshold)


def heat_colours(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) -> RGB on `HEAT_RAMP`, linearly between its stops, uint8 (..., 3)."""
    pos = np.clip(v, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_RAMP) - 2)
    t = (pos - lo)[..., None]
    return (_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)
