"""DeepSeek-V4's compressed keys: gated pooling of every `rate` tokens into one row (HCA, and CSA with
overlapping windows), and CSA's lightning indexer that picks, per query, the top-k rows to attend to.

A compressed row pools one window of `rate` tokens: per channel a softmax over the window's tokens of
learned gate scores plus a per-slot position bias weighs their projected keys; then RMSNorm, and RoPE at the
window's first position. With `overlap` (CSA) each token projects two series: row w pools window w-1's first
series with window w's second, 2*rate tokens at stride rate. A row exists once its window has closed, so
query t may see rows w < (t + 1) // rate. With a `CompressorState` the pooling runs incrementally while
decoding: tokens of an unfinished window wait in the state, and so does the last window's first series.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from dsfuse.nn.interleaved_rope import InterleavedRope


@dataclass
class CompressorState:
    """What one compressor keeps between calls: tokens of the unfinished window, the overlap carry, its rows."""

    pending_kv: torch.Tensor | None = None  # [B, <rate, c*D]
    pending_gate: torch.Tensor | None = None
    carry_kv: torch.Tensor | None = None  # [B, 1, rate, D] the last window's first series (CSA)
    carry_gate: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # [B, N, D]

    @property
    def n_rows(self) -> int:
        return 0 if self.rows is None else self.rows.shape[1]

    def nbytes(self) -> int:
        tensors = (self.pending_kv, self.pending_gate, self.carry_kv, self.carry_gate, self.rows)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KVCompressor(nn.Module):
    """Pools every `rate` tokens of x [B, T, dim] into one row [head_dim] (see the module docstring)."""

    def __init__(self, dim: int, head_dim: int, rate: int, overlap: bool, rope: InterleavedRope, eps: float = 1e-6):
        super().__init__()
        if rate < 1:
            raise ValueError(f"the compression rate must be at least 1, got {rate}")
        series = 2 if overlap else 1
        self.rate, self.head_dim, self.overlap = rate, head_dim, overlap
        self.kv_proj = nn.Linear(dim, series * head_dim, bias=False)
        self.gate_proj = nn.Linear(dim, series * head_dim, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, series * head_dim))
        self.kv_norm = nn.RMSNorm(head_dim, eps=eps)
        self.rope = rope

    def forward(self, x: torch.Tensor, state: CompressorState | None = None) -> torch.Tensor:
        """Every row so far [B, N, head_dim]: those the state holds, then those x's closed windows add."""
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        first_position = state.n_rows * self.rate if state is not None else 0
        if state is not None and state.pending_kv is not None:
            kv, gate = torch.cat([state.pending_kv, kv], dim=1), torch.cat([state.pending_gate, gate], dim=1)
        usable = kv.shape[1] // self.rate * self.rate
        if state is not None:
            state.pending_kv, state.pending_gate = kv[:, usable:], gate[:, usable:]
        windows = usable // self.rate
        rows = x.new_zeros(x.shape[0], 0, self.head_dim)
        if windows:
            kv = rearrange(kv[:, :usable], "b (n m) c -> b n m c", m=self.rate)
            gate = rearrange(gate[:, :usable], "b (n m) c -> b n m c", m=self.rate) + self.position_bias
            if self.overlap:
                kv, gate = self._overlap(kv, gate, state)
            pooled = (kv * gate.float().softmax(dim=2).to(kv.dtype)).sum(dim=2)
            positions = first_position + self.rate * torch.arange(windows, device=x.device)
            rows = self.rope(self.kv_norm(pooled), positions)
        if state is None:
            return rows
        state.rows = rows if state.rows is None else torch.cat([state.rows, rows], dim=1)
        return state.rows

    def _overlap(self, kv: torch.Tensor, gate: torch.Tensor, state: CompressorState | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, n, m, 2D] -> [B, n, 2m, D]: window w-1's first series, then window w's second."""
        d = self.head_dim
        carry_kv, carry_gate = (state.carry_kv, state.carry_gate) if state is not None else (None, None)
        if carry_kv is None:  # nothing before the first window: weight 0
            carry_kv = kv.new_zeros(kv.shape[0], 1, self.rate, d)
            carry_gate = gate.new_full((gate.shape[0], 1, self.rate, d), float("-inf"))
        if state is not None:
            state.carry_kv, state.carry_gate = kv[:, -1:, :, :d], gate[:, -1:, :, :d]
        previous_kv = torch.cat([carry_kv, kv[:, :-1, :, :d]], dim=1)
        previous_gate = torch.cat([carry_gate, gate[:, :-1, :, :d]], dim=1)
        return torch.cat([previous_kv, kv[..., d:]], dim=2), torch.cat([previous_gate, gate[..., d:]], dim=2)


def visible_rows(positions: torch.Tensor, rate: int) -> torch.Tensor:
    """Rows whose window has closed by each position: query t sees rows w < (t + 1) // rate."""
    return (positions + 1) // rate


class LightningIndexer(KVCompressor):
    """CSA's lightning indexer: its own overlapping compressor at `head_dim` (the index keys), and per query
    `n_heads` small heads from the query latent; score_s = sum_h w_h * relu(q_h . key_s), w from the hidden
    state. `select` keeps the top-k visible rows; -1 marks picks with no visible row left."""

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, rate: int, top_k: int,
                 rope: InterleavedRope, eps: float = 1e-6):
        super().__init__(dim, head_dim, rate, overlap=True, rope=rope, eps=eps)
        self.n_heads, self.top_k = n_heads, top_k
        self.q_b_proj = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)

    def scores(self, keys: torch.Tensor, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor
               ) -> torch.Tensor:
        """Index scores [B, C, N] of queries (x and q_latent [B, C, ...] at `positions`) against keys [B, N, d]."""
        q = self.rope(rearrange(self.q_b_proj(q_latent), "b t (h d) -> b h t d", h=self.n_heads), positions)
        per_head = torch.matmul(q.float(), keys.float().transpose(-1, -2)[:, None]).relu_()  # [B, H, C, N], in place:
        weights = self.weights_proj(x).float() * (self.n_heads ** -0.5 * self.head_dim ** -0.5)  # at long contexts
        scores = per_head.mul_(rearrange(weights, "b t h -> b h t 1")).sum(dim=1)  # these are the big tensors
        future = torch.arange(keys.shape[1], device=x.device)[None, :] >= visible_rows(positions, self.rate)[:, None]
        return scores.masked_fill(future, float("-inf"))

    def select(self, keys: torch.Tensor, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor
               ) -> torch.Tensor:
        """The top-k visible rows per query [B, C, min(k, N)], -1 where fewer rows are visible."""
        picked = self.scores(keys, x, q_latent, positions).topk(min(self.top_k, keys.shape[1]), dim=-1).indices
        return picked.masked_fill(picked >= visible_rows(positions, self.rate)[:, None], -1)
