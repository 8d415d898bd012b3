"""One decoder-only language model for every supported checkpoint family, built from dsfuse's core.

token embedding -> n_layers x TransformerBlock (any attention kind; SwiGLU or DeepSeekMoE feed-forward
per layer) -> RMSNorm -> logits. Llama, Qwen2/3, Mixtral, Qwen-MoE, OLMoE and DeepSeek-V2/V3 differ
only in the options of those blocks (`models/hf_arch.py` maps their configs onto this one).
Decoding keeps one KVCache per layer, so each new token costs one position, not the whole prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    rewinds_cache = True  # fork_cache may cut a cache back to any length
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

    @staticmethod
    def fork_cache(cache: list[KVCache], length: int) -> list[KVCache]:
        """A copy of the first `length` cached positions of every layer that can grow on its own."""
        return [layer.fork(length) for layer in cache]

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


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]: greedy at temperature 0, else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model: CausalLM, prompt: list[int], max_new_tokens: int, stop: set[int], temperature: float = 0.0,
             top_p: float = 1.0, generator: torch.Generator | None = None,
             cache: list[KVCache] | None = None) -> Iterator[int]:
    """Yield new token ids after `prompt` until a stop id (not yielded) or `max_new_tokens`."""
    device = next(model.parameters()).device
    cache = cache if cache is not None else model.new_cache()
    logits = model(torch.tensor([prompt], device=device), cache, last_only=True)
    for _ in range(max_new_tokens):
        token = sample_next(logits[0, -1], temperature, top_p, generator)
        if token in stop:
            return
        yield token
        if cache[0].length >= model.cfg.max_seq_len:
            return
        logits = model(torch.tensor([[token]], device=device), cache)
