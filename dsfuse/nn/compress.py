"""Fewer visual tokens for the same information: average pooling, pixel-unshuffle + MLP, ToMe merging.

Tokens are [B, N, D]. Grid methods also take the grid (h, w), N = h * w in row-major order. Every
method returns a `Compressed`: the tokens, how many input tokens each one stands for (its size, which
proportional attention adds as log(size) to the logits), and what `expand` needs to put them back
on the input's N positions. The learned resampler (Q-Former / Perceiver style) is in
`dsfuse.nn.resampler`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import reduce, rearrange, repeat
from torch import nn

Grid = tuple[int, int]


@dataclass
class Compressed:
    tokens: torch.Tensor  # [B, M, D]
    sizes: torch.Tensor  # [B, M]: input tokens per output token
    grid: Grid | None = None  # the output grid, for the grid methods
    source: torch.Tensor | None = None  # [B, N]: output index of every input token (ToMe)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]


class CompressionError(ValueError):
    """A ratio, grid or trained model a method cannot work with; `about` names which ("ratio", "grid", "model")."""

    def __init__(self, message: str, about: str = "ratio"):
        super().__init__(message)
        self.about = about


# --------------------------------------------------------------------------- grids and kernels

def square_grid(n: int) -> Grid | None:
    """(s, s) when n is a perfect square, else None."""
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def pool_kernel(ratio: float) -> Grid:
    """The (kh, kw) window with kh * kw == ratio that is closest to square (2 -> 1x2, 4 -> 2x2, 8 -> 2x4)."""
    if ratio < 1 or ratio != int(ratio):
        raise CompressionError(f"grid methods need a whole-number ratio, got {ratio:g}")
    ratio = int(ratio)
    kh = max(d for d in range(1, math.isqrt(ratio) + 1) if ratio % d == 0)
    return kh, ratio // kh


def check_grid(n: int, grid: Grid, kernel: Grid) -> None:
    h, w = grid
    if h * w != n:
        raise CompressionError(f"grid {h}x{w} does not hold {n} tokens", "grid")
    if h % kernel[0] or w % kernel[1]:
        raise CompressionError(f"a {h}x{w} grid does not split into {kernel[0]}x{kernel[1]} windows "
                               f"(ratio {kernel[0] * kernel[1]})")


def _window_axes(grid: Grid, kernel: Grid) -> dict[str, int]:
    return {"h": grid[0] // kernel[0], "w": grid[1] // kernel[1], "p": kernel[0], "q": kernel[1]}


def _uniform_sizes(x: torch.Tensor, m: int, size: float) -> torch.Tensor:
    return torch.full((x.shape[0], m), float(size), device=x.device, dtype=x.dtype)


# --------------------------------------------------------------------------- average pooling

def avg_pool_tokens(x: torch.Tensor, grid: Grid, kernel: Grid) -> Compressed:
    """Average every kh x kw window of the grid into one token."""
    check_grid(x.shape[1], grid, kernel)
    axes = _window_axes(grid, kernel)
    pooled = reduce(x, "b (h p w q) d -> b (h w) d", "mean", **axes)
    return Compressed(pooled, _uniform_sizes(x, pooled.shape[1], kernel[0] * kernel[1]), (axes["h"], axes["w"]))


def unpool_tokens(y: torch.Tensor, grid: Grid, kernel: Grid) -> torch.Tensor:
    """Put each pooled token back on every position of its window (nearest-neighbour upsampling)."""
    return repeat(y, "b (h w) d -> b (h p w q) d", **_window_axes(grid, kernel))


# --------------------------------------------------------------------------- pixel-unshuffle + MLP

def pixel_unshuffle_tokens(x: torch.Tensor, grid: Grid, kernel: Grid) -> torch.Tensor:
    """Stack every kh x kw window's tokens along channels: [B, N, D] -> [B, N / (kh kw), kh kw D]."""
    check_grid(x.shape[1], grid, kernel)
    return rearrange(x, "b (h p w q) d -> b (h w) (p q d)", **_window_axes(grid, kernel))


def pixel_shuffle_tokens(y: torch.Tensor, grid: Grid, kernel: Grid) -> torch.Tensor:
    """The inverse of `pixel_unshuffle_tokens`, back to the full `grid`."""
    return rearrange(y, "b (h w) (p q d) -> b (h p w q) d", **_window_axes(grid, kernel))


