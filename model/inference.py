"""Few-shot class fitting and scored inference on top of `SowaModel.predict`.

`fit_class` turns K normal shots into a `ClassMemory` (bank + calibration); `predict_scored` runs a batch of
images of mixed classes and adds the online image scores of `calibration.py`. Both are what the CLI and the
service call, so offline and online results are the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .calibration import DEFAULT_Z, Calibration, ImageScores, calibrate, image_scores
from .maps import kshot_map
from .memory_bank import MemoryBank, build_bank, leave_one_out_distances
from .sowa import SowaModel

__all__ = ["ClassMemory", "Prediction", "fit_class", "memory_from_outputs", "predict_scored"]


@dataclass(frozen=True)
class ClassMemory:
    """What a product class needs at inference: its bank and its calibration."""

    bank: MemoryBank
    calibration: Calibration


@dataclass(frozen=True)
class Prediction:
    """`anomaly_maps` (B, S, S) float32 reference scale; `text_scores` (B,); per-image `scores`."""

    anomaly_maps: torch.Tensor
    text_scores: torch.Tensor
    scores: ImageScores


@torch.inference_mode()
def fit_class(model: SowaModel, shots: torch.Tensor, z: float = DEFAULT_Z) -> ClassMemory:
    """(K, 3, S, S) preprocessed normal shots -> bank + leave-one-out calibration (docs/scoring.md)."""
    if shots.dim() != 4 or shots.shape[0] < 1:
        raise ValueError(f"shots must be a (K, 3, S, S) batch with K >= 1, got {tuple(shots.shape)}")
    out = model.predict(shots)
    return memory_from_outputs(out.raw_patches, out.zero_shot_maps, out.text_scores, model.grid,
                               model.image_size, z)


def memory_from_outputs(raw: torch.Tensor, zero_shot: torch.Tensor, text_scores: torch.Tensor, grid: int,
                        size: int, z: float = DEFAULT_Z) -> ClassMemory:
    """`fit_class` on shots that already went through `predict`: raw patches (K, S, L, D), zero-shot maps
    (K, H, W), text scores (K,). Lets a caller that ran the shots anyway (evaluation) skip a second pass."""
    loo = leave_one_out_distances(raw, grid)  # (K, S, L)
    final = zero_shot.float() + kshot_map(loo, grid, size)
    return ClassMemory(build_bank(raw), calibrate(final.flatten(1).amax(dim=1), text_scores, z))


@torch.inference_mode()
def predict_scored(
    model: SowaModel, images: torch.Tensor, memories: Sequence[ClassMemory | None] | None = None
) -> Prediction:
    """Maps and online scores for a batch; `memories[i]` is image i's class, or None for zero-shot."""
    memories = list(memories) if memories is not None else [None] * images.shape[0]
    out = model.predict(images, [m.bank if m else None for m in memories])
    scores = image_scores(out.text_scores, out.anomaly_maps.flatten(1).amax(dim=1),
                          [m.calibration if m else None for m in memories])
    return Prediction(out.anomaly_maps, out.text_scores, scores)
