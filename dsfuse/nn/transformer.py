"""A pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)), with RMSNorm."""

from __future__ import annotations

import torch
from torch import nn

from dsfuse.nn.attention import AttentionConfig, KVCache, build_attention
from dsfuse.nn.ffn import SwiGLU
from dsfuse.nn.moe import MoE, MoEConfig


class TransformerBlock(nn.Module):
    """Self-attention (any AttentionConfig kind), then a SwiGLU or DeepSeekMoE feed-forward, each behind
    an RMSNorm. With ffn="moe", add `moe_aux_loss(model)` to the training loss."""

    def __init__(self, dim: int, attention: AttentionConfig, ffn: str = "swiglu", ffn_hidden: int | None = None,
                 moe: MoEConfig | None = None, norm_eps: float = 1e-6):
        super().__init__()
        if attention.dim != dim:
            raise ValueError(f"attention config has dim {attention.dim}, the block has {dim}")
        self.attn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attn = build_attention(attention)
        self.ffn_norm = nn.RMSNorm(dim, eps=norm_eps)
        if ffn == "swiglu":
            self.ffn: nn.Module = SwiGLU(dim, ffn_hidden or 4 * dim)
        elif ffn == "moe":
            if moe is None or moe.dim != dim:
                raise ValueError(f"ffn='moe' needs a MoEConfig with dim {dim}")
            self.ffn = MoE(moe)
        else:
            raise ValueError(f"ffn must be 'swiglu' or 'moe', got {ffn!r}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask=mask, causal=causal, cache=cache)
        return x + self.ffn(self.ffn_norm(x))
