"""A learned resampler (Q-Former / Perceiver style): M queries cross-attend to N tokens, and back.

Each query starts from the average of its k x k window of the grid (as Honeybee's D-Abstractor
initialises its queries from pooled features) and learns, through cross-attention to every token,
what to add to it; the outputs' last projection starts at zero, so training begins exactly at
average pooling and can only improve on it. The expander mirrors this from nearest-neighbour
upsampling. The M outputs have the input's width D, so M x D floats is the whole bottleneck, as
for pooling; inside, the layers work at `width` (D can be as small as a tokenizer's 16 channels).
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import nn

from dsfuse.nn.compress import Compressed, Grid, avg_pool_tokens, check_grid, unpool_tokens
from dsfuse.nn.transformer import CrossAttentionBlock


class QueryStack(nn.Module):
    """Queries seeded from `seeds` [B, M, D] read a context [B, S, D] through `depth` layers and
    return a correction to the seeds. Learned embeddings mark each query's and each context
    token's place on the grid."""

    def __init__(self, dim: int, num_queries: int, context_len: int, depth: int, heads: int, width: int,
                 hidden: int | None = None):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.positions = nn.Parameter(torch.randn(context_len, width) * 0.02)
        self.read_seeds = nn.Linear(dim, width)
        self.read_context = nn.Linear(dim, width)
        self.layers = nn.ModuleList(CrossAttentionBlock(width, heads, hidden or 4 * width, norm=nn.LayerNorm)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.write_out = nn.Linear(width, dim)
        nn.init.zeros_(self.write_out.weight)  # start as the identity on the seeds
        nn.init.zeros_(self.write_out.bias)

    def forward(self, seeds: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context = self.read_context(context) + self.positions
        queries = self.read_seeds(seeds) + repeat(self.queries, "m w -> b m w", b=seeds.shape[0])
        for layer in self.layers:
            queries = layer(queries, context)
        return seeds + self.write_out(self.norm(queries))


class Resampler(nn.Module):
    """N tokens on `grid` [B, N, D] -> N / (kh kw) learned tokens [B, M, D]."""

    def __init__(self, dim: int, grid: Grid, kernel: Grid, depth: int = 2, heads: int = 4, width: int = 128,
                 hidden: int | None = None):
        super().__init__()
        check_grid(grid[0] * grid[1], grid, kernel)
        self.grid, self.kernel = tuple(grid), tuple(kernel)
        num_queries = grid[0] * grid[1] // (kernel[0] * kernel[1])
        self.stack = QueryStack(dim, num_queries, grid[0] * grid[1], depth, heads, width, hidden)

    def forward(self, x: torch.Tensor) -> Compressed:
        pooled = avg_pool_tokens(x, self.grid, self.kernel)
        return Compressed(self.stack(pooled.tokens, x), pooled.sizes, pooled.grid)


class ResamplerExpander(nn.Module):
    """The way back: one query per grid position, seeded by upsampling, reads the M tokens -> [B, N, D]."""

    def __init__(self, dim: int, grid: Grid, kernel: Grid, depth: int = 2, heads: int = 4, width: int = 128,
                 hidden: int | None = None):
        super().__init__()
        self.grid, self.kernel = tuple(grid), tuple(kernel)
        num_tokens = grid[0] * grid[1]
        self.stack = QueryStack(dim, num_tokens, num_tokens // (kernel[0] * kernel[1]), depth, heads, width, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.stack(unpool_tokens(y, self.grid, self.kernel), y)
