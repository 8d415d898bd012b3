"""`dsfuse sample`: draw images from a `train-ddpm` checkpoint with DDPM, DDIM or DPM-Solver++."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from dsfuse.cli.common import (CheckpointOpt, DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, command,
                               console, emit_json)
from dsfuse.errors import UsageError


@command
def sample(
    checkpoint: CheckpointOpt,
    out: Annotated[Path, typer.Option("--out", help="A folder (one PNG per image plus grid.png) or a .png path (the grid only).")],
    n: Annotated[int, typer.Option("--n", help="How many images.")] = 16,
    sampler: Annotated[str, typer.Option("--sampler", help="ddpm (ancestral), ddim or dpm++ (DPM-Solver++ 2M).")] = "ddim",
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps (at most the training timesteps, 1000).")] = 50,
    eta: Annotated[float, typer.Option("--eta", help="DDIM noise: 0 deterministic, 1 like DDPM.")] = 0.0,
    class_name: Annotated[str | None, typer.Option("--class", help="Class folder name to draw (default: cycle through all classes).")] = None,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale (1: none).")] = 3.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images denoised at once.")] = 64,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Sample images from a diffusion checkpoint; the same seed gives the same images on the same device.

    Example: dsfuse sample --checkpoint runs/ddpm --out samples/ --n 16 --sampler dpm++ --steps 20 --class 7
    """
    import torch

    from dsfuse.data.images import save_grid, save_png
    from dsfuse.device import seed_everything, select_device
    from dsfuse.diffusion import SAMPLERS
    from dsfuse.diffusion.pipeline import load_diffusion

    if n < 1:
        raise UsageError(f"must be at least 1, got {n}", "--n")
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}", "--sampler")
    if eta < 0:
        raise UsageError(f"must be >= 0, got {eta}", "--eta")
    if batch_size < 1:
        raise UsageError(f"must be at least 1, got {batch_size}", "--batch-size")
    if guidance < 0:
        raise UsageError(f"must be >= 0, got {guidance}", "--guidance")
    grid_only = out.suffix.lower() == ".png"
    grid_path = out if grid_only else out / "grid.png"
    if not force and (grid_path.exists() or (not grid_only and out.is_dir() and any(out.glob("*.png")))):
        raise UsageError("output exists; pass --force to overwrite it", out)

    torch_device = select_device(device)
    model = load_diffusion(checkpoint, torch_device)
    timesteps = model.setup.timesteps
    if not 1 <= steps <= timesteps:
        raise UsageError(f"must be between 1 and {timesteps}, got {steps}", "--steps")

    labels = None
    if model.conditional:
        classes = model.setup.classes
        if class_name is not None:
            if class_name not in classes:
                raise UsageError(f"unknown class {class_name!r}; this model knows {', '.join(classes)}", "--class")
            labels = torch.full((n,), classes.index(class_name), dtype=torch.long)
        else:
            labels = torch.arange(n) % len(classes)
    elif class_name is not None:
        raise UsageError("this model was trained without classes", "--class")

    seed_everything(seed)
    generator = torch.Generator(torch_device).manual_seed(seed)
    started = time.perf_counter()
    images = model.generate(n, sampler=sampler, steps=steps, eta=eta, labels=labels, guidance=guidance,
                            generator=generator, batch_size=batch_size, progress=not quiet)
    seconds = time.perf_counter() - started

    files = []
    if not grid_only:
        width = len(str(n - 1))
        for i, image in enumerate(images):
            suffix = f"_{model.setup.classes[int(labels[i])]}" if labels is not None else ""
            files.append(str(save_png(image, out / f"{i:0{width}d}{suffix}.png")))
    save_grid(images, grid_path)

    result = {"out": str(out), "grid": str(grid_path), "files": files, "n": n, "sampler": sampler, "steps": steps,
              "guidance": guidance if labels is not None else None, "seconds": round(seconds, 3),
              "seconds_per_image": round(seconds / n, 4), "device": str(torch_device)}
    if json:
        emit_json(result)
    elif not quiet:
        console.print(f"{n} image(s) with {sampler}-{steps} in {seconds:.1f}s ({seconds / n:.3f}s per image): "
                      f"{grid_path}")


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)


def demo_steps(samples: Path, out: Path):
    from dsfuse.cli.demo import DemoStep

    run, target = out / "ddpm", out / "ddpm-samples"
    return [DemoStep("sample", ["sample", "--checkpoint", str(run), "--out", str(target), "--n", "4",
                                "--sampler", "dpm++", "--steps", "10", "--class", "generated"],
                     lambda r: f"{r[0]['n']} images, dpm++-{r[0]['steps']}, {r[0]['seconds_per_image']}s/image",
                     [target])]
