"""`dsfuse audio-emotion`: train a speech-emotion classifier, predict per file or as a streamed
timeline over long audio, and generate a synthetic emotional-speech set to train on offline.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dsfuse.cli.common import (CheckpointOpt, DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, ResumeOpt, SeedOpt,
                               command, console, emit_json, expand_inputs, for_each_input, print_table,
                               report_training, tabulate_each_input, warn)
from dsfuse.errors import InputError, UsageError

if TYPE_CHECKING:
    import torch

    from dsfuse.data.audio import LogMel
    from dsfuse.data.emotion_speech import LabelledClip, SpeakerBaselines
    from dsfuse.models.audio import AudioEmotionClassifier

    Normalize = Callable[[torch.Tensor], torch.Tensor]  # features -> speaker-normalised features

app = typer.Typer(help="Speech emotion: train on labelled clips, predict labels or timelines, make a synthetic set.",
                  no_args_is_help=True)

MIN_SEGMENT_SECONDS, MAX_SEGMENT_SECONDS = 0.1, 60.0
WHOLE_FILE_WINDOW_FRAMES = 3000  # 30 s of 10 ms log-mel frames
SPEAKER_GROUPS = ("name", "file", "all")
MIN_BASELINE_FRAMES = 600  # 6 s: one clip (2-4 s) makes a poor speaker baseline, four of mixed emotion a good one


# --------------------------------------------------------------------------- shared pieces

def load_clip_features(clips: Sequence[LabelledClip], mel: LogMel, quiet: bool, desc: str
                       ) -> tuple[list[torch.Tensor], list[LabelledClip]]:
    """Log-mel features of each readable, non-silent clip; unusable ones are skipped with a warning."""
    from tqdm import tqdm

    from dsfuse.data.audio import is_silent, load_audio, trim_silence

    features, kept = [], []
    for clip in tqdm(clips, desc=desc, disable=quiet, leave=False, file=sys.stderr):
        try:
            wave = load_audio(clip.path, mel.cfg.sample_rate)
        except InputError as e:
            warn(f"skipped: {e}")
            continue
        if is_silent(wave):
            warn(f"skipped: silent clip ({clip.path})")
            continue
        features.append(mel(trim_silence(wave, mel.cfg.sample_rate)))
        kept.append(clip)
    return features, kept


def split_for_training(data: Path, labels: str, split_by: str, heldout: Path | None, heldout_fraction: float,
                       seed: int) -> tuple[list[LabelledClip], list[LabelledClip]]:
    """(training, held-out) clips: a separate held-out folder, or a split of DATA."""
    from dsfuse.data.emotion_speech import find_labelled_clips, split_clips

    clips = find_labelled_clips(data, labels)
    if heldout is not None:
        return clips, find_labelled_clips(heldout, labels)
    return split_clips(clips, split_by, heldout_fraction, seed)


def classify(model: AudioEmotionClassifier, features: Sequence[torch.Tensor], device: torch.device,
             batch_size: int = 16) -> torch.Tensor:
    """Class probabilities [N, classes] for variable-length log-mel clips, batched by similar length."""
    import torch

    from dsfuse.data.emotion_speech import collate_padded

    order = sorted(range(len(features)), key=lambda i: len(features[i]))  # little padding per batch
    probs = torch.empty(len(features), model.config.num_classes)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = collate_padded([(features[i], torch.tensor(0)) for i in index])
            logits = model(batch["features"].to(device), batch["mask"].to(device))
            probs[index] = logits.float().softmax(-1).cpu()
    return probs


def evaluate_predictions(true: torch.Tensor, probs: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro and per-class F1 and the confusion matrix of held-out predictions."""
    from dsfuse.metrics import accuracy, confusion_matrix, per_class_f1

    pred = probs.argmax(-1)
    matrix = confusion_matrix(true, pred, len(classes))
    f1 = per_class_f1(matrix)
    return {"accuracy": accuracy(true, pred), "macro_f1": float(f1.mean()),
            "f1": {c: float(v) for c, v in zip(classes, f1)}, "confusion": matrix.tolist()}


