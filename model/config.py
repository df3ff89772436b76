"""Model configuration as plain data: what a bundle's `sowa.json` describes.

Defaults are the reference configuration (SOWA_SPEC.md, `sowa_hfwa.yaml`). Modules never see these classes: the
builder in `sowa.py` unpacks them into plain arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "DEFAULT_TEMPERATURE",
    "PROMPT_SCHEMES",
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


def _strict(cls: type, d: Any, where: str) -> dict[str, Any]:
    """`d` as keyword arguments of dataclass `cls`; an unknown key is a ConfigError naming it."""
    if not isinstance(d, Mapping):  # a dict, or e.g. an OmegaConf DictConfig
        raise ConfigError(f"{where} must be a mapping, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown key '{where}.{unknown[0]}' (known: {', '.join(sorted(names))})")
    return dict(d)


def _plain(v: Any) -> Any:
    """Mappings and sequences (e.g. OmegaConf containers) as plain dicts and lists, recursively."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, Sequence) and not isinstance(v, str):
        return [_plain(x) for x in v]
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class AdapterConfig:
    """HFWA adapter hyper-parameters of one stage (spec §2; the research code's `BasicLayer` arguments)."""

    window_size: int = 12
    depth: int = 1  # blocks per adapter; odd blocks use shifted windows (spec §2.2)
    num_heads: int = 8
    cpb_dim: int = 64  # hidden width of the continuous position-bias MLP
    attn_drop: float = 0.1  # training only
    value_only: bool = True  # cosine attention between values (SOWA); False: between CLIP's queries and keys
    hidden_features: tuple[int, ...] = ()  # widths of the "FFN"'s hidden layers (GELU between); () = one Linear
    drop: float = 0.0  # training only: dropout after the attention's output projection and after hidden layers

    def __post_init__(self) -> None:
        hidden = self.hidden_features
        if hidden is None:
            hidden = ()
        elif _is_int(hidden):
            hidden = (hidden,)
        elif isinstance(hidden, str) or not isinstance(hidden, Sequence):
            raise ConfigError(f"adapter hidden_features must be positive integers, got {hidden!r}")
        object.__setattr__(self, "hidden_features", tuple(hidden))
        for name in ("window_size", "depth", "num_heads", "cpb_dim"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"adapter {name} must be an integer, got {getattr(self, name)!r}")
        if not all(_is_int(h) and h >= 1 for h in self.hidden_features):
            raise ConfigError(f"adapter hidden_features must be positive integers, got {list(self.hidden_features)}")
        if not isinstance(self.value_only, bool):
            raise ConfigError(f"adapter value_only must be true or false, got {self.value_only!r}")
        if self.window_size < 2:
            raise ConfigError(f"adapter window_size must be >= 2, got {self.window_size}")
        if self.depth < 1:
            raise ConfigError(f"adapter depth must be >= 1, got {self.depth}")
        if self.num_heads < 1 or self.cpb_dim < 1:
            raise ConfigError(f"adapter num_heads and cpb_dim must be >= 1, got {self.num_heads}, {self.cpb_dim}")
        for name in ("attn_drop", "drop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ConfigError(f"adapter {name} must be in [0, 1), got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_features"] = list(self.hidden_features) or None  # the research code's `null`
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "adapter") -> AdapterConfig:
        return cls(**_strict(cls, d, where))


PROMPT_SCHEMES = ("learned", "template", "zero_finetune")


