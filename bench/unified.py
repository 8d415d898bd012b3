"""Benchmark: the unified-token model on the generated captioned shapes, everything trained in this run.

- caption accuracy per attribute on held-out (shape, colour) pairs, never seen together in training,
  plain greedy and guided against the image-less caption model (`caption --guidance`);
- text-to-image faithfulness: images drawn for the held-out captions, judged by a small attribute
  classifier trained here on real images (its own accuracy on held-out real images is reported); the
  reference is the same measure on captions of seen pairs. One draw (sampled or greedy), and the best of
  several draws by the model's own caption likelihood (`sample --candidates`): the judge never chooses;
- `--fusion parallel` against early fusion at the same parameter count (the parallel model's experts are
  narrowed to pay for its extra attention) and the same steps;
- expert load by modality (how far text and image tokens' expert distributions are apart);
- differential against standard (MHA) attention at equal size on a long-context retrieval toy: a key's
  value hidden among distractor pairs.

Images are 32 px, an 8x8 grid of codes from a 128-code tokenizer; captions name the shape first
(`--captions colour-first` measures the other order).

    python bench/unified.py                  # full scale (about 35 minutes of CPU)
    python bench/unified.py --scale 0.25     # reduced: a quarter of the data and steps
    python bench/unified.py --scale 1 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's dsfuse, not an installed one

from dsfuse.checkpoint import CheckpointMeta
from dsfuse.choices import CaptionOrder, values
from dsfuse.data.bpe import train_bpe
from dsfuse.data.captioned import ATTRIBUTES, parse_caption, read_captioned, write_captioned_set
from dsfuse.data.images import load_image
from dsfuse.device import seed_everything, select_device
from dsfuse.diffusion.latents import load_tokenizer
from dsfuse.engine import TrainConfig, fit
from dsfuse.nn.attention import AttentionConfig
from dsfuse.nn.differential import DifferentialAttention
from dsfuse.nn.transformer import TransformerBlock
from dsfuse.tasks import tokenizer as vq_task
from dsfuse.tasks import unified

console = Console(width=160)  # wide enough for the tables in a log file
SIZE = 32  # pixels: an 8x8 grid of codes at the tokenizer's downsampling by 4
CAPTION_GUIDANCE = 2.0  # `caption --guidance`: against the image-less caption model
CANDIDATES = 16  # `sample --candidates`: draws per image, the one the model captions likeliest kept


def scaled(n: int, scale: float, least: int = 1) -> int:
    return max(least, round(n * scale))


# --------------------------------------------------------------------------- the attribute judge

def small_cnn(channels: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, classes))


class AttributeJudge(nn.Module):
    """Names the shape and the colour of an image: logits per attribute. The shape is read from the
    silhouette alone (no colour), so the judge cannot name a shape by the colour it came with in training:
    held-out pairs combine them differently."""

    def __init__(self):
        super().__init__()
        self.shape = small_cnn(1, len(ATTRIBUTES["shape"]))
        self.colour = small_cnn(3, len(ATTRIBUTES["colour"]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        silhouette = (x.amax(1, keepdim=True) > -0.4).float()  # background is dark: any bright channel is shape
        return self.shape(silhouette), self.colour(x)


def labelled(folder: Path, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    data = read_captioned(folder)
    images = torch.stack([load_image(p, size) for p in data.images])
    parsed = [parse_caption(c) for c in data.captions]
    shapes = torch.tensor([ATTRIBUTES["shape"].index(p["shape"]) for p in parsed])
    colours = torch.tensor([ATTRIBUTES["colour"].index(p["colour"]) for p in parsed])
    return images, shapes, colours, data.captions


def train_judge(images, shapes, colours, steps: int, device: torch.device, run_dir: Path) -> AttributeJudge:
    seed_everything(0)
    judge = AttributeJudge()

    def loss_fn(model, batch):
        x, s, c = batch
        shape_logits, colour_logits = model(x)
        return F.cross_entropy(shape_logits, s) + F.cross_entropy(colour_logits, c)

    fit(judge, TensorDataset(images, shapes, colours), loss_fn, TrainConfig(steps=steps, batch_size=64, lr=3e-3,
                                                                               quiet=True), run_dir,
        meta=CheckpointMeta.of("judge", {}), device=device)
    return judge.eval()


@torch.no_grad()
def judged(judge: AttributeJudge, images: torch.Tensor, shapes: torch.Tensor, colours: torch.Tensor
           ) -> dict[str, float]:
    device = next(judge.parameters()).device
    shape_logits, colour_logits = judge(images.to(device))
    shape_ok = shape_logits.argmax(-1).cpu() == shapes
    colour_ok = colour_logits.argmax(-1).cpu() == colours
    return {"shape": float(shape_ok.float().mean()), "colour": float(colour_ok.float().mean()),
            "both": float((shape_ok & colour_ok).float().mean())}


# --------------------------------------------------------------------------- the unified runs

def parameters(cfg: unified.UnifiedConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in unified.UnifiedModel(cfg).parameters())


def matched_expert_hidden(options: unified.UnifiedOptions, text_vocab: int, vq: nn.Module, target: int) -> int:
    """The expert width that gives `options`' model the parameter count `target`."""
    def count(hidden: int) -> int:
        return parameters(replace(options, expert_hidden=hidden).model_config(text_vocab, vq))
    return min(range(1, options.expert_hidden + 1), key=lambda h: abs(count(h) - target))


