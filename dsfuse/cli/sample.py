"""`dsfuse sample`: draw images from a `train-ddpm` checkpoint with DDPM, DDIM or DPM-Solver++."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsfuse.choices import Sampler
from dsfuse.cli.common import CheckpointOpt, DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, command
from dsfuse.errors import UsageError
from dsfuse.report import console, emit_json


@command
def sample(
    checkpoint: CheckpointOpt,
    out: Annotated[Path, typer.Option("--out", help="A folder (one PNG per image plus grid.png) or a .png path (the grid only).")],
    n: Annotated[int, typer.Option("--n", min=1, help="How many images.")] = 16,
    sampler: Annotated[Sampler, typer.Option("--sampler", help="Ancestral DDPM, DDIM or DPM-Solver++ 2M.")] = "ddim",
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps (at most the training timesteps, 1000).")] = 50,
    eta: Annotated[float, typer.Option("--eta", min=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM.")] = 0.0,
    class_name: Annotated[str | None, typer.Option("--class", help="Class folder name to draw (default: cycle through all classes).")] = None,
    guidance: Annotated[float, typer.Option("--guidance", min=0.0, help="Classifier-free guidance scale (1: none).")] = 3.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images denoised at once.")] = 64,
    prompt: Annotated[str | None, typer.Option("--prompt", help="A train-unified model: the caption to draw images of.")] = None,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="--prompt: token sampling temperature (0: greedy).")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="--prompt: sample among the k likeliest image tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="--prompt: nucleus sampling mass (1: all).")] = 1.0,
    candidates: Annotated[int, typer.Option("--candidates", min=1, help="--prompt: draws per image; the one whose caption the model finds likeliest is kept.")] = 1,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Sample images from a diffusion checkpoint, or (--prompt) from a train-unified model; the same seed gives
    the same images on the same device.

    Example: dsfuse sample --checkpoint runs/ddpm --out samples/ --n 16 --sampler dpm++ --steps 20 --class 7
    Example: dsfuse sample --checkpoint runs/unified --prompt "a square, large and red, at the top left" --out red.png --candidates 4
    """
    from dsfuse.tasks import unified

    if unified.is_unified(checkpoint):
        if prompt is None:
            raise UsageError("a unified model draws images of a caption: give --prompt", "--prompt")
        options = unified.PromptOptions(prompt=prompt, n=n, guidance=guidance, temperature=temperature, top_k=top_k,
                                        top_p=top_p, candidates=candidates, batch_size=batch_size, seed=seed)
        result = unified.sample_prompt(checkpoint, out, options, device=device, force=force)
        if json:
            emit_json(result)
        elif not quiet:
            console.print(f"{n} image(s) of {prompt!r}: {result['grid']}")
        return
    if prompt is not None:
        raise UsageError("--prompt needs a train-unified model; this checkpoint is not one", "--prompt")
    from dsfuse.tasks.diffusion import SampleOptions
    from dsfuse.tasks.diffusion import sample as draw

    options = SampleOptions(n=n, sampler=sampler, steps=steps, eta=eta, class_name=class_name, guidance=guidance,
                            batch_size=batch_size, seed=seed)
    result = draw(checkpoint, out, options, device=device, quiet=quiet, force=force)
    if json:
        emit_json(result)
    elif not quiet:
        console.print(f"{n} image(s) with {sampler}-{steps} in {result['seconds']:.1f}s "
                      f"({result['seconds_per_image']:.3f}s per image): {result['grid']}")


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)


def demo_steps(samples: Path, out: Path):
    from dsfuse.cli.demo import DemoStep

    run, target = out / "ddpm", out / "ddpm-samples"
    return [DemoStep("sample", ["sample", "--checkpoint", str(run), "--out", str(target), "--n", "4",
                                "--sampler", "dpm++", "--steps", "10", "--class", "generated"],
                     lambda r: f"{r[0]['n']} images, dpm++-{r[0]['steps']}, {r[0]['seconds_per_image']}s/image",
                     [target])]
