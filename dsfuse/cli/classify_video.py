"""`dsfuse classify-video train|predict|make-dataset`: video classifiers on torchvision backbones or a small
3D CNN, alone or fused with the video's soundtrack (the recipes: dsfuse/tasks/video.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from dsfuse import choices
from dsfuse.cli.common import (ContrastiveOpt, DebugOpt, DeviceOpt, EngineOpt, ForceOpt, JsonOpt, QuietOpt,
                               ResumeOpt, RunOutOpt, SeedOpt, choice_metavar, command, expand_inputs, given_options,
                               report_training, stream_timelines, tabulate_each_input, trainer)
from dsfuse.errors import UsageError
from dsfuse.report import console, emit_json, print_table


WeightsOpt = Annotated[Path | None, typer.Option("--weights", help="With --pretrained: this Kinetics-400 .pth "
                                                "file instead of the cache or a download.")]

app = typer.Typer(help="Classify videos: train on class folders, predict per file, make a synthetic dataset.",
                  no_args_is_help=True)


@trainer
def train(
    data: Annotated[Path, typer.Argument(help="A folder with one sub-folder of videos per class.")],
    out: RunOutOpt = None,
    backbone: Annotated[choices.Backbone, typer.Option("--backbone", metavar=choice_metavar(choices.Backbone),
                                                       help="The video encoder.")] = "small3d",
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Start from torchvision's Kinetics-400 weights "
                                             "(torch hub's cache, else downloaded unless DSFUSE_OFFLINE=1).")] = False,
    weights: WeightsOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 600,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Clips per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, warmup + cosine).")] = 2e-3,
    frames: Annotated[int | None, typer.Option("--frames", help="Frames per clip (default: the backbone's).")] = None,
    fps: Annotated[float | None, typer.Option("--fps", help="Frames per second sampled (default: the "
                                                            "backbone's).")] = None,
    held_out: Annotated[float, typer.Option("--held-out", help="Fraction of each class kept out of training "
                                                               "to measure accuracy.")] = 0.2,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps (0: at the end).")] = 0,
    fusion: Annotated[choices.Fusion, typer.Option(
        "--fusion", metavar=choice_metavar(choices.Fusion), help="Fuse the frames with the video's soundtrack by this "
                                                          "strategy (none: frames alone).")] = "none",
    contrastive: ContrastiveOpt = 0.0,
    compare_fusion: Annotated[bool, typer.Option("--compare-fusion", help="Train every fusion strategy into "
                                                                          "OUT/<strategy> and tabulate them.")] = False,
    resume: ResumeOpt = False, device: DeviceOpt = "auto", seed: SeedOpt = 0, json: JsonOpt = False,
    quiet: QuietOpt = False, debug: DebugOpt = False, force: ForceOpt = False, *, engine: EngineOpt,
) -> None:
    """Train a video classifier on DATA/<class>/*.mp4; report held-out accuracy and a confusion matrix.

    Example: dsfuse classify-video train data/motion --out runs/video --steps 600
    """
    from dsfuse import runs
    from dsfuse.tasks import video

    options = video.VideoTrainOptions(data=data, backbone=backbone, pretrained=pretrained, steps=steps,
                                      batch_size=batch_size, lr=lr, frames=frames, fps=fps, held_out=held_out,
                                      eval_every=eval_every, fusion=fusion, weights=weights, contrastive=contrastive,
                                      seed=seed, **engine)
    if compare_fusion and resume:
        raise UsageError("--compare-fusion trains every strategy afresh; it cannot --resume", "--compare-fusion")
    out = runs.run_dir_for(out, video.TASK, resume)
    if not compare_fusion:
        report_training(*video.train(options, out, resume=resume, force=force, explicit=given_options(),
                                     device=device, quiet=quiet), json)
        return
    summary, trained = video.compare_fusion(options, out, force=force, device=device, quiet=quiet)
    rows = []
    for result, row in trained:
        rows.append(row)
        if result.interrupted:
            report_training(result, row, json)
    if json:
        emit_json({"compare_fusion": rows, **summary})
    else:
        print_table(f"fusion strategies on {data} ({steps} steps each, {summary['held_out_videos']} held-out videos)",
                    ["fusion", "held-out accuracy", "parameters", "train s", "run dir"],
                    [(r["fusion"], r["accuracy"], f"{r['params']:,}", r["train_s"], r["run_dir"]) for r in rows])


@command
def predict(
    videos: Annotated[list[str], typer.Argument(help="Video files, folders or globs; - reads paths from stdin.")],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", "-c", help="A trained model.safetensors "
                                                                              "or run directory.")] = None,
    backbone: Annotated[choices.PretrainedBackbone | None, typer.Option(
        "--backbone", metavar=choice_metavar(choices.PretrainedBackbone),
        help="With --pretrained: the Kinetics-400 model.")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Use torchvision's Kinetics-400 weights (torch "
                                             "hub's cache, else downloaded unless DSFUSE_OFFLINE=1).")] = False,
    weights: WeightsOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", help="How many labels to report per video.")] = 5,
    clips: Annotated[int, typer.Option("--clips", help="Clips spread over each video (each segment); scores are "
                                                       "averaged.")] = 3,
    segment: Annotated[float | None, typer.Option("--segment", min=0.1, help="Seconds per segment: a timeline of "
                                                  "labels over each video, decoded segment by segment.")] = None,
    render: Annotated[Path | None, typer.Option("--render", help="With --segment and one video: write it again "
                                                "(H.264 mp4) with each frame's label and score drawn on it.")] = None,
    device: DeviceOpt = "auto", seed: SeedOpt = 0, json: JsonOpt = False, quiet: QuietOpt = False,
    debug: DebugOpt = False, force: ForceOpt = False,
) -> None:
    """Classify each video from a few clips spread over it (and its soundtrack, for a model trained with
    --fusion), or with --segment a timeline over it; a failing file is reported and the rest go on.

    Example: dsfuse classify-video predict samples/video --checkpoint runs/video --top-k 2 --json
    Example: dsfuse classify-video predict match.mp4 --checkpoint runs/video --segment 2 --render labelled.mp4
    """
    from dsfuse.data.video import VIDEO_SUFFIXES
    from dsfuse.io import check_writable
    from dsfuse.tasks.video import load_predictor, render_timeline

    paths = expand_inputs(videos, VIDEO_SUFFIXES)  # before the model: a typo fails fast
    if render is not None:
        if segment is None or len(paths) != 1:
            raise UsageError("--render draws the timeline of one video: give --segment and one video", "--render")
        check_writable(render, force)
    predictor = load_predictor(checkpoint, backbone, pretrained, top_k=top_k, clips=clips, device=device, seed=seed,
                               weights=weights, quiet=quiet)
    if segment is not None:
        records: list[dict] = []

        def timeline(path: Path) -> Iterator[dict]:
            for record in predictor.timeline(path, segment):
                records.append(record)  # small: the labels only, for --render
                yield record

        stream_timelines(paths, timeline, lambda r: ", ".join(f"{t['label']} {t['score']:.2f}" for t in r["top"][:3]),
                         as_json=json)
        if render is not None:
            render_timeline(paths[0], records, render)
            if not quiet:
                console.print(f"wrote {render}")
        return
    title = "classify-video predict" + (f" ({predictor.fusion} fusion with the soundtrack)"
                                        if predictor.fusion != "none" else "")

    def show(rows: list[tuple]) -> None:
        print_table(title, ["file"] + [f"top {i + 1}" for i in range(max(len(r) for r in rows) - 1)], rows)

    tabulate_each_input(paths, predictor,
                        lambda path, result: [(path, *(f"{t['label']} {t['score']:.3f}" for t in result["top"][:3]))],
                        show, as_json=json, quiet=quiet, desc="videos")


@command
def make_dataset(
    out: Annotated[Path, typer.Argument(help="Folder to write OUT/<direction>/<direction>_NNN.mp4 into.")],
    per_class: Annotated[int, typer.Option("--per-class", help="Videos per direction.")] = 40,
    frames: Annotated[int, typer.Option("--frames", help="Frames per video.")] = 24,
    size: Annotated[int, typer.Option("--size", help="Width and height in pixels.")] = 64,
    fps: Annotated[float, typer.Option("--fps", help="Frame rate of the videos.")] = 12.0,
    audio: Annotated[bool, typer.Option("--audio", help="Add a soundtrack whose pitch names the class.")] = False,
    device: DeviceOpt = "auto", seed: SeedOpt = 0, json: JsonOpt = False, quiet: QuietOpt = False,
    debug: DebugOpt = False, force: ForceOpt = False,
) -> None:
    """Write labelled synthetic videos: a shape moving left, right, up or down (no single frame tells which).

    Example: dsfuse classify-video make-dataset data/motion --per-class 40
    """
    from dsfuse.tasks.video import make_dataset as write_dataset

    summary = write_dataset(out, per_class=per_class, frames=frames, size=size, fps=fps, audio=audio, seed=seed,
                            force=force, device=device, quiet=quiet)
    if json:
        emit_json(summary)
    elif not quiet:
        console.print(f"wrote {summary['videos']} videos ({', '.join(summary['classes'])}) to {out}")


def register(root: typer.Typer) -> None:
    app.command("train")(train)
    app.command("predict")(predict)
    app.command("make-dataset")(make_dataset)
    root.add_typer(app, name="classify-video")


def summarize_predictions(records: list[dict]) -> str:
    """The demo's one-line summary of `predict --json` records: file -> top label."""
    return "; ".join(f"{Path(r['file']).stem} -> {r['top'][0]['label']}" for r in records)


def demo_steps(samples: Path, out: Path) -> list:
    """Frames alone, then frames fused with the soundtrack: make a dataset, train briefly, predict the samples."""
    video = samples / "video"
    return (_demo_run(out / "video", "", ["--per-class", "6", "--frames", "16", "--size", "48"],
                      ["--steps", "20", "--batch-size", "8"], [str(video), "--clips", "2"])
            + _demo_run(out / "av-video", " (fused)", ["--per-class", "3", "--frames", "8", "--size", "32", "--audio"],
                        ["--fusion", "gated", "--steps", "6", "--batch-size", "4"],
                        [str(video / "left.mp4"), str(video / "right.mp4"), "--clips", "1"]))


def _demo_run(folder: Path, tag: str, data_args: list[str], train_args: list[str], predict_args: list[str]) -> list:
    from dsfuse.cli.demo import DemoStep

    data, run = folder / "data", folder / "run"
    return [
        DemoStep(f"classify-video make-dataset{tag}", ["classify-video", "make-dataset", str(data), *data_args],
                 lambda r: f"{r[0]['videos']} videos of {', '.join(r[0]['classes'])}", [data]),
        DemoStep(f"classify-video train{tag}", ["classify-video", "train", str(data), "--out", str(run), *train_args,
                                                "--held-out", "0.34"], summarize_training, [run]),
        DemoStep(f"classify-video predict{tag}", ["classify-video", "predict", *predict_args, "--checkpoint", str(run),
                                                  "--top-k", "2"], summarize_predictions),
    ]


def summarize_training(records: list[dict]) -> str:
    r = records[0]
    model = r["backbone"] + ("" if r["fusion"] == "none" else f" + soundtrack, {r['fusion']} fusion")
    return f"{model}, {r['step']} steps: held-out accuracy {r['accuracy']:.0%} (tiny run)"
