"""The one place a SowaModel is built from a config: bundles, `sowa init`, training and the benches call it.

`build_config` resolves an architecture (open_clip name, one of `model/configs/`, or a config JSON file) into a
`ModelConfig` with the reference hyper-parameters; `build_model` makes the network and loads the backbone
weights that `pretrained` names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .backbone import load_pretrained_tag, load_weights_file, resolve_backbone
from .config import AdapterConfig, ModelConfig, default_window
from .sowa import SowaModel

__all__ = ["build_config", "build_model"]


def build_config(arch: str, pretrained: str = "none", taps: list[int] | None = None,
                 window_size: int | None = None) -> ModelConfig:
    """Reference hyper-parameters on any open_clip ViT; the window defaults to one that tiles its grid."""
    backbone = resolve_backbone(arch, pretrained)
    window = window_size or default_window(backbone.grid_size)
    return ModelConfig(backbone=backbone, taps=tuple(taps or ()), adapter=AdapterConfig(window_size=window))


def build_model(cfg: ModelConfig, pretrained: str = "bundle", seed: int | None = None,
                trained: bool = True) -> SowaModel:
    """The network of `cfg`, its adapters and prompts seeded by `seed` (torch's current state when None).

    `pretrained` says where the backbone weights come from: a weight file, the open_clip tag recorded in `cfg`
    (any other value), or "bundle"/"none": left at their random init, for the caller to load or keep.
    """
    if seed is not None:
        torch.manual_seed(seed)
    model = SowaModel(cfg, trained=trained)
    if pretrained in ("bundle", "none"):
        return model
    if Path(pretrained).is_file():
        load_weights_file(model.clip, pretrained)
    elif cfg.backbone.weights != "bundle":
        load_pretrained_tag(cfg.backbone, model.clip)
    return model

