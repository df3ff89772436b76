"""The HFWA adapter: one per tapped CLIP block (SOWA_SPEC.md §2).

A stage is a stack of Swin-style blocks over the (G, G) patch grid: window attention (frozen CLIP value/out
projections of the tapped block) and a bias-free linear "FFN", each added back through a post-norm residual.
Odd blocks use windows shifted by half a window (§2.2). The CLS token never enters the adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from .window_attention import WindowAttention

__all__ = ["HFWAAdapter", "HFWABlock", "block_mlp", "shifted_window_mask", "window_merge", "window_partition"]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window^2, C); windows row-major over the grid, tokens row-major inside."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nW, window^2, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(grid: int, window: int, shift: int) -> torch.Tensor:
    """(nW, N, N) additive mask: -100 between tokens that came from different regions before the cyclic roll."""
    labels = torch.zeros(1, grid, grid, 1)
    region = 0
    spans = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for hs in spans:
        for ws in spans:
            labels[:, hs, ws, :] = region
            region += 1
    lw = window_partition(labels, window).squeeze(-1)  # (nW, N)
    diff = lw.unsqueeze(1) - lw.unsqueeze(2)
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


def block_mlp(dim: int, hidden: tuple[int, ...] = (), drop: float = 0.0) -> nn.Module:
    """The block's "FFN", as the research code's `Linear`: bias-free linears with GELU (and, when `drop` > 0,
    dropout) after each hidden layer. No hidden layer: one `nn.Linear` (the layout of every existing bundle);
    else an `nn.Sequential` whose indices are the research code's `mlp.layers.*`."""
    if not hidden:
        return nn.Linear(dim, dim, bias=False)
    layers: list[nn.Module] = []
    last = dim
    for width in hidden:
        layers += [nn.Linear(last, width, bias=False), nn.GELU()]
        if drop > 0:
            layers.append(nn.Dropout(drop))
        last = width
    layers.append(nn.Linear(last, dim, bias=False))
    return nn.Sequential(*layers)


class HFWABlock(nn.Module):
    """x1 = x + LN1(WindowAttention(x));  x2 = x1 + LN2(MLP(x1))   (spec §2.1 steps 1-10)."""

    def __init__(
        self, dim: int, grid: int, window: int, shift: int, num_heads: int, cpb_dim: int, attn_drop: float,
        value_only: bool = True, hidden: tuple[int, ...] = (), drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.grid, self.window, self.shift = grid, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, cpb_dim, attn_drop, value_only, drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = block_mlp(dim, hidden, drop)
        mask = shifted_window_mask(grid, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, out_proj: nn.Linear) -> torch.Tensor:
        b, n, c = x.shape
        g = self.grid
        h = x.reshape(b, g, g, c)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        h = self.attn(window_partition(h, self.window), weight, out_proj, self.attn_mask)
        h = window_merge(h, self.window, g, g)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.norm1(h.reshape(b, n, c))
        return x + self.norm2(self.mlp(x))


class HFWAAdapter(nn.Module):
    """One tap's adapter: `depth` blocks alternating shift 0 and window // 2."""

    def __init__(
        self, dim: int, grid: int, window: int, depth: int, num_heads: int, cpb_dim: int = 64, attn_drop: float = 0.0,
        value_only: bool = True, hidden: tuple[int, ...] = (), drop: float = 0.0,
    ) -> None:
        super().__init__()
        if window >= grid:  # the window covers the whole grid: nothing to shift (spec §2.2)
            window = grid
        self.blocks = nn.ModuleList(
            HFWABlock(dim, grid, window, 0 if (i % 2 == 0 or window == grid) else window // 2, num_heads, cpb_dim,
                      attn_drop, value_only, tuple(hidden), drop)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, weight: torch.Tensor, out_proj: nn.Linear) -> torch.Tensor:
        """x: (B, L, C) raw tokens of the tapped block (no CLS, no LayerNorm) -> (B, L, C); `weight` is the
        block's (3C, C) in_proj_weight (value-only adapters also take just its (C, C) value rows)."""
        for block in self.blocks:
            x = block(x, weight, out_proj)
        return x
