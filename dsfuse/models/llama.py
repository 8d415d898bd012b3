"""A Llama-architecture decoder (SmolLM2, Llama 2/3) on dsfuse's attention core, with sampling.

token embedding -> n_layers x [RMSNorm -> GQA with RoPE -> + ; RMSNorm -> SwiGLU -> +] -> RMSNorm -> logits.
Decoding keeps one KVCache per layer, so each new token costs one position, not the whole prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from dsfuse.nn.attention import AttentionConfig, KVCache
from dsfuse.nn.transformer import TransformerBlock


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    ffn_hidden: int = 1536
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 8192
    tie_embeddings: bool = True


class Llama(nn.Module):
    Config = LlamaConfig

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        attention = AttentionConfig(dim=cfg.dim, n_heads=cfg.n_heads, kind="gqa", n_kv_heads=cfg.n_kv_heads,
                                    rope_theta=cfg.rope_theta)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg.dim, attention, ffn_hidden=cfg.ffn_hidden,
                                                     norm_eps=cfg.norm_eps) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    @staticmethod
    def fork_cache(cache: list[KVCache], length: int) -> list[KVCache]:
        """A copy of the first `length` cached positions that can grow on its own (GQA caches k and v
        as [B, H, T, D]; appending concatenates, so the originals are never written in place)."""
        forked = []
        for layer in cache:
            twin = KVCache()
            twin.tensors = {name: t[:, :, :length] for name, t in layer.tensors.items()}
            twin.length = min(length, layer.length)
            forked.append(twin)
        return forked

    def forward(self, tokens: torch.Tensor, cache: list[KVCache] | None = None, last_only: bool = False
                ) -> torch.Tensor:
        """Logits [B, T, V] for tokens [B, T] (positions continue after the cache); `last_only`: [B, 1, V]."""
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, causal=True, cache=None if cache is None else cache[i])
        if last_only:
            x = x[:, -1:]
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
def generate(model: Llama, prompt: list[int], max_new_tokens: int, stop: set[int], temperature: float = 0.0,
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
