"""The video task: train a classifier on class folders of videos (frames alone, or fused with each
video's soundtrack), evaluate it on held-out videos, compare fusion strategies, predict per file, and
write a synthetic dataset. `classify-video` and `dsfuse demo` call in here.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsfuse import choices, runs
from dsfuse.checkpoint import CheckpointMeta, build_model, load_checkpoint, read_metadata
from dsfuse.data.audio import SAMPLE_RATE, LogMel, MelConfig
from dsfuse.data.av_video import AudioVisualFolder, collate_clips, soundtrack_mel
from dsfuse.data.media import caption_frame, write_video_frames
from dsfuse.data.video import (VideoFolder, clip_starts, iter_frames, probe_video, read_audio_track, read_clips,
                               stratified_split)
from dsfuse.device import seed_everything, select_device
from dsfuse.engine import TrainConfig, TrainResult, fit, read_metrics, to_device, unwrap
from dsfuse.errors import InputError, UsageError
from dsfuse.io import claim_output_folder
from dsfuse.metrics import accuracy, confusion_matrix, retrieval_recall
from dsfuse.models.video import (AV_VIDEO_KIND, VideoClassifier, VideoConfig, kinetics_categories, kinetics_url,
                                 load_av_video)
from dsfuse.nn.fusion import alignment_embeddings, check_contrastive, contrastive_loss
from dsfuse.plots import plot_confusion, plot_curves
from dsfuse.report import warn
from dsfuse.weights import WeightsFile, load_state_dict, resolve

TASK = KIND = "video"  # the default run directories (runs/video/train, ...) and the checkpoint kind
FUSED_STRATEGIES = tuple(s for s in choices.values(choices.Fusion) if s != "none")


@dataclass(kw_only=True)
class VideoTrainOptions(runs.TrainOptions):
    """`classify-video train`'s options, as its run records them."""

    data: Path
    backbone: choices.Backbone
    pretrained: bool
    frames: int | None
    fps: float | None
    held_out: float
    fusion: choices.Fusion
    weights: Path | None = None  # with pretrained: this Kinetics-400 file instead of the cache or a download
    contrastive: float = 0.0  # weight of the CLIP-style frames-soundtrack alignment loss (needs a fusion)

    def check(self) -> None:
        if not 0 < self.held_out < 1:
            raise UsageError(f"held-out fraction must be between 0 and 1, got {self.held_out}", "--held-out")
        if (self.frames is not None and self.frames < 1) or (self.fps is not None and self.fps <= 0):
            raise UsageError("frames must be at least 1 and fps positive", "--frames/--fps")
        if self.weights is not None and not self.pretrained:
            raise UsageError("--weights is the file of --pretrained", "--weights")
        check_contrastive(self.contrastive, self.fusion != "none")

    def config(self) -> VideoConfig:
        """The model's config before the data is known (the classes, the soundtrack's statistics)."""
        return VideoConfig.for_backbone(self.backbone, num_classes=0, frames=self.frames, fps=self.fps,
                                        fusion=self.fusion, contrastive=self.contrastive)


# --------------------------------------------------------------------------- data

@dataclass
class VideoData:
    """The class folders split into training and held-out videos, with their soundtracks when fused."""

    classes: list[str]
    train: VideoFolder | AudioVisualFolder
    held: VideoFolder | AudioVisualFolder
    skipped: list[Path]  # unreadable videos
    no_audio: list[Path]  # videos left out of fused training

    def summary(self) -> dict[str, Any]:
        return {"classes": self.classes, "train_videos": len(self.train), "held_out_videos": len(self.held),
                "skipped": [str(p) for p in self.skipped], "no_audio": [str(p) for p in self.no_audio]}


def load_data(options: VideoTrainOptions, config: VideoConfig, quiet: bool = False) -> VideoData:
    """Read and split DATA/<class>/*; a fused model leaves out (with a warning) videos without sound."""
    folder = VideoFolder(options.data, config.frames, config.fps, config.decode_size)
    videos = AudioVisualFolder(folder, config.audio_seconds, config.audio.n_mels) if config.fused else folder
    no_audio = videos.no_audio if config.fused else []
    for path in no_audio:
        warn(f"no audio track: left out of fused training ({path})", quiet)
    if config.fused and not len(videos):
        raise UsageError("no video with an audio track to fuse", options.data)
    if len(set(videos.labels)) < 2:
        raise UsageError("need at least two class folders" + (" with sound" if config.fused else ""), options.data)
    train_idx, held_idx = stratified_split(videos.labels, options.held_out, options.seed)
    if not held_idx:
        raise UsageError("need at least two videos per class to hold some out", options.data)
    return VideoData(folder.classes, videos.subset(train_idx, True), videos.subset(held_idx, False),
                     folder.skipped, no_audio)


