from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from model.inference import fit_class, predict_scored
from model.maps import kshot_map
from model.memory_bank import build_bank, min_distances
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
    # fp32 on CUDA runs without TF32 (model.device.set_fp32_precision): the CPU's numbers up to summation order
    map_tol, score_tol = (1e-4, 1e-5) if dtype == torch.float32 else TOLERANCE[dtype]
    assert out.anomaly_maps.is_cuda
    assert (out.anomaly_maps.cpu() - ref.anomaly_maps).abs().max() < map_tol
    assert (out.scores.raw.cpu() - ref.scores.raw).abs().max() < score_tol


def test_to_host_is_one_copy_of_the_same_numbers(tiny_model: SowaModel) -> None:
    a = fit_class(tiny_model, torch.randn(2, 3, 64, 64))
    pred = predict_scored(tiny_model, torch.randn(3, 3, 64, 64), [a, None, a])
    host = pred.to_host()
    assert torch.equal(host.anomaly_maps, pred.anomaly_maps) and torch.equal(host.text_scores, pred.text_scores)
    for name in ("raw", "threshold", "normalized_score", "is_anomalous"):
        assert torch.equal(getattr(host.scores, name), getattr(pred.scores, name)), name
    assert host.scores.is_anomalous.dtype == torch.bool
    lean = pred.to_host(maps=False)
    assert lean.anomaly_maps.shape == (3, 0, 0) and torch.equal(lean.scores.raw, pred.scores.raw)


NO_CUDA = "needs a CUDA device; CI and dev machines have none"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_scored_batch_waits_for_the_device_only_in_the_final_copy(tiny_model: SowaModel) -> None:
    gpu = copy.deepcopy(tiny_model).to_inference("cuda", torch.float32)
    dev = torch.device("cuda")
    a, b = fit_class(gpu, torch.randn(2, 3, 64, 64, device=dev)), fit_class(gpu, torch.randn(3, 3, 64, 64, device=dev))
    x = torch.randn(4, 3, 64, 64, device=dev)
    for memories in ([a, a, a, a], [a, None, b, a]):  # one class (no index) and mixed classes with a zero-shot image
        predict_scored(gpu, x, memories)  # first call: the blur kernel, position bias and constants are cached
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pred = predict_scored(gpu, x, memories)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        host = pred.to_host()  # the one copy (and wait) of the batch
        assert torch.equal(host.anomaly_maps, pred.anomaly_maps.cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_fp32_convolutions_and_matmuls_are_full_fp32(tiny_model: SowaModel) -> None:
    gpu = copy.deepcopy(tiny_model).to_inference("cuda", torch.float32)
    assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"
    conv = gpu.clip.visual.conv1  # the patch embedding: a cuDNN convolution, TF32 by default
    x = torch.randn(2, 3, 64, 64)
    ref = F.conv2d(x.double(), conv.weight.detach().cpu().double(), stride=conv.stride)
    got = conv(x.cuda()).double().cpu()
    # TF32 keeps 10 mantissa bits: errors ~1e-4 of the output's scale; IEEE fp32 ~1e-7
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()
    m = torch.randn(512, 512, dtype=torch.float64)
    assert ((m.float().cuda() @ m.float().cuda()).double().cpu() - m @ m).abs().max() < 1e-5 * (m @ m).abs().max()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_bf16_kshot_cosines_come_out_in_fp32() -> None:
    g = torch.Generator().manual_seed(3)
    shots = torch.randn(4, 4, 64, 64, generator=g)
    patches = shots[:2].repeat(2, 1, 1, 1) + 0.3 * torch.randn(4, 4, 64, 64, generator=g)
    ref = kshot_map(min_distances(patches, [build_bank(shots)] * 4), 8, 64)
    low = build_bank(shots).to("cuda", torch.bfloat16)
    d = min_distances(patches.cuda(), [low] * 4)
    assert d.dtype == torch.float32
    # on the CPU the same bf16 bank gives max error 0.0025 with fp32 output, 0.0065 with bf16 output
    assert (kshot_map(d, 8, 64).cpu() - ref).abs().max() < 0.004
