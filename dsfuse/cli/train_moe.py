"""`dsfuse train-moe`: train a small MoE classifier with aux-loss balancing, the aux-free bias and neither,
and plot how unevenly each spreads the load over training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsfuse.cli.common import (DebugOpt, DeviceOpt, EngineOpt, ForceOpt, JsonOpt, QuietOpt, ResumeOpt, RunOutOpt,
                               SeedOpt, given_options, report_training, trainer)
from dsfuse.report import print_table


@trainer
def train_moe(
    out: RunOutOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps of each run in all (also when "
                                                       "resuming).")] = 300,
    experts: Annotated[int, typer.Option("--experts", help="Routed experts.", min=1)] = 16,
    top_k: Annotated[int, typer.Option("--top-k", help="Experts per token.", min=1)] = 2,
    shared: Annotated[int, typer.Option("--shared", help="Shared experts.", min=0)] = 1,
    capacity_factor: Annotated[float, typer.Option(
        "--capacity-factor", help="Each expert takes at most cf * tokens * k / experts (0: dropless).", min=0)] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences of 16 tokens per step.")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 3e-3,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps (0: at the end).",
                                            min=0)] = 0,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False, *, engine: EngineOpt,
) -> None:
    """Train one MoE classifier with aux-loss balancing, the aux-free bias and neither, and compare the loads.

    The classifier learns the cluster of each token, on tokens in skewed clusters; each way of balancing
    gets its run in OUT/<balancing>, and OUT/imbalance.png plots MaxVio over training.

    Example: dsfuse train-moe --steps 300 --out runs/moe-balancing
    """
    from dsfuse.device import select_device
    from dsfuse.runs import run_dir_for
    from dsfuse.tasks import moe

    options = moe.MoETrainOptions(steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed,
                                  experts=experts, top_k=top_k, shared=shared, capacity_factor=capacity_factor, **engine)
    result, summary = moe.train(options, run_dir_for(out, moe.TASK, resume), resume=resume, force=force,
                                explicit=given_options(), device=select_device(device), quiet=quiet or json)
    if not json:
        print_table(f"train-moe: {summary['experts']} experts, top-{summary['top_k']}, skewed clusters (held-out set)",
                    ["balancing", "MaxVio", "task loss", "accuracy", "run"],
                    [(name, r["maxvio"], r["task_loss"], r["accuracy"], r["run_dir"])
                     for name, r in summary["results"].items()])
    report_training(result, summary if json else {"plot": summary.get("plot")}, json)


def register(app: typer.Typer) -> None:
    app.command("train-moe")(train_moe)


def demo_steps(samples: Path, out: Path):
    from dsfuse.cli.demo import DemoStep

    def summarize(records):
        return ", ".join(f"{name} MaxVio {v['maxvio']:.2f} loss {v['task_loss']:.3f}"
                         for name, v in records[0]["results"].items())

    run = out / "train-moe"
    return [DemoStep("train-moe", ["train-moe", "--steps", "40", "--out", str(run)], summarize, [run])]
