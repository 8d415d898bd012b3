"""Sliding-window attention with attention sinks (DeepSeek-V4, as in gpt-oss).

Each query sees the last `window` keys up to itself, plus rows of its own a caller gives (V4's compressed
rows: all closed ones for HCA, the indexer's picks for CSA), and a learned per-head sink logit joins the
softmax as a key with no value, so a head may attend to nothing. Queries run in chunks: memory grows with chunk * (window + chunk + rows), never with the square of
the context. Keys double as values (V4's single shared key/value head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import einsum

# (first, end) query index -> the rows those queries see [B, C|1, N, D] and an additive bias [B, 1, C, N]
ExtraRows = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def sink_softmax(logits: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Softmax over the keys of logits [B, H, C, K] with one extra sink logit per head, the sink dropped."""
    sink = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    combined = torch.cat([logits, sink], dim=-1)
    combined = combined - combined.amax(-1, keepdim=True)
    return torch.softmax(combined, dim=-1)[..., :-1]


def window_allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """bool [C, K]: key position within the `window` positions ending at the query's (itself included)."""
    return (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)


def window_sink_attention(q: torch.Tensor, kv: torch.Tensor, q_start: int, kv_start: int, window: int,
                          sinks: torch.Tensor, scale: float, extra: ExtraRows | None = None, chunk: int = 256,
                          on_probs: Callable[[torch.Tensor, int], None] | None = None) -> torch.Tensor:
    """q [B, H, T, D] at positions q_start.., kv [B, 1, S, D] at kv_start..; `extra(first, end)` gives the
    further keys (= values) of queries first..end, per query or shared. `on_probs(probs, n_local)` sees
    each chunk's attention weights (local keys first). Returns [B, H, T, D]."""
    length = q.shape[2]
    outputs = []
    for first in range(0, length, chunk):
        end = min(length, first + chunk)
        lo = max(0, q_start + first - window + 1 - kv_start)
        hi = q_start + end - kv_start
        q_pos = torch.arange(q_start + first, q_start + end, device=q.device)
        k_pos = torch.arange(kv_start + lo, kv_start + hi, device=q.device)
        keys, queries = kv[:, :, lo:hi].float(), q[:, :, first:end].float()
        logits = torch.matmul(queries, keys.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~window_allowed(q_pos, k_pos, window), float("-inf"))
        rows = None
        if extra is not None:
            rows, bias = extra(first, end)
            rows = rows.float()
            logits = torch.cat([logits, einsum(queries, rows, "b h c d, b c n d -> b h c n") * scale + bias], -1)
        probs = sink_softmax(logits, sinks)
        if on_probs is not None:
            on_probs(probs, hi - lo)
        out = torch.matmul(probs[..., :hi - lo], keys)
        if rows is not None:
            out = out + einsum(probs[..., hi - lo:], rows, "b h c n, b c n d -> b h c d")
        outputs.append(out.to(q.dtype))
    return torch.cat(outputs, dim=2)
