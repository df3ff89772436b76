from __future__ import annotations

import torch

from model.adapter import HFWAAdapter, shifted_window_mask, window_merge, window_partition


def test_partition_and_merge_are_inverse_and_row_major() -> None:
    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).view(2, 4, 4, 3)
    w = window_partition(x, 2)
    assert w.shape == (8, 4, 3)
    # window 1 of image 0 is rows 0-1, cols 2-3, tokens row-major
    assert torch.equal(w[1, :, 0], x[0, 0:2, 2:4, 0].reshape(-1))
    assert torch.equal(window_merge(w, 2, 4, 4), x)


def test_shift_mask_separates_regions_of_the_unrolled_grid() -> None:
    grid, window, shift = 8, 4, 2
    mask = shifted_window_mask(grid, window, shift)
    assert mask.shape == (4, 16, 16)
    # independent construction: region of a rolled position = which side of each boundary it came from
    pos = torch.arange(grid)
    region = (pos >= grid - window).long() + (pos >= grid - shift).long()
    labels = (region[:, None] * 3 + region[None, :]).float().view(1, grid, grid, 1)
    lw = window_partition(labels, window).squeeze(-1)
    expected = torch.where(lw[:, :, None] != lw[:, None, :], -100.0, 0.0)
    assert torch.equal(mask, expected)
    assert (mask[0] == 0).all()  # the top-left window holds a single region


def _naive_adapter(adapter: HFWAAdapter, x: torch.Tensor, wv: torch.Tensor, out: torch.nn.Linear) -> torch.Tensor:
    """Blocks written out with an explicit loop over images and windows."""
    b, n, c = x.shape
    g = int(n ** 0.5)
    for blk in adapter.blocks:
        w, s = blk.window, blk.shift
        grid = torch.roll(x.view(b, g, g, c), (-s, -s), (1, 2))
        attn_out = torch.zeros_like(grid)
        mask = shifted_window_mask(g, w, s) if s else None
        for i in range(b):
            k = 0
            for r in range(0, g, w):
                for q in range(0, g, w):
                    win = grid[i, r:r + w, q:q + w].reshape(1, w * w, c)
                    m = None if mask is None else mask[k:k + 1]
                    attn_out[i, r:r + w, q:q + w] = blk.attn(win, wv, out, m).view(w, w, c)
                    k += 1
        h = torch.roll(attn_out, (s, s), (1, 2)).view(b, n, c)
        x = x + blk.norm1(h)
        x = x + blk.norm2(blk.mlp(x))
    return x


def test_depth_two_shifted_adapter_equals_window_loop() -> None:
    adapter = HFWAAdapter(dim=32, grid=8, window=4, depth=2, num_heads=4, cpb_dim=16).eval()
    assert [b.shift for b in adapter.blocks] == [0, 2]
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, wv, out = torch.randn(3, 64, 32), torch.randn(32, 32) * 0.2, torch.nn.Linear(32, 32)
    assert torch.allclose(adapter(x, wv, out), _naive_adapter(adapter, x, wv, out), atol=1e-5)


def test_window_covering_the_grid_means_one_unshifted_window() -> None:
    adapter = HFWAAdapter(dim=16, grid=8, window=12, depth=2, num_heads=2)
    assert [(b.window, b.shift) for b in adapter.blocks] == [(8, 0), (8, 0)]
    assert adapter.blocks[0].attn.relative_coords_table.shape == (1, 15, 15, 2)


def test_only_trainable_adapter_state_is_saved() -> None:
    adapter = HFWAAdapter(dim=16, grid=4, window=2, depth=2, num_heads=2, cpb_dim=8)
    keys = set(adapter.state_dict())
    assert keys == {f"blocks.{j}.{k}" for j in (0, 1) for k in (
        "norm1.weight", "norm1.bias", "attn.logit_scale", "attn.cpb_mlp.0.weight", "attn.cpb_mlp.0.bias",
        "attn.cpb_mlp.2.weight", "norm2.weight", "norm2.bias", "mlp.weight")}
    assert adapter.blocks[0].mlp.bias is None
