"""DeepSeek-V4 (transformers' DeepseekV4ForCausalLM, model_type deepseek_v4) on dsfuse's core.

token embedding -> n streams (mHC) -> n_layers x TransformerBlock [V4 attention of the layer's type;
DeepSeekMoE routed by token-id hash or learned; both residuals mHC] -> HyperHead -> RMSNorm -> logits.
Its config.json maps onto `V4LMConfig` (per-layer attention from `layer_types`, hash routing from
`mlp_layer_types`), its tensor names onto dsfuse's through the registry of models/hf_arch.
FP8 checkpoints load dequantised through the shared loader (models/hf_quant); not supported yet, each
refused in one line: FP4-packed experts (`expert_dtype: fp4`), padding masks. `rope_parameters` scale each kind's
RoPE as the config says (`main`: sliding layers, `compress`: CSA/HCA and their compressors; YaRN, llama3, linear).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from dsfuse import choices
from dsfuse.errors import UsageError
from dsfuse.models.causal_lm import CausalLM, CausalLMConfig
from dsfuse.models.hf_arch import Architecture, Source, _base, _get, register, rope_scaling_of
from dsfuse.nn.hyper_connections import HyperConfig, HyperHead, expand_streams
from dsfuse.nn.moe import MoEConfig
from dsfuse.nn.transformer import TransformerBlock
from dsfuse.nn.v4_attention import V4AttentionConfig, V4Cache


@dataclass
class V4LMConfig(CausalLMConfig):
    layer_attention: tuple[V4AttentionConfig, ...] = ()  # one per layer (`attention` is the first)
    hash_layers: tuple[int, ...] = ()  # layers whose MoE routes by token id
    hyper: HyperConfig = field(default_factory=HyperConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.layer_attention) != self.n_layers or self.moe is None:
            raise ValueError("a V4 model needs an attention config per layer and a MoE")


class V4CausalLM(CausalLM):
    rewinds_cache = False  # its compressors' state only moves forward: a cache forks whole, or starts empty

    def __init__(self, cfg: V4LMConfig):
        super().__init__(cfg)
        self.hc_head = HyperHead(cfg.dim, cfg.hyper, cfg.norm_eps)

    def block(self, i: int) -> TransformerBlock:
        cfg = self.cfg
        moe = replace(cfg.moe, router="hash") if i in cfg.hash_layers else cfg.moe
        return TransformerBlock(cfg.dim, cfg.layer_attention[i], ffn="moe", moe=moe, norm_eps=cfg.norm_eps,
                                hyper=cfg.hyper)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return expand_streams(x, self.cfg.hyper.streams)

    def new_cache(self) -> list[V4Cache]:
        return [V4Cache() for _ in self.layers]

    def forward(self, tokens: torch.Tensor, cache: list[V4Cache] | None = None, last_only: bool = False,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None and not bool(mask.all()):
            raise UsageError("DeepSeek-V4 models take no padded batches yet: give one text at a time")
        streams = self.enter(self.embed(tokens))
        for i, layer in enumerate(self.layers):
            streams = layer(streams, causal=True, cache=None if cache is None else cache[i], token_ids=tokens)
        x = self.hc_head(streams)
        return self.head(x[:, -1:] if last_only else x)


# --------------------------------------------------------------------------- config.json -> V4LMConfig

def _known(hf: dict[str, Any], key: str, allowed: object) -> list[str]:
    values = list(_get(hf, key))
    if len(values) != int(_get(hf, "num_hidden_layers")):
        raise UsageError(f"config.json's {key} has {len(values)} entries for {hf['num_hidden_layers']} layers")
    for value in values:
        if value not in choices.values(allowed):
            raise UsageError(f"config.json's {key} has {value!r}, a layer type dsfuse does not know "
                             f"({', '.join(choices.values(allowed))})")
    return values


def _refuse_unsupported(hf: dict[str, Any]) -> None:
    if int(hf.get("num_key_value_heads", 1)) != 1:
        raise UsageError("DeepSeek-V4 attention has one shared key/value head; config.json says "
                         f"{hf['num_key_value_heads']}")


def _rope_parameters(hf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (main, compress) rope parameters. A flat dict, as transformers reads it, scales the compressed layers
    only, and YaRN there leaves cos/sin unscaled unless it says otherwise."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise UsageError(f"config.json's rope_parameters is {params!r}, not a mapping")
    if "main" in params or "compress" in params:
        main, compress = params.get("main") or {}, params.get("compress") or {}
        if not isinstance(main, dict) or not isinstance(compress, dict):
            raise UsageError("config.json's rope_parameters main and compress must each be a mapping")
        return main, compress
    defaults = {"attention_factor": 1.0} if params.get("rope_type", params.get("type")) == "yarn" else {}
    return {}, {**defaults, **params, "rope_theta": hf.get("compress_rope_theta")}


def v4_config(hf: dict[str, Any]) -> V4LMConfig:
    _refuse_unsupported(hf)
    layer_types = _known(hf, "layer_types", choices.V4Attention)
    mlp_types = _known(hf, "mlp_layer_types", choices.V4Mlp)
    rates = dict(hf.get("compress_rates") or {})
    head_dim = int(_get(hf, "head_dim"))
    rope_dim = int(hf.get("qk_rope_head_dim") or head_dim * float(_get(hf, "partial_rotary_factor")))
    dim, eps = int(_get(hf, "hidden_size")), float(hf.get("rms_norm_eps", 1e-6))
    main, compress = _rope_parameters(hf)

    def attention(kind: str) -> V4AttentionConfig:
        rate = 1 if kind == "sliding_attention" else rates.get(kind)
        if not isinstance(rate, int) or rate < 1:
            raise UsageError(f"config.json's compress_rates gives {kind} the rate {rate!r}: it needs a whole "
                             "number of tokens per compressed row, at least 1")
        return V4AttentionConfig(
            dim=dim, n_heads=int(_get(hf, "num_attention_heads")), head_dim=head_dim, rope_dim=rope_dim,
            q_lora_rank=int(_get(hf, "q_lora_rank")), o_groups=int(_get(hf, "o_groups")),
            o_lora_rank=int(_get(hf, "o_lora_rank")), window=int(_get(hf, "sliding_window")), layer_type=kind,
            compress_rate=rate, index_heads=int(_get(hf, "index_n_heads")),
            index_head_dim=int(_get(hf, "index_head_dim")), index_topk=int(_get(hf, "index_topk")),
            rope_theta=float(main.get("rope_theta") or hf.get("rope_theta") or 10000.0),
            compress_rope_theta=float(compress.get("rope_theta") or hf.get("compress_rope_theta") or 160000.0),
            rope_scaling=rope_scaling_of(main, " on V4's sliding layers"),
            compress_rope_scaling=rope_scaling_of(compress, " on V4's compressed layers"),
            norm_eps=eps)

    layer_attention = tuple(attention(kind) for kind in layer_types)
    moe = MoEConfig(dim=dim, n_experts=int(_get(hf, "n_routed_experts")), top_k=int(_get(hf, "num_experts_per_tok")),
                    n_shared=int(hf.get("n_shared_experts", 1)), expert_hidden=int(_get(hf, "moe_intermediate_size")),
                    router="aux-free", affinity=hf.get("scoring_func", "sqrtsoftplus"),
                    norm_topk=bool(hf.get("norm_topk_prob", True)),
                    route_scale=float(hf.get("routed_scaling_factor", 1.0)), vocab_size=int(_get(hf, "vocab_size")),
                    swiglu_limit=float(hf.get("swiglu_limit") or 0.0), balance_weight=0.0, z_weight=0.0)
    base = _base(hf, layer_attention[0], moe.expert_hidden, moe, tuple(range(len(layer_types))))  # type: ignore[arg-type]
    return V4LMConfig(**{**base.__dict__, "layer_attention": layer_attention,
                         "hash_layers": tuple(i for i, kind in enumerate(mlp_types) if kind == "hash_moe"),
                         "hyper": HyperConfig(int(hf.get("hc_mult", 4)), int(hf.get("hc_sinkhorn_iters", 20)),
                                              float(hf.get("hc_eps", 1e-6)))})


# --------------------------------------------------------------------------- tensor names

V4_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "lm_head.weight": "head.weight", "hc_head.hc_fn": "model.hc_head.hc_fn",
          "hc_head.hc_base": "model.hc_head.hc_base", "hc_head.hc_scale": "model.hc_head.hc_scale"}
V4_NAMES = {  # dsfuse (module, or whole key) -> checkpoint, inside a decoder layer
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn.q_a_proj": "attn.wq_a", "attn.q_a_norm": "attn.q_norm",
    "attn.q_b_proj": "attn.wq_b", "attn.kv_proj": "attn.wkv", "attn.kv_norm": "attn.norm",
    "attn.o_a_proj": "attn.wo_a", "attn.o_b_proj": "attn.wo_b", "attn.sinks": "attn.attn_sink",
    "attn.compressor.kv_proj": "attn.compressor.wkv", "attn.compressor.gate_proj": "attn.compressor.wgate",
    "attn.compressor.position_bias": "attn.compressor.ape", "attn.compressor.kv_norm": "attn.compressor.norm",
    "attn.indexer.kv_proj": "attn.indexer.compressor.wkv", "attn.indexer.gate_proj": "attn.indexer.compressor.wgate",
    "attn.indexer.position_bias": "attn.indexer.compressor.ape",
    "attn.indexer.kv_norm": "attn.indexer.compressor.norm", "attn.indexer.q_b_proj": "attn.indexer.wq_b",
    "attn.indexer.weights_proj": "attn.indexer.weights_proj",
    **{f"{where}_hc.{p}": f"hc_{where}_{p}" for where in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "ffn.router.gate": "ffn.gate", "ffn.router.bias": "ffn.gate.bias", "ffn.router.tid2eid": "ffn.gate.tid2eid",
    "ffn.shared.w1": "ffn.shared_experts.w1", "ffn.shared.w3": "ffn.shared_experts.w3",
    "ffn.shared.w2": "ffn.shared_experts.w2"}


class V4Architecture(Architecture):
    def build(self, cfg: CausalLMConfig) -> V4CausalLM:
        return V4CausalLM(cfg)  # type: ignore[arg-type]

    def source(self, key: str, hf: dict[str, Any], cfg: CausalLMConfig) -> Source:
        if key in V4_TOP:
            return Source((V4_TOP[key],))
        return super().source(key, hf, cfg)


ARCHITECTURE = register(V4Architecture("DeepseekV4ForCausalLM", v4_config, V4_NAMES, ("ffn.experts", "w1", "w3", "w2")))
