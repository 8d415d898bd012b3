"""`dsfuse train-vqvae`: train an image tokenizer (VQ-VAE with an EMA codebook, or FSQ) on a folder of images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsfuse.cli.common import (DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, ResumeOpt, SeedOpt, command,
                               report_training, warn)
from dsfuse.errors import UsageError

# What a preset sets; options given on the command line win.
PRESETS = {"chameleon": {"image_size": 512, "downsample": 16, "codebook_size": 8192, "base_channels": 128}}
DEFAULTS = {"image_size": 256, "downsample": 16, "codebook_size": 8192, "quantizer": "vq",
            "latent_channels": 16, "base_channels": 64}
EVAL_IMAGES = 16


def model_config(options: dict, preset: str | None):
    """The VQVAEConfig of a new run: defaults, then the preset, then explicit options."""
    from dsfuse.models.vqvae import VQVAEConfig

    if preset is not None and preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}", "--preset")
    chosen = {**DEFAULTS, **PRESETS.get(preset or "", {}), **{k: v for k, v in options.items() if v is not None}}
    try:
        return VQVAEConfig(**chosen)
    except ValueError as e:
        raise UsageError(str(e), "--" + _option_at_fault(str(e))) from None


def _option_at_fault(message: str) -> str:
    for name in ("quantizer", "downsample", "codebook", "image size"):
        if name in message:
            return {"codebook": "codebook-size", "image size": "image-size"}.get(name, name)
    return "options"


def resumed_config(run_dir: Path, options: dict):
    """The config a run was started with; options that contradict it are refused."""
    from dsfuse.checkpoint import MODEL_FILE, read_metadata
    from dsfuse.models.vqvae import VQVAEConfig

    meta = read_metadata(run_dir / MODEL_FILE)
    if meta["kind"] != "vqvae":
        raise UsageError(f"the run holds a {meta['kind']!r} model, not a vqvae", run_dir)
    saved = meta["config"]
    for name, value in options.items():
        if value is not None and saved.get(name) != value:
            raise UsageError(f"the run was started with {name.replace('_', '-')} {saved.get(name)}; "
                             f"resume cannot change it", f"--{name.replace('_', '-')}")
    return VQVAEConfig(**saved)


def fixed_eval_images(dataset, count: int):
    """The first `count` images of a folder, as one tensor: the same set at every evaluation."""
    import torch

    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


@command
def train_vqvae(
    data: Annotated[Path, typer.Argument(help="Folder of images (jpg, png, webp, bmp), searched recursively.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory for model, metrics and pictures.")],
    quantizer: Annotated[str | None, typer.Option("--quantizer", help="vq (EMA codebook) or fsq (default vq).")] = None,
    codebook_size: Annotated[int | None, typer.Option("--codebook-size", "-k", help="Codes K (default 8192).")] = None,
    downsample: Annotated[int | None, typer.Option("--downsample", "-f", help="4, 8 or 16: one token per FxF pixels (default 16).")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", "-s", help="Training size S: resize + centre-crop (default 256).")] = None,
    latent_channels: Annotated[int | None, typer.Option("--latent-channels", help="Channels of the latent (default 16).")] = None,
    base_channels: Annotated[int | None, typer.Option("--base-channels", help="Width of the first level (default 64).")] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="chameleon: 512 px, F=16, K=8192.")] = None,
    val: Annotated[Path | None, typer.Option("--val", help="Held-out image folder for evaluation (default: the first training images).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps in all (also when resuming).")] = 2000,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 1e-3,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between evaluations (grid PNG + metrics).")] = 500,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Train an image tokenizer: a VQ-VAE whose images become grids of discrete tokens.

    Every --eval-every steps: reconstructions/step_N.png (originals above, reconstructions below).

    metrics.jsonl: loss, and PSNR, SSIM, codebook usage, perplexity at each evaluation.

    At the end: model.safetensors and curves.png. Unreadable images are skipped with a warning.

    Example: dsfuse train-vqvae samples/images --out runs/vq --image-size 64 --downsample 8 --codebook-size 512 --steps 300
    """
    import torch

    from dsfuse.data.images import ImageFolder, save_grid
    from dsfuse.device import seed_everything, select_device
    from dsfuse.engine import TrainConfig, fit, prepare_run_dir, read_metrics
    from dsfuse.models.vqvae import VQVAE, evaluate_tokenizer, training_loss
    from dsfuse.plots import plot_curves

    torch_device = select_device(device)
    if eval_every < 0:
        raise UsageError(f"eval-every must be 0 or more, got {eval_every}", "--eval-every")
    options = {"quantizer": quantizer, "codebook_size": codebook_size, "downsample": downsample,
               "image_size": image_size, "latent_channels": latent_channels, "base_channels": base_channels}
    if resume:
        run_dir = prepare_run_dir(out, resume=True, force=force)
        cfg = resumed_config(run_dir, options)
    else:
        cfg = model_config(options, preset)
    train_config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(100, steps // 10),
                               eval_every=eval_every, quiet=quiet, seed=seed)
    dataset = ImageFolder(data, cfg.image_size)
    for path in dataset.skipped:
        warn(f"skipped unreadable image ({path})")  # shown even with -q: data went unused
    held_out = ImageFolder(val, cfg.image_size) if val is not None else dataset
    eval_images = fixed_eval_images(held_out, EVAL_IMAGES)
    if not resume:
        run_dir = prepare_run_dir(out, resume=False, force=force)

    def evaluate(model, step: int) -> dict[str, float]:
        metrics, reconstruction = evaluate_tokenizer(model, eval_images)
        shown = min(8, len(eval_images))
        save_grid(torch.cat([eval_images[:shown], reconstruction[:shown]]),
                  run_dir / "reconstructions" / f"step_{step:06d}.png", nrow=shown)
        return metrics

    seed_everything(seed)
    model = VQVAE(cfg)
    def loss_fn(model, batch):  # an ImageFolder batch is (images, labels); a tokenizer needs only images
        return training_loss(model, batch[0])

    result = fit(model, dataset, loss_fn, train_config, run_dir, kind="vqvae", config=cfg,
                 device=torch_device, resume=resume, evaluate=evaluate)
    plot_curves(read_metrics(run_dir), ["loss", "psnr", "usage", "perplexity"], run_dir / "curves.png",
                title=f"train-vqvae ({cfg.quantizer}, K={model.codebook_size}, F={cfg.downsample})")
    summary = {"quantizer": cfg.quantizer, "codebook_size": model.codebook_size, "grid": [cfg.grid, cfg.grid],
               "images": len(dataset), "skipped": len(dataset.skipped), "loss": result.metrics.get("loss"),
               **{k.removeprefix("eval_"): v for k, v in result.metrics.items() if k.startswith("eval_")}}
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
