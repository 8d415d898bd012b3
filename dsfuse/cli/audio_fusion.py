"""`audio-emotion train --fusion` and predicting with a fused checkpoint: each clip's audio fused with
the transcript beside it (`clip.wav` + `clip.txt`) by an `nn.fusion` strategy.

audio-emotion's own module calls in here, so its code stays about audio alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsfuse import choices
from dsfuse.cli.common import print_table, report_training, tabulate_each_input, warn
from dsfuse.errors import InputError, UsageError

if TYPE_CHECKING:
    import torch

    from dsfuse.data.emotion_speech import LabelledClip
    from dsfuse.models.audio_text import AudioTextClassifier

FUSED_KIND = "audio-text"


def is_fused_checkpoint(checkpoint: Path) -> bool:
    from dsfuse.checkpoint import read_metadata

    return read_metadata(checkpoint)["kind"] == FUSED_KIND


def with_transcripts(clips: Sequence[LabelledClip], max_bytes: int
                     ) -> tuple[list[LabelledClip], list[torch.Tensor], list[InputError]]:
    """The clips whose transcript is readable with its byte ids, and why each other clip is left out."""
    from dsfuse.data.transcripts import read_transcript
    from dsfuse.models.audio_text import encode_text

    kept, ids, missing = [], [], []
    for clip in clips:
        try:
            ids.append(encode_text(read_transcript(clip.path), max_bytes))
        except InputError as e:
            missing.append(e)
            continue
        kept.append(clip)
    return kept, ids, missing


def classify_fused(model: AudioTextClassifier, features: Sequence[torch.Tensor], text_ids: Sequence[torch.Tensor],
                   device: torch.device, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class probabilities [N, classes] and, for gated fusion, the gate weights [N, 2] (audio, text)."""
    import torch

    from dsfuse.data.transcripts import collate_transcribed

    order = sorted(range(len(features)), key=lambda i: len(features[i]))  # little padding per batch
    probs = torch.empty(len(features), model.config.num_classes)
    gates = torch.empty(len(features), 2) if model.config.fusion == "gated" else None
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = collate_transcribed([(features[i], torch.tensor(0), text_ids[i]) for i in index])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(batch["features"], batch["mask"], batch["text"], batch["text_mask"])
            probs[index] = logits.float().softmax(-1).cpu()
            if gates is not None:
                gates[index] = model.fusion.gate_weights().float().cpu()
    return probs, gates


