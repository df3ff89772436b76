"""ModelConfig as sowa.json (and Hydra's `model:` node) holds it: symmetric, strict, every knob checked."""

from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any

import pytest

from model.config import AdapterConfig, ConfigError, ModelConfig, PromptConfig
from tests.helpers import tiny_config

STAGES = [
    {"window_size": 2, "depth": 2, "num_heads": 8},
    {"window_size": 4, "depth": 1, "num_heads": 4, "value_only": False},
    {"window_size": 8, "depth": 3, "num_heads": 2, "hidden_features": [48, 32], "drop": 0.1},
    {"window_size": 4, "depth": 1, "num_heads": 8, "attn_drop": 0.0, "cpb_dim": 16},
]


def _dict(**changes: Any) -> dict[str, Any]:
    d = tiny_config().to_dict()
    for key, value in changes.items():
        d[key] = value
    return d


def test_every_knob_round_trips() -> None:
    d = _dict(adapters=STAGES, filter=False, filter_sigma=2.5, temperature=0.05,
              prompt={"length": 6, "class_names": ["bolt", "nut"], "normal_templates": ["{}", "flawless {}"],
                      "anomaly_templates": ["damaged {}", "broken {}"], "scheme": "learned",
                      "templates": ["a photo of a {}."], "text_taps": [-1, 0]})
    cfg = ModelConfig.from_dict(d)
    assert [a.window_size for a in cfg.stage_adapters] == [2, 4, 8, 4]
    assert cfg.stage_adapters[2].hidden_features == (48, 32) and cfg.stage_adapters[1].value_only is False
    assert cfg.sigma == 0.0 and cfg.prompt.text_taps == (-1, 0)
    again = cfg.to_dict()
    assert ModelConfig.from_dict(again) == cfg
    assert again["adapters"][2]["hidden_features"] == [48, 32] and again["adapter"]["hidden_features"] is None
    assert again["filter"] is False and again["prompt"]["class_names"] == ["bolt", "nut"]


def test_bundles_written_before_the_new_keys_load_unchanged() -> None:
    old = {
        "backbone": tiny_config().to_dict()["backbone"], "taps": [0, 1, 2, 3],
        "adapter": {"window_size": 4, "depth": 1, "num_heads": 8, "cpb_dim": 64, "attn_drop": 0.1},
        "prompt": {"length": 12, "class_names": ["object"], "normal_templates": ["{}"],
                   "anomaly_templates": ["damaged {}"]},
        "temperature": 0.07, "filter_sigma": 4.0,
    }
    cfg = ModelConfig.from_dict(old)
    assert cfg == tiny_config()
    assert cfg.adapters == () and not cfg.share_weight and cfg.filter and cfg.sigma == 4.0
    assert cfg.adapter.value_only and cfg.adapter.hidden_features == () and cfg.prompt.scheme == "learned"


@pytest.mark.parametrize(("where", "message"), [
    ((), "unknown key 'model.adapter_list'"),
    (("adapter",), "unknown key 'adapter.shift'"),
    (("prompt",), "unknown key 'prompt.shift'"),
    (("backbone",), "unknown key 'backbone.shift'"),
])
def test_unknown_keys_are_named(where: tuple[str, ...], message: str) -> None:
    d = _dict()
    node = d
    for key in where:
        node = node[key]
    node["adapter_list" if not where else "shift"] = 1
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(d)


def test_unknown_key_in_a_stage_names_the_stage() -> None:
    stages = copy.deepcopy(STAGES)
    stages[3]["windows"] = 4
    with pytest.raises(ConfigError, match=r"unknown key 'adapters\[3\]\.windows'"):
        ModelConfig.from_dict(_dict(adapters=stages))


@pytest.mark.parametrize(("changes", "message"), [
    ({"adapters": STAGES[:3]}, "3 given for 4 taps"),
    ({"adapters": [*STAGES[:3], {"window_size": 3}]}, r"adapters\[3\]: grid 8x8 is not divisible by window_size 3"),
    ({"adapters": [*STAGES[:3], {"num_heads": 5}]}, r"adapters\[3\]: vision width 64 is not divisible"),
    ({"adapters": {"window_size": 4}}, "adapters must be a list"),
    ({"adapters": STAGES, "share_weight": True}, "one shared adapter cannot have different"),
    ({"share_weight": "yes"}, "share_weight and filter must be true or false"),
    ({"filter": 1}, "share_weight and filter must be true or false"),
    ({"temperature": 0}, "temperature must be > 0"),
    ({"filter_sigma": "4"}, "filter_sigma must be a number"),
    ({"taps": [0, 1, 9]}, r"taps \[9\] out of range"),
])
def test_bad_model_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(_dict(**changes))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"value_only": "false"}, "value_only must be true or false"),
    ({"hidden_features": [32, 0]}, "hidden_features must be positive integers"),
    ({"hidden_features": 1.5}, "hidden_features must be positive integers"),
    ({"drop": 1.0}, r"drop must be in \[0, 1\)"),
    ({"attn_drop": -0.1}, r"attn_drop must be in \[0, 1\)"),
    ({"window_size": 1}, "window_size must be >= 2"),
    ({"depth": 2.0}, "depth must be an integer"),
])
def test_bad_adapter_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AdapterConfig(**kwargs)


def test_hidden_features_forms() -> None:
    assert AdapterConfig(hidden_features=None).hidden_features == ()
    assert AdapterConfig(hidden_features=64).hidden_features == (64,)
    assert AdapterConfig(hidden_features=[64, 32]).to_dict()["hidden_features"] == [64, 32]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scheme": "coop"}, "scheme must be one of learned, template, zero_finetune"),
    ({"class_names": ("a", "a")}, "class_names must be distinct"),
    ({"class_names": "bolt"}, "class_names must be a list"),
    ({"normal_templates": ("{}",), "anomaly_templates": ("damaged {}", "broken {}")}, "same number"),
    ({"templates": ()}, "templates must not be empty"),
    ({"text_taps": (1, 1)}, "text_taps must be distinct integers"),
    ({"scheme": "template", "text_taps": (0,)}, "scheme 'template' has no text-tower pass"),
    ({"length": 0}, "length must be an integer >= 1"),
])
def test_bad_prompt_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PromptConfig(**kwargs)


def test_template_scheme_allows_unequal_state_lists_and_text_taps_are_checked_against_the_tower() -> None:
    p = PromptConfig(scheme="template", normal_templates=("{}", "flawless {}"), anomaly_templates=("damaged {}",))
    assert len(p.normal_templates) == 2
    d = _dict(prompt={"text_taps": [2]})  # the tiny text tower has 2 blocks
    with pytest.raises(ConfigError, match=r"text_taps \[2\] out of range for a 2-block text tower"):
        ModelConfig.from_dict(d)


def test_class_index_falls_back_to_zero() -> None:
    p = PromptConfig(class_names=("bolt", "nut"))
    assert (p.class_index("nut"), p.class_index("bolt"), p.class_index("washer")) == (1, 0, 0)


def test_any_mapping_and_sequence_is_read_as_plain_data() -> None:
    """Hydra hands over OmegaConf containers (a Mapping and Sequences, not dict and list)."""
    d = _dict(adapters=STAGES)
    frozen = MappingProxyType({**d, "backbone": MappingProxyType(d["backbone"]),
                               "adapters": tuple(MappingProxyType(a) for a in STAGES)})
    cfg = ModelConfig.from_dict(frozen)
    assert cfg == ModelConfig.from_dict(d) and type(cfg.backbone.model_config) is dict
