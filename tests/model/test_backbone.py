from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from model.backbone import CONFIG_DIR, BackboneError, build_clip, load_weights_file, resolve_backbone, take_taps
from model.config import ConfigError, ModelConfig, default_taps, default_window
from tests.helpers import tiny_config


def test_default_window_tiles_the_grid() -> None:
    assert [default_window(g) for g in (24, 14, 8, 16, 13)] == [12, 7, 12, 8, 13]


def test_default_taps() -> None:
    assert default_taps(24) == (5, 11, 17, 23)
    assert default_taps(8) == (1, 3, 5, 7)
    assert default_taps(12) == (2, 5, 8, 11)
    assert ModelConfig(backbone=tiny_config().backbone, taps=()).taps == (0, 1, 2, 3)


def test_openai_tag_forces_quick_gelu_without_downloading() -> None:
    plain = resolve_backbone("ViT-L-14-336", "none")
    openai = resolve_backbone("ViT-L-14-336", "openai")
    assert not plain.model_config.get("quick_gelu") and openai.model_config["quick_gelu"] is True
    assert openai.weights == "openai" and plain.weights == "bundle"
    assert (openai.image_size, openai.grid_size, openai.layers, openai.width) == (336, 24, 24, 1024)


def test_config_file_and_errors(tmp_path: Path) -> None:
    tiny = resolve_backbone("sowa-tiny")
    assert tiny.arch is None and tiny.image_size == 112 and tiny.model_config["quick_gelu"] is True
    assert resolve_backbone(str(CONFIG_DIR / "sowa-tiny.json")) == tiny  # the same config, by file path
    with pytest.raises(ConfigError, match="unknown open_clip architecture"):
        resolve_backbone("ViT-Nope")
    with pytest.raises(ConfigError, match="not found"):
        resolve_backbone(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="neither a file nor a pretrained tag"):
        resolve_backbone("ViT-B-16", "no-such-tag")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read model config"):
        resolve_backbone(str(tmp_path / "broken.json"))


def test_taps_are_the_raw_block_outputs() -> None:
    cfg = tiny_config()
    clip = build_clip(cfg.backbone)
    x = torch.randn(2, 3, 64, 64)
    taps = take_taps(clip, x, (1, 3))
    # the same computation written out: embeddings, blocks one by one, no ln_post on the taps
    v = clip.visual
    h = v.conv1(x).flatten(2).transpose(1, 2)
    h = torch.cat([v.class_embedding.expand(2, 1, -1), h], dim=1) + v.positional_embedding
    h = v.ln_pre(h)
    outs = []
    for blk in v.transformer.resblocks:
        h = blk(h)
        outs.append(h)
    assert torch.allclose(taps.tokens[0], outs[1][:, 1:], atol=1e-6)
    assert torch.allclose(taps.tokens[1], outs[3][:, 1:], atol=1e-6)
    assert torch.allclose(taps.image_embeds, v.ln_post(outs[3][:, 0]) @ v.proj, atol=1e-6)
    assert torch.allclose(taps.image_embeds, clip.encode_image(x), atol=1e-6)


def test_weight_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cfg = tiny_config()
    src, dst = build_clip(cfg.backbone), build_clip(cfg.backbone)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "w.pt")
    with warnings.catch_warnings():  # an OpenAI-style TorchScript archive, made the way open_clip traces CLIP
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(copy.deepcopy(src), {"encode_image": torch.ones(1, 3, 64, 64)})
        torch.jit.save(traced, str(tmp_path / "jit.pt"))
    for name in ("w.safetensors", "w.pt", "jit.pt"):
        load_weights_file(dst, tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(),
                                                       strict=True))
    with pytest.raises(BackboneError, match="not found"):
        load_weights_file(dst, tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_text(json.dumps({"a": 1}))
    with pytest.raises(BackboneError, match="cannot load CLIP weights"):
        load_weights_file(dst, tmp_path / "junk.pt")
