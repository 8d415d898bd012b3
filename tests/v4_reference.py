"""The parity reference for DeepSeek-V4's blocks: transformers' deepseek_v4 modules on a tiny config, their
random weights copied into dsfuse's blocks (fp32)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as ref  # noqa: E402
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config  # noqa: E402

from dsfuse.nn.hyper_connections import HyperConfig  # noqa: E402
from dsfuse.nn.moe import MoEConfig  # noqa: E402
from dsfuse.nn.transformer import TransformerBlock  # noqa: E402
from dsfuse.nn.v4_attention import V4AttentionConfig  # noqa: E402

LAYER_TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]


def tiny_config(**overrides) -> DeepseekV4Config:
    """Three layers, one of each attention type; width 64; CSA m=4, HCA m'=8; a 16-token window."""
    settings = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, head_dim=32,
                    q_lora_rank=32, partial_rotary_factor=0.25, o_groups=2, o_lora_rank=16, sliding_window=16,
                    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                    index_n_heads=4, index_head_dim=16, index_topk=3, layer_types=LAYER_TYPES,
                    mlp_layer_types=["hash_moe", "moe", "moe"], n_routed_experts=8, num_experts_per_tok=2,
                    moe_intermediate_size=32, hc_mult=4, swiglu_limit=1.0, hc_sinkhorn_iters=20, max_position_embeddings=4096)
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


def moe_config(config: DeepseekV4Config, layer: int) -> MoEConfig:
    return MoEConfig(dim=config.hidden_size, n_experts=config.n_routed_experts, top_k=config.num_experts_per_tok,
                     n_shared=config.n_shared_experts, expert_hidden=config.moe_intermediate_size,
                     router="hash" if config.mlp_layer_types[layer] == "hash_moe" else "aux-free",
                     affinity=config.scoring_func, route_scale=config.routed_scaling_factor,
                     vocab_size=config.vocab_size, swiglu_limit=config.swiglu_limit, balance_weight=0.0,
                     z_weight=0.0)


def block(config: DeepseekV4Config, layer: int) -> TransformerBlock:
    """dsfuse's V4 decoder layer: V4 attention, the V4 MoE, mHC residuals."""
    return TransformerBlock(config.hidden_size, attention_config(config, layer, chunk=8), ffn="moe",
                            moe=moe_config(config, layer), norm_eps=config.rms_norm_eps,
                            hyper=HyperConfig(config.hc_mult, config.hc_sinkhorn_iters, config.hc_eps))


def block_state(reference_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' DeepseekV4DecoderLayer state dict under dsfuse's TransformerBlock names and layouts."""
    names = {"input_layernorm.": "attn_norm.", "post_attention_layernorm.": "ffn_norm.", "self_attn.": "attn.",
             "mlp.gate.weight": "ffn.router.gate.weight", "mlp.gate.tid2eid": "ffn.router.tid2eid",
             "mlp.gate.e_score_correction_bias": "ffn.router.bias", "mlp.shared_experts.gate_proj": "ffn.shared.w1",
             "mlp.shared_experts.up_proj": "ffn.shared.w3", "mlp.shared_experts.down_proj": "ffn.shared.w2",
             "mlp.experts.gate_up_proj": "ffn.experts.w13", "mlp.experts.down_proj": "ffn.experts.w2",
             **ATTENTION_RENAMES}
    state = {}
    for key, value in reference_state.items():
        for old, new in names.items():
            key = key.replace(old, new)
        state[key] = value.transpose(1, 2) if key.startswith("ffn.experts.") else value
    return state


@torch.no_grad()
def randomize_layer(layer: torch.nn.Module, config: DeepseekV4Config, seed: int) -> None:
    """randomize, plus the routers' buffers: a random hash table and random correction biases."""
    randomize(layer, seed)
    generator = torch.Generator().manual_seed(seed)
    for name, buffer in layer.named_buffers():
        if name.endswith("tid2eid"):
            buffer.copy_(torch.stack([torch.randperm(config.n_routed_experts, generator=generator)[:buffer.shape[1]]
                                      for _ in range(buffer.shape[0])]))
        elif name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)


class ReferenceAttention:
    """transformers' DeepseekV4Attention (or, with `decoder`, its DeepseekV4DecoderLayer) run as its model runs
    it: rotary tables, the sliding mask, a cache; the indexer's picks and the router's expert ids recorded."""

    def __init__(self, config: DeepseekV4Config, layer: int, decoder: bool = False):
        self.config, self.layer = config, layer
        self.module = (ref.DeepseekV4DecoderLayer if decoder else ref.DeepseekV4Attention)(config, layer).eval()
        self.attn = self.module.self_attn if decoder else self.module
        self.rotary = ref.DeepseekV4RotaryEmbedding(config)
        self.cache = None
        self.selections: list[torch.Tensor] = []
        self.experts: list[torch.Tensor] = []
        if self.attn.compressor is not None and hasattr(self.attn.compressor, "indexer"):
            self.attn.compressor.indexer.register_forward_hook(lambda m, a, out: self.selections.append(out))
        if decoder:
            self.module.mlp.gate.register_forward_hook(lambda m, a, out: self.experts.append(out[2]))

    def start_cache(self) -> None:
        self.cache = ref.DynamicCache(config=self.config)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] for the attention; streams [B, T, n, D] and token_ids for a decoder layer."""
        past = self.cache.get_seq_length(self.layer) if self.cache is not None else 0
        position_ids = (torch.arange(x.shape[1]) + past)[None]
        kept = min(self.config.sliding_window - 1, past)  # the sliding cache keeps window-1 keys
        q_pos, k_pos = position_ids[0], torch.arange(past - kept, past + x.shape[1])
        allowed = (k_pos[None] <= q_pos[:, None]) & (k_pos[None] > q_pos[:, None] - self.config.sliding_window)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).expand(x.shape[0], 1, -1, -1)
        embeddings = {kind: self.rotary(x, position_ids=position_ids, layer_type=kind) for kind in ("main", "compress")}
        if token_ids is not None:
            return self.module(x, input_ids=token_ids, position_embeddings=embeddings, position_ids=position_ids,
                               attention_mask=mask, cache=self.cache)
        return self.attn(x, position_embeddings=embeddings, position_ids=position_ids, attention_mask=mask,
                         cache=self.cache)[0]
