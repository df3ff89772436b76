"""Few-shot memory banks and their scoring (SOWA_SPEC.md §6).

A class's bank holds, per stage, the L2-normalised raw patch tokens of its K normal shots: (S, K*L, D). The
distance of a test patch to the class is 1 - max cosine over the stage's bank: one matmul and a max. A batch is
scored with one batched matmul per distinct class in it (over its images and stages): never a loop over images,
and never a copy of a bank, which at K = 4 on ViT-L weighs 14 MB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .device import to_device

__all__ = ["MemoryBank", "build_bank", "leave_one_out_distances", "min_distances"]


@dataclass(frozen=True)
class MemoryBank:
    """Per-stage unit patch features of a class's shots: `features` (S, K*L, D); `shots` = K."""

    features: torch.Tensor
    shots: int

    def __post_init__(self) -> None:
        if self.features.dim() != 3 or self.shots < 1 or self.features.shape[1] % self.shots:
            raise ValueError(f"bank features must be (S, K*L, D) for K={self.shots}, got "
                             f"{tuple(self.features.shape)}")

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MemoryBank:
        return MemoryBank(self.features.to(device=device, dtype=dtype), self.shots)


def build_bank(raw_patches: torch.Tensor) -> MemoryBank:
    """(K, S, L, D) raw projected patch tokens of K normal shots -> their MemoryBank."""
    k, s, n, d = raw_patches.shape
    features = F.normalize(raw_patches.float(), dim=-1).permute(1, 0, 2, 3).reshape(s, k * n, d)
    return MemoryBank(features.to(raw_patches.dtype).contiguous(), k)


def min_distances(patches: torch.Tensor, banks: Sequence[MemoryBank]) -> torch.Tensor:
    """(B, S, L, D) raw patch tokens, one bank per image -> (B, S, L) float32 min cosine distance to the bank."""
    b, s, n, d = patches.shape
    if len(banks) != b:
        raise ValueError(f"need one bank per image: {b} images, {len(banks)} banks")
    x = F.normalize(patches.float(), dim=-1).to(banks[0].features.dtype)
    if all(bank is banks[0] for bank in banks):  # the common case, one class: (S, B*L, D) @ (S, D, N)
        sim = _cosines(x.transpose(0, 1).reshape(s, b * n, d), banks[0].features)
        return 1.0 - sim.amax(dim=-1).view(s, b, n).transpose(0, 1)
    # mixed classes: one matmul per distinct bank over its own images; banks are never copied
    members: dict[int, list[int]] = {}
    for i, bank in enumerate(banks):
        members.setdefault(id(bank), []).append(i)
    groups = list(members.values())
    # all the groups' rows in one host-to-device copy, then device slices of it
    order = to_device(torch.tensor([i for idx in groups for i in idx]), x.device)
    best = torch.empty(b, s, n, device=x.device, dtype=torch.float32)
    start = 0
    for idx in groups:
        rows = order[start:start + len(idx)]
        start += len(idx)
        xi = x.index_select(0, rows)  # (b_i, S, L, D): test patches, small next to a bank
        sim = _cosines(xi.transpose(0, 1).reshape(s, len(idx) * n, d), banks[idx[0]].features)
        best.index_copy_(0, rows, sim.amax(dim=-1).view(s, len(idx), n).transpose(0, 1))
    return 1.0 - best


def _cosines(x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """(S, M, D) unit test patches x (S, N, D) unit bank features -> (S, M, N) float32 cosines.

    In bf16/fp16 the products are accumulated and returned in fp32: rounding cosines near 1 to bf16 moves each by
    up to 2^-9 (~0.002), per stage, and the k-shot map sums the stages. CUDA does it in the matmul (`out_dtype`);
    the CPU has no such kernel, so there the (bf16-valued) inputs are upcast, a transient fp32 copy of the bank.
    """
    if feats.dtype == torch.float32:
        return torch.bmm(x, feats.transpose(1, 2))
    if x.is_cuda:
        return torch.bmm(x, feats.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(x.float(), feats.float().transpose(1, 2))


def leave_one_out_distances(raw_patches: torch.Tensor, grid: int) -> torch.Tensor:
    """Min distances of each shot's patches to the other shots: (K, S, L, D) -> (K, S, L).

    With a single shot there is no other image, so each patch is matched against the same image's patches
    outside its 3x3 neighbourhood: a conservative estimate of the normal distance level.
    """
    k, s, n, d = raw_patches.shape
    x = F.normalize(raw_patches.float(), dim=-1)  # (K, S, L, D)
    if k == 1:
        sim = torch.bmm(x[0], x[0].transpose(1, 2))  # (S, L, L)
        pos = torch.arange(n, device=x.device)
        row, col = pos // grid, pos % grid
        near = ((row[:, None] - row[None, :]).abs() <= 1) & ((col[:, None] - col[None, :]).abs() <= 1)
        return (1.0 - sim.masked_fill(near, float("-inf")).amax(dim=-1)).unsqueeze(0)
    # one shot at a time: memory S*L*(K-1)*L instead of (S, K*L, K*L), which is gigabytes at K = 32 on ViT-L
    out = torch.empty(k, s, n, device=x.device)
    for i in range(k):
        others = torch.cat([x[:i], x[i + 1:]]).permute(1, 0, 2, 3).reshape(s, (k - 1) * n, d)
        out[i] = 1.0 - torch.bmm(x[i], others.transpose(1, 2)).amax(dim=-1)
    return out