@dataclass(frozen=True)
class PromptConfig:
    """Text side: M prompt classes x K state templates (spec §3).

    `scheme`: "learned" (the research code's AnomalyPromptLearner: `length` learnable context tokens per class
    and template, trained), "template" (its PromptEncoder: frozen CLIP text features of every state phrase of
    `normal_templates` / `anomaly_templates` put into every sentence of `templates`, each normalised, averaged
    and renormalised per class and state; nothing learned on the text side but the fusion linear),
    "zero_finetune" (its TextEncoderZeroshot: the frozen text tower on the plain "<state template>." prompts,
    no context tokens). `text_taps`: text-tower blocks whose EOT features are also returned for training
    (the research code's TextMapEncoder `feature_map_idx`; they do not enter the maps or scores).
    """

    length: int = 12  # learnable context tokens (scheme "learned")
    class_names: tuple[str, ...] = ("object",)
    normal_templates: tuple[str, ...] = ("{}",)
    anomaly_templates: tuple[str, ...] = ("damaged {}",)
    scheme: str = "learned"
    templates: tuple[str, ...] = ("{}",)  # sentence templates of scheme "template"
    text_taps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for key in ("class_names", "normal_templates", "anomaly_templates", "templates", "text_taps"):
            v = getattr(self, key)
            if isinstance(v, (str, int)):
                raise ConfigError(f"prompt {key} must be a list, got {v!r}")
            object.__setattr__(self, key, tuple(v))
        if self.scheme not in PROMPT_SCHEMES:
            raise ConfigError(f"prompt scheme must be one of {', '.join(PROMPT_SCHEMES)}, got {self.scheme!r}")
        if not _is_int(self.length) or self.length < 1:
            raise ConfigError(f"prompt length must be an integer >= 1, got {self.length!r}")
        if not self.class_names:
            raise ConfigError("prompt class_names must not be empty")
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"prompt class_names must be distinct, got {list(self.class_names)}")
        for key in ("class_names", "normal_templates", "anomaly_templates", "templates"):
            if not all(isinstance(t, str) and t for t in getattr(self, key)):
                raise ConfigError(f"prompt {key} must be non-empty strings, got {list(getattr(self, key))}")
        for key in ("normal_templates", "anomaly_templates", "templates"):
            if not getattr(self, key):
                raise ConfigError(f"prompt {key} must not be empty")
        if self.scheme != "template" and len(self.normal_templates) != len(self.anomaly_templates):
            raise ConfigError(
                "prompt templates: need the same number of normal and anomaly templates, got "
                f"{len(self.normal_templates)} and {len(self.anomaly_templates)}"
            )
        if not all(_is_int(t) for t in self.text_taps) or len(set(self.text_taps)) != len(self.text_taps):
            raise ConfigError(f"prompt text_taps must be distinct integers, got {list(self.text_taps)}")
        if self.text_taps and self.scheme == "template":
            raise ConfigError("prompt text_taps: scheme 'template' has no text-tower pass to tap")

    def class_index(self, name: str) -> int:
        """The prompt class of `name`: its position in `class_names`, else 0 (the research code's rule)."""
        try:
            return self.class_names.index(name)
        except ValueError:
            return 0

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Any, where: str = "prompt") -> PromptConfig:
        return cls(**_strict(cls, d, where))


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
    """Everything needed to build a SOWA model (weights aside).

    `adapters`: one AdapterConfig per tap (mixed windows and depths allowed), or empty for `adapter` at every
    tap. `share_weight`: one adapter module (trainable weights and the frozen CLIP projections of the first
    tap's block) serves every tap, as the research code's VisionMapEncoder does with a module instance.
    """

    backbone: BackboneConfig
    taps: tuple[int, ...] = ()  # empty: default_taps(layers)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    temperature: float = DEFAULT_TEMPERATURE
    filter_sigma: float = 4.0  # Gaussian filter of the zero-shot map (scipy sigma, truncate 4)
    filter: bool = True  # the research code's `filter`: False leaves the zero-shot map unfiltered
    adapters: tuple[AdapterConfig, ...] = ()
    share_weight: bool = False

    def __post_init__(self) -> None:
        taps = tuple(int(t) for t in self.taps) or default_taps(self.backbone.layers)
        object.__setattr__(self, "taps", taps)
        object.__setattr__(self, "adapters", tuple(self.adapters))
        bad = [t for t in taps if not 0 <= t < self.backbone.layers]
        if bad:
            raise ConfigError(f"taps {bad} out of range for a {self.backbone.layers}-block vision tower")
        if len(set(taps)) != len(taps):
            raise ConfigError(f"taps must be distinct, got {list(taps)}")
        if self.adapters and len(self.adapters) != len(taps):
            raise ConfigError(f"adapters: {len(self.adapters)} given for {len(taps)} taps (one per tap, or none)")
        if not isinstance(self.share_weight, bool) or not isinstance(self.filter, bool):
            raise ConfigError(f"share_weight and filter must be true or false, got {self.share_weight!r}, "
                              f"{self.filter!r}")
        if self.share_weight and self.adapters and len(set(self.adapters)) > 1:
            raise ConfigError("share_weight: one shared adapter cannot have different per-stage configurations")
        for i, a in enumerate(self.stage_adapters):
            where = f"adapters[{i}]" if self.adapters else "adapter"
            if self.backbone.width % a.num_heads:
                raise ConfigError(f"{where}: vision width {self.backbone.width} is not divisible by adapter num_heads "
                                  f"{a.num_heads}")
            grid, window = self.backbone.grid_size, min(a.window_size, self.backbone.grid_size)
            if grid % window:
                raise ConfigError(f"{where}: grid {grid}x{grid} is not divisible by window_size {a.window_size}")
        text_layers = self.backbone.model_config["text_cfg"].get("layers")
        if _is_int(text_layers):
            bad = [t for t in self.prompt.text_taps if not -text_layers <= t < text_layers]
            if bad:
                raise ConfigError(f"prompt text_taps {bad} out of range for a {text_layers}-block text tower")
        for name in ("temperature", "filter_sigma"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise ConfigError(f"{name} must be a number, got {getattr(self, name)!r}")
        if self.temperature <= 0 or self.filter_sigma < 0:
            raise ConfigError(f"temperature must be > 0 and filter_sigma >= 0, got {self.temperature}, "
                              f"{self.filter_sigma}")

    @property
    def stage_adapters(self) -> tuple[AdapterConfig, ...]:
        """The adapter configuration of each tap, in tap order."""
        return self.adapters or (self.adapter,) * len(self.taps)

    @property
    def sigma(self) -> float:
        """The zero-shot map's Gaussian sigma as applied: 0 when `filter` is off."""
        return float(self.filter_sigma) if self.filter else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": asdict(self.backbone),
            "taps": list(self.taps),
            "adapter": self.adapter.to_dict(),
            "prompt": self.prompt.to_dict(),
            "temperature": self.temperature,
            "filter_sigma": self.filter_sigma,
            "filter": self.filter,
            "adapters": [a.to_dict() for a in self.adapters],
            "share_weight": self.share_weight,
        }

    @classmethod
    def from_dict(cls, d: Any) -> ModelConfig:
        """The inverse of `to_dict`; keys left out take their defaults (bundles written before a key existed
        load unchanged), unknown keys are a ConfigError naming them."""
        d = _strict(cls, d, "model")
        if "backbone" not in d:
            raise ConfigError("model config lacks 'backbone'")
        adapters = d.get("adapters", ())
        if adapters is None or isinstance(adapters, (str, Mapping)) or not isinstance(adapters, Sequence):
            raise ConfigError(f"adapters must be a list, got {adapters!r}")
        try:
            return cls(
                backbone=BackboneConfig(**_plain(_strict(BackboneConfig, d["backbone"], "backbone"))),
                taps=tuple(d.get("taps") or ()),
                adapter=AdapterConfig.from_dict(d.get("adapter", {})),
                prompt=PromptConfig.from_dict(d.get("prompt", {})),
                temperature=d.get("temperature", DEFAULT_TEMPERATURE),
                filter_sigma=d.get("filter_sigma", 4.0),
                filter=d.get("filter", True),
                adapters=tuple(AdapterConfig.from_dict(a, f"adapters[{i}]") for i, a in enumerate(adapters)),
                share_weight=d.get("share_weight", False),
            )
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"invalid model config: {e}") from e
