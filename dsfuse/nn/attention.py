"""Attention on F.scaled_dot_product_attention: MHA, GQA, MQA and DeepSeek-V2's MLA, with RoPE (plain,
YaRN or Llama-3 scaled), optional q/k RMSNorm and qkv bias, causal and padding masks, a KV cache for
step-by-step decoding, and cross-attention.

Every self-attention module has the same call:
    forward(x [B, T, D], mask: bool [B, T] (True = real token) | None, causal=False, cache=None) -> [B, T, D]
With a cache, `x` holds only the new tokens; their positions continue from `cache.length`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")
QK_NORMS = ("none", "head", "all")


@dataclass
class RopeScaling:
    """Context-extension scaling of RoPE frequencies, as in Hugging Face configs' `rope_scaling`.

    yarn (DeepSeek-V2/V3): frequencies blended between interpolated and original along a ramp, and
    cos/sin scaled by mscale; MLA also scales its softmax by mscale(factor, mscale_all_dim)^2.
    llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    linear: every frequency divided by `factor`.
    """

    kind: str  # yarn | llama3 | linear
    factor: float
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    attention_factor: float | None = None  # yarn: the cos/sin factor when the config fixes it (V4 uses 1)

    def __post_init__(self) -> None:
        if self.kind not in ("yarn", "llama3", "linear"):
            raise ValueError(f"rope scaling must be yarn, llama3 or linear, got {self.kind!r}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (1 without extension)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None
                     ) -> tuple[torch.Tensor, float]:
    """The inverse frequencies [head_dim / 2] and the factor cos/sin are multiplied by."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq, 1.0
    if scaling.kind == "linear":
        return inv_freq / scaling.factor, 1.0
    if scaling.kind == "llama3":
        wavelength = 2 * math.pi / inv_freq
        low_wave = scaling.original_max_position / scaling.low_freq_factor
        high_wave = scaling.original_max_position / scaling.high_freq_factor
        smooth = ((scaling.original_max_position / wavelength - scaling.low_freq_factor)
                  / (scaling.high_freq_factor - scaling.low_freq_factor))
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        scaled = torch.where(wavelength > low_wave, inv_freq / scaling.factor, inv_freq)
        middle = (wavelength <= low_wave) & (wavelength >= high_wave)
        return torch.where(middle, blended, scaled), 1.0

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(scaling.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    inv_freq = inv_freq / scaling.factor * ramp + inv_freq * (1 - ramp)
    if scaling.attention_factor is not None:
        return inv_freq, scaling.attention_factor
    attention_factor = (yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
                        if scaling.mscale and scaling.mscale_all_dim else yarn_mscale(scaling.factor))
    return inv_freq, attention_factor


@dataclass
class AttentionConfig:
    dim: int = 256
    n_heads: int = 8
    kind: str = "mha"  # mha | gqa | mqa | mla
    n_kv_heads: int | None = None  # gqa: key/value heads (divides n_heads); mha: n_heads; mqa: 1
    head_dim: int | None = None  # default dim // n_heads (mha/gqa/mqa)
    rope: bool = True
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    dropout: float = 0.0
    bias: bool = False
    qkv_bias: bool = False  # bias on the q/k/v projections only (Qwen2)
    qk_norm: str = "none"  # RMSNorm on queries and keys before RoPE: per head (Qwen3) or all heads (OLMoE)
    norm_eps: float = 1e-6  # the q/k norms' and MLA's latent norms' epsilon
    # MLA (DeepSeek-V2 section 2.1); q_lora_rank 0 projects queries directly.
    q_lora_rank: int = 0
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind must be one of {', '.join(ATTENTION_KINDS)}, got {self.kind!r}")
        if self.kind != "mla" and self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads {self.kv_heads} must divide n_heads {self.n_heads}")
        if self.kind == "mla" and self.rope and self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even for RoPE")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {', '.join(QK_NORMS)}, got {self.qk_norm!r}")

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used: n_heads for MHA (and MLA), 1 for MQA, n_kv_heads for GQA."""
        if self.kind == "mqa":
            return 1
        if self.kind == "gqa":
            if self.n_kv_heads is None:
                raise ValueError("gqa needs n_kv_heads")
            return self.n_kv_heads
        return self.n_heads

    @property
    def qk_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads


def kv_cache_bytes_per_token(cfg: AttentionConfig, dtype_bytes: int = 2, n_layers: int = 1) -> int:
    """Bytes the KV cache grows by per token: 2 * kv_heads * head_dim for MHA/GQA/MQA, and the
    compressed latent plus the shared RoPE key, (kv_lora_rank + qk_rope_head_dim), for MLA."""
    if cfg.kind == "mla":
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.kv_heads * cfg.qk_head_dim
    return per_layer * dtype_bytes * n_layers


# --------------------------------------------------------------------------- RoPE

class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al.), rotate-half layout as in Llama; applied to q and k.
    The frequencies are computed with the tables, so a module built on the meta device works once moved."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [positions, Dh]

    def _cos_sin(self, end: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables covering positions 0..end-1, computed once and grown by doubling: every layer
        and every decoding step reuses them instead of recomputing the angles."""
        tables = self._tables
        if tables is None or tables[0].shape[0] < end or tables[0].device != device or tables[0].dtype != dtype:
            size = max(end, 2 * tables[0].shape[0] if tables is not None else 256)
            inv_freq, factor = rope_frequencies(self.head_dim, self.theta, self.scaling)
            angles = torch.outer(torch.arange(size, device=device, dtype=torch.float32), inv_freq.to(device))
            angles = torch.cat([angles, angles], -1)
            tables = self._tables = ((angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype))
        return tables

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate x [B, H, T, Dh] for positions offset .. offset+T-1."""
        cos, sin = self._cos_sin(offset + x.shape[-2], x.device, x.dtype)
        cos, sin = cos[offset:offset + x.shape[-2]], sin[offset:offset + x.shape[-2]]
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], -1) * sin


# --------------------------------------------------------------------------- cache and masks

class KVCache:
    """What one attention layer remembers between decoding steps: named tensors [B, ..., T, ...]
    grown along their time axis, plus the padding mask of every cached token."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.axes: dict[str, int] = {}  # each tensor's time axis
        self.key_mask: torch.Tensor | None = None  # bool [B, T_cached]
        self.length = 0

    def append(self, mask: torch.Tensor | None, new_len: int, **new: tuple[torch.Tensor, int]
               ) -> dict[str, torch.Tensor]:
        """Add `new[name] = (tensor, time_axis)` and return every cached tensor, new tokens included."""
        for name, (tensor, axis) in new.items():
            old = self.tensors.get(name)
            self.tensors[name] = tensor if old is None else torch.cat([old, tensor], dim=axis)
            self.axes[name] = axis
        if mask is not None or self.key_mask is not None:
            batch = next(iter(new.values()))[0].shape[0]
            device = next(iter(new.values()))[0].device
            old_mask = (self.key_mask if self.key_mask is not None
                        else torch.ones(batch, self.length, dtype=torch.bool, device=device))
            new_mask = mask if mask is not None else torch.ones(batch, new_len, dtype=torch.bool, device=device)
            self.key_mask = torch.cat([old_mask, new_mask.bool()], dim=1)
        self.length += new_len
        return self.tensors

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def fork(self, length: int) -> KVCache:
        """A cache of the first `length` positions that grows on its own (appending concatenates, so the
        views it starts from are never written in place)."""
        twin = KVCache()
        twin.tensors = {name: t.narrow(self.axes[name], 0, min(length, t.shape[self.axes[name]]))
                        for name, t in self.tensors.items()}
        twin.axes = dict(self.axes)
        twin.key_mask = self.key_mask[:, :length] if self.key_mask is not None else None
        twin.length = min(length, self.length)
        return twin


