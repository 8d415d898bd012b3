"""A pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)), with RMSNorm."""

from __future__ import annotations

import torch
from torch import nn

from dsfuse.nn.attention import AttentionConfig, KVCache, build_attention
from dsfuse.nn.ffn import SwiGLU


class TransformerBlock(nn.Module):
    """Self-attention (any AttentionConfig kind) and a SwiGLU feed-forward, each behind an RMSNorm."""

    def __init__(self, dim: int, attention: AttentionConfig, ffn: str = "swiglu", ffn_hidden: int | None = None,
                 norm_eps: float = 1e-6):
        super().__init__()
        if attention.dim != dim:
            raise ValueError(f"attention config has dim {attention.dim}, the block has {dim}")
        if ffn != "swiglu":
            raise ValueError(f"ffn must be 'swiglu', got {ffn!r}")
        self.attn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attn = build_attention(attention)
        self.ffn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn = SwiGLU(dim, ffn_hidden or 4 * dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask=mask, causal=causal, cache=cache)
        return x + self.ffn(self.ffn_norm(x))
