"""Anomaly-map maths as pure functions on tensors (SOWA_SPEC.md §5-6).

All maps are float32 whatever the model's precision: they are cheap, and their sums and the blur are where
reduced precision would show.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = [
    "final_map",
    "gaussian_blur",
    "gaussian_kernel",
    "kshot_map",
    "patch_anomaly_logits",
    "stage_anomaly_probs",
    "zero_shot_map",
]


def patch_anomaly_logits(patches: torch.Tensor, text: torch.Tensor, grid: int) -> torch.Tensor:
    """cos(anomaly) - cos(normal) per patch: (B, S, L, D) adapted patches x (B or 1, 2, D) unit text vectors
    -> (B, S, G, G) float32. Patch logits carry no temperature (spec §4 step 5)."""
    p = F.normalize(patches.float(), dim=-1)
    cos = torch.einsum("bsld,bcd->bslc", p, text.float())
    diff = cos[..., 1] - cos[..., 0]
    return diff.view(*diff.shape[:2], grid, grid)


def stage_anomaly_probs(logits: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S, G, G) logits -> (B, S, size, size) per-stage anomaly probabilities.

    The reference upsamples the two channels (bilinear, align_corners) and softmaxes; interpolation is linear,
    so sigmoid of the upsampled difference is the same number with one channel to upsample.
    """
    up = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
    return torch.sigmoid(up)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate * sigma + 0.5), normalised, built in float64."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


@functools.lru_cache(maxsize=64)
def _symmetric_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of scipy's mode='reflect' (numpy 'symmetric': the edge sample repeats), valid for any n >= 1.
    Cached per (n, radius, device): the same few map sizes come back every batch."""
    with torch.inference_mode(False):  # a normal tensor: training code may index tensors that need grad with it
        i = torch.arange(-radius, n + radius, device=device) % (2 * n)
        return torch.where(i < n, i, 2 * n - 1 - i)


@functools.lru_cache(maxsize=16)
def _device_kernel(sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    """`gaussian_kernel` as a float32 (1, 1, K) conv weight on `device`, built once per (sigma, truncate, device):
    it is made on the host, and copying it per call would make the host wait for the device every batch."""
    with torch.inference_mode(False):  # a normal tensor: conv1d saves its weight for backward in training
        return gaussian_kernel(sigma, truncate).to(device=device, dtype=torch.float32).view(1, 1, -1)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Equivalent of `scipy.ndimage.gaussian_filter(m, sigma)` on each (H, W) map of a (B, H, W) batch.

    Separable 33-tap (sigma 4) correlation with edge-repeating symmetric padding; float32 out.
    """
    if sigma <= 0:
        return maps.float()
    x = maps.float()
    b, h, w = x.shape
    k = _device_kernel(float(sigma), float(truncate), x.device)
    r = (k.numel() - 1) // 2
    # along W, then along H (scipy filters axis 0 first; the float32 results agree to ~1e-7 either way)
    x = x[:, :, _symmetric_index(w, r, x.device)]
    x = F.conv1d(x.reshape(b * h, 1, -1), k).view(b, h, w)
    x = x[:, _symmetric_index(h, r, x.device), :].transpose(1, 2)
    x = F.conv1d(x.reshape(b * w, 1, -1), k).view(b, w, h)
    return x.transpose(1, 2).contiguous()


def zero_shot_map(logits: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Sum over stages of the anomaly probabilities (range (0, S)), then the Gaussian filter -> (B, size, size)."""
    return gaussian_blur(stage_anomaly_probs(logits, size).sum(dim=1), sigma)


def kshot_map(distances: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """(B, S, L) min cosine distances to a class bank -> (B, size, size): summed over stages at grid
    resolution, then upsampled once (bilinear, align_corners; linear, so equal to summing upsampled maps)."""
    d = distances.float().sum(dim=1).view(-1, 1, grid, grid)
    return F.interpolate(d, size=(size, size), mode="bilinear", align_corners=True)[:, 0]



def final_map(zero_shot: torch.Tensor, distances: torch.Tensor | None, grid: int, rows: torch.Tensor | None = None,
              zero_shot_weight: float = 1.0) -> torch.Tensor:
    """The final anomaly map (spec §6): filtered zero-shot map (B, H, W) + unfiltered k-shot map of `distances`.

    `distances` (R, S, L) are min cosine distances to a class bank for the images `rows` (R indices into B), or
    for all B images when `rows` is None; None means zero-shot only. `zero_shot_weight` (1 in the reference)
    is for diagnostics that sweep the balance of the two parts. float32 out.
    """
    zs = zero_shot.float()
    if zero_shot_weight != 1.0:
        zs = zero_shot_weight * zs
    if distances is None:
        return zs
    ks = kshot_map(distances, grid, zs.shape[-1])
    return zs + ks if rows is None else zs.index_add(0, rows, ks)