def attention_mask(q_len: int, key_mask: torch.Tensor | None, causal: bool, offset: int = 0,
                   device: torch.device | None = None) -> torch.Tensor | None:
    """Boolean mask [B|1, 1, Tq, Tk] (True = may attend) from key padding and causality, or None.

    Query i sits at position offset + i. A row with nothing to attend (a padding query) attends to
    every key instead, so SDPA never returns NaN; its output is meaningless and should be masked out.
    """
    k_len = offset + q_len if key_mask is None else key_mask.shape[1]
    allowed = None
    if causal:
        q_pos = torch.arange(offset, offset + q_len, device=device)
        allowed = (torch.arange(k_len, device=device)[None, :] <= q_pos[:, None])[None, None]
    if key_mask is not None:
        keys = key_mask.bool()[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    if allowed is None:
        return None
    return allowed | ~allowed.any(-1, keepdim=True)


def _sdpa(q, k, v, key_mask, causal, offset, dropout, scale=None):
    """SDPA with our mask convention, taking the fast is_causal path when nothing else is needed.

    Values narrower than the keys (MLA: v_head_dim < qk_head_dim) are zero-padded to the keys' width and the
    output cut back: the fused kernels need equal widths, and without them prefill is ~7x slower on CPU."""
    if v.shape[-1] < q.shape[-1]:
        width = v.shape[-1]
        return _sdpa(q, k, F.pad(v, (0, q.shape[-1] - width)), key_mask, causal, offset, dropout, scale)[..., :width]
    gqa = k.shape[1] != q.shape[1]
    causal = causal and q.shape[-2] > 1  # one new token may see every cached key
    if key_mask is None and (not causal or offset == 0):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout, scale=scale,
                                              enable_gqa=gqa)
    attn_mask = attention_mask(q.shape[-2], key_mask, causal, offset, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale,
                                          enable_gqa=gqa)


