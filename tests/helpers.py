"""Small real models and files for tests: random-weight open_clip towers, never mocks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from model.config import AdapterConfig, BackboneConfig, ModelConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference"

TINY_CLIP: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_config(taps: tuple[int, ...] = (0, 1, 2, 3), window: int = 4, depth: int = 1, image_size: int = 64,
                layers: int = 4, **adapter: Any) -> ModelConfig:
    mc = copy.deepcopy(TINY_CLIP)
    mc["vision_cfg"].update(image_size=image_size, layers=layers)
    return ModelConfig(backbone=BackboneConfig(model_config=mc), taps=taps,
                       adapter=AdapterConfig(window_size=window, depth=depth, **adapter))


def perturb_trainables(model: torch.nn.Module, seed: int = 0) -> None:
    """Move adapters, prompts and fusion away from their init, as a trained model would be."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("clip."):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