def load_classifier(checkpoint: Path, device: torch.device) -> tuple[AudioEmotionClassifier, list[str], dict[str, Any]]:
    """The model, its class names and the rest of what training recorded (label scheme, speaker norm)."""
    from dsfuse.checkpoint import load_checkpoint

    model, meta = load_checkpoint(checkpoint, kind="audio", device=device)
    extra = meta.get("extra") or {}
    classes = extra.get("classes")
    if not classes or len(classes) != model.config.num_classes:
        raise UsageError("checkpoint has no class names for its outputs", checkpoint)
    return model, list(classes), extra


# --------------------------------------------------------------------------- speaker baselines

def warn_thin_baselines(baselines: SpeakerBaselines, quiet: bool) -> None:
    """One warning naming the speakers whose baseline rests on too little speech to be trusted."""
    thin = [s for s in baselines.speakers if baselines.frames(s) < MIN_BASELINE_FRAMES]
    if thin:
        warn(f"speaker baseline from under {MIN_BASELINE_FRAMES // 100} s of speech for {len(thin)} speaker(s) "
             f"({', '.join(thin[:3])}{', ...' if len(thin) > 3 else ''}): give several clips of mixed emotion "
             "per speaker", quiet)


def normalize_clips(clips: Sequence[LabelledClip], features: Sequence[torch.Tensor], quiet: bool
                    ) -> list[torch.Tensor]:
    """Each clip's features less its speaker's mean frame over these clips (train --speaker-norm)."""
    from dsfuse.data.emotion_speech import SpeakerBaselines

    speakers = [c.speaker for c in clips]
    baselines = SpeakerBaselines.of(speakers, features)
    warn_thin_baselines(baselines, quiet)
    return [baselines.normalize(s, f) for s, f in zip(speakers, features)]


def gather_baselines(paths: Sequence[Path], speaker_of_path: Callable[[Path], str], mel: LogMel, quiet: bool
                     ) -> SpeakerBaselines:
    """Each speaker's baseline over all their files given, decoded as a stream (memory stays flat).
    Unreadable files are passed over here; predicting them reports the error."""
    from tqdm import tqdm

    from dsfuse.data.audio import is_silent, stream_audio, trim_silence
    from dsfuse.data.emotion_speech import SpeakerBaselines

    baselines = SpeakerBaselines()
    block_seconds = WHOLE_FILE_WINDOW_FRAMES * mel.cfg.hop_length / mel.cfg.sample_rate
    for path in tqdm(paths, desc="speaker baselines", disable=quiet, leave=False, file=sys.stderr):
        try:
            for block in stream_audio(path, block_seconds, mel.cfg.sample_rate):
                if not is_silent(block):
                    baselines.add(speaker_of_path(path), mel(trim_silence(block, mel.cfg.sample_rate)))
        except InputError:
            continue
    warn_thin_baselines(baselines, quiet)
    return baselines


# --------------------------------------------------------------------------- train

