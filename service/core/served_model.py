"""ServedModel: one bundle loaded on the engine's device, with what serving it needs beside the weights.

The engine holds one active ServedModel and, while a new version is prepared, loads the next beside it
(service/core/models/activation.py); a shadow candidate is one too. Everything tied to one bundle lives here, so a
switch is one pointer: its weights, its input size and stager, its compiled graphs, and how answers name it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.bundle import BundleInfo, load_bundle
from model.compiled_vision import CompiledVision, bucket_sizes
from model.sowa import SowaModel

from .staging import Decoder, ImageStager

__all__ = ["ServedModel", "load_served"]


@dataclass(eq=False)
class ServedModel:
    """A loaded bundle. Identity matters: the batcher groups requests by the ServedModel they started on."""

    model: SowaModel
    info: BundleInfo
    label: str | None
    stager: ImageStager
    compiled: CompiledVision | None = None
    description: dict[str, Any] = field(default_factory=dict)
    weight_bytes: int = 0

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def version(self) -> str:
        """How answers, records and the API name this model: its label, else its fingerprint's first 16 digits."""
        return self.label or self.info.fingerprint[:16]

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def describe(self) -> dict[str, Any]:
        return dict(self.description)


def load_served(bundle: Path, device: torch.device, dtype: torch.dtype, decoder: Decoder, label: str | None = None,
                compile_mode: str | None = None, max_batch_size: int = 16) -> ServedModel:
    """Load a bundle onto `device` (any thread: nothing runs on the device but the weight copy). BundleError
    when it is broken: nothing is held then."""
    model, info = load_bundle(bundle, device, dtype)
    compiled = None
    if compile_mode is not None:
        compiled = CompiledVision(model, compile_mode, bucket_sizes(max_batch_size))
        model.set_inference_encoder(compiled)
    bb = info.config.backbone
    served = ServedModel(model, info, label, ImageStager(device, model.image_size, decoder), compiled)
    served.description = {
        "arch": bb.arch or "custom", "image_size": model.image_size, "taps": list(model.taps),
        "trained": info.trained, "fingerprint": info.fingerprint[:16], "version": served.version,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "compile": compiled.mode if compiled else "off"}
    served.weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return served
