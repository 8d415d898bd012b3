"""`dsfuse classify-video train|predict|make-dataset`: video classifiers on torchvision backbones or a small 3D CNN."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dsfuse.cli.common import (DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, ResumeOpt, SeedOpt,
                               command, console, emit_json, expand_inputs, print_table, report_training,
                               tabulate_each_input)
from dsfuse.errors import UsageError

if TYPE_CHECKING:
    import torch

    from dsfuse.models.video import VideoClassifier

BACKBONE_NAMES = "small3d, r3d_18, mc3_18, r2plus1d_18, s3d, mvit_v2_s, swin3d_t"
BackboneOpt = Annotated[str, typer.Option("--backbone", help=f"Encoder: {BACKBONE_NAMES}.")]
FramesOpt = Annotated[int | None, typer.Option("--frames", help="Frames per clip (default: the backbone's).")]
FpsOpt = Annotated[float | None, typer.Option("--fps", help="Frames per second sampled (default: the backbone's).")]

app = typer.Typer(help="Classify videos: train on class folders, predict per file, make a synthetic dataset.",
                  no_args_is_help=True)


# --------------------------------------------------------------------------- train

@command
def train(
    data: Annotated[Path, typer.Argument(help="A folder with one sub-folder of videos per class.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory for model.safetensors, metrics and plots.")],
    backbone: BackboneOpt = "small3d",
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Start from Kinetics-400 weights in the local "
                                                                  "torch hub cache (never downloaded).")] = False,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 600,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Clips per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, warmup + cosine).")] = 2e-3,
    frames: FramesOpt = None,
    fps: FpsOpt = None,
    held_out: Annotated[float, typer.Option("--held-out", help="Fraction of each class kept out of training "
                                                               "to measure accuracy.")] = 0.2,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps (0: at the end).")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")] = 0,
    fusion: Annotated[str, typer.Option("--fusion", help="Fuse the frames with the video's soundtrack: none, early, "
                                                         "mid, late, gated, bottleneck, qformer or hybrid.")] = "none",
    compare_fusion: Annotated[bool, typer.Option("--compare-fusion", help="Train every fusion strategy into "
                                                                          "OUT/<strategy> and tabulate them.")] = False,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Train a video classifier on DATA/<class>/*.mp4; report held-out accuracy and a confusion matrix.

    Example: dsfuse classify-video train data/motion --out runs/video --steps 600
    """
    if not 0 < held_out < 1:
        raise UsageError(f"held-out fraction must be between 0 and 1, got {held_out}", "--held-out")
    if (frames is not None and frames < 1) or (fps is not None and fps <= 0):
        raise UsageError("frames must be at least 1 and fps positive", "--frames/--fps")
    if fusion != "none" or compare_fusion:  # frames + soundtrack, in cli/video_fusion.py
        from dsfuse.cli.video_fusion import train_fused

        return train_fused(data, out, fusion=fusion, compare=compare_fusion, backbone=backbone, steps=steps,
                           batch_size=batch_size, lr=lr, frames=frames, fps=fps, held_out=held_out,
                           eval_every=eval_every, workers=workers, resume=resume, device=device, seed=seed,
                           json=json, quiet=quiet, force=force)
    import torch

    from dsfuse.checkpoint import MODEL_FILE, read_metadata
    from dsfuse.data.video import VideoFolder, stratified_split
    from dsfuse.device import seed_everything, select_device
    from dsfuse.engine import TrainConfig, fit, prepare_run_dir, read_metrics, unwrap
    from dsfuse.models.video import VideoClassifier, VideoConfig, require_kinetics_weights
    from dsfuse.plots import plot_curves

    if pretrained and not resume:
        require_kinetics_weights(backbone)
    torch_device = select_device(device)
    seed_everything(seed)
    train_cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(50, steps // 10),
                            eval_every=eval_every, num_workers=workers, quiet=quiet, seed=seed)
    previous = read_metadata(out / MODEL_FILE) if resume and (out / MODEL_FILE).exists() else None
    if previous:  # the run's own config, whatever the options say now
        config = VideoConfig(**previous["config"])
    else:
        config = VideoConfig.for_backbone(backbone, num_classes=0, frames=frames, fps=fps)
    folder = VideoFolder(data, config.frames, config.fps, config.decode_size)
    if len(folder.classes) < 2:
        raise UsageError("need at least two class folders", data)
    if previous and previous["extra"].get("classes") != folder.classes:
        raise UsageError("the class folders differ from the run's; resume with the same data", data)
    config = replace(config, num_classes=len(folder.classes))
    train_idx, held_idx = stratified_split(folder.labels, held_out, seed)
    if not held_idx:
        raise UsageError("need at least two videos per class to hold some out", data)
    train_set, held_set = folder.subset(train_idx, train=True), folder.subset(held_idx, train=False)
    run_dir = prepare_run_dir(out, resume, force)

    model = VideoClassifier(config)
    if pretrained and not resume:
        model.load_kinetics()

    def loss_fn(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        clips, labels = batch
        return torch.nn.functional.cross_entropy(net(unwrap(net).preprocess(clips, random_crop=True)), labels)

    def evaluate(net: VideoClassifier, step: int) -> dict[str, float]:
        return evaluate_folder(net, held_set, run_dir, torch_device, batch_size)

    result = fit(model, train_set, loss_fn, train_cfg, run_dir, kind="video", config=config, device=torch_device,
                 resume=resume, evaluate=evaluate, extra_meta={"classes": folder.classes})
    plot_curves(read_metrics(run_dir), ["loss", "accuracy"], run_dir / "curves.png",
                title=f"classify-video {config.backbone}")

    report_training(result, {"backbone": config.backbone, "accuracy": result.metrics.get("eval_accuracy"),
                             "classes": folder.classes, "train_videos": len(train_set),
                             "held_out_videos": len(held_set), "skipped": [str(p) for p in folder.skipped]}, json)


def evaluate_folder(model: VideoClassifier, dataset, run_dir: Path, device: torch.device,
                    batch_size: int) -> dict[str, float]:
    """Held-out accuracy (middle clip of each video) and confusion.png in the run dir."""
    import torch

    from dsfuse.metrics import accuracy, confusion_matrix
    from dsfuse.plots import plot_confusion

    true, pred = [], []
    for first in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
        clips = torch.stack([clip for clip, _ in items]).to(device)
        pred.append(model(model.preprocess(clips)).argmax(-1).cpu())
        true.append(torch.tensor([label for _, label in items]))
    true_t, pred_t = torch.cat(true), torch.cat(pred)
    matrix = confusion_matrix(true_t, pred_t, len(dataset.classes))
    acc = accuracy(true_t, pred_t)
    plot_confusion(matrix, dataset.classes, run_dir / "confusion.png",
                   title=f"held-out accuracy {acc:.1%} ({len(true_t)} videos)")
    return {"accuracy": acc}


# --------------------------------------------------------------------------- predict


def load_classifier(checkpoint: Path | None, backbone: str | None, pretrained: bool,
                    device: torch.device) -> tuple[VideoClassifier, list[str]]:
    """A trained checkpoint with its class names, or torchvision's Kinetics-400 model with its categories."""
    from dsfuse.checkpoint import load_checkpoint
    from dsfuse.models.video import VideoClassifier, VideoConfig, kinetics_categories, require_kinetics_weights

    if checkpoint is not None:
        model, meta = load_checkpoint(checkpoint, kind="video", device=device)
        classes = meta["extra"].get("classes") or [str(i) for i in range(model.config.num_classes)]
        return model, classes
    if backbone is None:
        raise UsageError("--pretrained needs --backbone (r3d_18, mc3_18, r2plus1d_18, s3d, mvit_v2_s, swin3d_t)",
                         "--backbone")
    config = VideoConfig.for_backbone(backbone, 400)
    require_kinetics_weights(backbone)  # before building a large model for nothing
    model = VideoClassifier(config)
    model.load_kinetics()
    return model.to(device).eval(), kinetics_categories(backbone)


def video_probabilities(model: VideoClassifier, path: Path, clips: int, device: torch.device) -> torch.Tensor:
    """Class probabilities [classes] of one video: the mean over `clips` clips spread over it."""
    import torch

    from dsfuse.data.video import read_clips

    cfg = model.config
    frames = read_clips(path, cfg.frames, cfg.fps, clips, cfg.decode_size).to(device)
    with torch.no_grad():
        return model(model.preprocess(frames)).softmax(-1).mean(0)


def top_labels(probs: torch.Tensor, classes: list[str], k: int) -> list[dict[str, Any]]:
    """The `k` most likely labels, best first: [{"label", "score"}, ...]."""
    scores, indices = probs.topk(min(k, len(classes)))
    return [{"label": classes[i], "score": round(float(s), 4)} for s, i in zip(scores.tolist(), indices.tolist())]


@command
def predict(
    videos: Annotated[list[str], typer.Argument(help="Video files, folders or globs; - reads paths from stdin.")],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", "-c", help="A trained model.safetensors "
                                                                              "or run directory.")] = None,
    backbone: Annotated[str | None, typer.Option("--backbone", help="With --pretrained: the Kinetics-400 model "
                                                                     f"({BACKBONE_NAMES.partition(', ')[2]}).")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Use torchvision's Kinetics-400 weights from "
                                                                  "the local torch hub cache.")] = False,
    top_k: Annotated[int, typer.Option("--top-k", help="How many labels to report per video.")] = 5,
    clips: Annotated[int, typer.Option("--clips", help="Clips spread over each video; scores are averaged.")] = 3,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Classify each video from a few clips spread over it; a failing file is reported and the rest go on.

    Example: dsfuse classify-video predict samples/video --checkpoint runs/video --top-k 2 --json
    """
    if top_k < 1:
        raise UsageError(f"top-k must be at least 1, got {top_k}", "--top-k")
    if clips < 1:
        raise UsageError(f"clips must be at least 1, got {clips}", "--clips")
    if (checkpoint is None) == (not pretrained):
        raise UsageError("give either --checkpoint or --pretrained (with --backbone)", "--checkpoint/--pretrained")
    from dsfuse.data.video import VIDEO_SUFFIXES
    from dsfuse.device import seed_everything, select_device

    paths = expand_inputs(videos, VIDEO_SUFFIXES)  # before the model: a typo fails fast
    torch_device = select_device(device)
    seed_everything(seed)
    from dsfuse.cli.video_fusion import is_fused_checkpoint, predict_fused

    if checkpoint is not None and is_fused_checkpoint(checkpoint):  # trained with --fusion: frames + soundtrack
        return predict_fused(paths, checkpoint, top_k=top_k, clips=clips, device=torch_device, json=json, quiet=quiet)
    model, classes = load_classifier(checkpoint, backbone, pretrained, torch_device)

    def classify(path: Path) -> dict[str, Any]:
        return {"top": top_labels(video_probabilities(model, path, clips, torch_device), classes, top_k)}

    tabulate_top_labels(paths, classify, "classify-video predict", json=json, quiet=quiet)


def tabulate_top_labels(paths: list[Path], classify, title: str, *, json: bool, quiet: bool) -> None:
    """Classify each video ({"top": [{"label", "score"}, ...]}); a table of the top 3 unless --json."""

    def show(rows: list[tuple]) -> None:
        shown = max(len(r) for r in rows) - 1
        print_table(title, ["file"] + [f"top {i + 1}" for i in range(shown)], rows)

    tabulate_each_input(paths, classify,
                        lambda path, result: [(path, *(f"{t['label']} {t['score']:.3f}" for t in result["top"][:3]))],
                        show, as_json=json, quiet=quiet, desc="videos")


# --------------------------------------------------------------------------- make-dataset

@command
def make_dataset(
    out: Annotated[Path, typer.Argument(help="Folder to write OUT/<direction>/<direction>_NNN.mp4 into.")],
    per_class: Annotated[int, typer.Option("--per-class", help="Videos per direction.")] = 40,
    frames: Annotated[int, typer.Option("--frames", help="Frames per video.")] = 24,
    size: Annotated[int, typer.Option("--size", help="Width and height in pixels.")] = 64,
    fps: Annotated[float, typer.Option("--fps", help="Frame rate of the videos.")] = 12.0,
    audio: Annotated[bool, typer.Option("--audio", help="Add a soundtrack whose pitch names the class.")] = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Write labelled synthetic videos: a shape moving left, right, up or down (no single frame tells which).

    Example: dsfuse classify-video make-dataset data/motion --per-class 40
    """
    if per_class < 1 or frames < 2 or size < 16 or fps <= 0:
        raise UsageError("need --per-class >= 1, --frames >= 2, --size >= 16 and --fps > 0",
                         "--per-class/--frames/--size/--fps")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UsageError("output folder is not empty; pass --force to write into it", out)
    from dsfuse.data.motion import write_motion_dataset
    from dsfuse.device import select_device

    select_device(device)  # checked like every command's, though writing videos needs no accelerator
    files = write_motion_dataset(out, per_class, frames, size, fps, audio=audio, seed=seed, progress=not quiet)
    summary = {"out": str(out), "videos": len(files), "classes": sorted({f.parent.name for f in files}),
               "frames": frames, "size": size, "fps": fps, "audio": audio}
    if json:
        emit_json(summary)
    elif not quiet:
        console.print(f"wrote {len(files)} videos ({', '.join(summary['classes'])}) to {out}")


