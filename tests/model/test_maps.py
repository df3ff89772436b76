from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

import model.maps as maps_module
from model.maps import (
    final_map,
    gaussian_blur,
    gaussian_kernel,
    kshot_map,
    patch_anomaly_logits,
    stage_anomaly_probs,
)


@pytest.mark.parametrize("shape", [(2, 336, 336), (3, 64, 64), (1, 5, 7), (2, 20, 33)])
def test_blur_equals_scipy_gaussian_filter(shape: tuple[int, ...]) -> None:
    x = torch.rand(shape) * 4
    expected = np.stack([gaussian_filter(a, sigma=4) for a in x.numpy()])
    assert np.abs(gaussian_blur(x, 4.0).numpy() - expected).max() < 2e-6


def test_blur_kernel_is_scipys() -> None:
    k = gaussian_kernel(4.0)
    assert k.numel() == 33 and abs(k.sum().item() - 1) < 1e-12
    assert torch.equal(k, k.flip(0))


def test_blur_keeps_constants_and_is_per_image() -> None:
    x = torch.full((2, 16, 16), 1.5)
    x[1] = 0.25
    assert torch.allclose(gaussian_blur(x), x, atol=1e-6)  # edge-repeating padding keeps a constant map


def test_sigmoid_of_difference_equals_softmax_of_upsampled_channels() -> None:
    cos = torch.rand(2, 3, 2, 6, 6) * 2 - 1  # (B, S, 2 channels, G, G)
    ref = torch.stack([F.softmax(F.interpolate(cos[:, s], size=(48, 48), mode="bilinear", align_corners=True),
                                 dim=1)[:, 1] for s in range(3)], dim=1)
    ours = stage_anomaly_probs(cos[:, :, 1] - cos[:, :, 0], 48)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_patch_logits_are_cosine_differences_without_temperature() -> None:
    patches = torch.randn(2, 3, 16, 8)
    text = F.normalize(torch.randn(1, 2, 8), dim=-1)
    logits = patch_anomaly_logits(patches, text, 4)
    p = F.normalize(patches, dim=-1)
    expected = (p @ text[0, 1] - p @ text[0, 0]).view(2, 3, 4, 4)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert logits.abs().max() <= 2


def test_kshot_map_sums_stages_before_one_upsample() -> None:
    d = torch.rand(2, 4, 36)
    per_stage = F.interpolate(d.view(2, 4, 6, 6), size=(30, 30), mode="bilinear", align_corners=True).sum(1)
    assert torch.allclose(kshot_map(d, 6, 30), per_stage, atol=1e-5)


def test_final_map_is_zero_shot_plus_kshot_for_all_or_some_rows() -> None:
    zs, d = torch.rand(3, 30, 30), torch.rand(3, 4, 36)
    assert torch.equal(final_map(zs, d, 6), zs + kshot_map(d, 6, 30))
    assert torch.equal(final_map(zs, None, 6), zs)
    rows = torch.tensor([0, 2])
    some = final_map(zs, d[rows], 6, rows=rows)
    assert torch.equal(some[1], zs[1]) and torch.equal(some[rows], zs[rows] + kshot_map(d[rows], 6, 30))
    assert torch.equal(final_map(zs, d, 6, zero_shot_weight=0.0), kshot_map(d, 6, 30))
    assert torch.equal(final_map(zs, d, 6, zero_shot_weight=0.5), 0.5 * zs + kshot_map(d, 6, 30))


def test_blur_kernel_is_built_once_per_device_and_results_are_unchanged() -> None:
    x = torch.rand(2, 40, 40) * 4
    maps_module._device_kernel.cache_clear()
    first = gaussian_blur(x, 4.0)
    second = gaussian_blur(x + 0, 4.0)
    info = maps_module._device_kernel.cache_info()
    assert (info.misses, info.hits) == (1, 1)  # built on the first call, reused by the second
    assert torch.equal(first, second)
    # the same numbers as convolving with a kernel built on the spot, as every call did before the cache
    k = gaussian_kernel(4.0).float().view(1, 1, -1)
    idx = maps_module._symmetric_index.__wrapped__(40, 16, x.device)
    rows = F.conv1d(x[:, :, idx].reshape(80, 1, -1), k).view(2, 40, 40)
    cols = F.conv1d(rows[:, idx, :].transpose(1, 2).reshape(80, 1, -1), k).view(2, 40, 40).transpose(1, 2)
    assert torch.equal(first, cols.contiguous())


def test_cached_blur_tensors_still_train() -> None:
    # the cache may be filled under inference mode (serving): its tensors must still work where autograd saves them
    maps_module._device_kernel.cache_clear()
    maps_module._symmetric_index.cache_clear()
    with torch.inference_mode():
        gaussian_blur(torch.rand(1, 24, 24))
    x = torch.rand(1, 24, 24, requires_grad=True)
    gaussian_blur(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
