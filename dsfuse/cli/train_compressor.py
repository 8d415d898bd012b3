"""`dsfuse train-compressor`: train a resampler or pixel-shuffle compressor on a tokenizer's latents."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsfuse.choices import TrainableCompressMethod
from dsfuse.cli.common import (DebugOpt, DeviceOpt, EngineOpt, ForceOpt, JsonOpt, QuietOpt, ResumeOpt, RunOutOpt,
                               SeedOpt, given_options, report_training, trainer)


@trainer
def train_compressor(
    data: Annotated[Path, typer.Argument(help="A folder of images (searched recursively); random crops of them "
                                              "are the training set.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="The vqvae tokenizer whose latents are "
                                                                        "compressed.")],
    out: RunOutOpt = None,
    method: Annotated[TrainableCompressMethod, typer.Option("--method", "-m", help="What to train.")] = "resampler",
    ratio: Annotated[int, typer.Option("--ratio", "-r", help="Tokens in per token out.", min=1)] = 4,
    val: Annotated[Path | None, typer.Option("--val", help="Held-out images for the PSNR evaluation "
                                                           "(default: centre crops of DATA).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps in all (also when resuming).")] = 400,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 1e-3,
    width: Annotated[int, typer.Option("--width", help="Resampler: width of its layers.", min=8)] = 128,
    depth: Annotated[int, typer.Option("--depth", help="Resampler: cross-attention layers each way.", min=1)] = 2,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps (0: at the end).",
                                            min=0)] = 0,
    views: Annotated[int, typer.Option("--views", help="Random crops of DATA encoded once as the training set.",
                                       min=1)] = 1024,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False, *, engine: EngineOpt,
) -> None:
    """Train a resampler or pixel-shuffle compressor to reconstruct a tokenizer's latents.

    Every evaluation decodes the compressed-then-expanded latents of held-out images and reports their
    PSNR against the uncompressed reconstruction, beside average pooling's at the same ratio.

    Example: dsfuse train-compressor photos/ --val held-out/ -c runs/vq --method resampler --out runs/rs4
    """
    from dsfuse.device import select_device
    from dsfuse.runs import run_dir_for
    from dsfuse.tasks import compression

    options = compression.CompressorOptions(data=data, checkpoint=checkpoint, method=method, ratio=ratio, val=val,
                                            steps=steps, batch_size=batch_size, lr=lr, width=width, depth=depth,
                                            eval_every=eval_every, views=views, seed=seed, **engine)
    result, summary = compression.train(options, run_dir_for(out, compression.TASK, resume), resume=resume,
                                        force=force, explicit=given_options(), device=select_device(device),
                                        quiet=quiet or json)
    report_training(result, summary, json)


def register(app: typer.Typer) -> None:
    app.command("train-compressor")(train_compressor)
