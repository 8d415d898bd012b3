"""The diffusion task: train a UNet on an image folder, on pixels or a tokenizer's latents (`train-ddpm`),
and draw images from it (`sample`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from dsfuse import choices, runs
from dsfuse.checkpoint import CheckpointMeta, build_model
from dsfuse.data.images import ImageFolder, save_grid, save_png
from dsfuse.device import seed_everything, select_device
from dsfuse.diffusion import Objective, diffusion_loss
from dsfuse.diffusion.latents import encode_latents, keep_tokenizer, load_tokenizer
from dsfuse.diffusion.pipeline import DiffusionModel, DiffusionSetup, load_diffusion
from dsfuse.engine import EvalFn, LossFn, TrainConfig, TrainResult, fit, read_metrics
from dsfuse.errors import ConfigError, UsageError
from dsfuse.models.unet import UNet, UNetConfig
from dsfuse.plots import plot_curves
from dsfuse.report import console, warn

TASK = "diffusion"
KIND = "unet"
PIXEL_SIZE = 32  # the image side when neither --image-size nor a tokenizer says otherwise
GRID_SAMPLES = 16
GRID_SAMPLER, GRID_STEPS = "ddim", 25  # fast enough to preview every few hundred steps


@dataclass(kw_only=True)
class DiffusionOptions(runs.TrainOptions):
    """What `train-ddpm` takes."""

    data: Path
    tokenizer: Path | None = None
    image_size: int | None = None  # None: PIXEL_SIZE, or the tokenizer's image size
    steps: int = 5000
    batch_size: int = 64
    lr: float = 2e-4
    schedule: choices.Schedule = "cosine"
    objective: choices.Objective = "eps"
    min_snr: float = 5.0
    class_conditional: bool = False
    label_dropout: float = 0.1
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    res_blocks: int = 2
    attention: tuple[int, ...] = (16,)
    dropout: float = 0.1
    ema_decay: float = 0.999
    sample_every: int = 500

    CHANGEABLE = runs.TrainOptions.CHANGEABLE | {"sample_every"}

    def check(self) -> None:
        """Refuse values the training cannot use."""
        if not 0 <= self.label_dropout < 1:
            raise UsageError(f"must be in [0, 1), got {self.label_dropout}", "--label-dropout")
        if not 0 < self.ema_decay < 1:
            raise UsageError(f"must be between 0 and 1, got {self.ema_decay}", "--ema-decay")


def capped_ema_decay(decay: float, steps: int) -> float:
    """The EMA starts from the untrained weights: cap its horizon at a tenth of the run, so that they have
    faded (to e^-10) by the end of even a short run."""
    return min(decay, max(1 - 10 / max(steps, 1), 0.5))


@dataclass
class RunStart:
    """Where a run starts from: its options, diffusion setup, tokenizer (latent mode) and, on resume, its record."""

    options: DiffusionOptions
    setup: DiffusionSetup
    tokenizer: nn.Module | None
    meta: CheckpointMeta | None = None


def start_run(options: DiffusionOptions, out: Path, resume: bool, explicit: Collection[str],
              device: torch.device) -> RunStart:
    """A new run from the options given, or the recorded run in `out` (the one resume rule)."""
    if not resume:
        tokenizer = load_tokenizer(options.tokenizer, device) if options.tokenizer is not None else None
        size = options.image_size or (tokenizer.config.image_size if tokenizer is not None else PIXEL_SIZE)
        setup = DiffusionSetup(schedule=options.schedule, objective=options.objective)
        return RunStart(dataclasses.replace(options, image_size=size), setup, tokenizer)
    options, meta = runs.resume_options(options, out, KIND, explicit)
    setup = DiffusionSetup(**meta.setup)
    if options.tokenizer is not None and not setup.latent:
        raise UsageError("the run trains on pixels; --resume cannot add a tokenizer", "--tokenizer")
    own_tokenizer = Path(out) / setup.tokenizer if setup.latent else None  # the run's own copy
    tokenizer = load_tokenizer(own_tokenizer, device) if own_tokenizer is not None else None
    return RunStart(dataclasses.replace(options, tokenizer=own_tokenizer), setup, tokenizer, meta)


def load_images(dataset: ImageFolder, quiet: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the whole folder once: [N, 3, S, S] and labels [N], so training steps never touch the disk."""
    images, labels = [], []
    for x, y in tqdm(DataLoader(dataset, batch_size=256), desc="load images", unit="batch", leave=False,
                     disable=quiet):
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def training_images(start: RunStart, quiet: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The run's images, labels and class names (the same classes as the run's, on resume)."""
    options = start.options
    dataset = ImageFolder(options.data, options.image_size, class_folders=options.class_conditional)
    if dataset.skipped:
        warn(f"skipped {len(dataset.skipped)} unreadable image(s), e.g. {dataset.skipped[0]}", quiet)
    if options.class_conditional and len(dataset.classes) < 2:
        raise UsageError("class-conditional training needs at least two class folders", options.data)
    if start.meta is not None and dataset.classes != list(start.meta.classes):
        raise UsageError(f"the data's classes differ from the run's ({', '.join(start.meta.classes)})", options.data)
    return (*load_images(dataset, quiet), dataset.classes)


def unet_config(options: DiffusionOptions, images: torch.Tensor, classes: list[str]) -> UNetConfig:
    """The UNet of a new run, for images (or latents) shaped like `images`."""
    try:
        return UNetConfig(in_channels=images.shape[1], image_size=images.shape[-1],
                          base_channels=options.base_channels, channel_mults=options.channel_mults,
                          num_res_blocks=options.res_blocks, attention_resolutions=options.attention,
                          dropout=options.dropout, num_classes=len(classes) if options.class_conditional else 0)
    except ConfigError as e:
        raise e.as_usage_error() from None


def train(options: DiffusionOptions, out: Path, *, resume: bool = False, force: bool = False,
          explicit: Collection[str] = (), device: str = "auto", quiet: bool = False) -> tuple[TrainResult, dict]:
    """Train (or, with `resume`, continue) a diffusion run in `out`; returns the result and its summary."""
    options.check()
    torch_device = select_device(device)
    start = start_run(options, out, resume, explicit, torch_device)
    options, setup = start.options, start.setup
    train_cfg = TrainConfig.of(options, ema_decay=capped_ema_decay(options.ema_decay, options.steps), quiet=quiet,
                               eval_every=options.sample_every, checkpoint_every=options.sample_every)
    images, labels, classes = training_images(start, quiet)
    if start.tokenizer is not None:  # latents scaled to unit variance, or as the resumed run scaled them
        images, setup.latent_scale = encode_latents(start.tokenizer, images, torch_device, quiet,
                                                    scale=setup.latent_scale if resume else None)
    net = build_model(start.meta) if start.meta is not None else None
    net_cfg = net.config if net is not None else unet_config(options, images, classes)
    run_dir = runs.prepare_run_dir(out, resume, force)  # only now: bad input leaves no half-made run behind
    if net is None:
        if options.tokenizer is not None:
            setup.tokenizer = keep_tokenizer(options.tokenizer, run_dir)
        seed_everything(options.seed)
        net = UNet(net_cfg)
    if not quiet:
        console.print(f"train-ddpm: {describe_run(images, classes, net, setup)}, on {torch_device}")
    meta = CheckpointMeta.of(KIND, net_cfg, classes=tuple(classes), options=options.record(),
                             setup=dataclasses.asdict(setup))
    result = fit(net, TensorDataset(images, labels), denoising_loss(options, setup, net_cfg.num_classes),
                 train_cfg, run_dir, meta=meta, device=torch_device, resume=resume,
                 evaluate=sample_grid_evaluator(setup, start.tokenizer, net_cfg.num_classes, run_dir, options.seed))
    plot_curves(read_metrics(run_dir), ["loss", "grad_norm", "lr"], run_dir / "curves.png", title="train-ddpm")
    return result, {"loss": result.metrics.get("loss"), "images": len(images), "classes": classes,
                    "latent": setup.latent, "samples": str(run_dir / "samples.png"),
                    "checkpoint": str(run_dir / "model.safetensors")}


def describe_run(images: torch.Tensor, classes: list[str], net: nn.Module, setup: DiffusionSetup) -> str:
    """One line on what a run trains: its data, classes, network size, schedule and objective."""
    return (f"{len(images)} {'latents' if setup.latent else 'images'} {tuple(images.shape[1:])}, "
            f"{len(classes) or 'no'} classes, UNet {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
            f"{setup.schedule} schedule, {setup.objective} objective")


def denoising_loss(options: DiffusionOptions, setup: DiffusionSetup, num_classes: int) -> LossFn:
    """The diffusion loss of a batch (x0, labels); a conditional model sees the null class on a
    `label_dropout` share of its samples: the unconditional model that guidance needs."""
    schedule, objective = setup.noise_schedule(), Objective(setup.objective)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x0, y = batch
        if not num_classes:
            y = None
        elif options.label_dropout:
            y = torch.where(torch.rand(len(y), device=y.device) < options.label_dropout, num_classes, y)
        return diffusion_loss(model, x0, schedule, objective, y, options.min_snr or None)

    return loss_fn


def sample_grid_evaluator(setup: DiffusionSetup, tokenizer: nn.Module | None, num_classes: int, run_dir: Path,
                          seed: int) -> EvalFn:
    """At each evaluation, a 4x4 grid from the EMA model, drawn from the same noise each time so grids compare:
    `samples_<step>.png`, the latest also as `samples.png`."""
    labels = torch.arange(GRID_SAMPLES) % num_classes if num_classes else None

    def evaluate(ema_model: nn.Module, step: int) -> dict[str, float]:
        device = next(ema_model.parameters()).device
        grid = DiffusionModel(ema_model, setup, tokenizer).generate(
            GRID_SAMPLES, sampler=GRID_SAMPLER, steps=GRID_STEPS, labels=labels,
            guidance=2.0 if num_classes else 1.0, generator=torch.Generator(device).manual_seed(seed))
        save_grid(grid, run_dir / f"samples_{step:06d}.png")
        save_grid(grid, run_dir / "samples.png")
        return {}

    return evaluate


# --------------------------------------------------------------------------- sample

@dataclass(kw_only=True)
class SampleOptions:
    """What `sample` takes besides the checkpoint and where the images go."""

    n: int = 16
    sampler: choices.Sampler = "ddim"
    steps: int = 50
    eta: float = 0.0
    class_name: str | None = None  # None: cycle through the classes of a conditional model
    guidance: float = 3.0
    batch_size: int = 64
    seed: int = 0


def sample_labels(model: DiffusionModel, class_name: str | None, n: int) -> torch.Tensor | None:
    """The labels of n samples: one class, every class in turn, or None for an unconditional model."""
    if not model.conditional:
        if class_name is not None:
            raise UsageError("this model was trained without classes", "--class")
        return None
    if class_name is None:
        return torch.arange(n) % len(model.classes)
    if class_name not in model.classes:
        raise UsageError(f"unknown class {class_name!r}; this model knows {', '.join(model.classes)}", "--class")
    return torch.full((n,), model.classes.index(class_name), dtype=torch.long)


def sample(checkpoint: str | Path, out: Path, options: SampleOptions, *, device: str = "auto",
           quiet: bool = False, force: bool = False) -> dict[str, Any]:
    """Draw images into `out` (a folder: one PNG each plus grid.png; a .png path: the grid only); the same
    seed gives the same images on the same device. Returns what was written and how fast."""
    grid_path = sample_output(out, force)
    grid_only = grid_path == out
    torch_device = select_device(device)
    model = load_diffusion(checkpoint, torch_device)
    if not 1 <= options.steps <= model.setup.timesteps:
        raise UsageError(f"must be between 1 and {model.setup.timesteps}, got {options.steps}", "--steps")
    labels = sample_labels(model, options.class_name, options.n)

    seed_everything(options.seed)
    started = time.perf_counter()
    generator = torch.Generator(torch_device).manual_seed(options.seed)
    images = model.generate(options.n, sampler=options.sampler, steps=options.steps, eta=options.eta, labels=labels,
                            guidance=options.guidance, generator=generator, batch_size=options.batch_size,
                            progress=not quiet)
    seconds = time.perf_counter() - started
    files = [] if grid_only else write_images(images, labels, model.classes, out)
    save_grid(images, grid_path)
    return {"out": str(out), "grid": str(grid_path), "files": files, "n": options.n, "sampler": options.sampler,
            "steps": options.steps, "guidance": options.guidance if labels is not None else None,
            "seconds": round(seconds, 3), "seconds_per_image": round(seconds / options.n, 4),
            "device": str(torch_device)}


def sample_output(out: Path, force: bool) -> Path:
    """Where the grid of drawn images goes: `out` itself when it ends in .png, else OUT/grid.png beside one
    PNG per image; PNGs already there are refused without --force."""
    grid_only = out.suffix.lower() == ".png"
    grid_path = out if grid_only else out / "grid.png"
    if not force and (grid_path.exists() or (not grid_only and out.is_dir() and any(out.glob("*.png")))):
        raise UsageError("output exists; pass --force to overwrite it", out)
    return grid_path


def write_images(images: torch.Tensor, labels: torch.Tensor | None, classes: list[str], folder: Path) -> list[str]:
    """One PNG per image, named by its index and (conditional models) its class: 0_7.png, 1_7.png, ..."""
    width = len(str(len(images) - 1))
    suffixes = [f"_{classes[int(label)]}" for label in labels] if labels is not None else [""] * len(images)
    return [str(save_png(image, folder / f"{i:0{width}d}{suffix}.png"))
            for i, (image, suffix) in enumerate(zip(images, suffixes))]
