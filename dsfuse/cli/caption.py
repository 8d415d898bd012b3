"""`dsfuse caption`: caption images with a train-unified model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsfuse.cli.common import (CheckpointOpt, DebugOpt, DeviceOpt, JsonOpt, QuietOpt, command, expand_inputs,
                               tabulate_each_input)
from dsfuse.data.images import IMAGE_SUFFIXES
from dsfuse.report import print_table


@command
def caption(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders, globs, or - (paths on stdin).")],
    checkpoint: CheckpointOpt,
    guidance: Annotated[float, typer.Option("--guidance", min=0.0, help="Weigh each word against the image-less caption model, so the image outweighs the language prior (1: none).")] = 1.0,
    device: DeviceOpt = "auto",
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Caption each image (greedy, optionally guided); --json writes a JSON line per image: {"file", "caption"}.

    Example: dsfuse caption data/shapes/heldout --checkpoint runs/unified --json > captions.jsonl
    """
    from dsfuse.tasks.unified import Captioner

    captioner = Captioner(checkpoint, device, guidance)
    tabulate_each_input(expand_inputs(inputs, IMAGE_SUFFIXES), captioner,
                        lambda path, result: [(path, result["caption"])],
                        lambda rows: print_table("captions", ["file", "caption"], rows),
                        as_json=json, quiet=quiet, desc="images")


def register(app: typer.Typer) -> None:
    app.command("caption")(caption)


def demo_steps(samples: Path, out: Path):
    from dsfuse.cli.demo import DemoStep

    return [DemoStep("caption", ["caption", str(out / "shapes" / "heldout"), "--checkpoint", str(out / "unified")],
                     lambda r: f"{len(r)} captions, e.g. {r[0]['caption']!r}")]
