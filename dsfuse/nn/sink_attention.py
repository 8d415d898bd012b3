"""Sliding-window attention with attention sinks (DeepSeek-V4, as in gpt-oss).

Each query sees the last `window` keys up to itself, plus any further rows a caller allows (V4's compressed
rows), and a learned per-head sink logit joins the softmax as a key with no value, so a head may attend to
nothing. Queries run in chunks: memory grows with chunk * (window + chunk + rows), never with the square of
the context. Keys double as values (V4's single shared key/value head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RowBias = Callable[[int, int], torch.Tensor]  # (first, end) query index -> additive bias [B, 1, C, N]


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
                          sinks: torch.Tensor, scale: float, rows: torch.Tensor | None = None,
                          row_bias: RowBias | None = None, chunk: int = 256,
                          on_probs: Callable[[torch.Tensor, int], None] | None = None) -> torch.Tensor:
    """q [B, H, T, D] at positions q_start.., kv [B, 1, S, D] at kv_start..; rows [B, 1, N, D] extra keys
    (= values) that `row_bias(first, end)` opens per query. `on_probs(probs, n_local)` sees each chunk's
    attention weights (local keys first). Returns [B, H, T, D]."""
    batch, _, length, _ = q.shape
    outputs = []
    for first in range(0, length, chunk):
        end = min(length, first + chunk)
        lo = max(0, q_start + first - window + 1 - kv_start)
        hi = q_start + end - kv_start
        q_pos = torch.arange(q_start + first, q_start + end, device=q.device)
        k_pos = torch.arange(kv_start + lo, kv_start + hi, device=q.device)
        keys = kv[:, :, lo:hi]
        bias = torch.zeros(q_pos.shape[0], k_pos.shape[0], device=q.device).masked_fill(
            ~window_allowed(q_pos, k_pos, window), float("-inf")).expand(batch, 1, -1, -1)
        if rows is not None and rows.shape[2]:
            keys = torch.cat([keys, rows], dim=2)
            bias = torch.cat([bias, row_bias(first, end)], dim=-1)
        logits = torch.matmul(q[:, :, first:end].float(), keys.float().transpose(-1, -2)) * scale + bias
        probs = sink_softmax(logits, sinks)
        if on_probs is not None:
            on_probs(probs, hi - lo)
        outputs.append(torch.matmul(probs.to(keys.dtype), keys))
    return torch.cat(outputs, dim=2)
