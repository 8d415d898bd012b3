"""`dsfuse train-ddpm`: train a diffusion UNet on a folder of images (pixels, or a tokenizer's latents)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsfuse.choices import Objective, Schedule
from dsfuse.cli.common import (DebugOpt, DeviceOpt, EngineOpt, ForceOpt, JsonOpt, QuietOpt, ResumeOpt, RunOutOpt,
                               SeedOpt, given_options, report_training, trainer)
from dsfuse.errors import UsageError


def int_list(text: str, option: str) -> tuple[int, ...]:
    """"1,2,2" -> (1, 2, 2): positive integers, or a UsageError naming `option`."""
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got {text!r}", option) from None
    if any(v < 1 for v in values):
        raise UsageError(f"values must be positive, got {text!r}", option)
    return values


@trainer
def train_ddpm(
    data: Annotated[Path, typer.Argument(help="Image folder; with --class-conditional one subfolder per class.")],
    out: RunOutOpt = None,
    image_size: Annotated[int | None, typer.Option("--image-size", min=8, help="Images are resized and centre-cropped to this side (default: 32, or the tokenizer's).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 5000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (warmup, then cosine decay).")] = 2e-4,
    schedule: Annotated[Schedule, typer.Option("--schedule", help="Noise schedule.")] = "cosine",
    objective: Annotated[Objective, typer.Option("--objective", help="What the UNet predicts.")] = "eps",
    min_snr: Annotated[float, typer.Option("--min-snr", help="Min-SNR-gamma loss weighting (0: off).")] = 5.0,
    class_conditional: Annotated[bool, typer.Option("--class-conditional", help="Condition on the class folders (and learn an unconditional mode for guidance).")] = False,
    label_dropout: Annotated[float, typer.Option("--label-dropout", help="Fraction of steps trained without the label, for classifier-free guidance.")] = 0.1,
    base_channels: Annotated[int, typer.Option("--base-channels", help="UNet width at full resolution.")] = 64,
    channel_mults: Annotated[str, typer.Option("--channel-mults", help="Width multiplier per resolution level.")] = "1,2,2",
    res_blocks: Annotated[int, typer.Option("--res-blocks", help="Residual blocks per level.")] = 2,
    attention: Annotated[str, typer.Option("--attention", help="Feature-map sides with self-attention, e.g. 16,8.")] = "16",
    dropout: Annotated[float, typer.Option("--dropout", help="Dropout in the residual blocks.")] = 0.1,
    ema_decay: Annotated[float, typer.Option("--ema-decay", help="EMA of the weights (at most 1 - 10/steps); the EMA model is saved and sampled.")] = 0.999,
    sample_every: Annotated[int, typer.Option("--sample-every", min=0, help="Write a sample grid PNG every N steps (0: only at the end).")] = 500,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="A train-vqvae checkpoint: train in its latent space.")] = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False, *, engine: EngineOpt,
) -> None:
    """Train a diffusion UNet (DDPM) on an image folder; the EMA weights are what `sample` uses.

    Example: dsfuse train-ddpm digits/ --out runs/ddpm --class-conditional --steps 4000
    """
    from dsfuse import runs
    from dsfuse.tasks import diffusion

    options = diffusion.DiffusionOptions(
        data=data, tokenizer=tokenizer, image_size=image_size, steps=steps, batch_size=batch_size, lr=lr,
        schedule=schedule, objective=objective, min_snr=min_snr, class_conditional=class_conditional,
        label_dropout=label_dropout, base_channels=base_channels, res_blocks=res_blocks, dropout=dropout,
        channel_mults=int_list(channel_mults, "--channel-mults"), attention=int_list(attention, "--attention"),
        ema_decay=ema_decay, sample_every=sample_every, seed=seed, **engine)
    result, summary = diffusion.train(options, runs.run_dir_for(out, diffusion.TASK, resume), resume=resume,
                                      force=force, explicit=given_options(), device=device, quiet=quiet)
    report_training(result, summary, json)


def register(app: typer.Typer) -> None:
    app.command("train-ddpm")(train_ddpm)


def demo_steps(samples: Path, out: Path):
    from dsfuse.cli.demo import DemoStep

    run = out / "ddpm"
    train = DemoStep("train-ddpm", ["train-ddpm", str(samples / "images"), "--out", str(run), "--class-conditional",
                                    "--image-size", "16", "--steps", "30", "--batch-size", "8",
                                    "--base-channels", "16", "--channel-mults", "1,2", "--res-blocks", "1",
                                    "--attention", "8", "--sample-every", "0", "--lr", "1e-3"],
                     lambda r: f"{r[0]['step']} steps, loss {r[0]['loss']:.3f}, classes {', '.join(r[0]['classes'])}",
                     [run])
    return [train]
