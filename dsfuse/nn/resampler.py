"""A learned resampler (Q-Former / Perceiver style): M queries cross-attend to N tokens, and back.

The compressor's M outputs have the input's width, so M x D floats is the whole bottleneck, as
for pooling; inside, the layers work at `width` (D can be as small as a tokenizer's 16 channels).
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import nn

from dsfuse.nn.attention import CrossAttention
from dsfuse.nn.compress import Compressed
from dsfuse.nn.ffn import SwiGLU


class CrossAttentionLayer(nn.Module):
    """Pre-norm: queries + attn(norm(queries), norm(context)), then + SwiGLU(norm(queries))."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.query_norm = nn.LayerNorm(width)
        self.context_norm = nn.LayerNorm(width)
        self.attn = CrossAttention(width, heads)
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn = SwiGLU(width, hidden)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        queries = queries + self.attn(self.query_norm(queries), self.context_norm(context))
        return queries + self.ffn(self.ffn_norm(queries))


class QueryStack(nn.Module):
    """`num_queries` learned queries read a context of `context_len` tokens through `depth` layers.

    The context gets a learned embedding per position, so a query can ask for a place on the grid.
    """

    def __init__(self, dim: int, num_queries: int, context_len: int, depth: int, heads: int, width: int,
                 hidden: int | None = None):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.positions = nn.Parameter(torch.randn(context_len, width) * 0.02)
        self.read_in = nn.Linear(dim, width)
        self.layers = nn.ModuleList(CrossAttentionLayer(width, heads, hidden or 4 * width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.write_out = nn.Linear(width, dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        context = self.read_in(context) + self.positions
        queries = repeat(self.queries, "m w -> b m w", b=context.shape[0])
        for layer in self.layers:
            queries = layer(queries, context)
        return self.write_out(self.norm(queries))


class Resampler(nn.Module):
    """N tokens [B, N, D] -> M tokens [B, M, D], each standing for N / M inputs."""

    def __init__(self, dim: int, num_queries: int, num_tokens: int, depth: int = 2, heads: int = 4,
                 width: int = 128, hidden: int | None = None):
        super().__init__()
        self.stack = QueryStack(dim, num_queries, num_tokens, depth, heads, width, hidden)

    def forward(self, x: torch.Tensor) -> Compressed:
        tokens = self.stack(x)
        sizes = torch.full(tokens.shape[:2], x.shape[1] / tokens.shape[1], device=x.device, dtype=x.dtype)
        return Compressed(tokens, sizes)


class ResamplerExpander(nn.Module):
    """The way back: one learned query per grid position reads the M compressed tokens -> [B, N, D]."""

    def __init__(self, dim: int, num_tokens: int, num_queries: int, depth: int = 2, heads: int = 4,
                 width: int = 128, hidden: int | None = None):
        super().__init__()
        self.stack = QueryStack(dim, num_tokens, num_queries, depth, heads, width, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.stack(y)
