"""`dsfuse train-vqvae`: train an image tokenizer (VQ-VAE with an EMA codebook, or FSQ) on a folder of images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsfuse.choices import Quantizer, TokenizerPreset
from dsfuse.cli.common import (DebugOpt, DeviceOpt, EngineOpt, ForceOpt, JsonOpt, QuietOpt, ResumeOpt, RunOutOpt,
                               SeedOpt, given_options, report_training, trainer)


@trainer
def train_vqvae(
    data: Annotated[Path, typer.Argument(help="Folder of images (jpg, png, webp, bmp), searched recursively.")],
    out: RunOutOpt = None,
    quantizer: Annotated[Quantizer | None, typer.Option("--quantizer", help="EMA codebook or FSQ (default vq).")] = None,
    codebook_size: Annotated[int | None, typer.Option("--codebook-size", "-k", help="Codes K (default 8192).")] = None,
    downsample: Annotated[int | None, typer.Option("--downsample", "-f", help="4, 8 or 16: one token per FxF pixels (default 16).")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", "-s", help="Training size S: resize + centre-crop (default 256).")] = None,
    latent_channels: Annotated[int | None, typer.Option("--latent-channels", help="Channels of the latent (default 16).")] = None,
    base_channels: Annotated[int | None, typer.Option("--base-channels", help="Width of the first level (default 64).")] = None,
    preset: Annotated[TokenizerPreset | None, typer.Option("--preset", help="chameleon: 512 px, F=16, K=8192.")] = None,
    val: Annotated[Path | None, typer.Option("--val", help="Held-out image folder for evaluation (default: the first training images).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps in all (also when resuming).")] = 2000,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 1e-3,
    eval_every: Annotated[int, typer.Option("--eval-every", min=0, help="Steps between evaluations (grid PNG + metrics).")] = 500,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False, *, engine: EngineOpt,
) -> None:
    """Train an image tokenizer: a VQ-VAE whose images become grids of discrete tokens.

    Every --eval-every steps: reconstructions/step_N.png (originals above, reconstructions below).

    metrics.jsonl: loss, and PSNR, SSIM, codebook usage, perplexity at each evaluation.

    At the end: model.safetensors and curves.png. Unreadable images are skipped with a warning.

    Example: dsfuse train-vqvae samples/images --out runs/vq --image-size 64 --downsample 8 --codebook-size 512 --steps 300
    """
    from dsfuse import runs
    from dsfuse.tasks import tokenizer

    options = tokenizer.TokenizerOptions(
        data=data, val=val, quantizer=quantizer, codebook_size=codebook_size, downsample=downsample,
        image_size=image_size, latent_channels=latent_channels, base_channels=base_channels, preset=preset,
        steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed, **engine)
    result, summary = tokenizer.train(options, runs.run_dir_for(out, tokenizer.TASK, resume), resume=resume,
                                      force=force, explicit=given_options(), device=device, quiet=quiet)
    report_training(result, summary, json)


def register(app: typer.Typer) -> None:
    app.command("train-vqvae")(train_vqvae)


def demo_steps(samples: Path, out: Path) -> list:
    from dsfuse.cli.demo import DemoStep

    def summarize(records: list[dict]) -> str:
        r = records[0]
        return (f"{r['step']} steps on {r['images']} images: PSNR {r['psnr']:.1f} dB, "
                f"usage {r['usage']:.0%} of K={r['codebook_size']}, {r['grid'][0]}x{r['grid'][1]} tokens")

    run = out / "tokenizer" / "run"
    return [DemoStep("train-vqvae", ["train-vqvae", str(samples / "images"), "--out", str(run), "--image-size", "32",
                                     "--downsample", "8", "--codebook-size", "64", "--base-channels", "16",
                                     "--latent-channels", "8", "--steps", "30", "--batch-size", "8",
                                     "--eval-every", "15"], summarize, [run])]
