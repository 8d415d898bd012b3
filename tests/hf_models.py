"""Tiny random Hugging Face models of every supported architecture, saved as real model folders
(config.json, safetensors, tokenizer.json) with `transformers`' own save_pretrained."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.15, rms_norm_eps=1e-6, tie_word_embeddings=False,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
MLA = dict(num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
           intermediate_size=96, num_hidden_layers=3, first_k_dense_replace=1, routed_scaling_factor=1.5)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

# architecture -> (transformers config class, model class, options beyond COMMON)
SPECS = {
    "LlamaForCausalLM": ("LlamaConfig", dict(intermediate_size=96, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "Qwen2ForCausalLM": ("Qwen2Config", dict(intermediate_size=96, tie_word_embeddings=True)),
    "Qwen3ForCausalLM": ("Qwen3Config", dict(intermediate_size=96, head_dim=32)),
    "MixtralForCausalLM": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "OlmoeForCausalLM": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2)),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                                   num_experts_per_tok=2, shared_expert_intermediate_size=48,
                                                   mlp_only_layers=[1], norm_topk_prob=False)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                                   num_experts_per_tok=2, norm_topk_prob=True, head_dim=16)),
    "DeepseekV2ForCausalLM": ("DeepseekV2Config", dict(MLA, q_lora_rank=None, topk_method="group_limited_greedy",
                                                       n_group=4, topk_group=2, rope_parameters=YARN)),
    "DeepseekV3ForCausalLM": ("DeepseekV3Config", dict(MLA, q_lora_rank=24, n_group=4, topk_group=2,
                                                       norm_topk_prob=True, rope_interleave=True)),
}


def tiny_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer.json with VOCAB entries (every text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|end|>"], show_progress=False)
    text = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 3]
    tokenizer.train_from_iterator(text, trainer)
    tokenizer.save(str(path / "tokenizer.json"))


def save_tiny(arch: str, path: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """Build architecture `arch` at random (fp32), save it with its tokenizer to `path`, return it."""
    import transformers

    config_name, options = SPECS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**COMMON, **options, **overrides})
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a trained V3 has a non-zero bias: make it count
                buffer.copy_(torch.rand_like(buffer) * 0.2)
    model.save_pretrained(path)
    tiny_tokenizer(path)
    return model


def save_fp8(folder: Path, fp8: Path, dequantised: Path, quantised: Callable[[str], bool],
             block: tuple[int, int] = (16, 24)) -> None:
    """Rewrite the saved model `folder` the way DeepSeek ships its checkpoints: each tensor `quantised`
    names becomes float8_e4m3fn with a float32 `<name>_scale_inv` (one scale per block, the block's
    absolute maximum over e4m3's largest value), the rest stays as it is; `dequantised` gets the same model
    with those weights as their fp8 values times their scales, in float32 (for transformers to load)."""
    from safetensors.torch import load_file, save_file

    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    tensors, stored, exact = load_file(folder / "model.safetensors"), {}, {}
    for name, w in tensors.items():
        if not quantised(name):
            stored[name] = exact[name] = w
            continue
        br, bc = block
        rows, cols = -(-w.shape[0] // br), -(-w.shape[1] // bc)
        scale = torch.empty(rows, cols)
        q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
        deq = torch.empty(w.shape)
        for i in range(rows):
            for j in range(cols):
                cut = (slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc))
                scale[i, j] = w[cut].abs().max().clamp(min=1e-12) / fp8_max
                q[cut] = (w[cut] / scale[i, j]).to(torch.float8_e4m3fn)
                deq[cut] = q[cut].float() * scale[i, j]
        stored[name], stored[name + "_scale_inv"], exact[name] = q, scale, deq
    config = json.loads((folder / "config.json").read_text())
    for path, state, quant in ((fp8, stored, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                              "weight_block_size": list(block)}), (dequantised, exact, None)):
        path.mkdir(parents=True, exist_ok=True)
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps({**config, "quantization_config": quant} if quant else config))
        shutil.copy(folder / "tokenizer.json", path / "tokenizer.json")
