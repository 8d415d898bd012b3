"""Real-checkpoint loading on dsfuse's core, measured in one run:

1. speed: dsfuse against transformers on the same random DeepseekV3-architecture model (4 layers,
   d_model 512, 64 routed experts top-6, 1 shared, MLA ranks as V3, fp32), saved once with
   save_pretrained and loaded by both: prefill tokens/s over a 512-token prompt and greedy decode
   tokens/s with each one's KV cache (the same loop for both; dsfuse decodes MLA absorbed);
2. memory: peak RSS of `moe-inspect`'s streamed routing on generated random V3-architecture models of
   about 2 GB and 8 GB (bf16, same width, more layers), and of loading the 2 GB one whole; each in its
   own process. The generated folders go under /tmp and are deleted afterwards.

    python bench/hf_models.py                      # both parts
    python bench/hf_models.py --part speed --rounds 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's dsfuse, not an installed one

from dsfuse.models.hf import ModelFolder, load_model, skeleton  # noqa: E402

SPEED = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
             num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
             q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
             n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=1, n_group=8, topk_group=4,
             routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=4096,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
MEMORY = dict(SPEED, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512, num_attention_heads=8,
              first_k_dense_replace=0, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
              topk_method="noaux_tc", rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def best_of(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Best rate of each function over `rounds`, run round-robin so a busy machine slows all alike."""
    best = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = max(best[name], fn())
    return best


@torch.inference_mode()
def prefill_rate(forward: Callable[[], object], tokens: int) -> float:
    started = time.perf_counter()
    forward()
    return tokens / (time.perf_counter() - started)


@torch.inference_mode()
def ours_decode(model, prompt: torch.Tensor, steps: int, out: list[int]) -> float:
    cache = model.new_cache()
    logits = model(prompt, cache, last_only=True)
    out.clear()
    started = time.perf_counter()
    for _ in range(steps):
        token = logits[0, -1].argmax().view(1, 1)
        out.append(int(token))
        logits = model(token, cache)
    return steps / (time.perf_counter() - started)


@torch.inference_mode()
def reference_decode(model, prompt: torch.Tensor, steps: int, out: list[int]) -> float:
    result = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, logits = result.past_key_values, result.logits
    out.clear()
    started = time.perf_counter()
    for _ in range(steps):
        token = logits[0, -1].argmax().view(1, 1)
        out.append(int(token))
        result = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, logits = result.past_key_values, result.logits
    return steps / (time.perf_counter() - started)


def speed(work: Path, prompt_tokens: int, decode_tokens: int, rounds: int) -> list[tuple]:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    reference = DeepseekV3ForCausalLM(DeepseekV3Config(**SPEED)).eval()
    with torch.no_grad():  # a trained model's correction bias is not zero
        for name, buffer in reference.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.rand_like(buffer) * 0.1)
    reference.save_pretrained(work / "speed")
    ours = load_model(ModelFolder(work / "speed"), torch.float32)
    prompt = torch.randint(0, SPEED["vocab_size"], (1, prompt_tokens))
    with torch.inference_mode():
        difference = (ours(prompt) - reference(input_ids=prompt).logits).abs().max().item()
    prefill = best_of({"dsfuse": lambda: prefill_rate(lambda: ours(prompt, last_only=True), prompt_tokens),
                       "transformers": lambda: prefill_rate(lambda: reference(input_ids=prompt, logits_to_keep=1),
                                                            prompt_tokens)}, rounds)
    tokens: dict[str, list[int]] = {"dsfuse": [], "transformers": []}
    decode = best_of({"dsfuse": lambda: ours_decode(ours, prompt, decode_tokens, tokens["dsfuse"]),
                      "transformers": lambda: reference_decode(reference, prompt, decode_tokens,
                                                               tokens["transformers"])}, rounds)
    same = tokens["dsfuse"] == tokens["transformers"]
    return [("prefill tokens/s", prompt_tokens, f"{prefill['dsfuse']:.0f}", f"{prefill['transformers']:.0f}",
             f"{prefill['dsfuse'] / prefill['transformers']:.2f}x", f"max |logit diff| {difference:.1e}"),
            ("decode tokens/s", decode_tokens, f"{decode['dsfuse']:.1f}", f"{decode['transformers']:.1f}",
             f"{decode['dsfuse'] / decode['transformers']:.2f}x", f"greedy tokens equal: {same}")]


# --------------------------------------------------------------------------- memory

def tokenizer_json(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([Path(__file__).read_text()], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))


