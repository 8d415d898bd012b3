"""`dsfuse train-ddpm`: train a diffusion UNet on a folder of images (pixels, or a tokenizer's latents)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsfuse.cli.common import (DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, ResumeOpt, SeedOpt, command,
                               console, report_training, warn)
from dsfuse.errors import UsageError

GRID_SAMPLES = 16
GRID_SAMPLER, GRID_STEPS = "ddim", 25  # fast enough to preview every few hundred steps


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got {text!r}", option) from None
    if any(v < 1 for v in values):
        raise UsageError(f"values must be positive, got {text!r}", option)
    return values


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise UsageError(f"unknown value {value!r}; choose from {', '.join(choices)}", option)
    return value


def _load_images(dataset, quiet: bool):
    """Decode the whole folder once: [N, 3, S, S] and labels [N], so training steps never touch the disk."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    loader = DataLoader(dataset, batch_size=256, shuffle=False)
    images, labels = [], []
    for x, y in tqdm(loader, desc="load images", unit="batch", leave=False, disable=quiet):
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


@command
def train_ddpm(
    data: Annotated[Path, typer.Argument(help="Image folder; with --class-conditional one subfolder per class.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory to create.")],
    image_size: Annotated[int | None, typer.Option("--image-size", help="Images are resized and centre-cropped to this side (default: 32, or the tokenizer's).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 5000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (warmup, then cosine decay).")] = 2e-4,
    schedule: Annotated[str, typer.Option("--schedule", help="Noise schedule: linear, cosine or sigmoid.")] = "cosine",
    objective: Annotated[str, typer.Option("--objective", help="What the UNet predicts: eps, v or x0.")] = "eps",
    min_snr: Annotated[float, typer.Option("--min-snr", help="Min-SNR-gamma loss weighting (0: off).")] = 5.0,
    class_conditional: Annotated[bool, typer.Option("--class-conditional", help="Condition on the class folders (and learn an unconditional mode for guidance).")] = False,
    label_dropout: Annotated[float, typer.Option("--label-dropout", help="Fraction of steps trained without the label, for classifier-free guidance.")] = 0.1,
    base_channels: Annotated[int, typer.Option("--base-channels", help="UNet width at full resolution.")] = 64,
    channel_mults: Annotated[str, typer.Option("--channel-mults", help="Width multiplier per resolution level.")] = "1,2,2",
    res_blocks: Annotated[int, typer.Option("--res-blocks", help="Residual blocks per level.")] = 2,
    attention: Annotated[str, typer.Option("--attention", help="Feature-map sides with self-attention, e.g. 16,8.")] = "16",
    dropout: Annotated[float, typer.Option("--dropout", help="Dropout in the residual blocks.")] = 0.1,
    ema_decay: Annotated[float, typer.Option("--ema-decay", help="EMA of the weights (at most 1 - 10/steps); the EMA model is saved and sampled.")] = 0.999,
    sample_every: Annotated[int, typer.Option("--sample-every", help="Write a sample grid PNG every N steps (0: only at the end).")] = 500,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="A train-vqvae checkpoint: train in its latent space.")] = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Train a diffusion UNet (DDPM) on an image folder; the EMA weights are what `sample` uses.

    Example: dsfuse train-ddpm digits/ --out runs/ddpm --class-conditional --steps 4000
    """
    import torch
    from torch.utils.data import TensorDataset

    from dsfuse.checkpoint import read_metadata
    from dsfuse.data.images import ImageFolder, save_grid
    from dsfuse.device import seed_everything, select_device
    from dsfuse.diffusion import OBJECTIVES, SCHEDULES, Objective, diffusion_loss
    from dsfuse.diffusion.latents import encode_latents, keep_tokenizer, load_tokenizer
    from dsfuse.diffusion.pipeline import DiffusionModel, DiffusionSetup
    from dsfuse.engine import TrainConfig, fit, prepare_run_dir, read_metrics
    from dsfuse.models.unet import UNet, UNetConfig
    from dsfuse.plots import plot_curves

    schedule = _choice(schedule, SCHEDULES, "--schedule")
    objective = _choice(objective, OBJECTIVES, "--objective")
    if image_size is not None and image_size < 8:
        raise UsageError(f"image size must be at least 8, got {image_size}", "--image-size")
    if not 0 <= label_dropout < 1:
        raise UsageError(f"must be in [0, 1), got {label_dropout}", "--label-dropout")
    if not 0 < ema_decay < 1:
        raise UsageError(f"must be between 0 and 1, got {ema_decay}", "--ema-decay")
    if sample_every < 0:
        raise UsageError(f"must be >= 0, got {sample_every}", "--sample-every")
    # The EMA starts from the untrained weights: cap its horizon at a tenth of the run, so that they have
    # faded (to e^-10) by the end of even a short run.
    ema_decay = min(ema_decay, max(1 - 10 / max(steps, 1), 0.5))
    train_cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, seed=seed,
                            eval_every=sample_every, checkpoint_every=sample_every, quiet=quiet,
                            warmup_steps=min(200, steps // 10))
    torch_device = select_device(device)
    tokenizer_model = load_tokenizer(tokenizer, torch_device) if tokenizer is not None else None
    if tokenizer_model is not None:
        image_size = image_size or tokenizer_model.config.image_size
    dataset = ImageFolder(data, image_size or 32, class_folders=class_conditional)
    if dataset.skipped:
        warn(f"skipped {len(dataset.skipped)} unreadable image(s), e.g. {dataset.skipped[0]}", quiet)
    if class_conditional and len(dataset.classes) < 2:
        raise UsageError("class-conditional training needs at least two class folders", data)
    images, labels = _load_images(dataset, quiet)
    setup = DiffusionSetup(schedule=schedule, objective=objective, classes=dataset.classes)
    if tokenizer_model is not None:
        images, setup.latent_scale = encode_latents(tokenizer_model, images, torch_device, quiet)
    net_cfg = UNetConfig(in_channels=images.shape[1], image_size=images.shape[-1], base_channels=base_channels,
                         channel_mults=_int_list(channel_mults, "--channel-mults"), num_res_blocks=res_blocks,
                         attention_resolutions=_int_list(attention, "--attention"), dropout=dropout,
                         num_classes=len(dataset.classes) if class_conditional else 0)
    if net_cfg.image_size % 2 ** (len(net_cfg.channel_mults) - 1):
        raise UsageError(f"image side {net_cfg.image_size} must be divisible by 2^{len(net_cfg.channel_mults) - 1} "
                         "(one halving per extra level)", "--channel-mults")

    run_dir = prepare_run_dir(out, resume, force)  # only now: bad input leaves no half-made run behind
    if resume:  # the architecture and diffusion setup are the run's, whatever the flags say now
        meta = read_metadata(run_dir)
        net_cfg, saved = UNetConfig(**meta["config"]), DiffusionSetup.from_meta(meta["extra"])
        if saved.classes != setup.classes or saved.latent != (tokenizer_model is not None):
            raise UsageError("the data's classes or latent mode differ from the run being resumed", data)
        images = images * setup.latent_scale / saved.latent_scale  # the scaling the run was trained with
        setup = saved
    elif tokenizer_model is not None:
        setup.tokenizer = keep_tokenizer(tokenizer, run_dir)

    seed_everything(seed)
    net = UNet(net_cfg)
    schedule_obj, objective_obj = setup.noise_schedule(), Objective(setup.objective)

    def loss_fn(model, batch):
        x0, y = batch
        if not net_cfg.num_classes:
            y = None
        elif label_dropout:  # some steps see the null class: the unconditional model guidance needs
            y = torch.where(torch.rand(len(y), device=y.device) < label_dropout, net_cfg.num_classes, y)
        return diffusion_loss(model, x0, schedule_obj, objective_obj, y, min_snr or None)

    preview_labels = torch.arange(GRID_SAMPLES) % net_cfg.num_classes if net_cfg.num_classes else None

    def evaluate(ema_model, step):
        generator = torch.Generator(torch_device).manual_seed(seed)  # the same noise each time: comparable grids
        pipeline = DiffusionModel(ema_model, setup, tokenizer_model)
        grid = pipeline.generate(GRID_SAMPLES, sampler=GRID_SAMPLER, steps=GRID_STEPS, labels=preview_labels,
                                 guidance=2.0 if net_cfg.num_classes else 1.0, generator=generator)
        save_grid(grid, run_dir / f"samples_{step:06d}.png")
        save_grid(grid, run_dir / "samples.png")
        return {}

    if not quiet:
        params = sum(p.numel() for p in net.parameters())
        console.print(f"train-ddpm: {len(images)} images{' as latents' if setup.latent else ''} "
                      f"{tuple(images.shape[1:])}, {len(dataset.classes) or 'no'} classes, "
                      f"UNet {params / 1e6:.2f}M parameters, {setup.schedule} schedule, {setup.objective} objective, "
                      f"on {torch_device}")
    result = fit(net, TensorDataset(images, labels), loss_fn, train_cfg, run_dir, kind="unet", config=net_cfg,
                 device=torch_device, resume=resume, evaluate=evaluate, extra_meta=setup.to_meta())
    plot_curves(read_metrics(run_dir), ["loss", "grad_norm", "lr"], run_dir / "curves.png", title="train-ddpm")

    report_training(result, {"loss": result.metrics.get("loss"), "images": len(images), "classes": dataset.classes,
                             "latent": setup.latent, "samples": str(run_dir / "samples.png"),
                             "checkpoint": str(run_dir / "model.safetensors")}, json)


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
