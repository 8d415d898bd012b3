"""The local model's speed and exactness: dsfuse's Llama (nn/attention) against transformers'
LlamaForCausalLM, both loaded from the same SmolLM2-135M GGUF and run in float32 on this CPU.

Prefill: one forward over the prompt. Decode: greedy steps of one token with each model's KV cache
(the same loop for both). Logits: max |difference| on the prompt, and whether every argmax agrees.

    python bench/llm.py --prompt-tokens 128 --decode-tokens 32
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch

PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n"
          "Explain in a few sentences how a vector-quantized autoencoder turns an image into a grid of "
          "discrete tokens, and why a language model can then read those tokens. ")


def seconds(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    return min(seconds(fn) for _ in range(repeats))


@torch.inference_mode()
def ours_decode(model, ids: torch.Tensor, steps: int) -> tuple[list[int], float]:
    """Greedy tokens after `ids` and the seconds the one-token steps took (prefill excluded)."""
    cache = model.new_cache()
    logits = model(ids, cache, last_only=True)
    out = []
    started = time.perf_counter()
    for _ in range(steps):
        token = logits[0, -1].argmax().view(1, 1)
        out.append(int(token))
        logits = model(token, cache)
    return out, time.perf_counter() - started


@torch.inference_mode()
def reference_decode(model, ids: torch.Tensor, steps: int) -> tuple[list[int], float]:
    result = model(ids, use_cache=True)
    cache, logits = result.past_key_values, result.logits
    out = []
    started = time.perf_counter()
    for _ in range(steps):
        token = logits[0, -1].argmax().view(1, 1)
        out.append(int(token))
        result = model(token, past_key_values=cache, use_cache=True)
        cache, logits = result.past_key_values, result.logits
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from dsfuse.agent.local import GGUF_NAME, gguf_path
    from dsfuse.report import console, print_table
    from dsfuse.models.gguf import load_gguf_llama

    path = gguf_path()
    ours, tokenizer = load_gguf_llama(path)
    ids = tokenizer.encode(PROMPT * 8).ids[:args.prompt_tokens]
    ids = torch.tensor([ids])
    console.print(f"{GGUF_NAME}: prompt {ids.shape[1]} tokens, decode {args.decode_tokens} tokens, "
                  f"{torch.get_num_threads()} threads, best of {args.repeats}")

    try:
        from transformers import LlamaForCausalLM
        from transformers.utils import logging as transformers_logging
    except ImportError:
        with torch.inference_mode():
            prefill = best_seconds(lambda: ours(ids), args.repeats)
        steps = min(ours_decode(ours, ids, args.decode_tokens)[1] for _ in range(args.repeats))
        rows = [["prefill tokens/s", ids.shape[1] / prefill, "(transformers not installed)", ""],
                ["decode tokens/s", args.decode_tokens / steps, "", ""]]
        print_table("local model (reference skipped: pip install -e '.[bench]')",
                    ["", "dsfuse", "transformers", "ratio"], rows)
        return
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values renames across versions
    reference = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    # Interleaved repeats, best of each: on a shared machine the load drifts between measurements.
    timings: dict[str, list[float]] = {"ours_prefill": [], "ref_prefill": [], "ours_steps": [], "ref_steps": []}
    for _ in range(args.repeats):
        with torch.inference_mode():
            timings["ours_prefill"].append(seconds(lambda: ours(ids)))
            timings["ref_prefill"].append(seconds(lambda: reference(ids)))
        ours_tokens, ours_seconds = ours_decode(ours, ids, args.decode_tokens)
        ref_tokens, ref_seconds = reference_decode(reference, ids, args.decode_tokens)
        timings["ours_steps"].append(ours_seconds)
        timings["ref_steps"].append(ref_seconds)
    ours_prefill, ref_prefill, ours_steps, ref_steps = (min(v) for v in timings.values())
    ours_decode_rate, ref_decode_rate = args.decode_tokens / ours_steps, args.decode_tokens / ref_steps
    same_tokens = ours_tokens == ref_tokens
    with torch.inference_mode():
        ours_logits, ref_logits = ours(ids), reference(ids).logits
    diff = float((ours_logits - ref_logits).abs().max())
    agree = bool((ours_logits.argmax(-1) == ref_logits.argmax(-1)).all())
    rows = [
        ["prefill tokens/s", ids.shape[1] / ours_prefill, ids.shape[1] / ref_prefill, ref_prefill / ours_prefill],
        ["decode tokens/s", ours_decode_rate, ref_decode_rate, ours_decode_rate / ref_decode_rate],
        ["max |logit difference|", diff, 0.0, f"{'ok' if diff < 1e-3 else 'TOO LARGE'} (tolerance 1e-3)"],
        ["argmax agrees at every position", agree, True, ""],
        ["same greedy continuation", same_tokens, True, ""],
    ]
    print_table("local model: dsfuse Llama vs transformers LlamaForCausalLM (same GGUF weights, float32)",
                ["", "dsfuse", "transformers", "ratio (dsfuse / ref)"], rows)


if __name__ == "__main__":
    main()