def register(root: typer.Typer) -> None:
    app.command("train")(train)
    app.command("predict")(predict)
    app.command("make-dataset")(make_dataset)
    root.add_typer(app, name="classify-video")


def summarize_predictions(records: list[dict]) -> str:
    """The demo's one-line summary of `predict --json` records: file -> top label."""
    return "; ".join(f"{Path(r['file']).stem} -> {r['top'][0]['label']}" for r in records)


def demo_steps(samples: Path, out: Path) -> list:
    from dsfuse.cli.demo import DemoStep

    data, run = out / "video-data", out / "video-run"

    def trained(records: list[dict]) -> str:
        r = records[0]
        return f"{r['backbone']}, {r['step']} steps: held-out accuracy {r['accuracy']:.0%} (tiny run)"

    return [
        DemoStep("classify-video make-dataset", ["classify-video", "make-dataset", str(data), "--per-class", "6",
                                                 "--frames", "16", "--size", "48"],
                 lambda r: f"{r[0]['videos']} videos of {', '.join(r[0]['classes'])}", [data]),
        DemoStep("classify-video train", ["classify-video", "train", str(data), "--out", str(run), "--steps", "20",
                                          "--batch-size", "8", "--held-out", "0.34"], trained, [run]),
        DemoStep("classify-video predict", ["classify-video", "predict", str(samples / "video"), "--checkpoint",
                                            str(run), "--top-k", "2", "--clips", "2"], summarize_predictions),
    ]
