"""Run configs: Hydra's compose API over the `configs/` tree shipped with this package.

`compose_config("train", ["data=visa", "model.adapter.depth=2"])` composes `configs/train.yaml` with the research
code's override syntax (groups `data/`, `model/`, `prompt/`, `trainer/`, `logger/`, `callbacks/`, `experiment/`)
and resolves every interpolation. Any wrong key or value becomes one `RunConfigError` line, never a traceback.

The `model:` node is `model.config.ModelConfig`'s dict form (a bundle's sowa.json `config`), so `model_config`
turns it into a ModelConfig through `ModelConfig.from_dict` and nothing here knows the model's knobs. Two
conveniences only: `backbone.model_config: null` takes open_clip's config of `backbone.arch`, and
`backbone.weights` may say `none` or a weight file, as `sowa init --pretrained` does.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from model.backbone import resolve_backbone
from model.config import ModelConfig

__all__ = ["CONFIG_DIR", "RunConfigError", "compose_config", "model_config", "pretrained_source", "to_yaml"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class RunConfigError(ValueError):
    """A config that does not compose or resolve: a wrong group, key, value or interpolation."""


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith("    "))
    cause = e.__cause__
    if cause is not None and str(cause) and str(cause).splitlines()[0] not in text:
        text += f" ({str(cause).splitlines()[0]})"
    text = text.split(" Config search path:")[0].split(" See https://hydra.cc")[0]
    return text or type(e).__name__


def _register_resolvers() -> None:
    # `${now:...}` as Hydra's own runs have it; one timestamp per process, so run_dir is one folder
    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver(
            "now", lambda pattern: datetime.datetime.now().strftime(pattern), use_cache=True)


def compose_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """`configs/{name}.yaml` with `overrides`, every interpolation resolved and no `???` left."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    _register_resolvers()
    GlobalHydra.instance().clear()  # compose is re-entrant here: tests and benches compose many times
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name=f"sowa_{name}"):
            cfg = compose(config_name=name, overrides=list(overrides))
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OverrideParseException as e:
        raise RunConfigError(f"cannot parse an override: {_one_line(e)}") from None
    except (HydraException, OmegaConfBaseException) as e:
        raise RunConfigError(_one_line(e)) from None
    resolved = OmegaConf.create(container)
    OmegaConf.set_struct(resolved, True)  # a typo in code reading the config is an error too
    return resolved


def pretrained_source(model: DictConfig | dict[str, Any]) -> str:
    """Where the backbone weights come from: `none`, an open_clip tag, or a weight file (build_model's argument)."""
    weights = str(_plain(model).get("backbone", {}).get("weights", "none"))
    return "none" if weights == "bundle" else weights


def model_config(model: DictConfig | dict[str, Any]) -> ModelConfig:
    """The `model:` node as a ModelConfig (ModelConfig.from_dict; a ConfigError names a wrong key or value)."""
    d = _plain(model)
    backbone = dict(d.get("backbone") or {})
    if backbone.get("model_config") is None:
        if not backbone.get("arch"):
            raise RunConfigError("model.backbone needs an arch (open_clip name or config JSON) or a model_config")
        resolved = resolve_backbone(str(backbone["arch"]), pretrained_source(d))
        backbone.update(model_config=resolved.model_config, arch=resolved.arch, weights=resolved.weights)
    elif backbone.get("weights") in (None, "none") or Path(str(backbone.get("weights"))).is_file():
        backbone["weights"] = "bundle"  # random or file weights travel in the bundle
    d["backbone"] = backbone
    return ModelConfig.from_dict(d)


def _plain(node: DictConfig | dict[str, Any]) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def to_yaml(cfg: DictConfig | dict[str, Any]) -> str:
    return OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg))