def train_fused(data: Path, out: Path, *, fusion: str, labels: str, split_by: str, heldout: Path | None,
                heldout_fraction: float, steps: int, batch_size: int, lr: float, dim: int, depth: int, ffn: str,
                n_mels: int, crop_seconds: float, eval_every: int, speaker_norm: bool, resume: bool, device: torch.device, seed: int,
                json: bool, quiet: bool, force: bool) -> None:
    """Train an audio-text model on the clips that have a transcript beside them; report held-out scores."""
    import torch
    import torch.nn.functional as F

    from dsfuse.checkpoint import MODEL_FILE, read_metadata
    from dsfuse.cli.audio_emotion import (evaluate_predictions, load_clip_features, normalize_clips,
                                          split_for_training)
    from dsfuse.data.audio import LogMel, MelConfig
    from dsfuse.data.emotion_speech import LogMelClips
    from dsfuse.data.transcripts import TranscribedClips, collate_transcribed
    from dsfuse.device import seed_everything
    from dsfuse.engine import TrainConfig, fit, prepare_run_dir, read_metrics
    from dsfuse.models.audio import AudioConfig
    from dsfuse.models.audio_text import AudioTextClassifier, AudioTextConfig, TextConfig
    from dsfuse.nn.moe import moe_aux_loss
    from dsfuse.plots import plot_confusion, plot_curves

    if fusion not in choices.values(choices.Fusion):  # until audio-emotion takes choices.Fusion
        raise UsageError(f"unknown fusion {fusion!r}", "--fusion")
    if dim % 4:
        raise UsageError(f"dim must be a multiple of 4 under --fusion, got {dim}", "--dim")
    text_cfg = TextConfig(dim=dim)
    train_clips, heldout_clips = split_for_training(data, labels, split_by, heldout, heldout_fraction, seed)
    train_clips, train_text, train_missing = with_transcripts(train_clips, text_cfg.max_bytes)
    heldout_clips, heldout_text, heldout_missing = with_transcripts(heldout_clips, text_cfg.max_bytes)
    if not train_clips:  # one line, not a warning per clip: the set has no transcripts at all
        raise UsageError("no training clip has a transcript (.txt of the same name) beside it to fuse", data)
    for reason in train_missing + heldout_missing:
        warn(f"left out of fused training: {reason}", quiet)
    run_dir = prepare_run_dir(out, resume, force)

    mel = LogMel(MelConfig(n_mels=n_mels))
    text_of = dict(zip([c.path for c in train_clips + heldout_clips], train_text + heldout_text))
    train_features, train_clips = load_clip_features(train_clips, mel, quiet, "features (train)")
    classes = sorted({c.label for c in train_clips})
    if len(classes) < 2:
        raise UsageError(f"training needs at least 2 classes with transcripts, found {len(classes)}", data)
    heldout_features, heldout_clips = load_clip_features([c for c in heldout_clips if c.label in classes], mel,
                                                         quiet, "features (held-out)")
    if not heldout_clips:
        raise UsageError("no usable held-out clips with transcripts", heldout or data)
    if speaker_norm:  # as audio-emotion train does
        train_features = normalize_clips(train_clips, train_features, quiet)
        heldout_features = normalize_clips(heldout_clips, heldout_features, quiet)
    class_index = {c: i for i, c in enumerate(classes)}
    heldout_true = torch.tensor([class_index[c.label] for c in heldout_clips])

    if resume and (run_dir / MODEL_FILE).exists():
        config = AudioTextConfig(**read_metadata(run_dir / MODEL_FILE)["config"])
    else:
        frames = torch.cat(train_features)
        # the audio encoder audio-emotion train builds without --fusion, so the two compare like for like
        audio_cfg = AudioConfig(n_mels=n_mels, num_classes=len(classes), dim=dim, depth=depth, ffn=ffn,
                                n_heads=max(1, dim // 32), feature_mean=float(frames.mean()),
                                feature_std=float(frames.std()))
        config = AudioTextConfig(audio=audio_cfg, text=text_cfg, fusion=fusion, num_classes=len(classes),
                                 fusion_dim=dim)
    seed_everything(seed)
    model = AudioTextClassifier(config)
    crop_frames = round(crop_seconds * mel.cfg.sample_rate / mel.cfg.hop_length)
    clips = LogMelClips(train_features, [class_index[c.label] for c in train_clips], crop_frames, augment=True)
    dataset = TranscribedClips(clips, [text_of[c.path] for c in train_clips])

    def loss_fn(net, batch):
        logits = net(batch["features"], batch["mask"], batch["text"], batch["text_mask"])
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=0.05)
        stats = {"train_acc": float((logits.argmax(-1) == batch["labels"]).float().mean())}
        if ffn == "moe":  # keep the experts evenly loaded
            aux = moe_aux_loss(net)
            loss, stats["moe_aux"] = loss + aux, float(aux)
        return loss, stats

    report: dict[str, Any] = {}
    heldout_ids = [text_of[c.path] for c in heldout_clips]

    def evaluate(net, step):
        probs, gates = classify_fused(net, heldout_features, heldout_ids, device)
        report.update(evaluate_predictions(heldout_true, probs, classes))
        if gates is not None:  # how much the model listens to each modality, on average
            report["gate_audio"], report["gate_text"] = (round(float(g), 4) for g in gates.mean(0))
        plot_confusion(report["confusion"], classes, run_dir / "confusion.png",
                       title=f"held-out confusion, {fusion} fusion, step {step} (accuracy {report['accuracy']:.1%})")
        return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}

    result = fit(model, dataset, loss_fn, TrainConfig(steps=steps, batch_size=batch_size, lr=lr,
                                                      warmup_steps=min(50, steps // 10), eval_every=eval_every,
                                                      seed=seed, quiet=quiet),
                 run_dir, kind=FUSED_KIND, config=config, device=device, resume=resume, evaluate=evaluate,
                 collate_fn=collate_transcribed,
                 extra_meta={"classes": classes, "labels": labels, "speaker_norm": speaker_norm})
    plot_curves(read_metrics(run_dir), ["loss", "train_acc", "accuracy", "macro_f1"], run_dir / "curves.png",
                title=f"audio-emotion + transcript, {fusion} fusion", log_keys=("loss",))
    summary = {"fusion": fusion, "classes": classes, "train_clips": len(train_clips),
               "heldout_clips": len(heldout_clips), "split": "heldout folder" if heldout else split_by,
               "speaker_norm": speaker_norm, **report}
    if not json and report:
        print_table(f"audio-emotion + transcript ({fusion}) held-out F1 ({len(heldout_clips)} clips)",
                    ["class", "F1", "clips"],
                    [(c, report["f1"][c], int((heldout_true == i).sum())) for i, c in enumerate(classes)])
        summary = {k: v for k, v in summary.items() if k not in ("f1", "confusion", "classes")}
    report_training(result, summary, json)


def predict_fused(paths: list[Path], checkpoint: Path, *, segment: float | None, speaker_by: str | None,
                  device: torch.device, json: bool, quiet: bool) -> None:
    """Label each file from its audio and the transcript beside it; a missing transcript fails that file."""
    import torch

    from dsfuse.checkpoint import load_checkpoint
    from dsfuse.cli.audio_emotion import WHOLE_FILE_WINDOW_FRAMES, speaker_normalizer
    from dsfuse.data.audio import LogMel, MelConfig, is_silent, load_audio, trim_silence
    from dsfuse.data.transcripts import read_transcript
    from dsfuse.models.audio_text import encode_text

    if segment is not None:
        raise UsageError("--segment needs an audio-only checkpoint: a transcript covers the whole file",
                         "--segment")
    model, meta = load_checkpoint(checkpoint, kind=FUSED_KIND, device=device)
    cfg, extra = model.config, meta.get("extra") or {}
    classes = extra.get("classes")
    if not classes or len(classes) != cfg.num_classes:
        raise UsageError("checkpoint has no class names for its outputs", checkpoint)
    mel = LogMel(MelConfig(n_mels=cfg.audio.n_mels))
    normalizer = speaker_normalizer(paths, extra, speaker_by, mel, quiet)

    def classify_file(path: Path) -> dict[str, Any]:
        text = encode_text(read_transcript(path), cfg.text.max_bytes)  # first: no transcript, no decoding
        wave = load_audio(path, mel.cfg.sample_rate)
        if is_silent(wave):
            raise InputError("audio is silent: nothing to classify", path)
        features = normalizer(path)(mel(trim_silence(wave, mel.cfg.sample_rate)))
        # Long files: 30 s windows, each with the whole transcript, averaged by length.
        windows = list(features.split(WHOLE_FILE_WINDOW_FRAMES))
        weights = torch.tensor([len(w) for w in windows], dtype=torch.float32)
        window_probs, gates = classify_fused(model, windows, [text] * len(windows), device)
        probs = (window_probs * weights[:, None]).sum(0) / weights.sum()
        best = int(probs.argmax())
        record = {"label": classes[best], "score": round(float(probs[best]), 4),
                  "probabilities": {c: round(float(p), 4) for c, p in zip(classes, probs)},
                  "duration": round(wave.numel() / mel.cfg.sample_rate, 3), "fusion": cfg.fusion}
        if gates is not None:
            record["gate_text"] = round(float(gates[:, 1].mean()), 4)
        return record

    tabulate_each_input(paths, classify_file, lambda p, r: [(p, r["label"], r["score"], r["duration"])],
                        lambda rows: print_table(f"audio-emotion ({cfg.fusion} fusion with the transcript)",
                                                 ["file", "label", "score", "seconds"], rows),
                        as_json=json, quiet=quiet)


def register(app) -> None:
    """No command of its own: --fusion lives on audio-emotion train (see its module)."""


def demo_steps(samples: Path, out: Path) -> list:
    from dsfuse.cli.demo import DemoStep

    data, run = out / "audio-text" / "synthetic", out / "audio-text" / "run"

    def trained(records: list[dict]) -> str:
        r = records[0]
        return (f"{r['fusion']} fusion, {r['step']} steps: held-out accuracy {r['accuracy']:.0%}, "
                f"text gate {r['gate_text']:.2f} (tiny run)")

    return [
        DemoStep("audio-emotion synthetic --transcripts", ["audio-emotion", "synthetic", str(data), "--voices", "3",
                                                          "--sentences", "3", "--heldout-voices", "1",
                                                          "--heldout-sentences", "1", "--transcripts"],
                 lambda r: f"{r[0]['clips']} clips with transcripts", [data]),
        DemoStep("audio-emotion train --fusion", ["audio-emotion", "train", str(data / "train"), "--heldout",
                                                  str(data / "heldout"), "--out", str(run), "--fusion", "gated",
                                                  "--steps", "20", "--dim", "64", "--depth", "1",
                                                  "--batch-size", "8"], trained, [run]),
        DemoStep("audio-emotion predict (fused)", ["audio-emotion", "predict", str(data / "heldout"),
                                                   "--checkpoint", str(run)],
                 lambda r: f"{sum(Path(x['file']).parent.name == x['label'] for x in r)}/{len(r)} "
                           "held-out clips labelled right", []),
    ]
