"""Model configuration as plain data: what a bundle's `sowa.json` describes.

Defaults are the reference configuration (SOWA_SPEC.md, `sowa_hfwa.yaml`). Modules never see these classes: the
builder in `sowa.py` unpacks them into plain arguments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_TEMPERATURE",
    "AdapterConfig",
    "BackboneConfig",
    "ConfigError",
    "ModelConfig",
    "PromptConfig",
    "default_taps",
    "default_window",
]

DEFAULT_TEMPERATURE = 0.07  # image-level softmax temperature; not stored in reference checkpoints (spec §4, §10)


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model."""


def default_window(grid: int, preferred: int = 12) -> int:
    """The reference window (12) when it tiles the grid (or covers it), else the largest divisor of the grid
    below it: 7 for ViT-B-16's 14x14 grid."""
    if grid <= preferred or grid % preferred == 0:
        return preferred
    divisors = [w for w in range(2, preferred + 1) if grid % w == 0]
    return max(divisors) if divisors else grid  # a prime grid: one window over all of it


def default_taps(layers: int) -> tuple[int, ...]:
    """Block indices tapped for an L-block tower: [L/4-1, L/2-1, 3L/4-1, L-1] ([5, 11, 17, 23] for L=24)."""
    if layers < 4:
        return tuple(range(layers))
    return tuple(layers * q // 4 - 1 for q in (1, 2, 3, 4))


@dataclass(frozen=True)
class AdapterConfig:
    """HFWA adapter hyper-parameters, one adapter per tap (spec §2)."""

    window_size: int = 12
    depth: int = 1  # blocks per adapter; odd blocks use shifted windows (spec §2.2)
    num_heads: int = 8
    cpb_dim: int = 64  # hidden width of the continuous position-bias MLP
    attn_drop: float = 0.1  # training only

    def __post_init__(self) -> None:
        if self.window_size < 2:
            raise ConfigError(f"adapter window_size must be >= 2, got {self.window_size}")
        if self.depth < 1:
            raise ConfigError(f"adapter depth must be >= 1, got {self.depth}")
        if self.num_heads < 1 or self.cpb_dim < 1:
            raise ConfigError(f"adapter num_heads and cpb_dim must be >= 1, got {self.num_heads}, {self.cpb_dim}")
        if not 0.0 <= self.attn_drop < 1.0:
            raise ConfigError(f"adapter attn_drop must be in [0, 1), got {self.attn_drop}")


@dataclass(frozen=True)
class PromptConfig:
    """Learnable-context prompts (spec §3): M prompt classes x K templates per state."""

    length: int = 12  # learnable context tokens
    class_names: tuple[str, ...] = ("object",)
    normal_templates: tuple[str, ...] = ("{}",)
    anomaly_templates: tuple[str, ...] = ("damaged {}",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "normal_templates", tuple(self.normal_templates))
        object.__setattr__(self, "anomaly_templates", tuple(self.anomaly_templates))
        if self.length < 1:
            raise ConfigError(f"prompt length must be >= 1, got {self.length}")
        if not self.class_names:
            raise ConfigError("prompt class_names must not be empty")
        if len(self.normal_templates) != len(self.anomaly_templates) or not self.normal_templates:
            raise ConfigError(
                "prompt templates: need the same non-zero number of normal and anomaly templates, got "
                f"{len(self.normal_templates)} and {len(self.anomaly_templates)}"
            )


@dataclass(frozen=True)
class BackboneConfig:
    """An open_clip CLIP architecture and where its weights come from.

    `model_config` is the open_clip model-config dict (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`), stored
    whole so a bundle never depends on which configs an installed open_clip happens to ship.
    """

    model_config: dict[str, Any]
    arch: str | None = None  # open_clip model name, when the config came from one
    weights: str = "bundle"  # "bundle" (a file of the bundle) or an open_clip pretrained tag such as "openai"

    def __post_init__(self) -> None:
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            if key not in self.model_config:
                raise ConfigError(f"backbone model_config lacks '{key}'")
        vision = self.model_config["vision_cfg"]
        for key in ("image_size", "patch_size", "layers", "width"):
            if not isinstance(vision.get(key), int):
                raise ConfigError(f"backbone vision_cfg.{key} must be an integer, got {vision.get(key)!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def vision(self) -> dict[str, Any]:
        return self.model_config["vision_cfg"]

    @property
    def image_size(self) -> int:
        return self.vision["image_size"]

    @property
    def patch_size(self) -> int:
        return self.vision["patch_size"]

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def layers(self) -> int:
        return self.vision["layers"]

    @property
    def width(self) -> int:
        return self.vision["width"]

    @property
    def embed_dim(self) -> int:
        return int(self.model_config["embed_dim"])


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a SOWA model (weights aside)."""

    backbone: BackboneConfig
    taps: tuple[int, ...] = ()  # empty: default_taps(layers)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    temperature: float = DEFAULT_TEMPERATURE
    filter_sigma: float = 4.0  # Gaussian filter of the zero-shot map (scipy sigma, truncate 4)

    def __post_init__(self) -> None:
        taps = tuple(int(t) for t in self.taps) or default_taps(self.backbone.layers)
        object.__setattr__(self, "taps", taps)
        bad = [t for t in taps if not 0 <= t < self.backbone.layers]
        if bad:
            raise ConfigError(f"taps {bad} out of range for a {self.backbone.layers}-block vision tower")
        if len(set(taps)) != len(taps):
            raise ConfigError(f"taps must be distinct, got {list(taps)}")
        if self.backbone.width % self.adapter.num_heads:
            raise ConfigError(
                f"vision width {self.backbone.width} is not divisible by adapter num_heads {self.adapter.num_heads}"
            )
        grid, window = self.backbone.grid_size, min(self.adapter.window_size, self.backbone.grid_size)
        if grid % window:
            raise ConfigError(f"grid {grid}x{grid} is not divisible by window_size {self.adapter.window_size}")
        if self.temperature <= 0 or self.filter_sigma < 0:
            raise ConfigError(f"temperature must be > 0 and filter_sigma >= 0, got {self.temperature}, "
                              f"{self.filter_sigma}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["taps"] = list(self.taps)
        for key in ("class_names", "normal_templates", "anomaly_templates"):
            d["prompt"][key] = list(d["prompt"][key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        try:
            return cls(
                backbone=BackboneConfig(**d["backbone"]),
                taps=tuple(d.get("taps", ())),
                adapter=AdapterConfig(**d.get("adapter", {})),
                prompt=PromptConfig(**d.get("prompt", {})),
                temperature=float(d.get("temperature", DEFAULT_TEMPERATURE)),
                filter_sigma=float(d.get("filter_sigma", 4.0)),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"invalid model config: {e}") from e