def caption_accuracy(run: unified.UnifiedRun, paths: list[Path], captions: list[str], guidance: float = 1.0
                     ) -> tuple[dict[str, float], list[str]]:
    """The share of images whose greedy caption names each attribute right, and the captions."""
    images = torch.stack([load_image(p, run.vq.config.image_size) for p in paths])
    said = unified.greedy_captions(run, run.image_codes(images), guidance)
    truth, guessed = [parse_caption(c) for c in captions], [parse_caption(s) for s in said]
    return {name: sum(g[name] == t[name] for g, t in zip(guessed, truth)) / len(truth) for name in ATTRIBUTES}, said


def evaluate_run(run_dir: Path, heldout: Path, seen: Path, judge: AttributeJudge, device: torch.device) -> dict:
    run = unified.load_unified(run_dir, device)
    data, seen_data = read_captioned(heldout), read_captioned(seen)
    count = len(data.images)
    caption_acc, said = caption_accuracy(run, data.images, data.captions)
    guided_acc, guided_said = caption_accuracy(run, data.images, data.captions, CAPTION_GUIDANCE)
    seen_acc, _ = caption_accuracy(run, seen_data.images[:count], seen_data.captions[:count])  # training images
    seen_guided, _ = caption_accuracy(run, seen_data.images[:count], seen_data.captions[:count], CAPTION_GUIDANCE)
    generator = torch.Generator().manual_seed(0)

    def faithfulness(captions: list[str], temperature: float, candidates: int = 1) -> dict[str, float]:
        prompts = [run.encode_text(c) for c in captions]
        drawn = []
        for start in range(0, len(prompts), 32):  # `sample --prompt`'s defaults, sampled or greedy
            codes = unified.draw_best(run, prompts[start:start + 32], candidates=candidates, guidance=3.0,
                                      temperature=temperature, top_k=0, top_p=1.0, generator=generator)
            drawn.append(unified.decode_images(run, codes).cpu())
        parsed = [parse_caption(c) for c in captions]
        return judged(judge, torch.cat(drawn), torch.tensor([ATTRIBUTES["shape"].index(p["shape"]) for p in parsed]),
                      torch.tensor([ATTRIBUTES["colour"].index(p["colour"]) for p in parsed]))

    faithful = {}
    for name, captions in (("heldout", data.captions), ("seen", seen_data.captions[:count])):
        faithful[name] = {"sampled": faithfulness(captions, 1.0), "greedy": faithfulness(captions, 0.0),
                          "reranked": faithfulness(captions, 1.0, CANDIDATES)}
    load = unified.modality_load(run.model, run_dir)
    return {"caption": caption_acc, "caption_guided": guided_acc, "caption_seen": seen_acc,
            "caption_seen_guided": seen_guided, "faithful": faithful,
            "specialisation": [layer["specialisation"] for layer in load],
            "params": sum(p.numel() for p in run.model.parameters()),
            "examples": list(zip(data.captions, said, guided_said))[:4]}