@command
def train(
    data: Annotated[Path, typer.Argument(help="Folder of labelled clips (see --labels).")],
    out: Annotated[Path, typer.Option("--out", help="Run directory for the model, metrics and plots.")],
    labels: Annotated[str, typer.Option("--labels", help="folders (one folder per class), ravdess or crema-d "
                                        "(labels and speakers from the file names).")] = "folders",
    split_by: Annotated[str, typer.Option("--split-by", help="random (clips) or speaker (no speaker on both "
                                          "sides). With --labels folders the speaker is the file name up "
                                          "to its first '_'.")] = "random",
    heldout: Annotated[Path | None, typer.Option("--heldout", help="A separate held-out folder (same labels) "
                                                 "instead of splitting DATA.")] = None,
    heldout_fraction: Annotated[float, typer.Option("--heldout-fraction", help="Share of DATA (clips or speakers) "
                                                    "held out.")] = 0.2,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Clips per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (warmup, then cosine decay).")] = 1e-3,
    dim: Annotated[int, typer.Option("--dim", help="Model width.")] = 96,
    depth: Annotated[int, typer.Option("--depth", help="Transformer blocks.")] = 2,
    ffn: Annotated[str, typer.Option("--ffn", help="Feed-forward of each block: swiglu or moe.")] = "swiglu",
    n_mels: Annotated[int, typer.Option("--n-mels", help="Mel bands (64-80).")] = 64,
    crop_seconds: Annotated[float, typer.Option("--crop-seconds", help="Training crop length; held-out clips "
                                                "are classified whole.")] = 2.0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps (0: at the end).")] = 0,
    speaker_norm: Annotated[bool, typer.Option("--speaker-norm", help="Subtract each speaker's mean log-mel "
                                               "frame from their clips (speakers as --split-by names them): "
                                               "the model hears emotion relative to the voice. predict then "
                                               "needs several clips per speaker (see its --speaker-by).")] = False,
    fusion: Annotated[str, typer.Option("--fusion", help="Fuse the audio with the transcript beside each clip "
                                        "(clip.wav + clip.txt): none, early, mid, late, gated, bottleneck, "
                                        "qformer or hybrid. Clips without one are left out.")] = "none",
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Train a speech-emotion classifier (log-mel, MLA transformer) and report held-out accuracy and F1.

    Example: dsfuse audio-emotion train synthetic/train --heldout synthetic/heldout --out runs/emotion
    Example: dsfuse audio-emotion train synthetic/train --heldout synthetic/heldout --out runs/emotion --speaker-norm
    Example: dsfuse audio-emotion train synthetic/train --heldout synthetic/heldout --out runs/fused --fusion gated
    """
    import torch
    import torch.nn.functional as F

    from dsfuse.data.audio import LogMel, MelConfig
    from dsfuse.data.emotion_speech import LogMelClips, collate_padded
    from dsfuse.device import seed_everything, select_device
    from dsfuse.engine import TrainConfig, fit, prepare_run_dir, read_metrics
    from dsfuse.models.audio import FFN_KINDS, AudioConfig, AudioEmotionClassifier
    from dsfuse.nn.moe import moe_aux_loss
    from dsfuse.plots import plot_confusion, plot_curves

    if not 64 <= n_mels <= 80:
        raise UsageError(f"n-mels must be between 64 and 80, got {n_mels}", "--n-mels")
    if ffn not in FFN_KINDS:
        raise UsageError(f"ffn must be one of {', '.join(FFN_KINDS)}, got {ffn!r}", "--ffn")
    if not crop_seconds > 0.5:
        raise UsageError(f"crop-seconds must be above 0.5, got {crop_seconds}", "--crop-seconds")
    torch_device = select_device(device)
    if fusion != "none":  # audio + transcript, in cli/audio_fusion.py
        from dsfuse.cli.audio_fusion import train_fused

        return train_fused(data, out, fusion=fusion, labels=labels, split_by=split_by, heldout=heldout,
                           heldout_fraction=heldout_fraction, steps=steps, batch_size=batch_size, lr=lr, dim=dim,
                           depth=depth, ffn=ffn, n_mels=n_mels, crop_seconds=crop_seconds, eval_every=eval_every,
                           speaker_norm=speaker_norm, resume=resume, device=torch_device, seed=seed, json=json, quiet=quiet, force=force)
    train_cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(50, steps // 10),
                            eval_every=eval_every, seed=seed, quiet=quiet)
    train_clips, heldout_clips = split_for_training(data, labels, split_by, heldout, heldout_fraction, seed)
    run_dir = prepare_run_dir(out, resume, force)

    mel = LogMel(MelConfig(n_mels=n_mels))
    train_features, train_clips = load_clip_features(train_clips, mel, quiet, "features (train)")
    classes = sorted({c.label for c in train_clips})
    if len(classes) < 2:
        raise UsageError(f"training needs at least 2 classes, found {len(classes)}", data)
    unknown = sorted({c.label for c in heldout_clips} - set(classes))
    if unknown:
        warn(f"held-out clips of classes absent from training are left out: {', '.join(unknown)}", quiet)
    heldout_features, heldout_clips = load_clip_features([c for c in heldout_clips if c.label in classes], mel,
                                                         quiet, "features (held-out)")
    if not heldout_clips:
        raise UsageError("no usable held-out clips", heldout or data)
    if speaker_norm:  # each side against its own speakers' baselines, as predict --speaker-by name does
        train_features = normalize_clips(train_clips, train_features, quiet)
        heldout_features = normalize_clips(heldout_clips, heldout_features, quiet)
    class_index = {c: i for i, c in enumerate(classes)}
    heldout_true = torch.tensor([class_index[c.label] for c in heldout_clips])

    frames = torch.cat(train_features)
    cfg = AudioConfig(n_mels=n_mels, num_classes=len(classes), dim=dim, depth=depth, ffn=ffn,
                      n_heads=max(1, dim // 32), feature_mean=float(frames.mean()), feature_std=float(frames.std()))
    seed_everything(seed)
    model = AudioEmotionClassifier(cfg)
    crop_frames = round(crop_seconds * mel.cfg.sample_rate / mel.cfg.hop_length)
    dataset = LogMelClips(train_features, [class_index[c.label] for c in train_clips], crop_frames, augment=True)

    def loss_fn(net, batch):
        logits = net(batch["features"], batch["mask"])
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=0.05)
        stats = {"train_acc": float((logits.argmax(-1) == batch["labels"]).float().mean())}
        if ffn == "moe":  # keep the experts evenly loaded
            aux = moe_aux_loss(net)
            loss, stats["moe_aux"] = loss + aux, float(aux)
        return loss, stats

    report: dict[str, Any] = {}

    def evaluate(net, step):
        report.update(evaluate_predictions(heldout_true, classify(net, heldout_features, torch_device), classes))
        plot_confusion(report["confusion"], classes, run_dir / "confusion.png",
                       title=f"held-out confusion, step {step} (accuracy {report['accuracy']:.1%})")
        return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}

    result = fit(model, dataset, loss_fn, train_cfg, run_dir, kind="audio", config=cfg, device=torch_device,
                 resume=resume, evaluate=evaluate, collate_fn=collate_padded,
                 extra_meta={"classes": classes, "labels": labels, "speaker_norm": speaker_norm})
    plot_curves(read_metrics(run_dir), ["loss", "train_acc", "accuracy", "macro_f1"], run_dir / "curves.png",
                title="audio-emotion", log_keys=("loss",))
    summary = {"classes": classes, "train_clips": len(train_clips), "heldout_clips": len(heldout_clips),
               "split": "heldout folder" if heldout else split_by, "speaker_norm": speaker_norm, **report}
    if not json and report:
        print_table(f"audio-emotion held-out F1 ({len(heldout_clips)} clips)", ["class", "F1", "clips"],
                    [(c, report["f1"][c], int((heldout_true == i).sum())) for i, c in enumerate(classes)])
        summary = {k: v for k, v in summary.items() if k not in ("f1", "confusion", "classes")}
    report_training(result, summary, json)


# --------------------------------------------------------------------------- predict

def unchanged(features: torch.Tensor) -> torch.Tensor:
    """The features as they are: no speaker baseline to subtract."""
    return features


def predict_file(path: Path, model: AudioEmotionClassifier, classes: list[str], mel: LogMel,
                 device: torch.device, normalize: Normalize = unchanged) -> dict[str, Any]:
    """One label for a whole file: decoded, trimmed of silence, (speaker-normalised,) classified."""
    import torch

    from dsfuse.data.audio import is_silent, load_audio, trim_silence

    wave = load_audio(path, mel.cfg.sample_rate)
    if is_silent(wave):
        raise InputError("audio is silent: nothing to classify", path)
    features = normalize(mel(trim_silence(wave, mel.cfg.sample_rate)))
    # Long files: classify 30 s windows and average by length, so attention never spans a whole hour.
    windows = list(features.split(WHOLE_FILE_WINDOW_FRAMES))
    weights = torch.tensor([len(w) for w in windows], dtype=torch.float32)
    probs = (classify(model, windows, device) * weights[:, None]).sum(0) / weights.sum()
    best = int(probs.argmax())
    return {"label": classes[best], "score": round(float(probs[best]), 4),
            "probabilities": {c: round(float(p), 4) for c, p in zip(classes, probs)},
            "duration": round(wave.numel() / mel.cfg.sample_rate, 3)}


def predict_timeline(path: Path, segment: float, model: AudioEmotionClassifier, classes: list[str], mel: LogMel,
                     device: torch.device, normalize: Normalize = unchanged):
    """Yield one record per `segment` seconds, decoding the file block by block (memory stays flat)."""
    from dsfuse.data.audio import is_silent, stream_audio

    start = 0.0
    for block in stream_audio(path, segment, mel.cfg.sample_rate):
        end = start + block.numel() / mel.cfg.sample_rate
        record: dict[str, Any] = {"start": round(start, 3), "end": round(end, 3)}
        if is_silent(block):
            record.update(label=None, score=None, silent=True)
        else:
            probs = classify(model, [normalize(mel(block))], device)[0]
            best = int(probs.argmax())
            record.update(label=classes[best], score=round(float(probs[best]), 4))
        yield record
        start = end


def speaker_normalizer(paths: Sequence[Path], meta: dict[str, Any], speaker_by: str | None, mel: LogMel,
                       quiet: bool) -> Callable[[Path], Normalize]:
    """path -> what to do to its features: subtract its speaker's baseline if the model was trained so."""
    from functools import partial

    from dsfuse.data.emotion_speech import speaker_of

    if not meta.get("speaker_norm"):
        if speaker_by is not None:
            warn("--speaker-by is ignored: the checkpoint was trained without --speaker-norm", quiet)
        return lambda path: unchanged
    group = speaker_by or "name"
    scheme = meta.get("labels", "folders")
    key = {"name": lambda path: speaker_of(path, scheme), "file": str, "all": lambda path: ""}[group]
    baselines = gather_baselines(paths, key, mel, quiet)
    return lambda path: partial(baselines.normalize, key(path)) if baselines.frames(key(path)) else unchanged


@command
def predict(
    files: Annotated[list[str], typer.Argument(help="Audio files, folders or globs (wav, flac, ogg, mp3, m4a, "
                                               "...); - reads paths from stdin.")],
    checkpoint: CheckpointOpt,
    segment: Annotated[float | None, typer.Option("--segment", help="Seconds per segment: a timeline of labels "
                                                  "over long audio, decoded as a stream.")] = None,
    speaker_by: Annotated[str | None, typer.Option("--speaker-by", help="For a checkpoint trained with "
                                                   "--speaker-norm, whose files share a speaker baseline: name "
                                                   "(the training data's file-name convention), file (one long "
                                                   "recording each) or all (one speaker).")] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Label the emotion of each file (with probabilities), or with --segment a timeline over long audio.

    A checkpoint trained with --fusion also reads each file's transcript (clip.wav + clip.txt).

    Example: dsfuse audio-emotion predict talk.mp3 --checkpoint runs/emotion --segment 2.0 --json
    Example: dsfuse audio-emotion predict synthetic/heldout --checkpoint runs/emotion --speaker-by name
    """
    from dsfuse.cli.audio_fusion import is_fused_checkpoint, predict_fused
    from dsfuse.data.audio import AUDIO_SUFFIXES, LogMel, MelConfig
    from dsfuse.device import seed_everything, select_device

    if segment is not None and not MIN_SEGMENT_SECONDS <= segment <= MAX_SEGMENT_SECONDS:
        raise UsageError(f"segment must be between {MIN_SEGMENT_SECONDS} and {MAX_SEGMENT_SECONDS} seconds, "
                         f"got {segment}", "--segment")
    if speaker_by is not None and speaker_by not in SPEAKER_GROUPS:
        raise UsageError(f"speaker-by must be one of {', '.join(SPEAKER_GROUPS)}, got {speaker_by!r}", "--speaker-by")
    torch_device = select_device(device)
    seed_everything(seed)
    if is_fused_checkpoint(checkpoint):  # trained with --fusion: audio + transcript
        return predict_fused(expand_inputs(files, AUDIO_SUFFIXES), checkpoint, segment=segment,
                             speaker_by=speaker_by, device=torch_device, json=json, quiet=quiet)
    model, classes, meta = load_classifier(checkpoint, torch_device)
    mel = LogMel(MelConfig(n_mels=model.config.n_mels))
    paths = expand_inputs(files, AUDIO_SUFFIXES)
    normalizer = speaker_normalizer(paths, meta, speaker_by, mel, quiet)

    if segment is None:
        return tabulate_each_input(
            paths, lambda p: predict_file(p, model, classes, mel, torch_device, normalizer(p)),
            lambda p, r: [(p, r["label"], r["score"], r["duration"])],
            lambda rows: print_table("audio-emotion", ["file", "label", "score", "seconds"], rows),
            as_json=json, quiet=quiet)

    def stream_file(path: Path) -> dict[str, Any]:
        segments = 0
        for record in predict_timeline(path, segment, model, classes, mel, torch_device, normalizer(path)):
            segments += 1
            if json:  # each segment as soon as it is known: the timeline streams like the audio
                emit_json({"file": str(path), **record})
            else:
                label = record["label"] or "(silence)"
                score = "" if record["score"] is None else f" {record['score']:.2f}"
                console.print(f"{path}  {record['start']:8.2f}-{record['end']:8.2f}  {label}{score}", markup=False)
        return {"segments": segments}

    for _ in for_each_input(paths, stream_file, as_json=False, quiet=True):
        pass


# --------------------------------------------------------------------------- synthetic set

@command
def synthetic(
    out: Annotated[Path, typer.Argument(help="Folder to write the synthetic set into.")],
    voices: Annotated[int, typer.Option("--voices", help="How many espeak-ng voices (1-20).")] = 20,
    sentences: Annotated[int, typer.Option("--sentences", help="How many sentences (1-20).")] = 16,
    heldout_voices: Annotated[int, typer.Option("--heldout-voices", help="Voices kept for OUT/heldout only "
                                                "(0: no split).")] = 4,
    heldout_sentences: Annotated[int, typer.Option("--heldout-sentences", help="Sentences kept for OUT/heldout "
                                                   "only (0: no split).")] = 4,
    emotions: Annotated[str, typer.Option("--emotions", help="Comma-separated classes.")] = "neutral,happy,sad,angry",
    transcripts: Annotated[bool, typer.Option("--transcripts", help="Also write each clip's sentence beside it "
                                              "(clip.txt), for train --fusion.")] = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Write a synthetic emotional-speech set (espeak-ng, one prosody per emotion) with held-out voices/sentences.

    Example: dsfuse audio-emotion synthetic synthetic --voices 20 --sentences 16
    """
    from tqdm import tqdm

    from dsfuse.data.synthetic_speech import synthetic_split, write_synthetic_set
    from dsfuse.device import select_device

    select_device(device)  # synthesis runs on the CPU; an unavailable device is still an error
    plan = synthetic_split(voices, sentences, heldout_voices, heldout_sentences)
    classes = [e.strip() for e in emotions.split(",") if e.strip()]
    if len(classes) < 2:
        raise UsageError("give at least 2 emotions", "--emotions")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UsageError("output folder is not empty; pass --force to replace it", out)
        shutil.rmtree(out)
    total = len(classes) * sum(len(v) * len(s) for v, s in plan.values())
    bar = tqdm(total=total, desc="synthetic speech", disable=quiet, leave=False, file=sys.stderr)
    splits = {}
    with bar:
        for name, (split_voices, split_sentences) in plan.items():
            paths = write_synthetic_set(out / name, split_voices, split_sentences, classes, seed,
                                        on_clip=lambda _: bar.update(1), transcripts=transcripts)
            splits[name or "all"] = {"folder": str(out / name), "clips": len(paths), "voices": split_voices,
                                     "sentences": split_sentences}
    summary = {"out": str(out), "clips": total, "classes": classes, "splits": splits}
    if json:
        emit_json(summary)
    else:
        print_table(f"synthetic emotional speech -> {out}", ["split", "clips", "voices", "sentences"],
                    [(n, s["clips"], " ".join(s["voices"]), len(s["sentences"])) for n, s in splits.items()])


# --------------------------------------------------------------------------- wiring

app.command("train")(train)
app.command("predict")(predict)
app.command("synthetic")(synthetic)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="audio-emotion")


def demo_steps(samples: Path, out: Path) -> list:
    from dsfuse.cli.demo import DemoStep

    data, run = out / "audio-emotion" / "synthetic", out / "audio-emotion" / "run"
    return [
        DemoStep("audio-emotion synthetic", ["audio-emotion", "synthetic", str(data), "--voices", "4",
                                             "--sentences", "4", "--heldout-voices", "1", "--heldout-sentences", "1"],
                 lambda r: f"{r[0]['clips']} clips", [data]),
        DemoStep("audio-emotion train", ["audio-emotion", "train", str(data / "train"), "--heldout",
                                         str(data / "heldout"), "--out", str(run), "--steps", "40", "--dim", "64",
                                         "--depth", "1", "--batch-size", "16"],
                 lambda r: f"held-out accuracy {r[0]['accuracy']:.0%} after {r[0]['step']} steps", [run]),
        DemoStep("audio-emotion predict", ["audio-emotion", "predict", str(samples / "speech"), "--checkpoint",
                                           str(run)],
                 lambda r: f"{sum(x['file'].split('/')[-1].startswith(x['label']) for x in r)}/{len(r)} "
                           "bundled clips labelled right", []),
    ]
