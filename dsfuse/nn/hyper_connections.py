"""Manifold-constrained hyper-connections (mHC; DeepSeek-V4, Xie et al. 2026): the residual stream widened to
n parallel streams [B, T, n, D], mixed by a doubly-stochastic matrix so the residual path can neither blow
up nor vanish however deep the stack.

Around each sub-layer (attention or feed-forward) a small projection of the normalised streams gives, per
token, `pre` (weights collapsing the n streams into the sub-layer's input), `post` (how much of its output
each stream receives) and `comb` (an n x n mixing of the streams, projected onto the doubly-stochastic
matrices by Sinkhorn-Knopp):  streams' = post * sublayer(pre . streams) + comb^T streams.

    hc = HyperConnection(dim=64, cfg=HyperConfig(streams=4))
    streams = expand_streams(x, 4)                                # [B, T, D] -> [B, T, 4, D]
    streams = hc(streams, lambda h: attn(norm(h)))                # one residual sub-layer
    y = HyperHead(64, HyperConfig(streams=4))(streams)                                 # back to [B, T, D] at the end
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HyperConfig:
    streams: int = 4  # n, V4's hc_mult
    sinkhorn_iters: int = 20
    eps: float = 1e-6  # the floor added to pre and comb, and to Sinkhorn's sums

    def __post_init__(self) -> None:
        if self.streams < 1 or self.sinkhorn_iters < 1:
            raise ValueError("mHC needs at least one stream and one Sinkhorn iteration")


def sinkhorn(logits: torch.Tensor, iterations: int, eps: float = 1e-6) -> torch.Tensor:
    """Project [..., n, n] logits onto (nearly) doubly-stochastic matrices: a row softmax, then columns and
    rows normalised in turn (`iterations` column normalisations in all)."""
    matrix = torch.softmax(logits, dim=-1) + eps
    matrix = matrix / (matrix.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iterations - 1):
        matrix = matrix / (matrix.sum(dim=-1, keepdim=True) + eps)
        matrix = matrix / (matrix.sum(dim=-2, keepdim=True) + eps)
    return matrix


def expand_streams(x: torch.Tensor, streams: int) -> torch.Tensor:
    """[B, T, D] -> [B, T, streams, D], each stream a copy of x (how a V4 stack starts)."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], streams, x.shape[-1]).contiguous()


class HyperConnection(nn.Module):
    """One mHC residual around a sub-layer (see the module docstring)."""

    def __init__(self, dim: int, cfg: HyperConfig = HyperConfig(), norm_eps: float = 1e-6, init_std: float = 0.02):
        super().__init__()
        streams = cfg.streams
        self.streams, self.sinkhorn_iters, self.eps, self.norm_eps = streams, cfg.sinkhorn_iters, cfg.eps, norm_eps
        self.fn = nn.Parameter(torch.randn((2 + streams) * streams, streams * dim) * init_std)
        self.base = nn.Parameter(torch.zeros((2 + streams) * streams))
        self.scale = nn.Parameter(torch.ones(3))  # pre, post, comb

    def mixing(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre [B, T, n], post [B, T, n], comb [B, T, n, n] (doubly stochastic), from streams [B, T, n, D]."""
        n = self.streams
        flat = streams.flatten(-2).float()
        flat = F.rms_norm(flat, (flat.shape[-1],), eps=self.norm_eps)
        pre, post, comb = F.linear(flat, self.fn.float()).split([n, n, n * n], dim=-1)
        pre_base, post_base, comb_base = self.base.split([n, n, n * n])
        pre_scale, post_scale, comb_scale = self.scale.unbind(0)
        pre = torch.sigmoid(pre * pre_scale + pre_base) + self.eps
        post = 2 * torch.sigmoid(post * post_scale + post_base)
        comb = (comb * comb_scale + comb_base).unflatten(-1, (n, n))
        return pre, post, sinkhorn(comb, self.sinkhorn_iters, self.eps)

    def forward(self, streams: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        pre, post, comb = self.mixing(streams)
        dtype = streams.dtype
        out = sublayer((pre.unsqueeze(-1) * streams).sum(dim=-2).to(dtype))
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ streams


class HyperHead(nn.Module):
    """The final collapse of the n streams into one [B, T, D], by learned per-token sigmoid weights."""

    def __init__(self, dim: int, cfg: HyperConfig = HyperConfig(), norm_eps: float = 1e-6, init_std: float = 0.02):
        super().__init__()
        streams, self.eps, self.norm_eps = cfg.streams, cfg.eps, norm_eps
        self.hc_fn = nn.Parameter(torch.randn(streams, streams * dim) * init_std)
        self.hc_base = nn.Parameter(torch.zeros(streams))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        flat = streams.flatten(-2).float()
        flat = F.rms_norm(flat, (flat.shape[-1],), eps=self.norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.hc_fn.float()) * self.hc_scale + self.hc_base) + self.eps
        return (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)
