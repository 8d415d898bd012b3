"""`classify-video train --fusion/--compare-fusion` and predicting with a fused checkpoint: the frames
fused with the video's soundtrack (through the audio-emotion encoder) by an `nn.fusion` strategy.

classify-video's own module calls in here, so its code stays about video alone.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from dsfuse.cli.common import emit_json, print_table, report_training, warn
from dsfuse.errors import UsageError

# the strategies of dsfuse.nn.fusion, spelled out so importing this module at startup needs no torch
FUSION_CHOICES = ("none", "early", "mid", "late", "gated", "bottleneck", "qformer", "hybrid")
FUSED_KIND = "av-video"


def check_fusion(fusion: str) -> None:
    if fusion not in FUSION_CHOICES:
        raise UsageError(f"unknown fusion {fusion!r}; choose from {', '.join(FUSION_CHOICES)}", "--fusion")


def is_fused_checkpoint(checkpoint: Path) -> bool:
    from dsfuse.checkpoint import read_metadata

    return read_metadata(checkpoint)["kind"] == FUSED_KIND


def _load_folder(data: Path, backbone: str, frames: int | None, fps: float | None, audio_seconds: float,
                 held_out: float, seed: int, quiet: bool):
    """The class folders with soundtracks, split; videos without an audio track are left out with a warning."""
    from dsfuse.data.av_video import AudioVisualFolder
    from dsfuse.data.video import VideoFolder, stratified_split
    from dsfuse.models.av_video import AVVideoConfig
    from dsfuse.models.video import VideoConfig

    video_cfg = VideoConfig.for_backbone(backbone, num_classes=0, frames=frames, fps=fps)
    folder = VideoFolder(data, video_cfg.frames, video_cfg.fps, video_cfg.decode_size)
    av_folder = AudioVisualFolder(folder, audio_seconds, AVVideoConfig().audio.n_mels)
    for path in av_folder.no_audio:
        warn(f"no audio track: left out of fused training ({path})", quiet)
    if len(av_folder) == 0:
        raise UsageError("no video with an audio track to fuse", data)
    if len(set(av_folder.labels)) < 2:
        raise UsageError("need at least two class folders with sound", data)
    train_idx, held_idx = stratified_split(av_folder.labels, held_out, seed)
    if not held_idx:
        raise UsageError("need at least two videos per class to hold some out", data)
    return video_cfg, av_folder, av_folder.subset(train_idx, True), av_folder.subset(held_idx, False)


def _train_one(fusion: str, video_cfg, av_folder, train_set, held_set, run_dir: Path, *, steps: int,
               batch_size: int, lr: float, eval_every: int, workers: int, resume: bool, device, seed: int,
               quiet: bool, audio_seconds: float):
    import torch

    from dsfuse.checkpoint import MODEL_FILE, read_metadata
    from dsfuse.data.av_video import collate_audio_visual
    from dsfuse.device import seed_everything
    from dsfuse.engine import TrainConfig, fit, read_metrics, unwrap
    from dsfuse.models.av_video import AudioVisualVideoClassifier, AVVideoConfig
    from dsfuse.plots import plot_curves

    seed_everything(seed)
    if resume and (run_dir / MODEL_FILE).exists():
        config = AVVideoConfig(**read_metadata(run_dir / MODEL_FILE)["config"])
    else:
        mels = torch.cat(train_set.mels)
        audio_cfg = replace(AVVideoConfig().audio, feature_mean=float(mels.mean()), feature_std=float(mels.std()))
        config = AVVideoConfig(video=replace(video_cfg, num_classes=len(av_folder.classes)), audio=audio_cfg,
                               fusion=fusion, num_classes=len(av_folder.classes), audio_seconds=audio_seconds)
    model = AudioVisualVideoClassifier(config)

    def loss_fn(net, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        clips = unwrap(net).preprocess(batch["clips"], random_crop=True)
        return torch.nn.functional.cross_entropy(net(clips, batch["mel"], batch["mel_mask"]), batch["labels"])

    def evaluate(net, step: int) -> dict[str, float]:
        return evaluate_fused(net, held_set, run_dir, device, batch_size)

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(50, steps // 10),
                      eval_every=eval_every, num_workers=workers, quiet=quiet, seed=seed)
    result = fit(model, train_set, loss_fn, cfg, run_dir, kind=FUSED_KIND, config=config, device=device,
                 resume=resume, evaluate=evaluate, collate_fn=collate_audio_visual,
                 extra_meta={"classes": av_folder.classes})
    plot_curves(read_metrics(run_dir), ["loss", "accuracy"], run_dir / "curves.png",
                title=f"classify-video {config.video.backbone} + audio, {fusion} fusion")
    return result, model


def evaluate_fused(model, dataset, run_dir: Path, device, batch_size: int) -> dict[str, float]:
    """Held-out accuracy (middle clip + soundtrack of each video) and confusion.png in the run dir."""
    import torch

    from dsfuse.data.av_video import collate_audio_visual
    from dsfuse.metrics import accuracy, confusion_matrix
    from dsfuse.plots import plot_confusion

    true, pred = [], []
    for first in range(0, len(dataset), batch_size):
        batch = collate_audio_visual([dataset[i] for i in range(first, min(first + batch_size, len(dataset)))])
        clips = model.preprocess(batch["clips"].to(device))
        pred.append(model(clips, batch["mel"].to(device), batch["mel_mask"].to(device)).argmax(-1).cpu())
        true.append(batch["labels"])
    true_t, pred_t = torch.cat(true), torch.cat(pred)
    acc = accuracy(true_t, pred_t)
    plot_confusion(confusion_matrix(true_t, pred_t, len(dataset.classes)), dataset.classes,
                   run_dir / "confusion.png", title=f"held-out accuracy {acc:.1%} ({len(true_t)} videos)")
    return {"accuracy": acc}


def train_fused(data: Path, out: Path, *, fusion: str, compare: bool, backbone: str, steps: int,
                batch_size: int, lr: float, frames: int | None, fps: float | None, held_out: float,
                eval_every: int, workers: int, resume: bool, device: str, seed: int, json: bool, quiet: bool,
                force: bool, audio_seconds: float = 10.0) -> None:
    """Train one fused model into OUT, or (compare) every strategy into OUT/<strategy> and tabulate them."""
    from dsfuse.device import select_device
    from dsfuse.engine import prepare_run_dir

    check_fusion(fusion)
    if compare and resume:
        raise UsageError("--compare-fusion trains every strategy afresh; it cannot --resume", "--compare-fusion")
    torch_device = select_device(device)
    video_cfg, av_folder, train_set, held_set = _load_folder(data, backbone, frames, fps, audio_seconds,
                                                             held_out, seed, quiet)
    options = dict(steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, workers=workers,
                   device=torch_device, seed=seed, quiet=quiet, audio_seconds=audio_seconds)
    summary = {"backbone": backbone, "classes": av_folder.classes, "train_videos": len(train_set),
               "held_out_videos": len(held_set), "no_audio": [str(p) for p in av_folder.no_audio]}
    if not compare:
        run_dir = prepare_run_dir(out, resume, force)
        result, _ = _train_one(fusion, video_cfg, av_folder, train_set, held_set, run_dir, resume=resume, **options)
        report_training(result, {"fusion": fusion, "accuracy": result.metrics.get("eval_accuracy"), **summary},
                        json)
        return

    rows = []
    for strategy in FUSION_CHOICES[1:]:
        run_dir = prepare_run_dir(out / strategy, False, force)
        started = time.perf_counter()
        result, model = _train_one(strategy, video_cfg, av_folder, train_set, held_set, run_dir, resume=False,
                                   **options)
        rows.append({"fusion": strategy, "accuracy": result.metrics.get("eval_accuracy"),
                     "params": sum(p.numel() for p in model.parameters()),
                     "train_s": round(time.perf_counter() - started, 2), "run_dir": str(run_dir)})
        if result.interrupted:
            report_training(result, rows[-1], json)
    if json:
        emit_json({"compare_fusion": rows, **summary})
    else:
        print_table(f"fusion strategies on {data} ({steps} steps each, {len(held_set)} held-out videos)",
                    ["fusion", "held-out accuracy", "parameters", "train s", "run dir"],
                    [(r["fusion"], r["accuracy"], f"{r['params']:,}", r["train_s"], r["run_dir"]) for r in rows])


def predict_fused(paths: list[Path], checkpoint: Path, *, top_k: int, clips: int, device, json: bool,
                  quiet: bool) -> None:
    """Classify each video from clips spread over it plus its soundtrack; no audio track fails that file."""
    import torch

    from dsfuse.checkpoint import load_checkpoint
    from dsfuse.cli.classify_video import tabulate_top_labels
    from dsfuse.data.audio import LogMel, MelConfig
    from dsfuse.data.av_video import soundtrack_mel
    from dsfuse.data.video import read_clips

    model, meta = load_checkpoint(checkpoint, kind=FUSED_KIND, device=device)
    cfg = model.config
    classes = meta["extra"].get("classes") or [str(i) for i in range(cfg.num_classes)]
    mel = LogMel(MelConfig(n_mels=cfg.audio.n_mels))

    @torch.no_grad()
    def classify(path: Path) -> dict[str, Any]:
        features = soundtrack_mel(path, cfg.audio_seconds, mel).to(device)  # first: no audio, no decoding
        frames = read_clips(path, cfg.video.frames, cfg.video.fps, clips, cfg.video.decode_size).to(device)
        mels = features[None].expand(len(frames), -1, -1)
        probs = model(model.preprocess(frames), mels).softmax(-1).mean(0)
        scores, indices = probs.topk(min(top_k, len(classes)))
        return {"fusion": cfg.fusion,
                "top": [{"label": classes[i], "score": round(float(s), 4)} for s, i in zip(scores, indices.tolist())]}

    tabulate_top_labels(paths, classify, f"classify-video predict ({cfg.fusion} fusion with the soundtrack)",
                        json=json, quiet=quiet)


def register(app) -> None:
    """No command of its own: --fusion and --compare-fusion live on classify-video (see its module)."""


def demo_steps(samples: Path, out: Path) -> list:
    from dsfuse.cli.classify_video import summarize_predictions
    from dsfuse.cli.demo import DemoStep

    data, run = out / "av-data", out / "av-run"

    def trained(records: list[dict]) -> str:
        r = records[0]
        return f"{r['fusion']} fusion, {r['step']} steps: held-out accuracy {r['accuracy']:.0%} (tiny run)"

    return [
        DemoStep("classify-video make-dataset --audio", ["classify-video", "make-dataset", str(data), "--per-class",
                                                         "3", "--frames", "8", "--size", "32", "--audio"],
                 lambda r: f"{r[0]['videos']} videos with soundtracks", [data]),
        DemoStep("classify-video train --fusion", ["classify-video", "train", str(data), "--out", str(run),
                                                   "--fusion", "gated", "--steps", "6", "--batch-size", "4",
                                                   "--held-out", "0.34"], trained, [run]),
        DemoStep("classify-video predict (fused)", ["classify-video", "predict", str(samples / "video" / "left.mp4"),
                                                    str(samples / "video" / "right.mp4"), "--checkpoint", str(run),
                                                    "--top-k", "2", "--clips", "1"], summarize_predictions),
    ]