def generate_model(folder: Path, layers: int) -> float:
    """A random bf16 DeepseekV3-architecture folder, one shard per decoder layer (written one at a time,
    so generating it never holds the model in memory). Returns its size in GB."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = dict(MEMORY, num_hidden_layers=layers)
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_json(folder)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {}}))  # no shards yet: filled in at the end
    model_folder = ModelFolder(folder)
    model, cfg = skeleton(model_folder), model_folder.config
    hidden, dim = cfg.moe.expert_hidden, cfg.dim
    pool: dict[tuple[int, ...], torch.Tensor] = {}  # one random tensor per shape, reused: writing is the cost

    def tensors_of(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for key, target in module.state_dict(keep_vars=True).items():
            source = model_folder.arch.source(prefix + key, model_folder.hf, cfg)
            for name in source.names:
                shape = ((dim, hidden) if name.endswith("down_proj.weight") else (hidden, dim)) \
                    if ".experts." in name else tuple(target.shape)
                if shape not in pool:
                    pool[shape] = (torch.randn(shape) * 0.05).to(torch.bfloat16)
                out[name] = pool[shape]
        return out

    shards = [(f"layer-{i:03d}.safetensors", tensors_of(layer, f"layers.{i}.")) for i, layer in enumerate(model.layers)]
    shards.append(("top.safetensors", {**tensors_of(model.embed, "embed."), **tensors_of(model.norm, "norm."),
                                       **tensors_of(model.lm_head, "lm_head.")}))
    weight_map = {}
    for shard, tensors in shards:
        save_file({name: t.clone() for name, t in tensors.items()}, folder / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9


MEASURE = """
import resource, sys, torch
torch.set_num_threads({threads})
sys.path.insert(0, {repo!r})
from dsfuse.models.hf import ModelFolder, load_model
from dsfuse.tasks.model_routing import route_text
folder = ModelFolder(__import__("pathlib").Path({folder!r}))
text = open({text!r}).read()
if {whole}:
    model = load_model(folder)
    with torch.inference_mode():
        model(torch.tensor([folder.tokenizer().encode(text).ids[:{tokens}]]), last_only=True)
else:
    route_text(folder, folder.tokenizer(), text, "bench", None, {tokens}, quiet=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_gb(folder: Path, whole: bool, tokens: int = 256) -> tuple[float, float]:
    """Peak RSS (GB) and seconds of routing `tokens` tokens of this file's text through the model."""
    started = time.perf_counter()
    code = MEASURE.format(repo=str(REPO), folder=str(folder), text=__file__, whole=whole, tokens=tokens,
                          threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[-1]) / 1e6, time.perf_counter() - started  # ru_maxrss is in KB on Linux


def memory(work: Path, layer_counts: tuple[int, int]) -> list[tuple]:
    rows = []
    sizes = {}
    for layers in layer_counts:
        folder = work / f"v3-{layers}-layers"
        sizes[layers] = generate_model(folder, layers)
        rss, seconds = peak_rss_gb(folder, whole=False)
        rows.append((f"streamed, {layers} layers", f"{sizes[layers]:.2f}", f"{rss:.2f}", f"{seconds:.0f}"))
        if layers == layer_counts[0]:
            rss, seconds = peak_rss_gb(folder, whole=True)
            rows.append((f"whole model, {layers} layers", f"{sizes[layers]:.2f}", f"{rss:.2f}", f"{seconds:.0f}"))
        shutil.rmtree(folder)
    layer_gb = (sizes[layer_counts[1]] - sizes[layer_counts[0]]) / (layer_counts[1] - layer_counts[0])
    rows.append(("one decoder layer", f"{layer_gb:.2f}", "", ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["speed", "memory", "both"], default="both")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs=2, default=(9, 38), help="layers of the small and big model")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's); on a shared "
                                                                  "machine 1 keeps the timings steady")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    with tempfile.TemporaryDirectory(dir="/tmp") as work:
        if args.part in ("speed", "both"):
            table = Table(title=f"DeepseekV3 architecture, {SPEED['num_hidden_layers']} layers, d_model "
                                f"{SPEED['hidden_size']}, 64 experts top-6 + 1 shared, fp32, "
                                f"{torch.get_num_threads()} threads", title_justify="left")
            for column in ("measure", "tokens", "dsfuse", "transformers", "dsfuse / transformers", "check"):
                table.add_column(column)
            for row in speed(Path(work), args.prompt_tokens, args.decode_tokens, args.rounds):
                table.add_row(*map(str, row))
            console.print(table)
        if args.part in ("memory", "both"):
            table = Table(title="peak RSS routing a text (bf16 random DeepseekV3 architecture, d_model 1024, "
                                "64 experts of 512)", title_justify="left")
            for column in ("run", "weights GB", "peak RSS GB", "seconds"):
                table.add_column(column)
            for row in memory(Path(work), tuple(args.layers)):
                table.add_row(*row)
            console.print(table)


if __name__ == "__main__":
    main()
