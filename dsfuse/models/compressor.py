"""Token compressors: one entry point for every method, and the trainable ones as a model (kind "compressor").

`compress(x, grid, method, ratio)` runs a method on [B, N, D] tokens; `expand(...)` puts the result
back on the N input positions, which is how fidelity is measured and what the trainable methods
learn to do well (a reconstruction objective).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from dsfuse import choices
from dsfuse.nn.compress import (Compressed, CompressionError, Grid, PixelShuffleProjector, avg_pool_tokens,
                                check_grid, pool_kernel, tome_tokens, unpool_tokens, untome_tokens)
from dsfuse.nn.resampler import Resampler, ResamplerExpander


@dataclass
class CompressorConfig:
    method: choices.TrainableCompressMethod = "resampler"
    dim: int = 64  # token width (the tokenizer's latent channels)
    grid: tuple[int, int] = (16, 16)  # the input token grid it was trained on
    ratio: int = 4
    depth: int = 2  # resampler: cross-attention layers in the compressor and in the expander
    heads: int = 4
    width: int = 128  # resampler: the layers' width
    hidden: int = 0  # MLP width; 0: 4 * width (resampler), ratio * dim (pixel-shuffle)

    def __post_init__(self) -> None:
        self.grid = (int(self.grid[0]), int(self.grid[1]))  # a JSON list once loaded from a checkpoint
        choices.check(self.method, choices.TrainableCompressMethod, "a trained compressor's method")
        check_grid(self.num_tokens, self.grid, pool_kernel(self.ratio))  # both start from the ratio's k x k windows

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_queries(self) -> int:
        return self.num_tokens // self.ratio


class TokenCompressor(nn.Module):
    """A trained pixel-shuffle projector or resampler, with the expander it was trained with."""

    Config = CompressorConfig

    def __init__(self, config: CompressorConfig):
        super().__init__()
        self.config = config
        c = config
        if c.method == "pixel-shuffle":
            self.projector = PixelShuffleProjector(c.dim, pool_kernel(c.ratio), c.hidden or None)
        else:
            kernel = pool_kernel(c.ratio)
            self.resampler = Resampler(c.dim, c.grid, kernel, c.depth, c.heads, c.width, c.hidden or None)
            self.expander = ResamplerExpander(c.dim, c.grid, kernel, c.depth, c.heads, c.width, c.hidden or None)

    def check_input(self, x: torch.Tensor, grid: Grid) -> None:
        c = self.config
        if x.shape[-1] != c.dim or tuple(grid) != c.grid:
            raise CompressionError(f"this {c.method} compressor was trained on a {c.grid[0]}x{c.grid[1]} grid of "
                                   f"{c.dim}-d tokens, got {grid[0]}x{grid[1]} of {x.shape[-1]}-d", "model")

    def compress(self, x: torch.Tensor, grid: Grid) -> Compressed:
        self.check_input(x, grid)
        if self.config.method == "pixel-shuffle":
            return self.projector(x, grid)
        return self.resampler(x)

    def expand(self, y: torch.Tensor) -> torch.Tensor:
        if self.config.method == "pixel-shuffle":
            return self.projector.expand(y, self.config.grid)
        return self.expander(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compress and expand again: what the reconstruction objective trains."""
        return self.expand(self.compress(x, self.config.grid).tokens)


def compress(x: torch.Tensor, grid: Grid | None, method: str, ratio: float,
             model: TokenCompressor | None = None, tome_r: int | None = None) -> Compressed:
    """Run one method on [B, N, D] tokens; the trainable ones need their trained `model`."""
    if ratio < 1:
        raise CompressionError(f"ratio must be at least 1, got {ratio:g}")
    if method == "tome":
        return tome_tokens(x, ratio, r=tome_r)
    choices.check(method, choices.CompressMethod, "method")
    if grid is None:
        raise CompressionError(f"{method} needs the token grid: {x.shape[1]} tokens is not a square", "grid")
    check_grid(x.shape[1], grid, pool_kernel(ratio))
    if method == "pool":
        return avg_pool_tokens(x, grid, pool_kernel(ratio))
    if model is None or model.config.method != method:
        raise CompressionError(f"{method} needs a trained compressor checkpoint", "model")
    if model.config.ratio != ratio:
        raise CompressionError(f"the {method} checkpoint was trained for ratio {model.config.ratio}, not {ratio:g}",
                               "model")
    return model.compress(x, grid)


def expand(compressed: Compressed, grid: Grid | None, method: str, ratio: float,
           model: TokenCompressor | None = None) -> torch.Tensor:
    """Put compressed tokens back on the N input positions ([B, N, D])."""
    if method == "tome":
        return untome_tokens(compressed.tokens, compressed.source)
    if method == "pool":
        return unpool_tokens(compressed.tokens, grid, pool_kernel(ratio))
    return model.expand(compressed.tokens)


# --------------------------------------------------------------------------- trials: compress, time, judge

@dataclass
class Trial:
    """One method at one ratio on one token set: what came out, how long it took, how much survived."""

    method: str
    ratio: float
    tokens_in: int
    compressed: Compressed
    expanded: torch.Tensor  # [B, N, D]
    ms: float
    fidelity: float | None = None

    @property
    def tokens_out(self) -> int:
        return self.compressed.num_tokens


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_trial(x: torch.Tensor, grid: Grid | None, method: str, ratio: float, model: TokenCompressor | None = None,
              tome_r: int | None = None, repeats: int = 3) -> Trial:
    """Compress `x` [B, N, D] (timed: the median of `repeats` runs, in ms) and expand it back."""
    times = []
    for _ in range(max(1, repeats)):
        _synchronize(x.device)
        start = time.perf_counter()
        out = compress(x, grid, method, ratio, model, tome_r)
        _synchronize(x.device)
        times.append((time.perf_counter() - start) * 1000)
    return Trial(method, ratio, x.shape[1], out, expand(out, grid, method, ratio, model), statistics.median(times))


def attention_queries(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """A fixed set of queries: `count` of the input's own tokens [B, N, D], picked by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(x.shape[1], generator=generator)[:count].to(x.device)
    return x[:, picks]


@torch.no_grad()
def decode_latent_tokens(tokenizer: nn.Module, tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Latent tokens [B, N, C] on `grid` -> images, through the tokenizer's quantizer and decoder."""
    z = rearrange(tokens, "b (h w) c -> b c h w", h=grid[0], w=grid[1])
    return tokenizer.decode(tokenizer.quantize(z).z_q)
