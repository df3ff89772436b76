"""Offline bundle commands: import an official checkpoint, make an untrained bundle, predict on image files."""

from __future__ import annotations

import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.backbone import load_pretrained_tag, load_weights_file, resolve_backbone
from model.bundle import MANIFEST, BundleInfo, load_bundle, save_bundle
from model.checkpoint_import import import_checkpoint
from model.config import AdapterConfig, ModelConfig, default_window
from model.device import resolve_device, resolve_dtype
from model.inference import fit_class, predict_scored
from model.preprocess import load_image, preprocess_batch
from model.sowa import SowaModel

__all__ = ["build_config", "build_model", "check_output_dir", "init_bundle", "predict_files", "provenance_base",
           "run_import"]


def provenance_base(source: str) -> dict[str, Any]:
    """Common provenance fields: what made the bundle, when, with which code."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_revision": rev,
            "torch": torch.__version__, "python": platform.python_version()}


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to write over a non-bundle directory, or over a bundle without --force."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise ValueError(f"{out} is a non-empty directory that is not a bundle; choose another --out")
        if not force:
            raise ValueError(f"{out} already holds a bundle; pass --force to overwrite it")


def run_import(ckpt: Path, out: Path, taps: list[int] | None, text_heads: int | None, temperature: float,
               force: bool = False) -> BundleInfo:
    check_output_dir(out, force)
    imported = import_checkpoint(ckpt, taps=taps, text_heads=text_heads, temperature=temperature)
    return save_bundle(imported.model, out, {**provenance_base("import-checkpoint"), **imported.provenance})


def build_config(arch: str, pretrained: str = "none", taps: list[int] | None = None,
                 window_size: int | None = None) -> ModelConfig:
    """Reference hyper-parameters on any open_clip ViT; the window defaults to one that tiles its grid."""
    backbone = resolve_backbone(arch, pretrained)
    window = window_size or default_window(backbone.grid_size)
    return ModelConfig(backbone=backbone, taps=tuple(taps or ()), adapter=AdapterConfig(window_size=window))


def build_model(cfg: ModelConfig, pretrained: str, seed: int, trained: bool) -> SowaModel:
    """A model with seeded adapters and prompts on the backbone weights `pretrained` names (tag, file, none)."""
    torch.manual_seed(seed)
    model = SowaModel(cfg, trained=trained)
    if Path(pretrained).is_file():
        load_weights_file(model.clip, pretrained)
    elif cfg.backbone.weights != "bundle":
        load_pretrained_tag(cfg.backbone, model.clip)
    return model


def init_bundle(arch: str, pretrained: str, out: Path, taps: list[int] | None = None,
                window_size: int | None = None, seed: int = 0, force: bool = False) -> BundleInfo:
    """An untrained bundle: adapters and prompts at their init, marked untrained (few-shot-only serving)."""
    check_output_dir(out, force)
    cfg = build_config(arch, pretrained, taps, window_size)
    model = build_model(cfg, pretrained, seed, trained=False)
    model.refresh_text()
    prov = {**provenance_base("init"), "arch": arch, "pretrained": pretrained, "seed": seed}
    return save_bundle(model, out, prov)


def predict_files(
    bundle: Path, images: Sequence[Path], shots: Sequence[Path] = (), device: str = "auto", dtype: str = "fp32",
    batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """Offline inference on image files; returns the arrays `sowa predict` writes to its npz."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    model, _ = load_bundle(bundle, resolve_device(device), resolve_dtype(dtype))
    size = model.image_size
    memory = None
    if shots:
        memory = fit_class(model, preprocess_batch([load_image(p) for p in shots], size))
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("anomaly_maps", "text_scores", "scores",
                                                            "normalized_scores", "thresholds", "is_anomalous")}
    for start in range(0, len(images), batch_size):
        batch = preprocess_batch([load_image(p) for p in images[start:start + batch_size]], size)
        pred = predict_scored(model, batch, [memory] * batch.shape[0])
        chunks["anomaly_maps"].append(pred.anomaly_maps.float().cpu().numpy())
        chunks["text_scores"].append(pred.text_scores.float().cpu().numpy())
        chunks["scores"].append(pred.scores.raw.numpy())
        chunks["normalized_scores"].append(pred.scores.score.numpy())
        chunks["thresholds"].append(pred.scores.threshold.numpy())
        chunks["is_anomalous"].append(pred.scores.is_anomalous.numpy())
    return {k: np.concatenate(v).astype(np.float32 if k != "is_anomalous" else bool) for k, v in chunks.items()}
