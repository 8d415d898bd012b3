"""The parity reference for DeepSeek-V4's blocks: transformers' deepseek_v4 modules on a tiny config, their
random weights copied into dsfuse's blocks (fp32)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as ref  # noqa: E402
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config  # noqa: E402

from dsfuse.nn.v4_attention import V4AttentionConfig  # noqa: E402

LAYER_TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]


def tiny_config(**overrides) -> DeepseekV4Config:
    """Three layers, one of each attention type; width 64; CSA m=4, HCA m'=8; a 16-token window."""
    settings = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, head_dim=32,
                    q_lora_rank=32, partial_rotary_factor=0.25, o_groups=2, o_lora_rank=16, sliding_window=16,
                    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                    index_n_heads=4, index_head_dim=16, index_topk=3, layer_types=LAYER_TYPES,
                    mlp_layer_types=["hash_moe", "moe", "moe"], n_routed_experts=8, num_experts_per_tok=2,
                    moe_intermediate_size=32, hc_mult=4, hc_sinkhorn_iters=20, max_position_embeddings=4096)
    config = DeepseekV4Config(**{**settings, **overrides})
    config._attn_implementation = "eager"
    return config


def attention_config(config: DeepseekV4Config, layer: int, chunk: int = 256) -> V4AttentionConfig:
    layer_type = config.layer_types[layer]
    return V4AttentionConfig(
        dim=config.hidden_size, n_heads=config.num_attention_heads, head_dim=config.head_dim,
        rope_dim=config.qk_rope_head_dim, q_lora_rank=config.q_lora_rank, o_groups=config.o_groups,
        o_lora_rank=config.o_lora_rank, window=config.sliding_window, layer_type=layer_type,
        compress_rate=config.compress_rates.get(layer_type, 1), index_heads=config.index_n_heads,
        index_head_dim=config.index_head_dim, index_topk=config.index_topk, rope_theta=config.rope_theta,
        compress_rope_theta=config.compress_rope_theta, norm_eps=config.rms_norm_eps, chunk=chunk)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random, sinks, position biases and norm weights included, so none hides behind a 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (1.0 if param.ndim == 1 else 0.0))


def copy_weights(source: torch.nn.Module, target: torch.nn.Module, renames: dict[str, str]) -> None:
    """Load source's state dict into target, renaming key fragments; every key must match both ways."""
    state = {}
    for key, value in source.state_dict().items():
        for old, new in renames.items():
            key = key.replace(old, new)
        state[key] = value
    target.load_state_dict(state, strict=True)


ATTENTION_RENAMES = {"compressor.indexer.": "indexer.", "scorer.weights_proj": "weights_proj"}


class ReferenceAttention:
    """transformers' DeepseekV4Attention run as its decoder runs it: rotary tables, the sliding mask, a cache."""

    def __init__(self, config: DeepseekV4Config, layer: int):
        self.config, self.layer = config, layer
        self.attn = ref.DeepseekV4Attention(config, layer).eval()
        self.rotary = ref.DeepseekV4RotaryEmbedding(config)
        self.cache = None
        self.selections: list[torch.Tensor] = []
        if self.attn.compressor is not None and hasattr(self.attn.compressor, "indexer"):
            self.attn.compressor.indexer.register_forward_hook(lambda m, a, out: self.selections.append(out))

    def start_cache(self) -> None:
        self.cache = ref.DynamicCache(config=self.config)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        past = self.cache.get_seq_length(self.layer) if self.cache is not None else 0
        position_ids = (torch.arange(x.shape[1]) + past)[None]
        kept = min(self.config.sliding_window - 1, past)  # the sliding cache keeps window-1 keys
        q_pos, k_pos = position_ids[0], torch.arange(past - kept, past + x.shape[1])
        allowed = (k_pos[None] <= q_pos[:, None]) & (k_pos[None] > q_pos[:, None] - self.config.sliding_window)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).expand(x.shape[0], 1, -1, -1)
        embeddings = {kind: self.rotary(x, position_ids=position_ids, layer_type=kind) for kind in ("main", "compress")}
        return self.attn(x, position_embeddings=embeddings, position_ids=position_ids, attention_mask=mask,
                         cache=self.cache)[0]
