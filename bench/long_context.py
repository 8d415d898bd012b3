"""Benchmark: prefill time and KV-cache bytes per token as the context grows (1k, 4k, 16k, 64k tokens) for
DeepSeek-V4's hybrid attention (sliding window + CSA/HCA, nn/v4_attention), MLA, GQA and full MHA, each a
stack of the same number of attention layers at a small width, with its decode cache filled by the prefill.
Prints the growth exponent of each (the slope of log time and log cache size against log context) and the
ratios to V4 at the longest context. A point predicted to take longer than --budget seconds is not run but
extrapolated from the last two measured points, and labelled so.

    python bench/long_context.py                      # 4 layers, width 256, up to 64k tokens
    python bench/long_context.py --lengths 1024 4096 --budget 30
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's dsfuse, not an installed one

from dsfuse.nn.attention import AttentionConfig, KVCache, build_attention
from dsfuse.nn.v4_attention import V4Attention, V4AttentionConfig, V4Cache

HEADS, HEAD_DIM = 8, 32  # width 256


def v4_schedule(layers: int) -> list[str]:
    """DeepSeek-V4's default layer schedule (transformers' DeepseekV4Config): two HCA layers, then CSA and HCA
    alternating."""
    rest = ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(layers - 2)]
    return ["heavily_compressed_attention"] * min(layers, 2) + rest


def stacks(layers: int) -> dict[str, tuple[list[torch.nn.Module], type]]:
    """name -> (attention layers, cache class). V4 at the paper's rates (CSA m=4, HCA m'=128, a 128-token
    window, top-128 rows per query); MLA with a 4*d_h latent as DeepSeek-V2; GQA with 2 key/value heads."""
    dim = HEADS * HEAD_DIM
    v4 = [V4Attention(V4AttentionConfig(dim=dim, n_heads=HEADS, head_dim=HEAD_DIM, rope_dim=8, q_lora_rank=128,
                                        o_groups=2, o_lora_rank=64, window=128, layer_type=kind,
                                        compress_rate=4 if kind == "compressed_sparse_attention" else 128,
                                        index_heads=4, index_head_dim=32, index_topk=128))
          for kind in v4_schedule(layers)]
    plain = {
        "MLA": AttentionConfig(dim=dim, n_heads=HEADS, kind="mla", q_lora_rank=128, kv_lora_rank=4 * HEAD_DIM,
                               qk_nope_head_dim=HEAD_DIM, qk_rope_head_dim=HEAD_DIM // 2, v_head_dim=HEAD_DIM),
        "GQA (2 kv heads)": AttentionConfig(dim=dim, n_heads=HEADS, kind="gqa", n_kv_heads=2, head_dim=HEAD_DIM),
        "MHA": AttentionConfig(dim=dim, n_heads=HEADS, kind="mha", head_dim=HEAD_DIM),
    }
    short = {"sliding_attention": "SWA", "compressed_sparse_attention": "CSA", "heavily_compressed_attention": "HCA"}
    built = {f"V4 hybrid ({'/'.join(short[k] for k in v4_schedule(layers))})": (v4, V4Cache)}
    built.update({name: ([build_attention(cfg) for _ in range(layers)], KVCache) for name, cfg in plain.items()})
    return built


@dataclass
class Point:
    seconds: float
    cache_bytes: int
    measured: bool


def prefill(layers: list[torch.nn.Module], cache_class: type, x: torch.Tensor) -> Point:
    """One causal prefill of x through the stack (residual x + attn(x)), each layer filling its cache."""
    caches = [cache_class() for _ in layers]
    start = time.perf_counter()
    for layer, cache in zip(layers, caches):
        x = x + layer(x, causal=True, cache=cache)
    return Point(time.perf_counter() - start, sum(cache.nbytes() for cache in caches), True)


def exponent(lengths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(length)."""
    xs, ys = [math.log(n) for n in lengths], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds a point may be predicted to take before it is extrapolated instead")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 140))
    torch.manual_seed(0)
    lengths = sorted(args.lengths)
    results: dict[str, list[Point]] = {}
    with torch.inference_mode():
        for name, (layers, cache_class) in stacks(args.layers).items():
            for layer in layers:
                layer.eval()
            prefill(layers, cache_class, torch.randn(1, 300, HEADS * HEAD_DIM))  # warm-up: lazy setup, allocator
            points: list[Point] = []
            for n in lengths:
                if len(points) >= 2:
                    grow = exponent(lengths[len(points) - 2:len(points)], [p.seconds for p in points[-2:]])
                    predicted = points[-1].seconds * (n / lengths[len(points) - 1]) ** grow
                    if predicted > args.budget:
                        size = exponent(lengths[len(points) - 2:len(points)], [p.cache_bytes for p in points[-2:]])
                        points.append(Point(predicted, round(points[-1].cache_bytes * (n / lengths[len(points) - 1])
                                                             ** size), False))
                        console.print(f"{name} at {n}: predicted {predicted:.0f} s > budget, extrapolated")
                        continue
                x = torch.randn(1, n, HEADS * HEAD_DIM)
                points.append(prefill(layers, cache_class, x))
                console.print(f"{name} at {n}: {points[-1].seconds:.2f} s, {points[-1].cache_bytes / n:,.0f} B/token")
            results[name] = points

    table = Table(title=f"long-context prefill: {args.layers} attention layers, width {HEADS * HEAD_DIM} "
                        f"({HEADS} heads x {HEAD_DIM}), batch 1, fp32 cache, {torch.get_num_threads()} thread(s)")
    table.add_column("attention")
    for n in lengths:
        table.add_column(f"{n / 1024:g}k: s | KV B/token", justify="right")
    table.add_column("time exponent", justify="right")
    table.add_column("cache exponent", justify="right")
    for name, points in results.items():
        cells = [f"{p.seconds:,.2f} | {p.cache_bytes / n:,.0f}" + ("" if p.measured else " (extrap.)")
                 for n, p in zip(lengths, points)]
        table.add_row(name, *cells, f"{exponent(lengths, [p.seconds for p in points]):.2f}",
                      f"{exponent(lengths, [p.cache_bytes for p in points]):.2f}")
    console.print(table)
    v4_name = next(iter(results))
    v4 = results[v4_name][-1]
    longest = lengths[-1]
    for name, points in results.items():
        if name == v4_name:
            continue
        other = points[-1]
        note = "" if other.measured and v4.measured else " (extrapolated)"
        console.print(f"at {longest / 1024:g}k tokens, {name} / V4: prefill time {other.seconds / v4.seconds:.1f}x, "
                      f"KV cache {other.cache_bytes / v4.cache_bytes:.1f}x{note}", markup=False)


if __name__ == "__main__":
    main()
