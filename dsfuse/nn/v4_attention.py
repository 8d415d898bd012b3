"""DeepSeek-V4's attention: one layer is sliding-window attention with sinks, plus compressed rows for CSA
(compressed sparse: overlapping windows at rate m, the lightning indexer's top-k rows per query) or HCA
(heavily compressed: every non-overlapping row at a much higher rate m').

Projections as V4 has them: a low-rank query (q_a -> RMSNorm -> q_b) with a weightless RMSNorm per head;
one shared key/value head (keys are the values, RMSNorm'd); RoPE on the trailing `rope_dim` channels only
(interleaved), undone on the output at the query's position; a grouped low-rank output projection (heads in
`o_groups` groups, each projected to `o_lora_rank`, then mixed to `dim`).

    attn = V4Attention(V4AttentionConfig(dim=64, layer_type="compressed_sparse_attention", ...))
    y = attn(x)                              # x [B, T, dim], always causal
    cache = V4Cache(); y = attn(x, cache=cache); y1 = attn(x1, cache=cache)   # decoding
After a CSA forward, `last_selection` [B, T, k] holds the rows the indexer picked per query (-1: none);
after any forward, `last_outside_share` is the share of the attention mass (sinks aside) that went to
compressed rows, outside the local window.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from dsfuse import choices
from dsfuse.nn.attention import RopeScaling
from dsfuse.nn.interleaved_rope import InterleavedRope
from dsfuse.nn.kv_compression import CompressorState, KVCompressor, LightningIndexer, visible_rows
from dsfuse.nn.sink_attention import ExtraRows, window_sink_attention


@dataclass
class V4AttentionConfig:
    dim: int = 64
    n_heads: int = 4
    head_dim: int = 32
    rope_dim: int = 8  # trailing channels of each head that rotate
    q_lora_rank: int = 32
    o_groups: int = 2
    o_lora_rank: int = 16
    window: int = 16  # sliding window, the query included
    layer_type: choices.V4Attention = "sliding_attention"
    compress_rate: int = 4  # m for CSA, m' for HCA; unused by sliding layers
    index_heads: int = 4
    index_head_dim: int = 16
    index_topk: int = 8
    rope_theta: float = 10000.0  # sliding layers
    compress_rope_theta: float = 160000.0  # CSA/HCA layers and their compressors
    rope_scaling: RopeScaling | None = None  # context extension of the sliding layers' RoPE
    compress_rope_scaling: RopeScaling | None = None  # ... and of the CSA/HCA layers' (YaRN in V4's releases)
    norm_eps: float = 1e-6
    chunk: int = 256  # queries per attention chunk (memory, not results)

    def __post_init__(self) -> None:
        choices.check(self.layer_type, choices.V4Attention, "layer type")
        if self.rope_dim % 2 or not 0 < self.rope_dim <= min(self.head_dim, self.index_head_dim):
            raise ValueError(f"rope_dim must be even and at most head_dim and index_head_dim, got {self.rope_dim}")
        if self.n_heads % self.o_groups:
            raise ValueError(f"o_groups {self.o_groups} must divide n_heads {self.n_heads}")
        if self.window < 1 or self.compress_rate < 1:
            raise ValueError("the window and the compression rate must be at least 1")


class GroupedLinear(nn.Module):
    """Block-diagonal linear: x [..., groups, in_features] -> [..., groups, out_features], one matrix a group
    (stored stacked, as one [groups * out, in] weight)."""

    def __init__(self, in_features: int, out_features: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups * out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return einsum(x, self.weight.view(self.groups, -1, x.shape[-1]), "... g i, g o i -> ... g o")


@dataclass
class V4Cache:
    """Decoding state of one V4 attention layer: the last window-1 keys, and each compressor's state."""

    length: int = 0
    window_kv: torch.Tensor | None = None  # [B, 1, <window, D]
    compressor: CompressorState = field(default_factory=CompressorState)
    indexer: CompressorState = field(default_factory=CompressorState)

    def extend(self, kv: torch.Tensor, window: int) -> tuple[torch.Tensor, int]:
        """Keys to attend [B, 1, S, D] (the kept window, then kv) and the position of the first; keeps the last
        window-1 for the next call."""
        keys = kv if self.window_kv is None else torch.cat([self.window_kv, kv], dim=2)
        start = self.length - (0 if self.window_kv is None else self.window_kv.shape[2])
        self.window_kv = keys[:, :, keys.shape[2] - min(window - 1, keys.shape[2]):]
        self.length += kv.shape[2]
        return keys, start

    def fork(self, length: int) -> V4Cache:
        """A cache that grows on its own: empty (length 0) or a copy of this one (its length). The compressors'
        state cannot be rewound to a point between (tokens of closed windows are gone)."""
        if length == 0:
            return V4Cache()
        if length != self.length:
            raise ValueError(f"a DeepSeek-V4 cache cannot be cut back from {self.length} tokens to {length}")
        return replace(self, compressor=replace(self.compressor), indexer=replace(self.indexer))

    def nbytes(self) -> int:
        window = 0 if self.window_kv is None else self.window_kv.numel() * self.window_kv.element_size()
        return window + self.compressor.nbytes() + self.indexer.nbytes()


