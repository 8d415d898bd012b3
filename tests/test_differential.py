"""Differential attention (nn/differential.py) against the paper's formula written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dsfuse.nn.attention import KVCache
from dsfuse.nn.differential import DifferentialAttention, lambda_init


def by_hand(layer: DifferentialAttention, x: torch.Tensor) -> torch.Tensor:
    """(softmax(Q1 K1^T / sqrt d) - lambda softmax(Q2 K2^T / sqrt d)) V per head, causal, normalised per head."""
    b, t, dim = x.shape
    h, d = layer.n_heads, layer.head_dim
    q = layer.wq(x).view(b, t, 2 * h, d).transpose(1, 2)
    k = layer.wk(x).view(b, t, 2 * h, d).transpose(1, 2)
    q, k = layer.rope(q), layer.rope(k)
    v = layer.wv(x).view(b, t, h, 2 * d).transpose(1, 2)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    maps = [((q[:, i::2] @ k[:, i::2].transpose(-1, -2)) / math.sqrt(d)).masked_fill(future, -math.inf).softmax(-1)
            for i in (0, 1)]
    lq1, lk1, lq2, lk2 = layer.lambdas
    lam = math.exp((lq1 @ lk1).item()) - math.exp((lq2 @ lk2).item()) + layer.lambda_init
    out = (maps[0] - lam * maps[1]) @ v
    out = out / out.pow(2).mean(-1, keepdim=True).add(torch.finfo(out.dtype).eps).sqrt() * (1 - layer.lambda_init)
    return layer.wo(out.transpose(1, 2).reshape(b, t, dim))


def test_differential_attention_is_the_difference_of_two_softmax_maps():
    torch.manual_seed(0)
    layer = DifferentialAttention(32, 2, depth=3)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(layer(x, causal=True), by_hand(layer, x), atol=1e-5, rtol=1e-5)
    assert layer.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.6))
    assert lambda_init(1) == pytest.approx(0.2)


def test_lambda_is_learned():
    torch.manual_seed(0)
    layer = DifferentialAttention(32, 2)
    layer(torch.randn(1, 5, 32), causal=True).square().sum().backward()
    assert layer.lambdas.grad is not None and layer.lambdas.grad.abs().sum() > 0


def test_decoding_with_a_cache_matches_the_whole_sequence_and_padding_is_ignored():
    torch.manual_seed(0)
    layer = DifferentialAttention(32, 4)
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :2] = False
    full = layer(x, mask, causal=True)
    cache = KVCache()
    steps = [layer(x[:, :4], mask[:, :4], True, cache)] + [layer(x[:, t:t + 1], mask[:, t:t + 1], True, cache)
                                                          for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1)[:, 2:], full[:, 2:], atol=1e-5, rtol=1e-5)
    changed = x.clone()
    changed[1, :2] = 100.0  # what sits under padding does not matter
    torch.testing.assert_close(layer(changed, mask, causal=True)[1, 2:], full[1, 2:])


def test_width_must_split_into_two_maps_per_head():
    with pytest.raises(ValueError, match="2 \\* n_heads"):
        DifferentialAttention(30, 4)
