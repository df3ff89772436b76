"""Few-shot class fitting and scored inference on top of `SowaModel.predict`.

`fit_class` turns K normal shots into a `ClassMemory` (bank + calibration); `predict_scored` runs a batch of
images of mixed classes and adds the online image scores of `calibration.py`. Both are what the CLI and the
service call, so offline and online results are the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import torch

from .bundle import load_bundle
from .calibration import DEFAULT_Z, Calibration, ImageScores, calibrate, image_scores
from .device import resolve_device, resolve_dtype
from .maps import final_map
from .memory_bank import MemoryBank, build_bank, leave_one_out_distances
from .preprocess import load_image, preprocess_batch
from .sowa import SowaModel

__all__ = ["ClassMemory", "Prediction", "ScoreColumns", "fit_class", "memory_from_outputs", "predict_files",
           "predict_scored"]

V = TypeVar("V")


@dataclass(frozen=True)
class ClassMemory:
    """What a product class needs at inference: its bank and its calibration, and `prompt_name`: the name that
    picks its prompt class (`SowaModel.class_index`: the bundle's `class_names` entry of that name, else 0)."""

    bank: MemoryBank
    calibration: Calibration
    prompt_name: str | None = None


class ScoreColumns(NamedTuple, Generic[V]):
    """An image's numbers, named once for all who carry them: the columns of `Prediction.columns` in this order
    (tensors, one per column), one image's row of them (floats), the service's `ImageResult` fields of the same
    names and its worker wire rows. `score` is the raw online score (`ImageScores.raw`; `score` in the API)."""

    text_score: V
    score: V
    threshold: V
    normalized_score: V
    is_anomalous: V  # 0.0 or 1.0 when packed (float32 holds it exactly); `unpack` makes it a bool
    map_max: V  # the final map's highest value: at or below the pixel threshold, it holds no region

    @classmethod
    def unpack(cls, row: Sequence[float]) -> ScoreColumns[float]:
        """One image's row of the packed (B, n) tensor, as Python numbers with the verdict a bool."""
        values = cls._make(row)
        return values._replace(is_anomalous=values.is_anomalous > 0.5)


@dataclass(frozen=True)
class Prediction:
    """`anomaly_maps` (B, S, S) float32 reference scale; `text_scores` (B,); per-image `scores`. On the model's
    device as `predict_scored` returns it; `to_host` brings it to the CPU."""

    anomaly_maps: torch.Tensor
    text_scores: torch.Tensor
    scores: ImageScores

    def columns(self) -> torch.Tensor:
        """(B, len(ScoreColumns._fields)) float32 where the predictions are: the per-image numbers packed, in
        `ScoreColumns` order, for one copy to the host (float32 holds each exactly, the verdict included)."""
        s = self.scores
        return torch.stack(ScoreColumns(
            text_score=self.text_scores.float(), score=s.raw, threshold=s.threshold,
            normalized_score=s.normalized_score, is_anomalous=s.is_anomalous.float(),
            map_max=self.anomaly_maps.flatten(1).amax(dim=1).float()), 1)

    def to_host(self, maps: bool = True) -> Prediction:
        """The same on the CPU, in one packed device-to-host copy (the only host wait of a batch); `maps=False`
        leaves the maps behind, as an empty (B, 0, 0) tensor."""
        b, n = self.text_scores.shape[0], len(ScoreColumns._fields)
        columns = self.columns()
        parts = [self.anomaly_maps.float().flatten(1), columns] if maps else [columns]
        host = torch.cat(parts, dim=1).cpu()
        c = ScoreColumns._make(host[:, -n:].unbind(1))
        size = self.anomaly_maps.shape[-1] if maps else 0
        return Prediction(host[:, :-n].reshape(b, size, size), c.text_score.clone(),
                          ImageScores(c.score.clone(), c.threshold.clone(), c.normalized_score.clone(),
                                      c.is_anomalous > 0.5))


@torch.inference_mode()
def fit_class(model: SowaModel, shots: torch.Tensor, z: float = DEFAULT_Z, prompt_name: str | None = None
              ) -> ClassMemory:
    """(K, 3, S, S) preprocessed normal shots -> bank + leave-one-out calibration (docs/scoring.md), scored with
    the prompt class that `prompt_name` picks (the class's name; None: prompt class 0)."""
    if shots.dim() != 4 or shots.shape[0] < 1:
        raise ValueError(f"shots must be a (K, 3, S, S) batch with K >= 1, got {tuple(shots.shape)}")
    out = model.predict(shots, class_ids=_prompt_ids(model, [prompt_name] * shots.shape[0]))
    memory = memory_from_outputs(out.raw_patches, out.zero_shot_maps, out.text_scores, model.grid, z)
    return ClassMemory(memory.bank, memory.calibration, prompt_name)


def _prompt_ids(model: SowaModel, names: Sequence[str | None]) -> list[int] | None:
    """Each image's prompt class; None (all class 0, the cheaper path) when the bundle has one prompt class."""
    if len(model.cfg.prompt.class_names) == 1:
        return None
    return [0 if n is None else model.class_index(n) for n in names]


def memory_from_outputs(raw: torch.Tensor, zero_shot: torch.Tensor, text_scores: torch.Tensor, grid: int,
                        z: float = DEFAULT_Z) -> ClassMemory:
    """`fit_class` on shots that already went through `predict`: raw patches (K, S, L, D), zero-shot maps
    (K, H, W), text scores (K,). Lets a caller that ran the shots anyway (evaluation) skip a second pass."""
    loo = leave_one_out_distances(raw, grid)  # (K, S, L)
    final = final_map(zero_shot, loo, grid)
    return ClassMemory(build_bank(raw), calibrate(final.flatten(1).amax(dim=1), text_scores, z))


@torch.inference_mode()
def predict_scored(
    model: SowaModel, images: torch.Tensor, memories: Sequence[ClassMemory | None] | None = None,
    prompt_names: Sequence[str | None] | None = None,
) -> Prediction:
    """Maps and online scores for a batch; `memories[i]` is image i's class, or None for zero-shot.
    `prompt_names[i]` picks image i's prompt class (default: its memory's `prompt_name`; None: class 0)."""
    memories = list(memories) if memories is not None else [None] * images.shape[0]
    if prompt_names is None:
        prompt_names = [m.prompt_name if m else None for m in memories]
    ids = _prompt_ids(model, prompt_names)
    out = model.predict(images, [m.bank if m else None for m in memories], class_ids=ids)
    scores = image_scores(out.text_scores, out.anomaly_maps.flatten(1).amax(dim=1),
                          [m.calibration if m else None for m in memories])
    return Prediction(out.anomaly_maps, out.text_scores, scores)


def predict_files(
    bundle: Path, images: Sequence[Path], shots: Sequence[Path] = (), device: str = "auto", dtype: str = "fp32",
    batch_size: int = 8, class_name: str | None = None,
) -> dict[str, np.ndarray]:
    """Offline inference on image files; returns the arrays `sowa predict` writes to its npz. `class_name` picks
    the prompt class as the service does (the bundle's of that name, else 0), shots or not."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    model, _ = load_bundle(bundle, resolve_device(device), resolve_dtype(dtype))
    size = model.image_size
    memory = None
    if shots:
        memory = fit_class(model, preprocess_batch([load_image(p) for p in shots], size), prompt_name=class_name)
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("anomaly_maps", "text_scores", "scores",
                                                            "normalized_scores", "thresholds", "is_anomalous")}
    for start in range(0, len(images), batch_size):
        batch = preprocess_batch([load_image(p) for p in images[start:start + batch_size]], size)
        n = batch.shape[0]
        pred = predict_scored(model, batch, [memory] * n, prompt_names=[class_name] * n).to_host()
        chunks["anomaly_maps"].append(pred.anomaly_maps.numpy())
        chunks["text_scores"].append(pred.text_scores.numpy())
        chunks["scores"].append(pred.scores.raw.numpy())
        chunks["normalized_scores"].append(pred.scores.normalized_score.numpy())
        chunks["thresholds"].append(pred.scores.threshold.numpy())
        chunks["is_anomalous"].append(pred.scores.is_anomalous.numpy())
    return {k: np.concatenate(v).astype(np.float32 if k != "is_anomalous" else bool) for k, v in chunks.items()}