# --------------------------------------------------------------------------- retrieval toy

class Retriever(nn.Module):
    """Embedding, causal pre-norm blocks (MHA or differential attention), logits at the last position."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, differential: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, AttentionConfig(dim=dim, n_heads=heads), ffn_hidden=2 * dim)
                                    for _ in range(layers))
        if differential:
            for depth, block in enumerate(self.blocks, 1):
                block.attn = DifferentialAttention(dim, heads // 2 or 1, depth)
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, causal=True)
        return self.head(self.norm(x[:, -1]))


def retrieval_data(n: int, pairs: int, keys: int, values: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences `k1 v1 ... kn vn <q> k` (distinct keys); the answer is k's value."""
    query_token = keys + values
    key_ids = torch.argsort(torch.rand(n, keys, generator=generator), -1)[:, :pairs]
    value_ids = keys + torch.randint(0, values, (n, pairs), generator=generator)
    asked = torch.randint(0, pairs, (n,), generator=generator)
    seq = torch.stack([key_ids, value_ids], -1).flatten(1)
    seq = torch.cat([seq, torch.full((n, 1), query_token), key_ids.gather(1, asked[:, None])], 1)
    return seq, value_ids.gather(1, asked[:, None])[:, 0]


def retrieval(differential: bool, pairs: int, steps: int, device: torch.device, run_dir: Path) -> dict:
    keys, values, dim = 4 * pairs, 16, 64
    generator = torch.Generator().manual_seed(0)
    train_x, train_y = retrieval_data(max(4096, steps * 32), pairs, keys, values, generator)
    test_x, test_y = retrieval_data(1024, pairs, keys, values, generator)
    seed_everything(0)
    model = Retriever(keys + values + 1, dim, 2, 4, differential)
    started = time.perf_counter()
    fit(model, TensorDataset(train_x, train_y), lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        TrainConfig(steps=steps, batch_size=32, lr=1e-3, quiet=True), run_dir, meta=CheckpointMeta.of("toy", {}),
        device=device)
    with torch.no_grad():
        accuracy = float((model.eval()(test_x.to(device)).argmax(-1).cpu() == test_y).float().mean())
    return {"accuracy": accuracy, "params": sum(p.numel() for p in model.parameters()),
            "seconds": time.perf_counter() - started, "context": test_x.shape[1]}