def rotate_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     cache: KVCache | None, rope: RotaryEmbedding | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Rotary positions continuing after the cached tokens, then the new keys and values appended to
    `cache`: the q, k, v and key mask attention sees, and the new tokens' offset."""
    offset = cache.length if cache is not None else 0
    if rope is not None:
        q, k = rope(q, offset), rope(k, offset)
    if cache is not None:
        cached = cache.append(mask, q.shape[-2], k=(k, 2), v=(v, 2))
        k, v, mask = cached["k"], cached["v"], cache.key_mask
    return q, k, v, mask, offset


# --------------------------------------------------------------------------- MHA / GQA / MQA

class Attention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads: MHA (= n_heads), GQA (divides n_heads), MQA (1)."""

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.qk_head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.dim, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.dim, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=cfg.bias)
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = nn.RMSNorm(self.head_dim if per_head else self.n_heads * self.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim if per_head else self.kv_heads * self.head_dim, eps=cfg.norm_eps)
        self.rope = RotaryEmbedding(self.head_dim, cfg.rope_theta, cfg.rope_scaling) if cfg.rope else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        q, k = self.wq(x), self.wk(x)
        if self.cfg.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q = rearrange(q, "b t (h d) -> b h t d", h=self.n_heads)
        k = rearrange(k, "b t (h d) -> b h t d", h=self.kv_heads)
        if self.cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        v = rearrange(self.wv(x), "b t (h d) -> b h t d", h=self.kv_heads)
        q, k, v, mask, offset = rotate_and_cache(q, k, v, mask, cache, self.rope)
        out = _sdpa(q, k, v, mask, causal, offset, self.cfg.dropout if self.training else 0.0)
        return self.wo(rearrange(out, "b h t d -> b t (h d)"))


# --------------------------------------------------------------------------- MLA

class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2): keys and values come from a small shared latent
    c_kv; RoPE lives in separate q/k dimensions (the key's is shared by all heads). The cache keeps
    only c_kv and the RoPE key; decoding one token at a time absorbs the up-projections into the query
    and the output, so the cache is never expanded."""

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        h, nope, rope_dim, v_dim = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, h * (nope + rope_dim), bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, h * (nope + rope_dim), bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(cfg.kv_lora_rank, eps=cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, h * (nope + v_dim), bias=False)
        self.wo = nn.Linear(h * v_dim, cfg.dim, bias=False)
        self.rope = RotaryEmbedding(rope_dim, cfg.rope_theta, cfg.rope_scaling) if cfg.rope else None
        self.scale = 1.0 / math.sqrt(nope + rope_dim)
        scaling = cfg.rope_scaling
        if scaling is not None and scaling.kind == "yarn" and scaling.mscale_all_dim:
            self.scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2

    def _queries(self, x: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.cfg.q_lora_rank else self.wq(x)
        q = rearrange(q, "b t (h d) -> b h t d", h=self.cfg.n_heads)
        q_nope, q_rope = q.split([self.cfg.qk_nope_head_dim, self.cfg.qk_rope_head_dim], dim=-1)
        return q_nope, (self.rope(q_rope, offset) if self.rope is not None else q_rope)

    def _latent(self, x: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressed KV latent [B, T, r] and the shared RoPE key [B, 1, T, dr]: what the cache holds."""
        c_kv, k_rope = self.wkv_a(x).split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)
        k_rope = k_rope[:, None]
        return self.kv_norm(c_kv), (self.rope(k_rope, offset) if self.rope is not None else k_rope)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        offset = cache.length if cache is not None else 0
        q_nope, q_rope = self._queries(x, offset)
        c_kv, k_rope = self._latent(x, offset)
        dropout = self.cfg.dropout if self.training else 0.0
        if cache is not None:
            cached = cache.append(mask, x.shape[1], c_kv=(c_kv, 1), k_rope=(k_rope, 2))
            c_kv, k_rope, mask = cached["c_kv"], cached["k_rope"], cache.key_mask
        # Few queries against a long cache: attend over the latent itself. Many queries (training, a
        # prompt): up-projecting the latent once is cheaper than widening every query to kv_lora_rank.
        attend = self._attend_absorbed if x.shape[1] == 1 and cache is not None else self._attend_expanded
        out = attend(q_nope, q_rope, c_kv, k_rope, mask, causal, offset, dropout)
        return self.wo(rearrange(out, "b h t d -> b t (h d)"))

    def _attend_expanded(self, q_nope, q_rope, c_kv, k_rope, mask, causal, offset, dropout):
        """Training/prefill: up-project the latent to per-head keys and values, then plain SDPA."""
        kv = rearrange(self.wkv_b(c_kv), "b t (h d) -> b h t d", h=self.cfg.n_heads)
        k_nope, v = kv.split([self.cfg.qk_nope_head_dim, self.cfg.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], -1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.cfg.n_heads, -1, -1)], -1)
        return _sdpa(q, k, v, mask, causal, offset, dropout, scale=self.scale)

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, mask, causal, offset, dropout):
        """Decoding: fold W_UK into the query and W_UV into the output, so attention runs over the
        cached latent directly (one shared key/value head of width kv_lora_rank, i.e. MQA)."""
        w = rearrange(self.wkv_b.weight, "(h d) r -> h d r", h=self.cfg.n_heads)
        w_uk, w_uv = w.split([self.cfg.qk_nope_head_dim, self.cfg.v_head_dim], dim=1)
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        # Every head shares the one latent key/value, so fold the heads into the query axis: one head
        # attending over the cache as it is, instead of SDPA repeating the cache once per head.
        heads, q_len = q_nope.shape[1], q_nope.shape[2]
        q = rearrange(torch.cat([q_latent, q_rope], -1), "b h t d -> b 1 (h t) d")
        k = torch.cat([c_kv[:, None], k_rope], -1)  # [B, 1, S, r + dr]
        allowed = attention_mask(q_len, mask, causal and q_len > 1, offset, q.device)
        if allowed is not None:
            allowed = repeat(allowed.expand(-1, -1, q_len, -1), "b 1 t s -> b 1 (h t) s", h=heads)
        out_latent = F.scaled_dot_product_attention(q, k, c_kv[:, None], attn_mask=allowed, dropout_p=dropout,
                                                    scale=self.scale)
        out_latent = rearrange(out_latent, "b 1 (h t) r -> b h t r", h=heads)
        return torch.einsum("bhtr,hvr->bhtv", out_latent, w_uv)


# --------------------------------------------------------------------------- builders

def build_attention(cfg: AttentionConfig) -> nn.Module:
    """The self-attention module for `cfg.kind`."""
    return MLA(cfg) if cfg.kind == "mla" else Attention(cfg)


class CrossAttention(nn.Module):
    """Queries from x [B, T, D] attend to a context [B, S, Dc]; context_mask [B, S] (True = real)."""

    def __init__(self, dim: int, n_heads: int, context_dim: int | None = None, dropout: float = 0.0,
                 bias: bool = False):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        context_dim = context_dim or dim
        self.n_heads, self.dropout = n_heads, dropout
        self.wq = nn.Linear(dim, dim, bias=bias)
        self.wk = nn.Linear(context_dim, dim, bias=bias)
        self.wv = nn.Linear(context_dim, dim, bias=bias)
        self.wo = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        q = rearrange(self.wq(x), "b t (h d) -> b h t d", h=self.n_heads)
        k = rearrange(self.wk(context), "b s (h d) -> b h s d", h=self.n_heads)
        v = rearrange(self.wv(context), "b s (h d) -> b h s d", h=self.n_heads)
        mask = attention_mask(x.shape[1], context_mask, False, device=x.device) if context_mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.wo(rearrange(out, "b h t d -> b t (h d)"))
