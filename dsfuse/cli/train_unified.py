"""`dsfuse train-unified`: one MoE decoder over text and VQ image tokens, trained both ways on captioned images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsfuse.choices import AttentionVariant, UnifiedFusion
from dsfuse.cli.common import (DebugOpt, DeviceOpt, EngineOpt, ForceOpt, JsonOpt, QuietOpt, ResumeOpt, RunOutOpt,
                               SeedOpt, given_options, report_training, trainer)


@trainer
def train_unified(
    data: Annotated[Path, typer.Argument(help="Folder of images with a caption each (x.png + x.txt, or captions.jsonl).")],
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="A train-vqvae run: its codes are the image tokens (copied into the run; a new run needs it).")] = None,
    out: RunOutOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 2000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per step.")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 1e-3,
    text_vocab: Annotated[int, typer.Option("--text-vocab", help="Byte-level BPE tokens to train on the captions (at least 257).")] = 320,
    max_text: Annotated[int, typer.Option("--max-text", min=1, help="Caption tokens at most (longer captions are cut).")] = 24,
    dim: Annotated[int, typer.Option("--dim", min=8, help="Model width.")] = 64,
    layers: Annotated[int, typer.Option("--layers", min=1, help="Decoder layers.")] = 2,
    heads: Annotated[int, typer.Option("--heads", min=1, help="Attention heads.")] = 4,
    experts: Annotated[int, typer.Option("--experts", min=1, help="Routed experts per MoE layer.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Experts per token.")] = 2,
    shared: Annotated[int, typer.Option("--shared", min=0, help="Always-on shared experts.")] = 1,
    expert_hidden: Annotated[int, typer.Option("--expert-hidden", min=1, help="Hidden width of each expert.")] = 64,
    fusion: Annotated[UnifiedFusion, typer.Option("--fusion", help="early: one shared stream; parallel: text and image self-attention streams with gated cross-attention both ways.")] = "early",
    attention: Annotated[AttentionVariant, typer.Option("--attention", help="mla (DeepSeek-V2) or differential (two softmax maps, their difference).")] = "mla",
    caption_dropout: Annotated[float, typer.Option("--caption-dropout", help="Share of caption-to-image samples trained without their caption, for sample's classifier-free guidance.")] = 0.1,
    image_dropout: Annotated[float, typer.Option("--image-dropout", help="Share of image-to-caption samples trained without their image, for caption --guidance.")] = 0.1,
    sample_every: Annotated[int, typer.Option("--sample-every", min=0, help="Write sample images and captions every N steps (0: only at the end).")] = 500,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False, *, engine: EngineOpt,
) -> None:
    """Train the unified-token model: caption -> image tokens and image tokens -> caption, one vocabulary.

    Example: dsfuse train-unified data/shapes/train --tokenizer runs/vq --out runs/unified --steps 2000
    """
    from dsfuse import runs
    from dsfuse.tasks import unified

    options = unified.UnifiedOptions(
        data=data, tokenizer=tokenizer, steps=steps, batch_size=batch_size, lr=lr, text_vocab=text_vocab,
        max_text=max_text, dim=dim, layers=layers, heads=heads, experts=experts, top_k=top_k, shared=shared,
        expert_hidden=expert_hidden, fusion=fusion, attention=attention, caption_dropout=caption_dropout,
        image_dropout=image_dropout, sample_every=sample_every, seed=seed, **engine)
    result, summary = unified.train(options, runs.run_dir_for(out, unified.TASK, resume), resume=resume, force=force,
                                    explicit=given_options(), device=device, quiet=quiet)
    report_training(result, summary, json)


def register(app: typer.Typer) -> None:
    app.command("train-unified")(train_unified)


def demo_steps(samples: Path, out: Path):
    from dsfuse.cli.demo import DemoStep

    run = out / "unified"
    return [DemoStep("train-unified", ["train-unified", str(out / "shapes" / "train"), "--tokenizer",
                                       str(out / "tokenizer" / "run"), "--out", str(run), "--steps", "10", "--dim",
                                       "32", "--heads", "2", "--experts", "4", "--batch-size", "8",
                                       "--sample-every", "0"],
                     lambda r: f"{r[0]['step']} steps, token loss {r[0]['loss']:.2f}", [run])]
