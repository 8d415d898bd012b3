"""A Qwen2-architecture GGUF (written with the gguf package as llama.cpp's converter writes one) loads
onto dsfuse's Llama: qkv biases, no RoPE un-permuting, Qwen2's pre-tokenizer; logits as transformers'."""

from __future__ import annotations

import json

import numpy as np
import torch

from hf_models import save_tiny

from dsfuse.models.gguf import read_config, state_dict_from_gguf, tokenizer_from_gguf
from dsfuse.models.llama import Llama

PARTS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_qwen2_gguf(model, folder, path) -> None:
    from gguf import GGUFWriter

    cfg = model.config
    writer = GGUFWriter(str(path), "qwen2")
    for key, value in (("embedding_length", cfg.hidden_size), ("block_count", cfg.num_hidden_layers),
                       ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads),
                       ("feed_forward_length", cfg.intermediate_size), ("context_length", 256)):
        writer.add_uint32(f"qwen2.{key}", value)
    writer.add_float32("qwen2.rope.freq_base", 10000.0)
    writer.add_float32("qwen2.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "qwen2")
    writer.add_array("tokenizer.ggml.tokens", [t for t, _ in vocab])
    writer.add_array("tokenizer.ggml.token_type", [3 if t == "<|end|>" else 1 for t, _ in vocab])
    writer.add_array("tokenizer.ggml.merges", [" ".join(m) if isinstance(m, list) else m
                                               for m in tokenizer["model"]["merges"]])
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{PARTS[module]}.{kind}"
        writer.add_tensor(gguf_name, tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_qwen2_gguf_runs_on_dsfuse_s_llama(tmp_path):
    from gguf import GGUFReader

    reference = save_tiny("Qwen2ForCausalLM", tmp_path / "hf")
    write_qwen2_gguf(reference, tmp_path / "hf", tmp_path / "tiny-qwen2.gguf")
    reader = GGUFReader(tmp_path / "tiny-qwen2.gguf")
    cfg = read_config(reader)
    assert cfg.qkv_bias and cfg.tie_embeddings
    model = Llama(cfg)
    model.load_state_dict(state_dict_from_gguf(reader, cfg), strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        assert (model.eval()(tokens) - reference(input_ids=tokens).logits).abs().max() < 1e-4
    tokenizer = tokenizer_from_gguf(reader)
    text = "def add(a, b):\n    return a + b  # 2024"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.encode("<|end|>").ids == [tokenizer.token_to_id("<|end|>")]
