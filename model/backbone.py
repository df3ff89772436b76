"""The open_clip CLIP backbone: resolving an architecture, building it, loading its weights, taking its taps.

Taps come from `visual.forward_intermediates` in one pass (no forward hooks: they are not thread-safe and keep
activations alive on the modules). SOWA_SPEC.md §1 explains why the raw block outputs, without ln_post, are
exactly the reference's hooked tensors.
"""

from __future__ import annotations

import copy
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP

from .config import BackboneConfig, ConfigError

__all__ = [
    "BackboneError",
    "VisionTaps",
    "build_clip",
    "list_configs",
    "load_weights_file",
    "resolve_backbone",
    "take_taps",
]


class BackboneError(RuntimeError):
    """The backbone cannot be built or its weights cannot be loaded."""


@dataclass(frozen=True)
class VisionTaps:
    """One vision pass: `image_embeds` (B, D) = ln_post(CLS) @ proj; `tokens` per tap (B, L, W), no CLS, no norm."""

    image_embeds: torch.Tensor
    tokens: list[torch.Tensor]


CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # our own small configs, resolvable by name


def list_configs() -> list[str]:
    """Names of the model configs this package ships (e.g. `sowa-tiny`), beside open_clip's."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _read_model_config(arch: str) -> tuple[str | None, dict[str, Any]]:
    """(open_clip name or None, model config). Our shipped configs resolve by name the way open_clip's do; they
    are recorded as custom (no open_clip name), so a bundle carries its config and never needs this package's."""
    if arch in list_configs():
        return None, json.loads((CONFIG_DIR / f"{arch}.json").read_text())
    path = Path(arch)
    if arch.endswith(".json") or path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"model config file not found: {arch}") from e
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read model config {arch}: {e}") from e
        return None, cfg
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ConfigError(f"unknown open_clip architecture '{arch}' (see open_clip.list_models()), not one of ours "
                          f"({', '.join(list_configs())}) and no such file")
    return arch, copy.deepcopy(cfg)


def resolve_backbone(arch: str, weights: str = "none") -> BackboneConfig:
    """Architecture (open_clip name or model-config JSON path) + weight source -> BackboneConfig.

    `weights`: "none" (random init), an open_clip pretrained tag such as "openai", or a local weight file. Random
    and file weights are recorded as "bundle": a saved bundle carries them, so it is reproducible. OpenAI tags
    force QuickGELU, exactly as open_clip does; building ViT-L-14-336 with GELU would silently change every
    activation (spec §1).
    """
    name, cfg = _read_model_config(arch)
    if "vision_cfg" not in cfg or isinstance(cfg["vision_cfg"].get("timm_model_name"), str):
        raise ConfigError(f"'{arch}' is not a plain open_clip ViT (SOWA taps CLIP's own VisionTransformer)")
    source = "bundle"
    if weights not in ("none", "bundle") and not Path(weights).is_file():
        if name is None:
            raise ConfigError(f"pretrained tag '{weights}' needs an open_clip model name, not a config file")
        tag_cfg = open_clip.get_pretrained_cfg(name, weights)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ConfigError(f"'{weights}' is neither a file nor a pretrained tag of {name} (tags: {tags})")
        if tag_cfg.get("quick_gelu"):
            cfg["quick_gelu"] = True
        source = weights
    return BackboneConfig(model_config=cfg, arch=name, weights=source)


def build_clip(cfg: BackboneConfig) -> CLIP:
    """A randomly initialised open_clip CLIP of this architecture, in eval mode, every parameter frozen."""
    mc = cfg.model_config
    try:
        model = CLIP(
            embed_dim=mc["embed_dim"],
            vision_cfg=mc["vision_cfg"],
            text_cfg=mc["text_cfg"],
            quick_gelu=bool(mc.get("quick_gelu", False)),
        )
    except (TypeError, ValueError, AssertionError, ZeroDivisionError) as e:
        raise BackboneError(f"cannot build open_clip CLIP from {mc}: {e}") from e
    return model.eval().requires_grad_(False)


def load_pretrained_tag(cfg: BackboneConfig, model: CLIP) -> None:
    """Load open_clip pretrained weights by tag (downloads or reads open_clip's cache) into `model`."""
    assert cfg.arch is not None
    try:
        path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(cfg.arch, cfg.weights))
    except Exception as e:  # network, hub or cache failures all mean the same thing to the user
        raise BackboneError(f"cannot fetch pretrained weights {cfg.arch}/{cfg.weights}: {e}") from e
    load_weights_file(model, path)


def load_weights_file(model: CLIP, path: str | Path) -> None:
    """Load CLIP weights from a local file (safetensors, open_clip or OpenAI state dict / JIT archive)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = _read_openai_archive(path) if _is_torchscript(path) else torch.load(
                str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI metadata, not weights
            state.pop(key, None)
        derived = {name for name, _ in model.named_buffers()} - set(model.state_dict())
        state = {k: v for k, v in state.items() if k not in derived}  # e.g. a traced archive's causal mask
        if state.get("logit_scale") is not None and state["logit_scale"].ndim != model.logit_scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    except BackboneError:
        raise
    except Exception as e:
        raise BackboneError(f"cannot load CLIP weights from {path}: {e}") from e


def _is_torchscript(path: Path) -> bool:
    """OpenAI's CLIP releases are TorchScript archives: a zip holding `*/constants.pkl`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") for name in z.namelist())


def _read_openai_archive(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # torch.jit is deprecated, but it is how OpenAI shipped CLIP (open_clip agrees)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def take_taps(model: CLIP, images: torch.Tensor, taps: tuple[int, ...]) -> VisionTaps:
    """One vision pass returning the image embedding and the raw outputs of the tapped blocks."""
    out = model.visual.forward_intermediates(
        images,
        indices=list(taps),
        stop_early=False,  # the image embedding needs the last block anyway
        normalize_intermediates=False,  # the reference's hooks see the residual stream before ln_post
        output_fmt="NLC",
    )
    return VisionTaps(image_embeds=out["image_features"], tokens=out["image_intermediates"])