class V4Attention(nn.Module):
    """One DeepSeek-V4 attention layer of `cfg.layer_type` (see the module docstring)."""

    def __init__(self, cfg: V4AttentionConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.n_heads, cfg.head_dim
        self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_a_norm = nn.RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * d, bias=False)
        self.kv_proj = nn.Linear(cfg.dim, d, bias=False)
        self.kv_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.o_a_proj = GroupedLinear(h * d // cfg.o_groups, cfg.o_lora_rank, cfg.o_groups)
        self.o_b_proj = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, bias=False)
        self.sinks = nn.Parameter(torch.zeros(h))
        sliding = cfg.layer_type == "sliding_attention"
        self.rope = (InterleavedRope(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling) if sliding else
                     InterleavedRope(cfg.rope_dim, cfg.compress_rope_theta, cfg.compress_rope_scaling))
        self.compressor = self.indexer = None
        if not sliding:
            sparse = cfg.layer_type == "compressed_sparse_attention"
            self.compressor = KVCompressor(cfg.dim, d, cfg.compress_rate, sparse, self.rope, cfg.norm_eps)
            if sparse:
                self.indexer = LightningIndexer(cfg.dim, cfg.q_lora_rank, cfg.index_heads, cfg.index_head_dim,
                                                cfg.compress_rate, cfg.index_topk, self.rope, cfg.norm_eps)
        self.last_selection: torch.Tensor | None = None
        self._mass = torch.zeros(2)  # the last forward's attention mass [outside the window, all]

    @property
    def last_outside_share(self) -> float:
        """The share of the last forward's attention mass (sinks aside) on compressed rows (read on demand:
        no device sync in the forward)."""
        return float(self._mass[0] / self._mass[1].clamp_min(1e-12))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = True,
                cache: V4Cache | None = None) -> torch.Tensor:
        if mask is not None or not causal:
            raise ValueError("DeepSeek-V4 attention is causal and takes no padding mask")
        cfg = self.cfg
        offset = cache.length if cache is not None else 0
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = rearrange(self.q_b_proj(q_latent), "b t (h d) -> b h t d", h=cfg.n_heads)
        q = self.rope(F.rms_norm(q, (cfg.head_dim,), eps=cfg.norm_eps), positions)
        kv = self.rope(self.kv_norm(self.kv_proj(x))[:, None], positions)
        kv, kv_start = cache.extend(kv, cfg.window) if cache is not None else (kv, offset)
        extra, picks = None, []
        if self.compressor is not None:
            rows = self.compressor(x, cache.compressor if cache is not None else None)
            extra = self._closed_rows(rows, positions)
            if self.indexer is not None:
                keys = self.indexer(x, cache.indexer if cache is not None else None)
                extra = self._picked_rows(rows, keys, x, q_latent, positions, picks)
        mass = self._mass = torch.zeros(2, device=x.device)

        def tally(probs: torch.Tensor, n_local: int) -> None:
            mass.add_(torch.stack([probs[..., n_local:].sum(), probs.sum()]).detach())
        out = window_sink_attention(q, kv, offset, kv_start, cfg.window, self.sinks, cfg.head_dim ** -0.5, extra,
                                    cfg.chunk, tally)
        if picks:
            self.last_selection = torch.cat(picks, dim=1)
        out = rearrange(self.rope(out, positions, inverse=True), "b (g h) t d -> b t g (h d)", g=cfg.o_groups)
        return self.o_b_proj(self.o_a_proj(out).flatten(2))

    def _closed_rows(self, rows: torch.Tensor, positions: torch.Tensor) -> ExtraRows:
        """HCA: every row whose window has closed, for the queries first..end."""
        def extra(first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
            closed = torch.arange(rows.shape[1], device=rows.device)[None, :] < visible_rows(
                positions[first:end], self.cfg.compress_rate)[:, None]
            return rows[:, None], _additive(closed).expand(rows.shape[0], 1, -1, -1)
        return extra

    def _picked_rows(self, rows: torch.Tensor, keys: torch.Tensor, x: torch.Tensor, q_latent: torch.Tensor,
                     positions: torch.Tensor, picks: list[torch.Tensor]) -> ExtraRows:
        """CSA: only the rows the indexer picks for each query first..end, gathered [B, C, k, D]; the picks
        go to `picks`, a chunk at a time."""
        def extra(first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
            picked = self.indexer.select(keys, x[:, first:end], q_latent[:, first:end], positions[first:end])
            picks.append(picked)
            index = picked.clamp(min=0)
            gathered = torch.gather(rows[:, None].expand(-1, index.shape[1], -1, -1), 2,
                                    index[..., None].expand(-1, -1, -1, rows.shape[-1]))
            return gathered, _additive(picked >= 0)[:, None]
        return extra


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf"))
