"""The supported Hugging Face architectures: each maps its config.json onto `CausalLMConfig` and its
tensor names onto dsfuse's parameter names.

An `Architecture` holds a config function and a table of module names inside a decoder layer
(dsfuse -> Hugging Face); routed experts, stored one tensor per expert in released checkpoints, are
stacked into `SwiGLUExperts`. A family needing more overrides `Architecture.source` (or `build`) in a
subclass; another module adds it with `register(MyArchitecture(...))`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import nn

from dsfuse.errors import UsageError
from dsfuse.models.causal_lm import CausalLM, CausalLMConfig
from dsfuse.nn.attention import AttentionConfig, RopeScaling
from dsfuse.nn.moe import MoEConfig

LAYER = "model.layers.{i}."
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
LLAMA_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
               "attn.wo": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm",
               "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj", "ffn.w2": "mlp.down_proj",
               "ffn.router.gate": "mlp.gate", "ffn.router.bias": "mlp.gate.e_score_correction_bias",
               "ffn.shared.w1": "mlp.shared_experts.gate_proj", "ffn.shared.w3": "mlp.shared_experts.up_proj",
               "ffn.shared.w2": "mlp.shared_experts.down_proj"}
MLA_NAMES = {**LLAMA_NAMES, "attn.wq_a": "self_attn.q_a_proj", "attn.q_norm": "self_attn.q_a_layernorm",
             "attn.wq_b": "self_attn.q_b_proj", "attn.wkv_a": "self_attn.kv_a_proj_with_mqa",
             "attn.kv_norm": "self_attn.kv_a_layernorm", "attn.wkv_b": "self_attn.kv_b_proj"}
QWEN_MOE_NAMES = {**LLAMA_NAMES, "ffn.shared.w1": "mlp.shared_expert.gate_proj",
                  "ffn.shared.w3": "mlp.shared_expert.up_proj", "ffn.shared.w2": "mlp.shared_expert.down_proj",
                  "ffn.shared_gate": "mlp.shared_expert_gate"}
MIXTRAL_NAMES = {**LLAMA_NAMES, "ffn.router.gate": "block_sparse_moe.gate"}


@dataclass(frozen=True)
class Source:
    """Where one dsfuse tensor comes from: checkpoint tensors, combined by `build` (default: the one)."""

    names: tuple[str, ...]
    build: Callable[[list[torch.Tensor]], torch.Tensor] = lambda tensors: tensors[0]


@dataclass(frozen=True)
class Architecture:
    name: str  # config.json's "architectures" entry
    config: Callable[[dict[str, Any]], CausalLMConfig]
    names: Mapping[str, str] = field(default_factory=lambda: LLAMA_NAMES)
    experts: tuple[str, str, str, str] = ("mlp.experts", "gate_proj", "up_proj", "down_proj")  # where, gate, up, down
    interleaved_rope: Callable[[dict[str, Any]], bool] = lambda hf: False  # DeepSeek's q/k RoPE pairs

    def build(self, cfg: CausalLMConfig) -> nn.Module:
        """The model for `cfg` (parameters wherever the current default device puts them)."""
        return CausalLM(cfg)

    def source(self, key: str, hf: dict[str, Any], cfg: CausalLMConfig) -> Source:
        """The checkpoint tensors that make dsfuse parameter `key` (a full state-dict name)."""
        if key == "lm_head.weight" and cfg.tie_embeddings:
            key = "embed.weight"
        if key in TOP_NAMES:
            return Source((TOP_NAMES[key],))
        _, i, rest = key.split(".", 2)
        prefix = LAYER.format(i=i)
        if rest.startswith("ffn.experts."):
            return self._experts(prefix, rest.rsplit(".", 1)[1], cfg.moe.n_experts)
        if rest in self.names:  # a buffer named whole, such as the router's correction bias
            return Source((prefix + self.names[rest],))
        module, param = rest.rsplit(".", 1)
        if module not in self.names:
            raise UsageError(f"{self.name}: no checkpoint name for dsfuse parameter {key}")
        name = f"{prefix}{self.names[module]}.{param}"
        if self.interleaved_rope(hf) and module in ("attn.wq", "attn.wq_b", "attn.wkv_a"):
            return Source((name,), _deinterleave(module, cfg.attention))
        return Source((name,))

    def _experts(self, prefix: str, which: str, n: int) -> Source:
        where, gate, up, down = self.experts
        name = prefix + where + ".{e}.{proj}.weight"
        if which == "w2":  # [E, hidden, dim] from down [dim, hidden] each
            return Source(tuple(name.format(e=e, proj=down) for e in range(n)), lambda ts: _stack_transposed(ts, 1))
        # [E, dim, 2 * hidden] from gate and up [hidden, dim] each
        names = tuple(name.format(e=e, proj=proj) for e in range(n) for proj in (gate, up))
        return Source(names, lambda ts: _stack_transposed(ts, 2))


def _stack_transposed(tensors: list[torch.Tensor], per_expert: int) -> torch.Tensor:
    """Experts' [out, in] matrices as one contiguous [E, in, per_expert * out] tensor, copied straight
    into place (no intermediate copies: the sources may be memory-mapped)."""
    rows, cols = tensors[0].shape
    if any(t.shape != (rows, cols) for t in tensors):
        raise RuntimeError("experts differ in shape")
    out = torch.empty(len(tensors) // per_expert, cols, per_expert * rows, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i // per_expert, :, (i % per_expert) * rows:(i % per_expert + 1) * rows].copy_(t.T)
    return out


def _deinterleave(module: str, attention: AttentionConfig) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """DeepSeek rotates RoPE dimensions in adjacent pairs; dsfuse rotates halves. Permuting the rows that
    produce the RoPE part of q and k in the same way leaves every q.k score unchanged."""
    rope = attention.qk_rope_head_dim

    def permute(rows: torch.Tensor) -> torch.Tensor:
        return rearrange(rows, "... (half two) i -> ... (two half) i", two=2)

    def build(tensors: list[torch.Tensor]) -> torch.Tensor:
        w = tensors[0]
        if module == "attn.wkv_a":  # [kv_lora_rank + rope, dim]: the tail is the shared RoPE key
            return torch.cat([w[:-rope], permute(w[-rope:])])
        heads = w.view(attention.n_heads, -1, w.shape[-1])  # each head: [nope + rope, dim]
        return torch.cat([heads[:, :-rope], permute(heads[:, -rope:])], 1).view_as(w)

    return build


# --------------------------------------------------------------------------- config.json -> CausalLMConfig

def _get(hf: dict[str, Any], key: str, default: Any = ...) -> Any:
    value = hf.get(key, default)
    if value is ...:
        raise UsageError(f"config.json has no {key!r}")
    return value


def rope_scaling(hf: dict[str, Any]) -> RopeScaling | None:
    """`rope_scaling` (older configs) or `rope_parameters` (transformers 5) as a RopeScaling, None if plain."""
    return rope_scaling_of(hf.get("rope_scaling") or hf.get("rope_parameters") or {})


def rope_scaling_of(params: dict[str, Any], where: str = "") -> RopeScaling | None:
    """One rope-parameters dict as a RopeScaling, None if plain; `where` names its layers in the refusal."""
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind not in ("yarn", "llama3", "linear"):
        raise UsageError(f"rope scaling {kind!r}{where} is not supported (yarn, llama3, linear are)")
    factor = params.get("attention_factor")
    return RopeScaling(kind, float(_get(params, "factor")),
                       original_max_position=int(params.get("original_max_position_embeddings") or 4096),
                       beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                       mscale=float(params.get("mscale") or 0), mscale_all_dim=float(params.get("mscale_all_dim") or 0),
                       low_freq_factor=float(params.get("low_freq_factor") or 1),
                       high_freq_factor=float(params.get("high_freq_factor") or 4),
                       attention_factor=None if factor is None else float(factor))


def rope_theta(hf: dict[str, Any]) -> float:
    return float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def _eos(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))


def _base(hf: dict[str, Any], attention: AttentionConfig, ffn_hidden: int, moe: MoEConfig | None = None,
          moe_layers: tuple[int, ...] = ()) -> CausalLMConfig:
    return CausalLMConfig(vocab_size=int(_get(hf, "vocab_size")), dim=int(_get(hf, "hidden_size")),
                          n_layers=int(_get(hf, "num_hidden_layers")), attention=attention, ffn_hidden=ffn_hidden,
                          moe=moe, moe_layers=moe_layers, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                          tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                          max_seq_len=int(hf.get("max_position_embeddings", 4096)), eos_ids=_eos(hf))


def gqa_attention(hf: dict[str, Any], **options: Any) -> AttentionConfig:
    heads = int(_get(hf, "num_attention_heads"))
    if hf.get("clip_qkv"):
        raise UsageError("config.json sets clip_qkv, which dsfuse does not support")
    return AttentionConfig(dim=int(_get(hf, "hidden_size")), n_heads=heads, kind="gqa",
                           n_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=hf.get("head_dim"),
                           rope_theta=rope_theta(hf), rope_scaling=rope_scaling(hf),
                           bias=bool(hf.get("attention_bias", False)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                           **options)


def dense_config(hf: dict[str, Any], **attention: Any) -> CausalLMConfig:
    return _base(hf, gqa_attention(hf, **attention), int(_get(hf, "intermediate_size")))


def qwen_moe_config(hf: dict[str, Any], shared: bool, **attention: Any) -> CausalLMConfig:
    """Qwen2-MoE (a sigmoid-gated shared expert) and Qwen3-MoE: softmax top-k over num_experts."""
    n_layers, step, dense = int(_get(hf, "num_hidden_layers")), int(hf.get("decoder_sparse_step", 1)), \
        set(hf.get("mlp_only_layers") or ())
    moe = MoEConfig(dim=int(_get(hf, "hidden_size")), n_experts=int(hf.get("num_experts") or _get(hf, "num_local_experts")),
                    top_k=int(_get(hf, "num_experts_per_tok")), n_shared=0,
                    expert_hidden=int(_get(hf, "moe_intermediate_size")), norm_topk=bool(hf.get("norm_topk_prob")),
                    shared_hidden=int(_get(hf, "shared_expert_intermediate_size")) if shared else None,
                    shared_gate=shared)
    layers = tuple(i for i in range(n_layers) if i not in dense and (i + 1) % step == 0)
    return _base(hf, gqa_attention(hf, **attention), int(_get(hf, "intermediate_size")), moe, layers)


def every_layer_moe_config(hf: dict[str, Any], n_experts_key: str, **attention: Any) -> CausalLMConfig:
    """Mixtral and OLMoE: every layer a softmax top-k MoE over experts of width intermediate_size."""
    hidden = int(_get(hf, "intermediate_size"))
    moe = MoEConfig(dim=int(_get(hf, "hidden_size")), n_experts=int(_get(hf, n_experts_key)),
                    top_k=int(_get(hf, "num_experts_per_tok")), n_shared=0, expert_hidden=hidden,
                    norm_topk=bool(hf.get("norm_topk_prob", n_experts_key == "num_local_experts")))
    return _base(hf, gqa_attention(hf, **attention), hidden, moe, tuple(range(int(_get(hf, "num_hidden_layers")))))


def deepseek_config(hf: dict[str, Any], default_method: str = "greedy") -> CausalLMConfig:
    """DeepSeek-V2 (softmax, greedy or group-limited) and V3 (sigmoid + correction bias, noaux_tc)."""
    method = hf.get("topk_method") or default_method
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise UsageError(f"topk_method {method!r} is not supported (greedy, group_limited_greedy, noaux_tc are)")
    grouped = method != "greedy"
    attention = AttentionConfig(dim=int(_get(hf, "hidden_size")), n_heads=int(_get(hf, "num_attention_heads")),
                                kind="mla", q_lora_rank=int(hf.get("q_lora_rank") or 0),
                                kv_lora_rank=int(_get(hf, "kv_lora_rank")),
                                qk_nope_head_dim=int(_get(hf, "qk_nope_head_dim")),
                                qk_rope_head_dim=int(_get(hf, "qk_rope_head_dim")),
                                v_head_dim=int(_get(hf, "v_head_dim")), rope_theta=rope_theta(hf),
                                rope_scaling=rope_scaling(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
    if hf.get("attention_bias"):
        raise UsageError("config.json sets attention_bias for MLA, which dsfuse does not support")
    n_experts = hf.get("n_routed_experts")
    if not n_experts:
        return _base(hf, attention, int(_get(hf, "intermediate_size")))
    moe = MoEConfig(dim=attention.dim, n_experts=int(n_experts), top_k=int(_get(hf, "num_experts_per_tok")),
                    n_shared=int(hf.get("n_shared_experts") or 0), expert_hidden=int(_get(hf, "moe_intermediate_size")),
                    router="aux-free" if method == "noaux_tc" else "topk",
                    norm_topk=bool(hf.get("norm_topk_prob")), route_scale=float(hf.get("routed_scaling_factor", 1.0)),
                    n_groups=int(hf.get("n_group") or 1) if grouped else 1,
                    topk_groups=int(hf.get("topk_group") or 1) if grouped else 1)
    first, freq = int(hf.get("first_k_dense_replace", 0)), int(hf.get("moe_layer_freq", 1))
    layers = tuple(i for i in range(int(_get(hf, "num_hidden_layers"))) if i >= first and i % freq == 0)
    return _base(hf, attention, int(_get(hf, "intermediate_size")), moe, layers)


# --------------------------------------------------------------------------- the registry

ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add (or replace) an architecture; returns it, so a module can keep a name for it."""
    ARCHITECTURES[arch.name] = arch
    return arch


