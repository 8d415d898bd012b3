"""Benchmark: tokens/s (causal prefill and cached decoding) and KV-cache bytes per token of MHA, GQA,
MQA and MLA at DeepSeek-V2's head dimensions, against torch.nn.MultiheadAttention measured in the same
run; the cache sizes are measured from a real KVCache and checked against DeepSeek-V2's Table 1.

    python bench/attention.py                       # 8 heads of DeepSeek-V2's shape (d_model 1024)
    python bench/attention.py --heads 128 --device cuda   # the full DeepSeek-V2 layer
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's dsfuse, not an installed one

from dsfuse.nn.attention import AttentionConfig, KVCache, build_attention, kv_cache_bytes_per_token

# DeepSeek-V2 (arXiv 2405.04434, section 2.1 and appendix): per-head width 128, KV latent 4 * 128,
# query latent 1536, decoupled RoPE width 64, 128 heads, 60 layers.
HEAD_DIM, KV_LORA, Q_LORA, ROPE_DIM, LAYERS, FULL_HEADS = 128, 512, 1536, 64, 60, 128


def configs(heads: int) -> dict[str, AttentionConfig]:
    dim = heads * HEAD_DIM
    return {
        "MHA": AttentionConfig(dim=dim, n_heads=heads, kind="mha", head_dim=HEAD_DIM),
        f"GQA ({max(heads // 4, 1)} groups)": AttentionConfig(dim=dim, n_heads=heads, kind="gqa",
                                                              n_kv_heads=max(heads // 4, 1), head_dim=HEAD_DIM),
        "MQA": AttentionConfig(dim=dim, n_heads=heads, kind="mqa", head_dim=HEAD_DIM),
        "MLA": AttentionConfig(dim=dim, n_heads=heads, kind="mla", q_lora_rank=Q_LORA, kv_lora_rank=KV_LORA,
                               qk_nope_head_dim=HEAD_DIM, qk_rope_head_dim=ROPE_DIM, v_head_dim=HEAD_DIM),
    }


def paper_elements_per_token(name: str, cfg: AttentionConfig) -> float:
    """DeepSeek-V2 Table 1, per layer: 2 n_h d_h (MHA), 2 n_g d_h (GQA), 2 d_h (MQA), (d_c + d_R) ~ 9/2 d_h (MLA)."""
    if cfg.kind == "mla":
        return KV_LORA + ROPE_DIM
    groups = {"mha": cfg.n_heads, "gqa": cfg.kv_heads, "mqa": 1}[cfg.kind]
    return 2 * groups * HEAD_DIM


def best_seconds(fn: Callable[[], object], rounds: int, device: torch.device) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def decode(module: torch.nn.Module, prompt: torch.Tensor, steps: int, device: torch.device) -> tuple[KVCache, float]:
    """Prefill the prompt into a cache, then feed `steps` tokens one at a time; (cache, seconds of those steps)."""
    cache = KVCache()
    module(prompt, causal=True, cache=cache)
    token = prompt[:, -1:]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        token = module(token, causal=True, cache=cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return cache, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=8, help=f"query heads (DeepSeek-V2 has {FULL_HEADS})")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="prompt length")
    parser.add_argument("--decode", type=int, default=32, help="tokens decoded one at a time after the prompt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    console = Console(width=max(Console().width, 130))
    torch.manual_seed(0)
    dim = args.heads * HEAD_DIM
    x = torch.randn(args.batch, args.seq, dim, device=device)
    prefill_tokens, decode_tokens = args.batch * args.seq, args.batch * args.decode

    rows, seconds = [], {}
    with torch.inference_mode():
        reference = torch.nn.MultiheadAttention(dim, args.heads, bias=False, batch_first=True).to(device).eval()
        causal = torch.nn.Transformer.generate_square_subsequent_mask(args.seq, device=device)
        seconds["torch MHA"] = best_seconds(lambda: reference(x, x, x, attn_mask=causal, is_causal=True,
                                                              need_weights=False), args.rounds, device)
        rows.append(("torch.nn.MultiheadAttention (reference)", "torch MHA", None, None, None))
        for name, cfg in configs(args.heads).items():
            module = build_attention(cfg).to(device).eval()
            seconds[name] = best_seconds(lambda: module(x, causal=True), args.rounds, device)
            cache, decode_s = decode(module, x, args.decode, device)
            measured = cache.nbytes() / (args.batch * cache.length) / 2  # fp32 tensors, reported as bf16/fp16
            rows.append((name, name, cfg, measured, decode_s))

    full = configs(FULL_HEADS)
    table = Table(title=f"attention at DeepSeek-V2 head sizes: {args.heads} heads, d_model {dim}, batch {args.batch}, "
                        f"prompt {args.seq}, {device.type}, {torch.get_num_threads()} thread(s), best of {args.rounds}")
    for col in ["attention", "prefill tok/s", "vs torch MHA", "decode tok/s", "KV bytes/token/layer (measured)",
                "paper formula", "vs MHA", f"DeepSeek-V2 full: KB/token ({LAYERS} layers)"]:
        table.add_column(col, justify="right")
    mha_bytes = kv_cache_bytes_per_token(configs(args.heads)["MHA"])
    for label, key, cfg, measured, decode_s in rows:
        prefill = f"{prefill_tokens / seconds[key]:,.0f}"
        speed = f"{seconds['torch MHA'] / seconds[key]:.2f}x"
        if cfg is None:
            table.add_row(label, prefill, "1.00x", "-", "-", "-", "-", "-")
            continue
        formula = paper_elements_per_token(label, cfg) * 2
        assert measured == kv_cache_bytes_per_token(cfg) == formula, (label, measured, formula)
        full_cfg = next(c for n, c in full.items() if n.split()[0] == label.split()[0])
        table.add_row(label, prefill, speed, f"{decode_tokens / decode_s:,.0f}", f"{measured:,.0f}",
                      f"{formula:,.0f} ok", f"{measured / mha_bytes:.3f}",
                      f"{kv_cache_bytes_per_token(full_cfg, n_layers=LAYERS) / 1024:,.1f}")
    console.print(table)
    console.print("KV bytes at 2 bytes per element (bf16/fp16). Paper formula (DeepSeek-V2 Table 1, per layer): "
                  "MHA 2*n_h*d_h, GQA 2*n_g*d_h, MQA 2*d_h, MLA d_c + d_R = 512 + 64 = 4.5*d_h elements. "
                  "Decode: one token at a time after the prompt, MLA on its weight-absorbed path.", markup=False)


if __name__ == "__main__":
    main()