# --------------------------------------------------------------------------- training

def kinetics_weights(backbone: str, explicit: Path | None = None, quiet: bool = False) -> Path:
    """`backbone`'s Kinetics-400 weights file: `explicit`, else torch hub's cache, else downloaded (when online)."""
    return resolve(WeightsFile(kinetics_url(backbone)), explicit, option="--pretrained", quiet=quiet)


def load_kinetics(model: VideoClassifier, explicit: Path | None = None, quiet: bool = False) -> None:
    path = kinetics_weights(model.config.backbone, explicit, quiet)
    model.load_kinetics(load_state_dict(path), path)


def new_model(options: VideoTrainOptions, config: VideoConfig, data: VideoData, quiet: bool = False
              ) -> VideoClassifier:
    """A seeded model for `data`'s classes (and its soundtracks' log-mel statistics), Kinetics weights if asked."""
    config = replace(config, num_classes=len(data.classes))
    if config.fused:
        mels = torch.cat(data.train.mels)
        config = replace(config, audio=replace(config.audio, feature_mean=float(mels.mean()),
                                               feature_std=float(mels.std())))
    seed_everything(options.seed)
    model = VideoClassifier(config)
    if options.pretrained:
        load_kinetics(model, options.weights, quiet)
    return model


def train(options: VideoTrainOptions, out: Path, *, resume: bool = False, force: bool = False,
          explicit: Collection[str] = (), device: str = "auto", quiet: bool = False) -> tuple[TrainResult, dict]:
    """Train into OUT (or continue it under the run rule of dsfuse.runs); returns the result and a summary."""
    meta = None
    if resume:
        options, meta = runs.resume_options(options, out, KIND, explicit)
    options.check()
    if options.pretrained and not resume:
        kinetics_weights(options.backbone, options.weights, quiet)  # before reading any video
    torch_device = select_device(device)
    model = build_model(meta) if meta else None
    config = model.config if model else options.config()
    data = load_data(options, config, quiet)
    if meta and list(meta.classes) != data.classes:
        raise UsageError("the class folders differ from the run's; resume with the same data", options.data)
    if model is None:
        model = new_model(options, config, data, quiet)
    return fit_model(model, options, data, out, resume=resume, force=force, device=torch_device, quiet=quiet)