# --------------------------------------------------------------------------- the run

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="Share of the full data and steps (1: ~30 min CPU).")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--captions", choices=values(CaptionOrder), default="shape-first",
                        help="Which attribute the generated captions name first.")
    parser.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = parser.parse_args()
    device = select_device(args.device)
    if device.type == "cpu":  # models this small lose more to thread hand-offs than they gain (as train-moe finds)
        torch.set_num_threads(1)
    s = args.scale
    results: dict = {"scale": s, "device": str(device), "captions": args.captions}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        (root / "shapes").mkdir()
        write_captioned_set(root / "shapes", scaled(6000, s, 200), scaled(256, s, 64), SIZE, seed=0,
                            order=args.captions)
        train_dir, heldout = root / "shapes" / "train", root / "shapes" / "heldout"

        vq_options = vq_task.TokenizerOptions(data=train_dir, image_size=SIZE, downsample=4, codebook_size=128,
                                              base_channels=16, latent_channels=32, steps=scaled(3000, s, 300),
                                              batch_size=32, eval_every=0)
        _, vq_summary = vq_task.train(vq_options, root / "vq", device=str(device), quiet=True)
        results["tokenizer"] = {k: vq_summary.get(k) for k in ("psnr", "usage", "perplexity")}
        console.print(f"tokenizer: PSNR {vq_summary.get('psnr', 0):.1f} dB, {time.perf_counter() - t0:.0f}s")

        images, shapes, colours, seen_captions = labelled(train_dir, SIZE)
        judge = train_judge(images, shapes, colours, scaled(1500, s, 400), device, root / "judge")
        results["judge_on_heldout_real"] = judged(judge, *labelled(heldout, SIZE)[:3])
        console.print(f"judge on held-out real images: {results['judge_on_heldout_real']}")

        steps = scaled(5000, s, 300)
        base = unified.UnifiedOptions(data=train_dir, tokenizer=root / "vq", steps=steps, batch_size=32, lr=2e-3,
                                      dim=64, layers=3, heads=4, experts=8, top_k=2, shared=1, expert_hidden=64,
                                      sample_every=0)
        runs = {"early": base}
        vq = load_tokenizer(root / "vq", device)
        text_vocab = train_bpe(seen_captions, base.text_vocab).get_vocab_size()
        parallel = replace(base, fusion="parallel")  # its three extra attentions per layer paid for by narrower experts
        target = parameters(base.model_config(text_vocab, vq))
        runs["parallel"] = replace(parallel, expert_hidden=matched_expert_hidden(parallel, text_vocab, vq, target))
        results["fusion"] = {}
        for name in ("early", "parallel"):
            started = time.perf_counter()
            result, summary = unified.train(runs[name], root / name, device=str(device), quiet=True)
            seconds = time.perf_counter() - started
            results["fusion"][name] = {"train_seconds": seconds, "token_loss": summary["loss"],
                                       **evaluate_run(root / name, heldout, train_dir, judge, device)}
            console.print(f"{name}: {seconds:.0f}s, {results['fusion'][name]['caption']}")

        pairs = scaled(16, s, 8)
        results["retrieval"] = {name: retrieval(name == "differential", pairs, scaled(6000, s, 600), device,
                                                root / f"retrieval-{name}") for name in ("standard", "differential")}
        results["seconds"] = time.perf_counter() - t0

    show(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


def show(r: dict) -> None:
    table = Table(title=f"unified-token model on captioned shapes ({r['captions']} captions), scale {r['scale']} "
                        f"on {r['device']} ({r['seconds'] / 60:.1f} min in all)")
    for column in ("measure", "early fusion", "parallel cross-attention"):
        table.add_column(column)
    e, p = r["fusion"]["early"], r["fusion"]["parallel"]
    table.add_row("parameters", f"{e['params']:,}", f"{p['params']:,}")
    table.add_row("training seconds (same steps)", f"{e['train_seconds']:.0f}", f"{p['train_seconds']:.0f}")
    table.add_row("final token loss", f"{e['token_loss']:.3f}", f"{p['token_loss']:.3f}")
    for name in ATTRIBUTES:
        table.add_row(f"caption {name}, held-out pairs: guided {CAPTION_GUIDANCE:g} / plain (training images)",
                      *(f"{m['caption_guided'][name]:.1%} / {m['caption'][name]:.1%} "
                        f"({m['caption_seen_guided'][name]:.1%} / {m['caption_seen'][name]:.1%})" for m in (e, p)))
    for key, label in (("heldout", "held-out pairs"), ("seen", "seen pairs (reference)")):
        table.add_row(f"drawn images with the asked shape and colour, {label}: best of {CANDIDATES} / one sampled "
                      f"/ greedy", *(" / ".join(f"{m['faithful'][key][way]['both']:.1%}"
                                                for way in ("reranked", "sampled", "greedy")) for m in (e, p)))
    table.add_row("expert specialisation by modality per layer (0..1)",
                  " ".join(f"{v:.2f}" for v in e["specialisation"]), " ".join(f"{v:.2f}" for v in p["specialisation"]))
    console.print(table)
    judge = r["judge_on_heldout_real"]
    console.print(f"judge on held-out real images: shape {judge['shape']:.1%}, colour {judge['colour']:.1%}; "
                  f"tokenizer PSNR {r['tokenizer']['psnr']:.1f} dB")
    retrieval = Table(title=f"retrieval toy: a key's value among distractors, context "
                            f"{r['retrieval']['standard']['context']} tokens")
    for column in ("attention", "parameters", "accuracy", "seconds"):
        retrieval.add_column(column)
    for name, v in r["retrieval"].items():
        retrieval.add_row(name, f"{v['params']:,}", f"{v['accuracy']:.1%}", f"{v['seconds']:.0f}")
    console.print(retrieval)


if __name__ == "__main__":
    main()
