"""One decoder-only language model for every supported checkpoint family, built from dsfuse's core.

token embedding -> n_layers x TransformerBlock (any attention kind; SwiGLU or DeepSeekMoE feed-forward
per layer) -> RMSNorm -> logits. Llama, Qwen2/3, Mixtral, Qwen-MoE, OLMoE and DeepSeek-V2/V3 differ
only in the options of those blocks (`models/hf_arch.py` maps their configs onto this one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsfuse.nn.attention import AttentionConfig, KVCache
from dsfuse.nn.moe import MoEConfig
from dsfuse.nn.transformer import TransformerBlock


@dataclass
class CausalLMConfig:
    vocab_size: int
    dim: int
    n_layers: int
    attention: AttentionConfig
    ffn_hidden: int  # the dense layers' SwiGLU width
    moe: MoEConfig | None = None
    moe_layers: tuple[int, ...] = ()  # the layers whose feed-forward is `moe`
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    eos_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.moe_layers and self.moe is None:
            raise ValueError("moe_layers needs a MoEConfig")
        if any(not 0 <= i < self.n_layers for i in self.moe_layers):
            raise ValueError(f"moe_layers {self.moe_layers} outside 0..{self.n_layers - 1}")


class CausalLM(nn.Module):
    def __init__(self, cfg: CausalLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(self.block(i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def block(self, i: int) -> TransformerBlock:
        """Decoder layer i as the config describes it."""
        moe = i in self.cfg.moe_layers
        return TransformerBlock(self.cfg.dim, self.cfg.attention, ffn="moe" if moe else "swiglu",
                                ffn_hidden=self.cfg.ffn_hidden, moe=self.cfg.moe if moe else None,
                                norm_eps=self.cfg.norm_eps)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """What the first layer takes from the embeddings [B, T, D]: here x itself (DeepSeek-V4: its streams)."""
        return x

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def forward(self, tokens: torch.Tensor, cache: list[KVCache] | None = None, last_only: bool = False,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for tokens [B, T] (positions continue after the cache); `mask` [B, T] marks
        real tokens (False = padding); `last_only`: [B, 1, V]."""
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask=mask, causal=True, cache=None if cache is None else cache[i])
        return self.head(x[:, -1:] if last_only else x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the last layer's hidden states."""
        return self.lm_head(self.norm(x))
