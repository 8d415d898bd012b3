"""Read a Llama- or Qwen2-architecture GGUF file (llama.cpp's format) into dsfuse's `Llama` and a
`tokenizers` tokenizer.

Quantized tensors (Q4_1, Q8_0, ...) are dequantized to float32 with the `gguf` package. The BPE
tokenizer is rebuilt from the vocabulary and merges stored in the file. Parsing and dequantizing
take seconds, so the result is cached as a dsfuse checkpoint plus tokenizer.json.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from dsfuse.errors import UsageError
from dsfuse.models.llama import Llama, LlamaConfig

CONTROL_TOKEN = 3  # llama.cpp's token type for special tokens such as <|im_start|>
ARCHITECTURES = ("llama", "qwen2")
# Qwen2's pre-tokenizer split (its tokenizer.json's), applied before the byte-level mapping
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def cache_dir() -> Path:
    return Path(os.environ.get("DSFUSE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "dsfuse").expanduser()


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader: Any) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UsageError(f"expected a {' or '.join(ARCHITECTURES)}-architecture GGUF, got {arch!r}")
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        dim=int(_field(reader, f"{arch}.embedding_length")),
        n_layers=int(_field(reader, f"{arch}.block_count")),
        n_heads=int(_field(reader, f"{arch}.attention.head_count")),
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv")),
        ffn_hidden=int(_field(reader, f"{arch}.feed_forward_length")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=int(_field(reader, f"{arch}.context_length", 4096)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
    )


def _unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp interleaves each head's q/k rows for its RoPE; dsfuse (like Hugging Face) rotates halves."""
    return rearrange(weight, "(h half two) i -> (h two half) i", h=n_heads, two=2)


def state_dict_from_gguf(reader: Any, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """GGUF tensor names and layouts -> `Llama` parameter names, dequantized to float32. llama.cpp
    interleaves a llama's q/k rows for its RoPE (undone here); qwen2's it keeps as they were."""
    from gguf.quants import dequantize

    block = {"attn_norm": "attn_norm", "attn_q": "attn.wq", "attn_k": "attn.wk", "attn_v": "attn.wv",
             "attn_output": "attn.wo", "ffn_norm": "ffn_norm", "ffn_gate": "ffn.w1", "ffn_up": "ffn.w3",
             "ffn_down": "ffn.w2"}
    interleaved = _field(reader, "general.architecture") == "llama"
    top = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight"}
    state = {}
    for tensor in reader.tensors:
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if tensor.name in top:
            name = top[tensor.name]
        else:
            _, layer, part, kind = tensor.name.split(".")
            if interleaved and part == "attn_q":
                weight = _unpermute_rope(weight, cfg.n_heads)
            elif interleaved and part == "attn_k":
                weight = _unpermute_rope(weight, cfg.n_kv_heads)
            name = f"layers.{layer}.{block[part]}.{kind}"
        state[name] = torch.from_numpy(np.ascontiguousarray(weight))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def tokenizer_from_gguf(reader: Any) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF's vocabulary, merges and special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise UsageError(f"only byte-level BPE (gpt2) tokenizers are supported, got {_field(reader, 'tokenizer.ggml.model')!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    if _field(reader, "tokenizer.ggml.pre") == "qwen2":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # SmolLM2 ("smollm") splits digits one by one before the GPT-2 byte-level regex
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL_TOKEN])
    return tokenizer


def load_gguf_llama(path: Path, use_cache: bool = True) -> tuple[Llama, Any]:
    """The model (eval mode, float32, CPU) and tokenizer in a GGUF file, via the cache when it has them."""
    from tokenizers import Tokenizer

    from dsfuse.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
    from dsfuse.io import write_text

    stat = path.stat()
    cached = cache_dir() / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if use_cache and (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file():
        model, _ = load_checkpoint(cached / "model.safetensors", kind="llama")
        return model, Tokenizer.from_file(str(cached / "tokenizer.json"))
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise UsageError(f"not a readable GGUF file ({str(e).splitlines()[0][:120]})", path) from None
    cfg = read_config(reader)
    model = Llama(cfg)
    model.load_state_dict(state_dict_from_gguf(reader, cfg), strict=True)
    tokenizer = tokenizer_from_gguf(reader)
    if use_cache:
        try:
            save_checkpoint(cached / "model.safetensors", model,
                            CheckpointMeta.of("llama", cfg, setup={"source": str(path)}))
            write_text(cached / "tokenizer.json", tokenizer.to_str())
        except OSError:
            pass  # a read-only cache only costs speed next time
    return model.eval(), tokenizer