for _arch in (
    Architecture("LlamaForCausalLM", dense_config),
    Architecture("Qwen2ForCausalLM", lambda hf: dense_config(hf, qkv_bias=True)),
    Architecture("Qwen3ForCausalLM", lambda hf: dense_config(hf, qk_norm="head")),
    Architecture("MixtralForCausalLM", lambda hf: every_layer_moe_config(hf, "num_local_experts"), MIXTRAL_NAMES,
                 ("block_sparse_moe.experts", "w1", "w3", "w2")),
    Architecture("OlmoeForCausalLM", lambda hf: every_layer_moe_config(hf, "num_experts", qk_norm="all")),
    Architecture("Qwen2MoeForCausalLM", lambda hf: qwen_moe_config(hf, shared=True, qkv_bias=True), QWEN_MOE_NAMES),
    Architecture("Qwen3MoeForCausalLM", lambda hf: qwen_moe_config(hf, shared=False, qk_norm="head")),
    Architecture("DeepseekV2ForCausalLM", deepseek_config, MLA_NAMES, interleaved_rope=lambda hf: True),
    Architecture("DeepseekV3ForCausalLM", lambda hf: deepseek_config(hf, "noaux_tc"), MLA_NAMES,
                 interleaved_rope=lambda hf: bool(hf.get("rope_interleave", True))),
):
    register(_arch)


def architecture_of(hf: dict[str, Any]) -> Architecture:
    """The registered architecture config.json names, or UsageError listing the supported ones."""
    names = hf.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    found = ", ".join(names) if names else "none named"
    raise UsageError(f"unsupported architecture ({found}); supported: {', '.join(sorted(ARCHITECTURES))}")