def fit_model(model: VideoClassifier, options: VideoTrainOptions, data: VideoData, out: Path, *, resume: bool,
              force: bool, device: torch.device, quiet: bool) -> tuple[TrainResult, dict]:
    train_cfg = TrainConfig.of(options, quiet=quiet)
    run_dir = runs.prepare_run_dir(out, resume, force)
    config = model.config

    def loss_fn(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(batch_logits(net, batch, random_crop=True), batch["labels"])
        return loss + config.contrastive * contrastive_loss(net) if config.contrastive else loss

    def evaluate_held_out(net: VideoClassifier, step: int) -> dict[str, float]:
        return evaluate(net, data.held, run_dir, device, options.batch_size)

    meta = CheckpointMeta.of(KIND, config, classes=tuple(data.classes), options=options.record())
    result = fit(model, data.train, loss_fn, train_cfg, run_dir, meta=meta, device=device, resume=resume,
                 evaluate=evaluate_held_out, collate_fn=collate_clips)
    sound = f" + audio, {config.fusion} fusion" if config.fused else ""
    plot_curves(read_metrics(run_dir), ["loss", "accuracy"], run_dir / "curves.png",
                title=f"classify-video {config.backbone}{sound}")
    return result, {"backbone": config.backbone, "fusion": config.fusion,
                    "accuracy": result.metrics.get("eval_accuracy"),
                    **{k[5:]: v for k, v in result.metrics.items() if k.startswith("eval_recall@")}, **data.summary()}


def batch_logits(net: torch.nn.Module, batch: dict[str, torch.Tensor], random_crop: bool = False) -> torch.Tensor:
    """Logits of a `collate_clips` batch of decoded clips (and log-mels, for a fused model)."""
    clips = unwrap(net).preprocess(batch["clips"], random_crop)
    return net(clips, batch.get("mel"), batch.get("mel_mask"))


def evaluate(model: VideoClassifier, dataset: VideoFolder | AudioVisualFolder, run_dir: Path,
             device: torch.device, batch_size: int) -> dict[str, float]:
    """Held-out accuracy (the middle clip of each video, with its soundtrack when fused); confusion.png in run_dir."""
    true, pred, aligned = [], [], []
    for first in range(0, len(dataset), batch_size):
        batch = collate_clips([dataset[i] for i in range(first, min(first + batch_size, len(dataset)))])
        pred.append(batch_logits(model, to_device(batch, device)).argmax(-1).cpu())
        true.append(batch["labels"])
        if (embedded := alignment_embeddings(model)) is not None:  # under --contrastive
            aligned.append(torch.stack(embedded, 1).float().cpu())
    true_t, pred_t = torch.cat(true), torch.cat(pred)
    acc = accuracy(true_t, pred_t)
    plot_confusion(confusion_matrix(true_t, pred_t, len(dataset.classes)), dataset.classes,
                   run_dir / "confusion.png", title=f"held-out accuracy {acc:.1%} ({len(true_t)} videos)")
    if aligned:  # frames -> soundtrack and soundtrack -> frames retrieval among the held-out videos
        pairs = torch.cat(aligned)
        return {"accuracy": acc, **retrieval_recall(pairs[:, 0], pairs[:, 1])}
    return {"accuracy": acc}


def compare_fusion(options: VideoTrainOptions, out: Path, *, force: bool = False, device: str = "auto",
                   quiet: bool = False) -> tuple[dict[str, Any], Iterator[tuple[TrainResult, dict[str, Any]]]]:
    """Every fusion strategy but none, trained on the same split into OUT/<strategy>: the data's summary, and
    (result, row) per strategy as each finishes."""
    options.check()
    torch_device = select_device(device)
    config = replace(options, fusion=FUSED_STRATEGIES[0]).config()
    data = load_data(options, config, quiet)

    def each() -> Iterator[tuple[TrainResult, dict[str, Any]]]:
        for strategy in FUSED_STRATEGIES:
            started, chosen = time.perf_counter(), replace(options, fusion=strategy)
            model = new_model(chosen, replace(config, fusion=strategy), data, quiet)
            result, summary = fit_model(model, chosen, data, out / strategy, resume=False, force=force,
                                        device=torch_device, quiet=quiet)
            yield result, {"fusion": strategy, "accuracy": summary["accuracy"],
                           "params": sum(p.numel() for p in model.parameters()),
                           "train_s": round(time.perf_counter() - started, 2), "run_dir": str(result.run_dir)}

    return {"backbone": config.backbone, **data.summary()}, each()


# --------------------------------------------------------------------------- prediction

def load_trained(checkpoint: Path, device: torch.device | str = "cpu") -> tuple[VideoClassifier, CheckpointMeta]:
    """A trained video model; a checkpoint of the old fused kind `av-video` is migrated as it loads."""
    if read_metadata(checkpoint).kind == AV_VIDEO_KIND:
        return load_av_video(checkpoint, device)
    return load_checkpoint(checkpoint, kind=KIND, device=device)


def load_classifier(checkpoint: Path | None, backbone: choices.PretrainedBackbone | None, device: torch.device,
                    weights: Path | None = None, quiet: bool = False) -> tuple[VideoClassifier, list[str]]:
    """A trained checkpoint with its class names, or (no checkpoint) torchvision's Kinetics-400 `backbone`
    (from the `weights` file, else the cache, else a download)."""
    if checkpoint is not None:
        model, meta = load_trained(checkpoint, device)
        return model, meta.class_names(checkpoint)
    if backbone is None:
        raise UsageError("--pretrained needs --backbone", "--backbone")
    path = kinetics_weights(backbone, weights, quiet)  # before building a large model for nothing
    model = VideoClassifier(VideoConfig.for_backbone(backbone, 400))
    model.load_kinetics(load_state_dict(path), path)
    return model.to(device).eval(), kinetics_categories(backbone)


@dataclass
class VideoPredictor:
    """Classifies one video file per call: the mean over `clips` clips spread over it, each heard with the
    video's soundtrack when the model is fused (a video without one is that file's InputError)."""

    model: VideoClassifier
    classes: list[str]
    device: torch.device
    top_k: int
    clips: int

    def __post_init__(self) -> None:
        cfg = self.model.config
        self.log_mel = LogMel(MelConfig(n_mels=cfg.audio.n_mels)) if cfg.fused else None

    @property
    def fusion(self) -> str:
        return self.model.config.fusion

    @torch.no_grad()
    def probabilities(self, path: Path, span: tuple[float, float] | None = None) -> torch.Tensor:
        """Class probabilities [classes] of one video, or of its `span` (start, end) in seconds: the mean
        over clips spread over it, heard with the soundtrack from the span's start when fused."""
        cfg = self.model.config
        mel = (self.soundtrack(path, span).to(self.device) if self.log_mel else None)  # first: no sound, no decoding
        starts = None if span is None else [span[0] + s for s in clip_starts(span[1] - span[0], cfg.frames / cfg.fps,
                                                                             self.clips)]
        frames = read_clips(path, cfg.frames, cfg.fps, self.clips, cfg.decode_size, starts=starts).to(self.device)
        mels = None if mel is None else mel[None].expand(len(frames), -1, -1)
        return self.model(self.model.preprocess(frames), mels).softmax(-1).mean(0)

    def soundtrack(self, path: Path, span: tuple[float, float] | None) -> torch.Tensor:
        """Log-mels of the first `audio_seconds` of the soundtrack, or of the span's (at most as long)."""
        seconds = self.model.config.audio_seconds
        if span is None:
            return soundtrack_mel(path, seconds, self.log_mel)
        wave = read_audio_track(path, SAMPLE_RATE, start=span[0], duration=min(span[1] - span[0], seconds))
        if wave.numel() == 0:
            raise InputError(f"audio track holds no samples at {span[0]:.2f} s", path)
        return self.log_mel(wave)

    def __call__(self, path: Path) -> dict[str, Any]:
        return {"fusion": self.fusion, "top": top_labels(self.probabilities(path), self.classes, self.top_k)}

    def timeline(self, path: Path, segment: float) -> Iterator[dict[str, Any]]:
        """One record {start, end, top} per `segment` seconds (one segment when longer than the video),
        each decoded on its own: memory stays flat over the video's length."""
        duration = probe_video(path).duration
        count = max(1, math.ceil(duration / segment - 1e-6))
        for i in range(count):
            start, end = i * segment, (duration if i == count - 1 else (i + 1) * segment)
            probs = self.probabilities(path, (start, end))
            yield {"start": round(start, 3), "end": round(end, 3), "top": top_labels(probs, self.classes, self.top_k)}


def render_timeline(path: Path, records: list[dict[str, Any]], out: Path) -> Path:
    """`path` re-encoded into `out` (H.264 mp4, at its frame rate) with each frame's segment label and score
    drawn on it; frames stream through, so memory stays flat."""
    ends = [r["end"] for r in records]

    def captioned() -> Iterator[np.ndarray]:
        for seconds, rgb in iter_frames(path):
            best = records[min(bisect.bisect_right(ends, seconds), len(records) - 1)]["top"][0]
            yield caption_frame(rgb, f"{best['label']} {best['score']:.2f}")

    return write_video_frames(out, captioned(), probe_video(path).fps)


def load_predictor(checkpoint: Path | None, backbone: choices.PretrainedBackbone | None, pretrained: bool, *,
                   top_k: int, clips: int, device: str = "auto", seed: int = 0, weights: Path | None = None,
                   quiet: bool = False) -> VideoPredictor:
    """The predictor of a trained checkpoint, or of a Kinetics-400 backbone with `pretrained` (its `weights`
    file, else the cache, else a download)."""
    if top_k < 1:
        raise UsageError(f"top-k must be at least 1, got {top_k}", "--top-k")
    if clips < 1:
        raise UsageError(f"clips must be at least 1, got {clips}", "--clips")
    if (checkpoint is None) == (not pretrained):
        raise UsageError("give either --checkpoint or --pretrained (with --backbone)", "--checkpoint/--pretrained")
    if weights is not None and not pretrained:
        raise UsageError("--weights is the file of --pretrained", "--weights")
    torch_device = select_device(device)
    seed_everything(seed)
    model, classes = load_classifier(checkpoint, backbone, torch_device, weights, quiet)
    return VideoPredictor(model, classes, torch_device, top_k, clips)


def top_labels(probs: torch.Tensor, classes: list[str], k: int) -> list[dict[str, Any]]:
    """The `k` most likely labels, best first: [{"label", "score"}, ...]."""
    scores, indices = probs.topk(min(k, len(classes)))
    return [{"label": classes[i], "score": round(float(s), 4)} for s, i in zip(scores.tolist(), indices.tolist())]


# --------------------------------------------------------------------------- a synthetic dataset

def make_dataset(out: Path, *, per_class: int, frames: int, size: int, fps: float, audio: bool, seed: int,
                 force: bool, device: str = "auto", quiet: bool = False) -> dict[str, Any]:
    """Write OUT/<direction>/<direction>_NNN.mp4: a shape moving left, right, up or down (with a tone naming
    the direction when `audio`); returns a summary."""
    from dsfuse.data.motion import write_motion_dataset

    if per_class < 1 or frames < 2 or size < 16 or fps <= 0:
        raise UsageError("need --per-class >= 1, --frames >= 2, --size >= 16 and --fps > 0",
                         "--per-class/--frames/--size/--fps")
    select_device(device)  # checked like every command's, though writing videos needs no accelerator
    claim_output_folder(out, force)
    files = write_motion_dataset(out, per_class, frames, size, fps, audio=audio, seed=seed, progress=not quiet)
    return {"out": str(out), "videos": len(files), "classes": sorted({f.parent.name for f in files}),
            "frames": frames, "size": size, "fps": fps, "audio": audio}
