from __future__ import annotations

import math

import torch

from model.window_attention import WindowAttention, relative_coords_table, relative_position_index


def test_coords_table_is_log_spaced_over_offsets() -> None:
    t = relative_coords_table(12)
    assert t.shape == (1, 23, 23, 2)
    # spec §2.1: t = 8*d/11, t' = sign(t) log2(|t|+1) / log2(8); range ±1.0566
    d = torch.arange(-11, 12, dtype=torch.float32)
    expected = torch.sign(8 * d / 11) * torch.log2((8 * d / 11).abs() + 1) / math.log2(8)
    assert torch.allclose(t[0, :, 0, 0], expected)  # channel 0 = dy varies along axis 1
    assert torch.allclose(t[0, 0, :, 1], expected)  # channel 1 = dx varies along axis 2
    assert abs(t.max().item() - 1.0566) < 1e-4


def test_position_index_matches_its_definition() -> None:
    w = 3
    idx = relative_position_index(w)
    assert idx.shape == (9, 9)
    for i in range(9):
        for j in range(9):
            yi, xi, yj, xj = i // w, i % w, j // w, j % w
            assert idx[i, j] == (yi - yj + w - 1) * (2 * w - 1) + (xi - xj + w - 1)


def _naive(wa: WindowAttention, x: torch.Tensor, wv: torch.Tensor, out: torch.nn.Linear,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    bw, n, c = x.shape
    v = (x @ wv.T).view(bw, n, wa.num_heads, -1).transpose(1, 2)
    vh = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    tau = torch.exp(torch.clamp(wa.logit_scale, max=math.log(100.0)))
    a = (vh @ vh.transpose(-1, -2)) * tau + wa.position_bias().unsqueeze(0)
    if mask is not None:
        a = (a.view(-1, mask.shape[0], wa.num_heads, n, n) + mask[None, :, None]).view(bw, wa.num_heads, n, n)
    o = a.softmax(-1) @ v
    return out(o.transpose(1, 2).reshape(bw, n, c))


def test_sdpa_path_equals_written_out_attention() -> None:
    wa = WindowAttention(32, 4, 4, cpb_dim=16).eval()
    with torch.no_grad():
        wa.logit_scale.copy_(torch.tensor([1.0, 2.0, 4.0, 6.0]).view(4, 1, 1))  # 6 > ln 100: clamped
    x, wv, out = torch.randn(6, 16, 32), torch.randn(32, 32) * 0.2, torch.nn.Linear(32, 32)
    mask = torch.zeros(3, 16, 16)
    mask[1, :8, 8:] = -100.0
    assert torch.allclose(wa(x, wv, out), _naive(wa, x, wv, out), atol=1e-5)
    assert torch.allclose(wa(x, wv, out, mask), _naive(wa, x, wv, out, mask), atol=1e-5)


def test_attention_is_between_values_only() -> None:
    # the output depends on x only through x @ Wv: an orthogonal change of the other rows changes nothing
    wa = WindowAttention(16, 2, 2).eval()
    x, wv, out = torch.randn(2, 4, 16), torch.randn(16, 16), torch.nn.Linear(16, 16)
    y = wa(x, wv, out)
    assert y.shape == (2, 4, 16)
    assert torch.allclose(y, wa(x, wv.clone(), out))
    assert not torch.allclose(y, wa(x, wv * 2, out))


def test_position_bias_range_and_dropout_only_in_training() -> None:
    wa = WindowAttention(16, 3, 2, attn_drop=0.5)
    bias = wa.position_bias()
    assert bias.shape == (2, 9, 9) and bias.min() > 0 and bias.max() < 16
    x, wv, out = torch.randn(4, 9, 16), torch.randn(16, 16), torch.nn.Linear(16, 16)
    wa.eval()
    assert torch.equal(wa(x, wv, out), wa(x, wv, out))
    wa.train()
    assert not torch.allclose(wa(x, wv, out), wa(x, wv, out))


def test_inference_bias_is_cached_and_follows_weight_changes() -> None:
    wa = WindowAttention(16, 3, 2).eval()
    x, wv, out = torch.randn(4, 9, 16), torch.randn(16, 16), torch.nn.Linear(16, 16)
    with torch.no_grad():
        first = wa(x, wv, out)
        assert wa.inference_bias(torch.float32) is wa.inference_bias(torch.float32)  # computed once
        assert torch.equal(wa.inference_bias(torch.float32), wa.position_bias())
        # in-place changes (load_state_dict, an optimiser step) invalidate the cached bias
        state = {k: v + 0.5 if k.startswith("cpb_mlp") else v for k, v in wa.state_dict().items()}
        wa.load_state_dict(state)
        assert torch.equal(wa.inference_bias(torch.float32), wa.position_bias())
        assert not torch.allclose(wa(x, wv, out), first)
    # with autograd the bias is recomputed on the graph, so the MLP gets gradients
    wa.train()
    wa(x, wv, out).sum().backward()
    assert wa.cpb_mlp[0].weight.grad is not None and wa.cpb_mlp[0].weight.grad.abs().sum() > 0
