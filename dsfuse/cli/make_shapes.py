"""`dsfuse make-shapes`: write a generated captioned set (shapes, colours, sizes, positions) with held-out
attribute pairs, for `train-unified`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsfuse.choices import CaptionOrder
from dsfuse.cli.common import DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, command
from dsfuse.report import console, emit_json


@command
def make_shapes(
    out: Annotated[Path, typer.Argument(help="Folder to write OUT/train (x.png + x.txt) and OUT/heldout (captions.jsonl) into.")],
    train: Annotated[int, typer.Option("--train", help="Training images.")] = 2000,
    heldout: Annotated[int, typer.Option("--heldout", help="Images of the held-out (shape, colour) pairs.")] = 200,
    size: Annotated[int, typer.Option("--size", help="Width and height in pixels.")] = 32,
    captions: Annotated[CaptionOrder, typer.Option("--captions", help="shape-first: 'a triangle, large and blue, at the top left'; colour-first: 'a large blue triangle at the top left'.")] = "shape-first",
    device: DeviceOpt = "auto", seed: SeedOpt = 0, json: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False, force: ForceOpt = False,
) -> None:
    """Write captioned shapes ("a circle, small and red, at the top left"); eight (shape, colour) pairs
    appear only in OUT/heldout, never in OUT/train.

    Example: dsfuse make-shapes data/shapes --train 2000 --heldout 200
    """
    from dsfuse.device import select_device
    from dsfuse.tasks.unified import make_shapes as write_shapes

    select_device(device)  # checked like every command's, though drawing shapes needs no accelerator
    summary = write_shapes(out, n_train=train, n_heldout=heldout, size=size, seed=seed, order=captions,
                           force=force)
    if json:
        emit_json(summary)
    elif not quiet:
        console.print(f"wrote {summary['train']} training and {summary['heldout']} held-out captioned images to {out}")


def register(app: typer.Typer) -> None:
    app.command("make-shapes")(make_shapes)


def demo_steps(samples: Path, out: Path):
    from dsfuse.cli.demo import DemoStep

    data = out / "shapes"
    return [DemoStep("make-shapes", ["make-shapes", str(data), "--train", "64", "--heldout", "8", "--size", "16"],
                     lambda r: f"{r[0]['train']} training, {r[0]['heldout']} held-out images", [data])]
