"""Pre-norm transformer blocks: self-attention (x + attn(norm(x)), then x + ffn(norm(x))), and
cross-attention from x to a context, which fusion and the resampler share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsfuse.nn.attention import AttentionConfig, CrossAttention, KVCache, build_attention
from dsfuse.nn.checkpointing import Checkpointable
from dsfuse.nn.ffn import SwiGLU
from dsfuse.nn.hyper_connections import HyperConfig, HyperConnection
from dsfuse.nn.moe import MoE, MoEConfig
from dsfuse.nn.v4_attention import V4Attention, V4AttentionConfig, V4Cache


class TransformerBlock(Checkpointable):
    """Self-attention (any AttentionConfig kind, or DeepSeek-V4's for a V4AttentionConfig), then a SwiGLU or DeepSeekMoE feed-forward, each behind
    an RMSNorm. With ffn="moe", add `moe_aux_loss(model)` to the training loss. Under gradient
    checkpointing the block recomputes its activations in the backward pass; a MoE block recomputes its
    attention only (its router updates its balancing bias as it runs, which must happen once).

    With a `hyper` config the residual path is mHC (nn/hyper_connections): x holds n streams
    [B, T, n, D] and each sub-layer sits in a HyperConnection instead of `x + f(x)` (no checkpointing)."""

    def __init__(self, dim: int, attention: AttentionConfig | V4AttentionConfig, ffn: str = "swiglu",
                 ffn_hidden: int | None = None, moe: MoEConfig | None = None, norm_eps: float = 1e-6, hyper: HyperConfig | None = None):
        super().__init__()
        if attention.dim != dim:
            raise ValueError(f"attention config has dim {attention.dim}, the block has {dim}")
        self.attn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attn = V4Attention(attention) if isinstance(attention, V4AttentionConfig) else build_attention(attention)
        self.ffn_norm = nn.RMSNorm(dim, eps=norm_eps)
        if ffn == "swiglu":
            self.ffn: nn.Module = SwiGLU(dim, ffn_hidden or 4 * dim)
        elif ffn == "moe":
            if moe is None or moe.dim != dim:
                raise ValueError(f"ffn='moe' needs a MoEConfig with dim {dim}")
            self.ffn = MoE(moe)
        else:
            raise ValueError(f"ffn must be 'swiglu' or 'moe', got {ffn!r}")
        self.attn_hc = HyperConnection(dim, hyper, norm_eps) if hyper is not None else None
        self.ffn_hc = HyperConnection(dim, hyper, norm_eps) if hyper is not None else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | V4Cache | None = None, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`token_ids` [B, T] reach a hash-routed MoE (nn/moe), which routes by them."""
        if self.attn_hc is not None or token_ids is not None:
            return self._forward_unchecked(x, mask, causal, cache, token_ids)
        if cache is not None:  # decoding: no gradients to save memory for
            return self._feed_forward(x + self.attn(self.attn_norm(x), mask=mask, causal=causal, cache=cache))
        x = x + self.maybe_checkpoint(self._attend, x, mask, causal)
        return self._feed_forward(x) if isinstance(self.ffn, MoE) else self.maybe_checkpoint(self._feed_forward, x)

    def _forward_unchecked(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                           cache: KVCache | V4Cache | None, token_ids: torch.Tensor | None) -> torch.Tensor:
        """mHC streams and/or routing by token id (no checkpointing)."""
        def attend(h: torch.Tensor) -> torch.Tensor:
            return self.attn(self.attn_norm(h), mask=mask, causal=causal, cache=cache)

        def feed_forward(h: torch.Tensor) -> torch.Tensor:
            return self.ffn(self.ffn_norm(h), token_ids) if isinstance(self.ffn, MoE) else self.ffn(self.ffn_norm(h))
        if self.attn_hc is not None:
            return self.ffn_hc(self.attn_hc(x, attend), feed_forward)
        x = x + attend(x)
        return x + feed_forward(x)

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        return self.attn(self.attn_norm(x), mask=mask, causal=causal)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.ffn_norm(x))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention from x to a context, then SwiGLU; both residual.

    With `gated`, each token decides per channel how much of the attended context to let in
    (sigmoid of the token and what it attended to), as the seed's ParallelCrossAttention does.
    `norm` makes the normalisation layers (RMSNorm; the resampler keeps LayerNorm).
    """

    def __init__(self, dim: int, n_heads: int, ffn_hidden: int, gated: bool = False,
                 norm: Callable[[int], nn.Module] = nn.RMSNorm):
        super().__init__()
        self.norm, self.context_norm = norm(dim), norm(dim)
        self.attn = CrossAttention(dim, n_heads)
        self.gate = nn.Linear(2 * dim, dim) if gated else None
        self.ffn_norm = norm(dim)
        self.ffn = SwiGLU(dim, ffn_hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        queries = self.norm(x)
        update = self.attn(queries, self.context_norm(context), context_mask)
        if self.gate is not None:
            update = torch.sigmoid(self.gate(torch.cat([queries, update], -1))) * update
        x = x + update
        return x + self.ffn(self.ffn_norm(x))
