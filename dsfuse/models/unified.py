"""The unified-token model (kind "unified"): one vocabulary for text and image tokens, one causal decoder
of MLA attention and DeepSeekMoE feed-forwards (aux-free balancing) over it, as Chameleon and Emu3 do.

The vocabulary: text tokens [0, text_vocab), image codes [text_vocab, text_vocab + image_vocab) (a VQ
tokenizer's codebook), then the specials <image>, </image>, end of text and padding. A sequence reads
`caption <image> codes </image>` (text to image) or `<image> codes </image> caption <eot>` (image to text).

Image codes know their place and their look: each adds learned embeddings of its row and column in the
image grid, and (with `code_dim`) a projection of the tokenizer's own code vector, which also scores
the image codes at the output. Codes that look alike then start alike, so what the model learns about one
carries over to the codes of colour and shape pairs it never saw together.

`fusion="parallel"` is the seed's parallel cross-attention: each layer runs text and image tokens through
their own causal self-attention, then lets each stream attend to the other (causally, in sequence order)
and mixes the two by learned per-stream gates, before the shared MoE feed-forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dsfuse import choices
from dsfuse.nn.attention import AttentionConfig, KVCache, build_attention
from dsfuse.nn.differential import DifferentialAttention
from dsfuse.nn.moe import MoE, MoEConfig
from dsfuse.nn.transformer import TransformerBlock

SPECIALS = ("<image>", "</image>", "<eot>", "<pad>")


@dataclass
class UnifiedConfig:
    text_vocab: int = 256
    image_vocab: int = 64
    image_tokens: int = 16  # codes per image: the tokenizer's grid, row by row
    max_text: int = 24  # caption tokens at most
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    experts: int = 8
    top_k: int = 2
    shared: int = 1
    expert_hidden: int = 64
    fusion: choices.UnifiedFusion = "early"
    attention: choices.AttentionVariant = "mla"
    code_dim: int = 0  # > 0: image codes are also embedded and predicted through the tokenizer's code vectors

    def __post_init__(self) -> None:
        choices.check(self.fusion, choices.UnifiedFusion, "fusion")
        choices.check(self.attention, choices.AttentionVariant, "attention")
        if min(self.text_vocab, self.image_vocab, self.image_tokens, self.max_text, self.n_layers) < 1:
            raise ValueError("vocabularies, image_tokens, max_text and n_layers must be positive")
        if self.grid ** 2 != self.image_tokens:
            raise ValueError(f"image_tokens must be a square grid, got {self.image_tokens}")

    @property
    def image_start(self) -> int:
        return self.text_vocab + self.image_vocab

    @property
    def image_end(self) -> int:
        return self.image_start + 1

    @property
    def eot(self) -> int:
        return self.image_start + 2

    @property
    def pad(self) -> int:
        return self.image_start + 3

    @property
    def vocab(self) -> int:
        return self.image_start + len(SPECIALS)

    @property
    def grid(self) -> int:
        """The side of the image's code grid."""
        return math.isqrt(self.image_tokens)

    @property
    def context(self) -> int:
        """The longest sequence: a caption, its end, and an image between its markers."""
        return self.max_text + 1 + self.image_tokens + 2

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        """True where an id is an image code."""
        return (ids >= self.text_vocab) & (ids < self.image_start)

    def attention_config(self) -> AttentionConfig:
        head = max(8, self.dim // self.n_heads)
        return AttentionConfig(dim=self.dim, n_heads=self.n_heads, kind="mla", kv_lora_rank=max(16, self.dim // 2),
                               qk_nope_head_dim=head, qk_rope_head_dim=8, v_head_dim=head)

    def moe(self) -> MoEConfig:
        return MoEConfig(dim=self.dim, n_experts=self.experts, top_k=self.top_k, n_shared=self.shared,
                         expert_hidden=self.expert_hidden, router="aux-free", balance_weight=0.0,
                         bias_update_rate=0.001)


def self_attention(cfg: UnifiedConfig, depth: int) -> nn.Module:
    """The configured self-attention of the layer at `depth` (1-based): MLA, or differential attention."""
    if cfg.attention == "differential":
        return DifferentialAttention(cfg.dim, cfg.n_heads, depth)
    return build_attention(cfg.attention_config())


class ParallelCrossAttention(nn.Module):
    """The seed's ParallelCrossAttention over one interleaved sequence: text and image tokens each attend
    causally to their own modality (two self-attention streams), and to the other modality (cross-attention
    both ways, causal too); a learned gate per stream mixes its self and cross outputs."""

    def __init__(self, cfg: UnifiedConfig, depth: int):
        super().__init__()
        self.text_self, self.vision_self = self_attention(cfg, depth), self_attention(cfg, depth)
        self.text_cross, self.vision_cross = self_attention(cfg, depth), self_attention(cfg, depth)
        self.text_gate = nn.Parameter(torch.zeros(1))  # sigmoid(0) = 1/2: self and cross equally at first
        self.vision_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None,
                caches: list[KVCache] | None = None) -> torch.Tensor:
        """x [B, T, D]; image bool [B, T] (True = an image token), mask bool [B, T] (True = real)."""
        real = mask if mask is not None else torch.ones_like(image)
        parts = [(self.text_self, real & ~image), (self.vision_self, real & image),  # attend to own modality
                 (self.text_cross, real & image), (self.vision_cross, real & ~image)]  # to the other
        outs = [attn(x, mask=keys, causal=True, cache=caches[i] if caches else None)
                for i, (attn, keys) in enumerate(parts)]
        # a query with no allowed key attends everywhere (attention_mask); zero such updates
        seen = [_any_before(keys, caches[i] if caches else None) for i, (_, keys) in enumerate(parts)]
        outs = [out * ok[..., None] for out, ok in zip(outs, seen)]
        text_gate, vision_gate = torch.sigmoid(self.text_gate), torch.sigmoid(self.vision_gate)
        text = text_gate * outs[0] + (1 - text_gate) * outs[2]
        vision = vision_gate * outs[1] + (1 - vision_gate) * outs[3]
        return torch.where(image[..., None], vision, text)


def _any_before(keys: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """bool [B, T]: whether each new query has at least one allowed key at or before it."""
    seen = keys.long().cumsum(1) > 0
    if cache is not None and cache.key_mask is not None:
        earlier = cache.key_mask[:, :-keys.shape[1]].any(1, keepdim=True)
        seen = seen | earlier
    return seen


class ParallelBlock(nn.Module):
    """ParallelCrossAttention then the shared MoE feed-forward, each behind an RMSNorm."""

    def __init__(self, cfg: UnifiedConfig, depth: int):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.attn = ParallelCrossAttention(cfg, depth)
        self.ffn = MoE(cfg.moe())

    def forward(self, x, image, mask, caches=None):
        x = x + self.attn(self.attn_norm(x), image, mask, caches)
        return x + self.ffn(self.ffn_norm(x))


class EarlyFusionBlock(TransformerBlock):
    """One shared block over the interleaved sequence: the default single-stream early fusion."""

    def __init__(self, cfg: UnifiedConfig, depth: int):
        super().__init__(cfg.dim, cfg.attention_config(), ffn="moe", moe=cfg.moe())
        if cfg.attention != "mla":
            self.attn = self_attention(cfg, depth)

    def forward(self, x, image, mask, caches=None):  # type: ignore[override]
        return super().forward(x, mask=mask, causal=True, cache=caches[0] if caches else None)


@dataclass
class UnifiedCache:
    """Decoding state: each block's key/value caches, and how many image codes each row has read."""

    layers: list[list[KVCache]]
    codes_read: torch.Tensor | None = None  # [B]


class UnifiedModel(nn.Module):
    """ids [B, T] (+ padding mask) -> next-token logits [B, T, vocab]; see the module docstring. A sequence
    holds one image, so a code's grid place is the count of codes before it."""

    Config = UnifiedConfig

    def __init__(self, config: UnifiedConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.image_row = nn.Embedding(config.grid, config.dim)
        self.image_column = nn.Embedding(config.grid, config.dim)
        if config.code_dim:
            self.register_buffer("code_vectors", torch.zeros(config.image_vocab, config.code_dim))
            self.code_in = nn.Linear(config.code_dim, config.dim)
            self.code_out = nn.Linear(config.code_dim, config.dim)
        block = ParallelBlock if config.fusion == "parallel" else EarlyFusionBlock
        self.blocks = nn.ModuleList(block(config, depth) for depth in range(1, config.n_layers + 1))
        self.norm = nn.RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab, bias=False)

    def new_cache(self) -> UnifiedCache:
        per_block = 4 if self.config.fusion == "parallel" else 1
        return UnifiedCache([[KVCache() for _ in range(per_block)] for _ in self.blocks])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                cache: UnifiedCache | None = None) -> torch.Tensor:
        cfg = self.config
        image = cfg.is_image(ids)
        x = self.embed(ids) + self.grid_embedding(image, cache)
        if cfg.code_dim:
            codes = (ids - cfg.text_vocab).clamp(0, cfg.image_vocab - 1)
            x = x + self.code_in(self.code_vectors[codes]) * image[..., None]
        for i, block in enumerate(self.blocks):
            x = block(x, image, mask, cache.layers[i] if cache is not None else None)
        h = self.norm(x)
        logits = self.head(h)
        if cfg.code_dim:
            logits[..., cfg.text_vocab:cfg.image_start] += h @ self.code_out(self.code_vectors).T
        return logits

    def grid_embedding(self, image: torch.Tensor, cache: UnifiedCache | None) -> torch.Tensor:
        """[B, T, D]: each image code's row and column embeddings (zero for other tokens), counting the
        codes the cache has already read."""
        read = image.long().cumsum(1)
        if cache is not None:
            if cache.codes_read is not None:
                read = read + cache.codes_read[:, None]
            cache.codes_read = read[:, -1]
        index = (read - 1).clamp(0, self.config.image_tokens - 1)
        grid = self.config.grid
        return (self.image_row(index // grid) + self.image_column(index % grid)) * image[..., None]
