"""Transformer-block throughput before and after each token-compression method, in one run.

The reference is the same TransformerBlock (dsfuse.nn.transformer) on the uncompressed tokens. A
method's throughput counts the input tokens it serves per second, the compression itself included:
B * N / (t_compress + t_block(N')). ToMe's row at r = N/2 is the one that halves the tokens.

    python bench/compress.py                      # 24x24 grid, 384-d, batch 8
    python bench/compress.py --grid 32 --dim 768 --heads 12
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from dsfuse.models.compressor import CompressorConfig, TokenCompressor
from dsfuse.nn.attention import AttentionConfig
from dsfuse.nn.compress import avg_pool_tokens, pool_kernel, tome_tokens
from dsfuse.nn.transformer import TransformerBlock


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def smooth_tokens(batch: int, side: int, dim: int, seed: int) -> torch.Tensor:
    """Image-like features: a smooth random field plus noise, so neighbours are similar as in a ViT."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, dim, max(2, side // 4), max(2, side // 4), generator=generator)
    field = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    field = field + 0.3 * torch.randn(batch, dim, side, side, generator=generator)
    return field.flatten(2).transpose(1, 2).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=24, help="tokens per side (N = grid^2)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady on a "
                                                                "shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    n = args.grid * args.grid
    grid = (args.grid, args.grid)
    x = smooth_tokens(args.batch, args.grid, args.dim, args.seed)
    block = TransformerBlock(args.dim, AttentionConfig(dim=args.dim, n_heads=args.heads, rope=False)).eval()
    resampler = TokenCompressor(CompressorConfig("resampler", args.dim, grid, 4, depth=1, heads=args.heads,
                                                 width=args.dim)).eval()
    shuffler = TokenCompressor(CompressorConfig("pixel-shuffle", args.dim, grid, 4)).eval()

    methods: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("tome r=N/2 (halves)", lambda: tome_tokens(x, 2, r=n // 2).tokens),
        ("pool 1x2", lambda: avg_pool_tokens(x, grid, pool_kernel(2)).tokens),
        ("tome x4 (2 steps)", lambda: tome_tokens(x, 4).tokens),
        ("pool 2x2", lambda: avg_pool_tokens(x, grid, pool_kernel(4)).tokens),
        ("pixel-shuffle 2x2 + MLP", lambda: shuffler.compress(x, grid).tokens),
        ("resampler x4 (1 layer)", lambda: resampler.compress(x, grid).tokens),
    ]
    console = Console(width=130)
    with torch.inference_mode():
        reference_ms = median_ms(lambda: block(x), args.repeats)
        rows = []
        for name, run in methods:
            tokens = run()
            compress_ms = median_ms(run, args.repeats)
            block_ms = median_ms(lambda: block(tokens), args.repeats)
            rows.append((name, tokens.shape[1], compress_ms, block_ms))

    table = Table(title=f"TransformerBlock throughput, {args.batch} x {n} tokens of {args.dim}-d, "
                        f"{args.heads} heads, {args.threads} thread(s), median of {args.repeats}",
                  title_justify="left")
    for col in ("method", "tokens", "compress ms", "block ms", "input tokens/s", "vs reference",
                "block only vs ref"):
        table.add_column(col, justify="left" if col == "method" else "right")
    reference_rate = args.batch * n / reference_ms * 1000
    table.add_row("reference: block on all tokens", str(n), "-", f"{reference_ms:.1f}", f"{reference_rate:,.0f}",
                  "1.00x", "1.00x")
    for name, tokens, compress_ms, block_ms in rows:
        rate = args.batch * n / (compress_ms + block_ms) * 1000
        table.add_row(name, str(tokens), f"{compress_ms:.2f}", f"{block_ms:.1f}", f"{rate:,.0f}",
                      f"{rate / reference_rate:.2f}x", f"{reference_ms / block_ms:.2f}x")
    console.print(table)
    tome = rows[0]
    speedup = reference_ms / (tome[2] + tome[3])
    verdict = "meets" if speedup >= 1.7 else "misses"
    console.print(f"ToMe at the r that halves the tokens: {speedup:.2f}x the reference block's throughput, "
                  f"merging included ({verdict} the 1.7x target).")


if __name__ == "__main__":
    main()
