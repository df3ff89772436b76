"""Scaled cosine window attention with a continuous log-spaced position bias (SOWA_SPEC.md §2.1).

Value-only (SOWA's default) compares value vectors; `value_only=False` compares CLIP's queries and keys, as the
research code's `WindowAttention(value_only=False)` does (both bias-free projections of the tapped block). The
projections are CLIP's own, frozen: they are passed to `forward` rather than stored, so the adapter never
aliases backbone tensors in its state dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WindowAttention", "relative_coords_table", "relative_position_index"]

_MAX_LOGIT_SCALE = math.log(100.0)  # tau = exp(min(logit_scale, ln 100)), spec §2.1 step 3


def relative_coords_table(window: int) -> torch.Tensor:
    """Log-spaced relative offsets, shape (1, 2w-1, 2w-1, 2): channel 0 = dy, 1 = dx (spec §2.1 step 4)."""
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1).unsqueeze(0)
    table = table / (window - 1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2w-1)^2 table for every query/key pair of a window, N = w^2."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Cosine attention between value (or query and key) vectors inside windows of N tokens.

    Trainable: `logit_scale` (per head temperature, init ln 10) and `cpb_mlp` (position-bias MLP). `proj_drop`
    (the research code's `drop`) drops the projected output in training.
    """

    def __init__(self, dim: int, window: int, num_heads: int, cpb_dim: int = 64, attn_drop: float = 0.0,
                 value_only: bool = True, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.dim, self.window, self.num_heads, self.attn_drop = dim, window, num_heads, attn_drop
        self.value_only, self.proj_drop = value_only, proj_drop
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_dim), nn.ReLU(inplace=True), nn.Linear(cpb_dim, num_heads,
                                                                                             bias=False))
        # Derived from the window size alone: rebuilt here, never loaded (persistent=False).
        self.register_buffer("relative_coords_table", relative_coords_table(window), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None

    def _bias_key(self, dtype: torch.dtype) -> tuple:
        # parameters change in place (optimiser steps, load_state_dict: _version moves) or are replaced (.to():
        # data_ptr moves); either way the key changes and the bias is recomputed
        return (dtype, *((p.data_ptr(), p._version) for p in self.cpb_mlp.parameters()))

    def inference_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """`position_bias()` in `dtype`, computed once and reused while the MLP's weights stay the same.

        For inference only (no autograd graph is kept): the bias depends on the window size and weights, never
        on the input, so recomputing its MLP, gather and sigmoid on every forward is wasted launches.
        """
        key = self._bias_key(dtype)
        if self._bias_cache is None or self._bias_cache[0] != key:
            with torch.no_grad():
                self._bias_cache = (key, self.position_bias().to(dtype))
        return self._bias_cache[1]

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) additive bias = 16 * sigmoid(MLP(table)), the same for every window and image."""
        n = self.window * self.window
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)  # ((2w-1)^2, heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, self.num_heads)
        return 16 * torch.sigmoid(bias.permute(2, 0, 1))

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        out_proj: nn.Linear,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B*nW, N, C) windows; weight: CLIP's (3C, C) in_proj_weight (or, value-only, its (C, C) value
        rows); mask: (nW, N, N) additive or None."""
        bw, n, c = x.shape
        heads = (bw, n, self.num_heads, c // self.num_heads)
        if self.value_only:
            v = F.linear(x, weight[-c:]).view(heads).transpose(1, 2)
            q_hat = k_hat = F.normalize(v, dim=-1)  # eps 1e-12, as the reference
        else:
            if weight.shape[0] != 3 * c:
                raise ValueError(f"query-key attention needs the (3C, C) in_proj_weight, got {tuple(weight.shape)}")
            q, k, v = (t.view(heads).transpose(1, 2) for t in F.linear(x, weight).chunk(3, dim=-1))
            q_hat, k_hat = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        tau = torch.exp(self.logit_scale.clamp(max=_MAX_LOGIT_SCALE)).to(v.dtype)  # (heads, 1, 1)
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.cpb_mlp.parameters())
        bias = self.position_bias().to(v.dtype) if grad else self.inference_bias(v.dtype)  # (heads, N, N)
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.to(v.dtype).unsqueeze(1))  # (nW, heads, N, N)
            bias = bias.unsqueeze(0).expand(bw // nw, -1, -1, -1, -1).reshape(bw, self.num_heads, n, n)
        # softmax(tau * q_hat k_hat^T + bias) v  ==  SDPA(q = tau * q_hat, k = k_hat, v, scale = 1)
        out = F.scaled_dot_product_attention(
            tau * q_hat, k_hat, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0, scale=1.0
        )
        out = out_proj(out.transpose(1, 2).reshape(bw, n, c))
        return F.dropout(out, self.proj_drop, self.training) if self.proj_drop else out
