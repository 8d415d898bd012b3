"""A Llama-architecture decoder (SmolLM2, Llama 2/3, Qwen2) as read from GGUF files and dsfuse checkpoints:
the generic `CausalLM` with grouped-query attention and SwiGLU, configured by `LlamaConfig`.

token embedding -> n_layers x [RMSNorm -> GQA with RoPE -> + ; RMSNorm -> SwiGLU -> +] -> RMSNorm -> logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsfuse.models.causal_lm import CausalLM, CausalLMConfig, generate, sample_next
from dsfuse.nn.attention import AttentionConfig

__all__ = ["Llama", "LlamaConfig", "generate", "sample_next"]


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
    qkv_bias: bool = False  # Qwen2

    def causal_lm(self) -> CausalLMConfig:
        attention = AttentionConfig(dim=self.dim, n_heads=self.n_heads, kind="gqa", n_kv_heads=self.n_kv_heads,
                                    rope_theta=self.rope_theta, qkv_bias=self.qkv_bias)
        return CausalLMConfig(vocab_size=self.vocab_size, dim=self.dim, n_layers=self.n_layers, attention=attention,
                              ffn_hidden=self.ffn_hidden, norm_eps=self.norm_eps, tie_embeddings=self.tie_embeddings,
                              max_seq_len=self.max_seq_len)


class Llama(CausalLM):
    Config = LlamaConfig

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg.causal_lm())
