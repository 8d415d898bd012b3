"""Differential attention (Ye et al. 2024, "Differential Transformer"): each head computes two softmax
maps from two halves of its query and key, and attends with their difference, the second scaled by a
learned lambda, which cancels the attention noise both maps share. Outputs are normalised per head and
scaled by (1 - lambda_init), as in the paper.

Same call as every self-attention module in nn/attention.py:
    forward(x [B, T, D], mask: bool [B, T] | None, causal=False, cache=None) -> [B, T, D]
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from dsfuse.nn.attention import KVCache, RotaryEmbedding, _sdpa, rotate_and_cache


def lambda_init(depth: int) -> float:
    """The paper's initial lambda for the layer at `depth` (1-based): 0.8 - 0.6 * exp(-0.3 * (depth - 1))."""
    return 0.8 - 0.6 * math.exp(-0.3 * (depth - 1))


class DifferentialAttention(nn.Module):
    """`n_heads` differential heads over `dim` channels: queries and keys of 2 x dim/(2 n_heads) per head,
    values of dim/n_heads; parameters as a standard attention layer of the same width."""

    def __init__(self, dim: int, n_heads: int, depth: int = 1, rope: bool = True, rope_theta: float = 10000.0):
        super().__init__()
        if dim % (2 * n_heads):
            raise ValueError(f"dim {dim} is not divisible by 2 * n_heads ({2 * n_heads})")
        self.n_heads, self.head_dim = n_heads, dim // n_heads // 2
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.lambda_init = lambda_init(depth)
        self.lambdas = nn.Parameter(torch.randn(4, self.head_dim) * 0.1)  # lambda_q1, lambda_k1, lambda_q2, lambda_k2
        self.head_norm = nn.RMSNorm(2 * self.head_dim, elementwise_affine=False)
        self.rope = RotaryEmbedding(self.head_dim, rope_theta) if rope else None

    def lam(self) -> torch.Tensor:
        """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init (a scalar)."""
        q1, k1, q2, k2 = self.lambdas
        return torch.exp((q1 * k1).sum()) - torch.exp((q2 * k2).sum()) + self.lambda_init

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        q = rearrange(self.wq(x), "b t (h d) -> b h t d", h=2 * self.n_heads)
        k = rearrange(self.wk(x), "b t (h d) -> b h t d", h=2 * self.n_heads)
        v = rearrange(self.wv(x), "b t (h d) -> b h t d", h=self.n_heads)
        q, k, v, mask, offset = rotate_and_cache(q, k, v, mask, cache, self.rope)
        scale = 1.0 / math.sqrt(self.head_dim)
        first = _sdpa(q[:, 0::2], k[:, 0::2], v, mask, causal, offset, 0.0, scale=scale)
        second = _sdpa(q[:, 1::2], k[:, 1::2], v, mask, causal, offset, 0.0, scale=scale)
        out = self.head_norm(first - self.lam() * second) * (1 - self.lambda_init)
        return self.wo(rearrange(out, "b h t d -> b t (h d)"))
