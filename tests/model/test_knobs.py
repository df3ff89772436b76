"""Every model knob of issue 21 reaches the built model: module structure and numbers, not just the config."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import take_taps
from model.bundle import MANIFEST, load_bundle, save_bundle
from model.config import AdapterConfig, ModelConfig, PromptConfig
from model.maps import gaussian_blur, patch_anomaly_logits, stage_anomaly_probs
from model.prompts import FixedPrompts, PromptLearner
from model.sowa import SowaModel
from tests.helpers import perturb_trainables, tiny_config

STAGES = (AdapterConfig(window_size=2, depth=2, num_heads=8), AdapterConfig(window_size=4, depth=1, num_heads=4),
          AdapterConfig(window_size=4, depth=3, num_heads=8), AdapterConfig(window_size=8, depth=2, num_heads=2))


def _model(seed: int = 1, **changes: object) -> SowaModel:
    torch.manual_seed(seed)
    model = SowaModel(dataclasses.replace(tiny_config(), **changes))
    perturb_trainables(model, seed)
    model.refresh_text()
    return model


def _images(n: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_per_stage_adapters_have_their_own_windows_depths_and_heads() -> None:
    model = _model(adapters=STAGES)
    assert len(model.adapters) == 4 and model.stage_block == (0, 1, 2, 3)
    for adapter, cfg in zip(model.adapters, STAGES, strict=True):
        assert len(adapter.blocks) == cfg.depth
        window = min(cfg.window_size, 8)
        shifts = [0 if (j % 2 == 0 or window == 8) else window // 2 for j in range(cfg.depth)]
        assert [(b.window, b.shift, b.attn.num_heads) for b in adapter.blocks] == \
            [(window, s, cfg.num_heads) for s in shifts]
        assert [b.attn_mask is not None for b in adapter.blocks] == [s > 0 for s in shifts]
        assert adapter.blocks[0].attn.logit_scale.shape == (cfg.num_heads, 1, 1)
    out = model.predict(_images())
    assert out.anomaly_maps.shape == (2, 64, 64) and torch.isfinite(out.anomaly_maps).all()


def test_shared_adapter_is_one_module_on_the_first_taps_projections() -> None:
    shared = _model(share_weight=True, adapter=AdapterConfig(window_size=4, depth=2))
    separate = _model(adapter=AdapterConfig(window_size=4, depth=2))
    assert len(shared.adapters) == 1 and shared.stage_module == (0, 0, 0, 0) and shared.stage_block == (0, 0, 0, 0)
    n_adapter = sum(p.numel() for p in shared.adapters[0].parameters())
    assert sum(p.numel() for p in shared.trainable_parameters()) == \
        sum(p.numel() for p in separate.trainable_parameters()) - 3 * n_adapter
    assert not any(k.startswith("adapters.1.") for k in shared.sowa_state_dict())
    x = _images()
    with torch.no_grad():
        feats = shared.encode(x)
        tokens = take_taps(shared.clip, x, shared.taps).tokens
        attn = shared.clip.visual.transformer.resblocks[0].attn
        for s in range(4):  # every stage: the one module, tap 0's frozen projections
            want = shared.adapters[0](tokens[s], attn.in_proj_weight, attn.out_proj) @ shared.clip.visual.proj
            torch.testing.assert_close(feats.adapted[:, s], want, rtol=0, atol=0)


def test_query_key_attention_is_the_cosine_of_clips_queries_and_keys() -> None:
    qk = _model(adapter=AdapterConfig(window_size=8, value_only=False))
    vo = _model(adapter=AdapterConfig(window_size=8))
    attn = qk.adapters[0].blocks[0].attn
    assert not attn.value_only and vo.adapters[0].blocks[0].attn.value_only
    clip_attn = qk.clip.visual.transformer.resblocks[0].attn
    x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = attn(x, clip_attn.in_proj_weight, clip_attn.out_proj)
        q, k, v = (t.view(2, 64, 8, 8).transpose(1, 2) for t in F.linear(x, clip_attn.in_proj_weight).chunk(3, -1))
        tau = attn.logit_scale.clamp(max=math.log(100)).exp()
        a = torch.softmax(tau * F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
                          + attn.position_bias(), dim=-1)
        want = clip_attn.out_proj((a @ v).transpose(1, 2).reshape(2, 64, 64))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    vo.load_state_dict(qk.state_dict())  # same weights: only the attention differs
    vo.refresh_text()
    x = _images()
    assert not torch.allclose(qk.predict(x).anomaly_maps, vo.predict(x).anomaly_maps)


def test_hidden_mlp_and_drop() -> None:
    model = _model(adapter=AdapterConfig(window_size=4, hidden_features=(48, 32), drop=0.1))
    block = model.adapters[0].blocks[0]
    layers = list(block.mlp)
    assert [type(m) for m in layers] == [nn.Linear, nn.GELU, nn.Dropout] * 2 + [nn.Linear]
    assert [tuple(m.weight.shape) for m in layers if isinstance(m, nn.Linear)] == [(48, 64), (32, 48), (64, 32)]
    assert all(m.bias is None for m in layers if isinstance(m, nn.Linear))
    assert block.attn.proj_drop == 0.1 and layers[2].p == 0.1
    assert {"adapters.0.blocks.0.mlp.0.weight", "adapters.0.blocks.0.mlp.3.weight",
            "adapters.0.blocks.0.mlp.6.weight"} <= set(model.sowa_state_dict())
    x = _images()
    assert torch.equal(model.predict(x).anomaly_maps, model.predict(x).anomaly_maps)  # eval: no dropout
    model.train()
    a, b = model(x).patch_logits, model(x).patch_logits
    assert not torch.equal(a, b)  # training: dropout on
    plain = _model(adapter=AdapterConfig(window_size=4))
    assert isinstance(plain.adapters[0].blocks[0].mlp, nn.Linear)  # no hidden layer: every existing bundle's layout


def test_filter_off_leaves_the_zero_shot_map_unblurred() -> None:
    on, off = _model(), _model(filter=False)
    off.load_state_dict(on.state_dict())
    x = _images()
    z_on, z_off = on.predict(x).zero_shot_maps, off.predict(x).zero_shot_maps
    with torch.no_grad():
        feats = on.encode(x)
        raw = stage_anomaly_probs(patch_anomaly_logits(feats.adapted, on.text_features[:1], 8), 64).sum(1)
    torch.testing.assert_close(z_off, raw, rtol=0, atol=1e-6)
    torch.testing.assert_close(gaussian_blur(z_off, 4.0), z_on, rtol=0, atol=1e-6)


def _encode_text(model: SowaModel, sentences: list[str]) -> torch.Tensor:
    ids = open_clip.SimpleTokenizer(context_length=77)(sentences)
    with torch.no_grad():
        return model.clip.encode_text(ids)


def test_template_scheme_is_the_research_prompt_encoder() -> None:
    prompt = PromptConfig(scheme="template", class_names=("bolt", "nut"), normal_templates=("{}", "flawless {}"),
                          anomaly_templates=("damaged {}",), templates=("a photo of a {}.", "a {} in the scene."))
    model = _model(prompt=prompt)
    assert isinstance(model.prompt_learner, FixedPrompts) and not list(model.prompt_learner.parameters())
    assert model.prompt_learner.tokenized_prompts_pos.shape == (2, 4, 77)
    assert model.prompt_learner.tokenized_prompts_neg.shape == (2, 2, 77)
    assert {id(p) for p in model.trainable_parameters()} == \
        {id(p) for p in [*model.adapters.parameters(), *model.fusion.parameters()]}
    for m, name in enumerate(prompt.class_names):
        states = []
        for state_list in (prompt.normal_templates, prompt.anomaly_templates):
            f = _encode_text(model, [t.format(s.format(name)) for s in state_list for t in prompt.templates])
            mean = F.normalize(f, dim=-1).mean(0)
            states.append(mean / mean.norm())
        with torch.no_grad():
            want = F.normalize(model.fusion.linear(torch.stack(states)), dim=-1)
        torch.testing.assert_close(model.text_features[m], want, rtol=1e-5, atol=1e-6)


def test_zero_finetune_scheme_encodes_the_plain_state_prompts() -> None:
    prompt = PromptConfig(scheme="zero_finetune", normal_templates=("{}", "flawless {}"),
                          anomaly_templates=("damaged {}", "broken {}"))
    model = _model(prompt=prompt)
    assert isinstance(model.prompt_learner, FixedPrompts)
    f = _encode_text(model, ["object.", "flawless object.", "damaged object.", "broken object."])
    with torch.no_grad():
        want = F.normalize(model.fusion.linear(f).view(2, 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(model.text_features[0], want, rtol=1e-5, atol=1e-6)


def test_text_taps_are_the_tapped_blocks_eot_features() -> None:
    model = _model(prompt=PromptConfig(text_taps=(0, -1)))
    captured: list[torch.Tensor] = []
    hook = model.clip.transformer.resblocks[0].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        out = model(_images())
    finally:
        hook.remove()
    assert [tuple(t.shape) for t in out.text_maps] == [(2, 32), (2, 32)]
    ids = torch.cat([model.prompt_learner.tokenized_prompts_pos.flatten(0, 1),
                     model.prompt_learner.tokenized_prompts_neg.flatten(0, 1)]).long()
    block0 = captured[0][torch.arange(2), ids.argmax(-1)] @ model.clip.text_projection
    torch.testing.assert_close(out.text_maps[0], block0)
    assert model(_images()).text_maps[0].requires_grad  # learned scheme: taps are differentiable
    assert _model().forward(_images()).text_maps == ()


def _two_classes(seed: int = 1) -> SowaModel:
    return _model(seed, prompt=PromptConfig(length=4, class_names=("bolt", "nut")))


def test_each_class_is_predicted_with_its_own_context() -> None:
    both = _two_classes()
    assert not torch.allclose(both.text_features[0], both.text_features[1])
    x = _images(3)
    for m, name in enumerate(("bolt", "nut")):
        alone = _model(prompt=PromptConfig(length=4, class_names=(name,)))  # one class, its context copied in
        state = both.state_dict()
        for key in ("prompt_learner.ctx_pos", "prompt_learner.ctx_neg", "prompt_learner.tokenized_prompts_pos",
                    "prompt_learner.tokenized_prompts_neg"):
            state[key] = state[key][m:m + 1]
        alone.load_state_dict(state)
        alone.refresh_text()
        got, want = both.predict(x, class_ids=[m] * 3), alone.predict(x)
        torch.testing.assert_close(got.zero_shot_maps, want.zero_shot_maps, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.text_scores, want.text_scores, rtol=0, atol=1e-6)
    mixed = both.predict(x, class_ids=torch.tensor([1, 0, 1]))
    nut, bolt = both.predict(x, class_ids=[1, 1, 1]), both.predict(x)
    assert torch.equal(mixed.text_scores[[0, 2]], nut.text_scores[[0, 2]])
    assert torch.equal(mixed.text_scores[1], bolt.text_scores[1])
    assert not torch.allclose(nut.text_scores, bolt.text_scores)


def test_each_class_trains_its_own_context() -> None:
    model = _two_classes()
    model.train()
    out = model(_images(2), class_ids=torch.tensor([1, 1]))
    (out.text_probs[:, 1].sum() + out.patch_logits.sum()).backward()
    grad = model.prompt_learner.ctx_pos.grad
    assert grad[0].abs().max() == 0 and grad[1].abs().max() > 0
    with pytest.raises(ValueError, match="must index the 2 prompt classes"):
        model(_images(1), class_ids=torch.tensor([2]))
    with pytest.raises(ValueError, match="one class id per image"):
        model.predict(_images(2), class_ids=[0])


@pytest.mark.parametrize("changes", [
    {"adapters": STAGES, "prompt": PromptConfig(length=4, class_names=("bolt", "nut"), text_taps=(1,))},
    {"share_weight": True, "adapter": AdapterConfig(window_size=4, depth=2, value_only=False, hidden_features=(16,),
                                                   drop=0.1), "filter": False,
     "prompt": PromptConfig(scheme="template", class_names=("bolt", "nut"), templates=("a photo of a {}.",))},
    {"prompt": PromptConfig(scheme="zero_finetune", class_names=("bolt", "nut"))},
], ids=["stages-classes", "shared-qk-hidden-template", "zero-finetune"])
def test_bundles_carry_every_knob(changes: dict[str, object], tmp_path: Path) -> None:
    model = _model(**changes)
    save_bundle(model, tmp_path / "b", {"source": "test"})
    loaded, info = load_bundle(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert info.config == model.cfg and ModelConfig.from_dict(manifest["model"]) == model.cfg
    assert isinstance(loaded.prompt_learner, PromptLearner if model.cfg.prompt.scheme == "learned" else FixedPrompts)
    x = _images()
    for ids in ([0, 0], [1, 1]):
        a, b = model.predict(x, class_ids=ids), loaded.predict(x, class_ids=ids)
        assert torch.equal(a.anomaly_maps, b.anomaly_maps) and torch.equal(a.text_scores, b.text_scores)
