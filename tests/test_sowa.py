from __future__ import annotations

import copy

import pytest
import torch

from model.inference import fit_class, predict_scored
from model.sowa import UNTRAINED_TEXT_SCORE, SowaModel
from tests.helpers import tiny_config

# Reduced-precision tolerances, max abs error against fp32 on the reference scale (maps in (0, 12)); measured
# on this tiny model on CPU and recorded in docs/model.md.
TOLERANCE = {torch.bfloat16: (0.05, 0.01), torch.float16: (0.01, 0.005)}


def test_predict_shapes_and_ranges(tiny_model: SowaModel) -> None:
    out = tiny_model.predict(torch.randn(3, 3, 64, 64))
    assert out.anomaly_maps.shape == out.zero_shot_maps.shape == (3, 64, 64)
    assert out.anomaly_maps.dtype == torch.float32
    assert out.raw_patches.shape == (3, 4, 64, 32)
    assert ((out.zero_shot_maps > 0) & (out.zero_shot_maps < 4)).all()  # sum of 4 sigmoids, then a blur
    assert ((out.text_scores > 0) & (out.text_scores < 1)).all()


def test_mixed_batch_equals_separate_batches(tiny_model: SowaModel) -> None:
    a, b = fit_class(tiny_model, torch.randn(2, 3, 64, 64)), fit_class(tiny_model, torch.randn(3, 3, 64, 64))
    x = torch.randn(4, 3, 64, 64)
    mixed = predict_scored(tiny_model, x, [a, None, b, a])
    alone = [predict_scored(tiny_model, x[i:i + 1], [m]) for i, m in enumerate([a, None, b, a])]
    assert torch.allclose(mixed.anomaly_maps, torch.cat([p.anomaly_maps for p in alone]), atol=1e-5)
    assert torch.allclose(mixed.scores.raw, torch.cat([p.scores.raw for p in alone]), atol=1e-6)
    # zero-shot image: map is the filtered zero-shot map alone
    assert torch.allclose(mixed.anomaly_maps[1], tiny_model.predict(x[1:2]).zero_shot_maps[0], atol=1e-6)


def test_a_shot_scores_as_normal_against_its_own_class(tiny_model: SowaModel) -> None:
    shots = torch.randn(4, 3, 64, 64)
    mem = fit_class(tiny_model, shots)
    pred = predict_scored(tiny_model, shots, [mem] * 4)
    assert torch.allclose(pred.anomaly_maps, tiny_model.predict(shots).zero_shot_maps, atol=1e-5)  # k-shot part 0
    assert not pred.scores.is_anomalous.any()
    assert mem.calibration.shots == 4 and 0 < mem.calibration.threshold < 1


def test_untrained_model_scores_from_shots_alone() -> None:
    model = SowaModel(tiny_config(), trained=False)
    model.refresh_text()
    x = torch.randn(2, 3, 64, 64)
    out = model.predict(x)
    assert (out.zero_shot_maps == 0).all() and (out.text_scores == UNTRAINED_TEXT_SCORE).all()
    mem = fit_class(model, torch.randn(2, 3, 64, 64))
    pred = predict_scored(model, x, [mem, mem])
    assert (pred.anomaly_maps > 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reduced_precision_stays_within_tolerance(tiny_model: SowaModel, dtype: torch.dtype) -> None:
    x, shots = torch.randn(4, 3, 64, 64), torch.randn(3, 3, 64, 64)
    ref = predict_scored(tiny_model, x, [fit_class(tiny_model, shots)] * 4)
    low = copy.deepcopy(tiny_model).to_inference("cpu", dtype)
    assert low.clip.visual.proj.dtype == dtype and low.text_features.dtype == torch.float32
    out = predict_scored(low, x, [fit_class(low, shots)] * 4)
    map_tol, score_tol = TOLERANCE[dtype]
    assert (out.anomaly_maps - ref.anomaly_maps).abs().max() < map_tol
    assert (out.text_scores - ref.text_scores).abs().max() < score_tol
    assert (out.scores.raw - ref.scores.raw).abs().max() < score_tol


def test_training_pass_reaches_only_trainable_parameters(tiny_model: SowaModel) -> None:
    tiny_model.train()
    out = tiny_model(torch.randn(2, 3, 64, 64))
    assert out.text_probs.shape == (2, 2) and out.patch_logits.shape == (2, 4, 8, 8)
    (out.text_probs[:, 1].sum() + out.patch_logits.sum()).backward()
    trainable = {id(p) for p in tiny_model.trainable_parameters()}
    for name, p in tiny_model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    # reference counts for this geometry: per stage norms 4*64, logit scale 8, cpb 64*2+64+8*64, mlp 64*64
    per_stage = 4 * 64 + 8 + (64 * 2 + 64 + 8 * 64) + 64 * 64
    assert sum(p.numel() for p in tiny_model.trainable_parameters()) == 4 * per_stage + 2 * 12 * 32 + 32 * 32 + 32


def test_wrong_image_size_is_refused(tiny_model: SowaModel) -> None:
    with pytest.raises(ValueError, match="images must be 64x64"):
        tiny_model.predict(torch.randn(1, 3, 32, 32))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; CI and dev machines have none")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_matches_cpu(tiny_model: SowaModel, dtype: torch.dtype) -> None:
    x, shots = torch.randn(4, 3, 64, 64), torch.randn(3, 3, 64, 64)
    ref = predict_scored(tiny_model, x, [fit_class(tiny_model, shots)] * 4)
    gpu = copy.deepcopy(tiny_model).to_inference("cuda", dtype)
    out = predict_scored(gpu, x, [fit_class(gpu, shots)] * 4)
    map_tol, score_tol = (1e-3, 1e-4) if dtype == torch.float32 else TOLERANCE[dtype]  # cuDNN convs may use TF32
    assert out.anomaly_maps.is_cuda
    assert (out.anomaly_maps.cpu() - ref.anomaly_maps).abs().max() < map_tol
    assert (out.scores.raw.cpu() - ref.scores.raw).abs().max() < score_tol
