"""Benchmark: tokens/s of dsfuse's MoE layer (each dispatch) against the seed's naive per-expert loop
and st-moe-pytorch, at several expert counts and top-k, all measured in one run; plus the layer's
achieved rate (useful expert FLOPs / time) against a dense matmul chain doing the same FLOPs.

    python bench/moe.py                        # 4096 tokens, d 256, hidden 128, 8/64/256 experts, top-2/6
    python bench/moe.py --experts 64 --top-k 6 --rounds 9 --device cuda

Timings interleave the variants round by round and keep each one's best round, so a busy machine
slows them alike. Routed experts only (no shared experts), dropless, forward in inference mode.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's dsfuse, not an installed one

from dsfuse.nn.moe import DISPATCHES, MoE, MoEConfig, moe_naive


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device,
                     once: frozenset[str] = frozenset()) -> dict[str, float]:
    """Best seconds per call of each function, run round-robin after one warm-up call each; the slow
    ones named in `once` are timed in the first round only."""
    best = {name: float("inf") for name in fns}
    for name, fn in fns.items():
        if name not in once:
            fn()
    for round_ in range(rounds):
        for name, fn in fns.items():
            if name in once and round_ > 0:
                continue
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def st_moe_layer(dim: int, hidden: int, n_experts: int, top_k: int, device: torch.device):
    """st-moe-pytorch's MoE with experts of the same hidden width, capacity 1.25x of an even share."""
    try:
        from st_moe_pytorch import MoE as StMoE
    except ImportError:
        return None
    layer = StMoE(dim, num_experts=n_experts, gating_top_n=top_k, expert_hidden_mult=hidden * 3 / (2 * dim),
                  threshold_eval=0.0, capacity_factor_eval=1.25 * top_k)
    return layer.to(device).eval()


def dense_chains(n_rows: int, dim: int, hidden: int, device: torch.device, dtype: torch.dtype):
    """The same expert FLOPs (6 * d * hidden per row) without routing: a pure matmul chain, and SwiGLU."""
    x = torch.randn(n_rows, dim, device=device, dtype=dtype)
    w13 = torch.randn(dim, 2 * hidden, device=device, dtype=dtype) * dim**-0.5
    w2 = torch.randn(hidden, dim, device=device, dtype=dtype) * hidden**-0.5

    def matmuls() -> torch.Tensor:
        return (x @ w13)[:, :hidden] @ w2

    def swiglu() -> torch.Tensor:
        gate, up = (x @ w13).split(hidden, dim=-1)
        return (F.silu(gate) * up) @ w2

    return matmuls, swiglu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--experts", default="8,64,256")
    parser.add_argument("--top-k", default="2,6")
    parser.add_argument("--dispatch", default=",".join(DISPATCHES), help="dsfuse dispatch variants to time")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); 1 keeps a shared machine's timings stable")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 150))
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    dispatches = args.dispatch.split(",")

    speed = Table(title=f"MoE layer forward: tokens/s, {args.tokens} tokens, d {args.dim}, expert hidden "
                        f"{args.hidden}, {device.type} {args.dtype}, {torch.get_num_threads()} thread(s), "
                        f"best of {args.rounds} interleaved rounds")
    for col in ["experts", "k", *dispatches, "naive (seed)", "naive fused", "st-moe", "best / naive",
                "best / naive fused", "max |diff|", "rate / matmuls", "rate / SwiGLU"]:
        speed.add_column(col, justify="right")
    notes = []
    with torch.inference_mode():
        for n_experts in map(int, args.experts.split(",")):
            for top_k in map(int, args.top_k.split(",")):
                torch.manual_seed(0)
                layer = MoE(MoEConfig(dim=args.dim, n_experts=n_experts, top_k=top_k, n_shared=0,
                                      expert_hidden=args.hidden)).to(device, dtype).eval()
                seed_experts = layer.experts.as_modules()  # the seed's experts: one SwiGLU module each
                fused_experts = [partial(layer.experts.expert, e) for e in range(n_experts)]
                fns: dict[str, Callable[[], torch.Tensor]] = {}
                for d in dispatches:
                    fns[d] = partial(run_layer, layer, d, x)
                fns["naive"] = partial(run_naive, layer, seed_experts, x)
                fns["naive fused"] = partial(run_naive, layer, fused_experts, x)
                st = st_moe_layer(args.dim, args.hidden, n_experts, top_k, device) if top_k >= 2 else None
                if st is not None:
                    st = st.to(dtype)
                    fns["st-moe"] = lambda st=st: st(x[None]).outputs
                fns["matmuls"], fns["swiglu"] = dense_chains(args.tokens * top_k, args.dim, args.hidden,
                                                             device, dtype)
                seconds = time_interleaved(fns, args.rounds, device, once=frozenset({"st-moe"}))

                reference = fns["naive"]()
                diff = max((fns[d]() - reference).abs().max().item() for d in dispatches)
                best = min(dispatches, key=lambda d: seconds[d])
                tok_s = {name: args.tokens / s for name, s in seconds.items()}
                speed.add_row(str(n_experts), str(top_k), *[f"{tok_s[d]:,.0f}" for d in dispatches],
                              f"{tok_s['naive']:,.0f}", f"{tok_s['naive fused']:,.0f}",
                              f"{tok_s['st-moe']:,.0f}" if "st-moe" in tok_s else "-",
                              f"{seconds['naive'] / seconds[best]:.2f}x ({best})",
                              f"{seconds['naive fused'] / seconds[best]:.2f}x", f"{diff:.1e}",
                              f"{seconds['matmuls'] / seconds[best]:.2f}", f"{seconds['swiglu'] / seconds[best]:.2f}")
                if "st-moe" not in tok_s:
                    notes.append(f"st-moe-pytorch needs top-k >= 2: skipped at top-{top_k}" if top_k < 2 else
                                 "st-moe-pytorch not installed (pip install st-moe-pytorch): skipped")
    console.print(speed)
    console.print("naive (seed): per expert a boolean mask, the expert as a SwiGLU module (3 matmuls); naive fused: "
                  "the same loop on dsfuse's fused gate/up weights. max |diff|: dsfuse vs naive (seed) outputs. "
                  "rate = useful expert FLOPs (tokens x k x 6 x d x hidden) / time of the whole layer, routing "
                  "included; matmuls / SwiGLU: the same FLOPs as one dense chain over tokens x k rows. st-moe-pytorch "
                  "(GShard-style dense dispatch tensors, capacity 1.25 x an even share) is timed once, it is slow.",
                  markup=False)
    for note in dict.fromkeys(notes):
        console.print(f"note: {note}")


def run_layer(layer: MoE, dispatch: str, x: torch.Tensor) -> torch.Tensor:
    layer.cfg.dispatch = dispatch
    return layer(x)


def run_naive(layer: MoE, experts, x: torch.Tensor) -> torch.Tensor:
    """The seed's loop after the same router."""
    routing = layer.router(x)
    return moe_naive(x, routing.expert_ids, routing.weights, experts)


if __name__ == "__main__":
    main()
