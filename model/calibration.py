"""Online image scores and their per-class calibration from the shots (docs/scoring.md has the derivation).

The reference image score with shots, 0.5 * (text_prob + min-max normalised map max), normalises over the whole
test set of a class: a service cannot wait for that. Here the map max is normalised against the class's own
normal range, learned from its shots by leave-one-out:

    a_i   = max over pixels of shot i's final map, its k-shot part scored against the other shots
    mu, sigma = mean of a_i, max(std of a_i, 5% of mu)
    raw   = 0.5 * (text_score + sigmoid((map_max - mu) / sigma))            in (0, 1)
    threshold = 0.5 * (mean text_score of the shots + sigmoid(Z))          Z = 3 standard deviations
    normalized_score = piecewise-linear map of raw onto [0, 1] with threshold -> 0.5   (postprocess.py)
    is_anomalous = raw > threshold

Without a class (zero-shot), raw = text_score and the threshold is 0.5. All functions are pure and batched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .device import to_device
from .postprocess import normalise, verdict

__all__ = ["DEFAULT_Z", "Calibration", "ImageScores", "calibrate", "image_scores", "zero_shot_pixel_threshold"]

DEFAULT_Z = 3.0
_MIN_REL_SIGMA = 0.05


@dataclass(frozen=True)
class Calibration:
    """A class's normal range (`map_mean`, `map_std` of shot map maxima), its text level and its threshold."""

    map_mean: float
    map_std: float
    text_mean: float
    threshold: float
    shots: int
    z: float = DEFAULT_Z
    # the K shots' leave-one-out final-map maxima and text scores, as `calibrate` saw them (empty in calibrations
    # stored before they were kept): the numbers behind the threshold, shown by GET /classes/{name}/scores
    shot_map_max: tuple[float, ...] = ()
    shot_text_scores: tuple[float, ...] = ()

    def __post_init__(self) -> None:  # JSON gives lists: keep the dataclass hashable
        object.__setattr__(self, "shot_map_max", tuple(float(v) for v in self.shot_map_max))
        object.__setattr__(self, "shot_text_scores", tuple(float(v) for v in self.shot_text_scores))

    @property
    def pixel_threshold(self) -> float:
        """Map value above the class's normal range (mean + Z std of shot maxima): where regions start."""
        return self.map_mean + self.z * self.map_std

    def with_threshold(self, threshold: float) -> Calibration:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        return replace(self, threshold=threshold)

    def shot_scores(self) -> list[float]:
        """Each shot's online raw score against the others (leave-one-out), as `image_scores` computes it; empty
        when the per-shot numbers were not kept."""
        return [0.5 * (t + 1.0 / (1.0 + math.exp(-(a - self.map_mean) / self.map_std)))
                for a, t in zip(self.shot_map_max, self.shot_text_scores, strict=True)]


@dataclass(frozen=True)
class ImageScores:
    """Per image: `raw` online score (`score` in the API and the service), `threshold`, `normalized_score` (0..1,
    threshold at 0.5), `is_anomalous`."""

    raw: torch.Tensor
    threshold: torch.Tensor
    normalized_score: torch.Tensor
    is_anomalous: torch.Tensor


def calibrate(final_map_max: torch.Tensor, text_scores: torch.Tensor, z: float = DEFAULT_Z) -> Calibration:
    """Calibration from the K shots' leave-one-out final-map maxima (K,) and their text scores (K,)."""
    a = final_map_max.double().flatten()
    k = a.numel()
    if k == 0 or text_scores.numel() != k:
        raise ValueError(f"need one map maximum and one text score per shot, got {k} and {text_scores.numel()}")
    mean = a.mean().item()
    std = a.std(unbiased=True).item() if k > 1 else 0.0
    std = max(std, _MIN_REL_SIGMA * abs(mean), 1e-6)
    text_mean = text_scores.double().mean().item()
    threshold = 0.5 * (text_mean + 1.0 / (1.0 + math.exp(-z)))
    return Calibration(mean, std, text_mean, threshold, k, z, tuple(a.tolist()),
                       tuple(text_scores.double().flatten().tolist()))


def zero_shot_pixel_threshold(num_stages: int) -> float:
    """Without a class: the mean stage anomaly probability above one half, i.e. a summed map above S / 2."""
    return 0.5 * num_stages


def image_scores(
    text_scores: torch.Tensor, map_max: torch.Tensor, calibrations: Sequence[Calibration | None]
) -> ImageScores:
    """Online scores of a batch of images, each with its class's calibration or None (zero-shot).

    Computed where `text_scores` lives and returned there: on a GPU the per-class constants go up in one
    non-blocking copy and nothing comes back, so the caller makes the single device-to-host copy of a batch.
    """
    if len(calibrations) != text_scores.numel():
        raise ValueError(f"need one calibration (or None) per image, got {len(calibrations)} for "
                         f"{text_scores.numel()} images")
    t = text_scores.double()
    m = map_max.double().to(t.device)
    table = torch.tensor([[1.0, c.map_mean, c.map_std, c.threshold] if c else [0.0, 0.0, 1.0, 0.5]
                          for c in calibrations], dtype=torch.float64).reshape(-1, 4)
    has, mean, std, thr = to_device(table, t.device).unbind(dim=1)
    raw = torch.where(has > 0, 0.5 * (t + torch.sigmoid((m - mean) / std)), t)
    return ImageScores(raw=raw.float(), threshold=thr.float(), normalized_score=normalise(raw, thr).float(),
                       is_anomalous=verdict(raw, thr))