class PixelShuffleProjector(nn.Module):
    """DeepSeek-VL2's token compressor: pixel-unshuffle k x k windows, then a 2-layer MLP back to `dim`.

    `expand` is the mirror image (an MLP to k*k*dim, then pixel-shuffle), so the pair trains on
    reconstruction.
    """

    def __init__(self, dim: int, kernel: Grid, hidden: int | None = None):
        super().__init__()
        self.kernel = tuple(kernel)
        window = kernel[0] * kernel[1]
        hidden = hidden or window * dim
        self.down = nn.Sequential(nn.Linear(window * dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.up = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, window * dim))

    def forward(self, x: torch.Tensor, grid: Grid) -> Compressed:
        y = self.down(pixel_unshuffle_tokens(x, grid, self.kernel))
        out_grid = (grid[0] // self.kernel[0], grid[1] // self.kernel[1])
        return Compressed(y, _uniform_sizes(y, y.shape[1], self.kernel[0] * self.kernel[1]), out_grid)

    def expand(self, y: torch.Tensor, grid: Grid) -> torch.Tensor:
        return pixel_shuffle_tokens(self.up(y), grid, self.kernel)


# --------------------------------------------------------------------------- ToMe

def bipartite_merge(x: torch.Tensor, sizes: torch.Tensor, r: int,
                    metric: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of ToMe's bipartite soft matching: merge the `r` most redundant tokens.

    Tokens alternate into sets A (even) and B (odd); each A token finds its most similar B token
    (cosine of `metric`, default `x`), and the r best-matched A tokens are folded into their partners
    by size-weighted averaging. Returns (tokens [B, N-r, D], sizes [B, N-r], new index of every input
    token [B, N]). Kept A tokens come first, then B, as in ToMe.
    """
    batch, n, dim = x.shape
    n_a, n_b = (n + 1) // 2, n // 2
    r = max(0, min(r, n_a if n_b else 0))
    if r == 0:
        return x, sizes, torch.arange(n, device=x.device).expand(batch, n)
    m = F.normalize((x if metric is None else metric).float(), dim=-1)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # [B, n_a, n_b]
    best_score, best_partner = scores.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]
    partner = best_partner.gather(1, merged)  # [B, r]

    x_a, x_b = x[:, ::2], x[:, 1::2]
    s_a, s_b = sizes[:, ::2], sizes[:, 1::2]

    def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1])) if t.dim() == 3 else t.gather(1, idx)

    # Size-weighted average: sum size * token into the partner, then divide by the summed size.
    moved_size = take(s_a, merged)
    weighted_b = (x_b * s_b[..., None]).scatter_add(1, partner[..., None].expand(-1, -1, dim),
                                                    take(x_a, merged) * moved_size[..., None])
    new_s_b = s_b.scatter_add(1, partner, moved_size)
    new_x_b = weighted_b / new_s_b[..., None]

    tokens = torch.cat([take(x_a, kept), new_x_b], dim=1)
    new_sizes = torch.cat([take(s_a, kept), new_s_b], dim=1)

    n_kept = n_a - r
    index_a = torch.empty_like(best_partner)
    index_a.scatter_(1, kept, torch.arange(n_kept, device=x.device).expand(batch, n_kept))
    index_a.scatter_(1, merged, n_kept + partner)
    index = torch.empty(batch, n, dtype=torch.long, device=x.device)
    index[:, ::2] = index_a
    index[:, 1::2] = n_kept + torch.arange(n_b, device=x.device)
    return tokens, new_sizes, index


def tome_steps(n: int, ratio: float, r: int | None = None) -> list[int]:
    """How many tokens each ToMe step merges to go from n to round(n / ratio) tokens, r at most per step."""
    if ratio < 1:
        raise CompressionError(f"ratio must be at least 1, got {ratio:g}")
    target = max(1, round(n / ratio))
    steps = []
    while n > target:
        step = min(n - target, (n + 1) // 2 if n > 1 else 0, r or n)
        if step <= 0:
            break
        steps.append(step)
        n -= step
    return steps


def tome_tokens(x: torch.Tensor, ratio: float, r: int | None = None, sizes: torch.Tensor | None = None,
                metric: torch.Tensor | None = None) -> Compressed:
    """Merge tokens by repeated bipartite soft matching until N / ratio are left (r per step at most)."""
    batch, n, _ = x.shape
    sizes = torch.ones(batch, n, device=x.device, dtype=x.dtype) if sizes is None else sizes
    source = torch.arange(n, device=x.device).expand(batch, n)
    for step in tome_steps(n, ratio, r):
        x, sizes, index = bipartite_merge(x, sizes, step, metric)
        source = index.gather(1, source)
        metric = None  # after the first merge the merged tokens are their own metric
    return Compressed(x, sizes, None, source)


def untome_tokens(y: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Give every input position the merged token it went into."""
    return y.gather(1, source[..., None].expand(-1, -1, y.shape[-1]))


# --------------------------------------------------------------------------- attention fidelity

def proportional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           sizes: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + log(size)) v: a merged token attracts as much attention as its members did."""
    bias = None if sizes is None else sizes.log()[:, None, :].to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def attention_fidelity(x: torch.Tensor, expanded: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity, per batch item, of the attention outputs for `queries` [B, Q, D] over the
    input tokens and over the compressed tokens expanded back to N positions.

    For pooling and ToMe the expansion repeats each token `size` times, so this equals proportional
    attention over the compressed tokens; a learned expander is judged by the same rule.
    """
    full = proportional_attention(queries, x, x)
    short = proportional_attention(queries, expanded, expanded)
    return F.cosine_similarity(full.float(), short.float(), dim=-1).mean(-1)
