"""Speech emotion: train a classifier on labelled clips, with the transcript beside each clip fused in or
not (one model kind, "audio": fusion "none" is audio alone), evaluate it on held-out clips, label whole
files or stream a timeline over long audio, and write a synthetic emotional-speech set to train on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from dsfuse import runs
from dsfuse.checkpoint import CheckpointMeta, build_model, load_checkpoint, read_metadata
from dsfuse.choices import FeedForward, Fusion, LabelScheme, SpeakerBy, SpeechEncoder, SplitBy
from dsfuse.data.audio import SAMPLE_RATE, LogMel, MelConfig, is_silent, load_audio, stream_audio, trim_silence
from dsfuse.data.emotion_speech import (LabelledClip, LogMelClips, SpeakerBaselines, collate_padded,
                                        check_speakers_are_not_labels, find_labelled_clips, speaker_of,
                                        speaker_pattern, split_clips)
from dsfuse.data.synthetic_speech import synthetic_split, write_synthetic_set
from dsfuse.data.transcripts import TranscribedClips, collate_transcribed, read_transcript
from dsfuse.device import seed_everything
from dsfuse.engine import TrainConfig, TrainResult, fit, read_metrics, unwrap
from dsfuse.io import claim_output_folder
from dsfuse.errors import InputError, UsageError
from dsfuse.metrics import accuracy, confusion_matrix, per_class_f1, retrieval_recall
from dsfuse.models.audio import AudioEmotionClassifier, AudioEmotionConfig
from dsfuse.models.text import TextConfig, encode_text, pad_text
from dsfuse.nn.fusion import alignment_embeddings, check_contrastive, contrastive_loss
from dsfuse.nn.moe import moe_aux_loss
from dsfuse.plots import plot_bars, plot_confusion, plot_curves
from dsfuse.report import warn
from dsfuse.tasks.speech_features import Encoder, FeatureCache, Featurize, open_encoder

TASK = "speech-emotion"  # default run directories: runs/speech-emotion/train, train2, ...
KIND = "audio"
LEGACY_FUSED_KIND = "audio-text"  # fused models before fusion became an option of KIND
WINDOW_SECONDS = 30.0  # a whole file is classified window by window: attention never spans an hour
MIN_SPEECH_SECONDS = 0.3  # under this, no prosody to hear: the label is a guess
MIN_BASELINE_FRAMES = 600  # 6 s: one clip (2-4 s) makes a poor speaker baseline, four of mixed emotion a good one

Normalize = Callable[[torch.Tensor], torch.Tensor]  # features -> speaker-normalised features


@dataclass(kw_only=True)
class SpeechEmotionOptions(runs.TrainOptions):
    """What `audio-emotion train` takes; the checkpoint records it and `--resume` adopts it."""

    data: Path
    labels: LabelScheme = "folders"
    split_by: SplitBy = "random"
    heldout: Path | None = None
    heldout_fraction: float = 0.2
    dim: int = 96
    depth: int = 2
    ffn: FeedForward = "swiglu"
    n_mels: int = 64
    crop_seconds: float = 2.0
    speaker_norm: bool = False
    speaker_pattern: str | None = None
    fusion: Fusion = "none"
    encoder: SpeechEncoder = "mel"
    unfreeze: int = 0
    contrastive: float = 0.0  # weight of the CLIP-style audio-transcript alignment loss (needs a fusion)

    @property
    def fused(self) -> bool:
        return self.fusion != "none"


# --------------------------------------------------------------------------- data

@dataclass
class Examples:
    """Clips with their features (log-mels or an encoder's hidden states) and, under fusion, their transcripts'
    byte ids."""

    clips: list[LabelledClip]
    features: list[torch.Tensor]
    text: list[torch.Tensor] | None = None

    def targets(self, classes: Sequence[str]) -> torch.Tensor:
        index = {c: i for i, c in enumerate(classes)}
        return torch.tensor([index[clip.label] for clip in self.clips])


@dataclass
class TrainingData:
    classes: list[str]
    train: Examples
    heldout: Examples


def load_training_data(options: SpeechEmotionOptions, quiet: bool, featurize: Featurize | None = None,
                       cache: FeatureCache | None = None) -> TrainingData:
    """The training and held-out examples as `featurize` (default: the options' log-mels) hears them, from
    `cache` when it has them; data that cannot train a classifier is refused in one line."""
    featurize = featurize or LogMel(MelConfig(n_mels=options.n_mels))
    pattern = speaker_pattern(options.speaker_pattern)
    clips = find_labelled_clips(options.data, options.labels, pattern)
    if options.speaker_norm or options.split_by == "speaker":
        check_speakers_are_not_labels(clips)
    if options.heldout is not None:
        train_clips, heldout_clips = clips, find_labelled_clips(options.heldout, options.labels, pattern)
    else:
        train_clips, heldout_clips = split_clips(clips, options.split_by, options.heldout_fraction, options.seed)
    text_of = transcripts_of(train_clips, heldout_clips, options, quiet) if options.fused else None
    with_transcripts = " with transcripts" if options.fused else ""
    train = load_examples(train_clips, featurize, text_of, quiet, "features (train)", cache)
    classes = sorted({clip.label for clip in train.clips})
    if len(classes) < 2:
        raise UsageError(f"training needs at least 2 classes{with_transcripts}, found {len(classes)}", options.data)
    unknown = sorted({clip.label for clip in heldout_clips} - set(classes))
    if unknown:
        warn(f"held-out clips of classes absent from training are left out: {', '.join(unknown)}", quiet)
    heldout = load_examples([c for c in heldout_clips if c.label in classes], featurize, text_of, quiet,
                            "features (held-out)", cache)
    if not heldout.clips:
        raise UsageError(f"no usable held-out clips{with_transcripts}", options.heldout or options.data)
    if options.speaker_norm:  # each side against its own speakers' baselines, as predict --speaker-by name does
        train, heldout = speaker_normalized(train, quiet), speaker_normalized(heldout, quiet)
    return TrainingData(classes, train, heldout)


def transcripts_of(train: Sequence[LabelledClip], heldout: Sequence[LabelledClip], options: SpeechEmotionOptions,
                   quiet: bool) -> dict[Path, torch.Tensor]:
    """Each clip's transcript as byte ids; a clip without one is left out with a warning, and a training
    set without any is refused."""
    ids, missing = {}, []
    max_bytes = text_config(options).max_bytes
    for clip in [*train, *heldout]:
        try:
            ids[clip.path] = encode_text(read_transcript(clip.path), max_bytes)
        except InputError as e:
            missing.append(e)
    if not any(clip.path in ids for clip in train):  # one line, not a warning per clip
        raise UsageError("no training clip has a transcript (.txt of the same name) beside it to fuse", options.data)
    for reason in missing:
        warn(f"left out of fused training: {reason}", quiet)
    return ids


def load_examples(clips: Sequence[LabelledClip], featurize: Featurize, text_of: dict[Path, torch.Tensor] | None,
                  quiet: bool, desc: str, cache: FeatureCache | None = None) -> Examples:
    """The readable, non-silent clips (with a transcript, when `text_of` is given) and their features,
    read from `cache` or computed (and kept there); an unusable clip is skipped with a warning."""
    if text_of is not None:
        clips = [clip for clip in clips if clip.path in text_of]
    features, kept = [], []
    for clip in tqdm(clips, desc=desc, disable=quiet, leave=False, file=sys.stderr):
        cached = cache.load(clip.path) if cache is not None else None
        if cached is None:
            try:
                wave = load_audio(clip.path, SAMPLE_RATE)
            except InputError as e:
                warn(f"skipped: {e}")
                continue
            if is_silent(wave):
                warn(f"skipped: silent clip ({clip.path})")
                continue
            cached = featurize(trim_silence(wave, SAMPLE_RATE))
            if cache is not None:
                cached = cache.save(clip.path, cached)
        features.append(cached)
        kept.append(clip)
    return Examples(kept, features, None if text_of is None else [text_of[clip.path] for clip in kept])


# --------------------------------------------------------------------------- speaker baselines

def warn_thin_baselines(baselines: SpeakerBaselines, quiet: bool) -> None:
    """One warning naming the speakers whose baseline rests on too little speech to be trusted."""
    thin = [s for s in baselines.speakers if baselines.frames(s) < MIN_BASELINE_FRAMES]
    if thin:
        warn(f"speaker baseline from under {MIN_BASELINE_FRAMES // 100} s of speech for {len(thin)} speaker(s) "
             f"({', '.join(thin[:3])}{', ...' if len(thin) > 3 else ''}): give several clips of mixed emotion "
             "per speaker", quiet)


def speaker_normalized(examples: Examples, quiet: bool) -> Examples:
    """Each clip's features less its speaker's mean frame over these clips (train --speaker-norm)."""
    speakers = [clip.speaker for clip in examples.clips]
    baselines = SpeakerBaselines.of(speakers, examples.features)
    warn_thin_baselines(baselines, quiet)
    return replace(examples, features=[baselines.normalize(s, f) for s, f in zip(speakers, examples.features)])


def gather_baselines(paths: Sequence[Path], speaker_of_path: Callable[[Path], str], featurize: Featurize,
                     quiet: bool) -> SpeakerBaselines:
    """Each speaker's baseline over all their files given, decoded as a stream (memory stays flat).
    Unreadable files are passed over here; predicting them reports the error."""
    baselines = SpeakerBaselines()
    for path in tqdm(paths, desc="speaker baselines", disable=quiet, leave=False, file=sys.stderr):
        try:
            for block in stream_audio(path, WINDOW_SECONDS, SAMPLE_RATE):
                if not is_silent(block):
                    baselines.add(speaker_of_path(path), featurize(trim_silence(block, SAMPLE_RATE)))
        except InputError:
            continue
    warn_thin_baselines(baselines, quiet)
    return baselines


def unchanged(features: torch.Tensor) -> torch.Tensor:
    """The features as they are: no speaker baseline to subtract."""
    return features


def speaker_normalizer(paths: Sequence[Path], options: dict[str, Any], speaker_by: SpeakerBy | None,
                       featurize: Featurize, quiet: bool) -> Callable[[Path], Normalize]:
    """path -> what to do to its features: subtract its speaker's baseline if the model was trained so
    (`options`: the trainer's, as the checkpoint recorded them)."""
    if not options.get("speaker_norm"):
        if speaker_by is not None:
            warn("--speaker-by is ignored: the checkpoint was trained without --speaker-norm", quiet)
        return lambda path: unchanged
    scheme, pattern = options.get("labels", "folders"), speaker_pattern(options.get("speaker_pattern"))
    key = {"name": lambda path: speaker_of(path, scheme, pattern), "file": str,
           "all": lambda path: ""}[speaker_by or "name"]
    baselines = gather_baselines(paths, key, featurize, quiet)
    return lambda path: partial(baselines.normalize, key(path)) if baselines.frames(key(path)) else unchanged


# --------------------------------------------------------------------------- the model, classification, evaluation

def text_config(options: SpeechEmotionOptions) -> TextConfig:
    """The transcript's encoder, as wide as the audio's."""
    return TextConfig(dim=options.dim)


def model_config(options: SpeechEmotionOptions, data: TrainingData, encoder: Encoder) -> AudioEmotionConfig:
    """A new model for `options`; under fusion the audio encoder is the one built without, so the two
    compare like for like. Log-mels are normalised by the training set's statistics; an encoder's hidden
    states by a layer norm of the model's own."""
    statistics = {}
    if not encoder.pretrained:
        frames = torch.cat(data.train.features)
        statistics = {"feature_mean": float(frames.mean()), "feature_std": float(frames.std())}
    return AudioEmotionConfig(n_mels=options.n_mels, num_classes=len(data.classes), dim=options.dim,
                              depth=options.depth, ffn=options.ffn, n_heads=max(1, options.dim // 32),
                              fusion=options.fusion, text=text_config(options) if options.fused else None,
                              fusion_dim=options.dim, encoder=encoder.name, ssl=encoder.params,
                              unfreeze=options.unfreeze, contrastive=options.contrastive, **statistics)


class Scores(NamedTuple):
    probs: torch.Tensor  # [N, classes]
    gates: torch.Tensor | None  # [N, 2] (audio, text) weights under gated fusion, else None
    aligned: torch.Tensor | None = None  # [N, 2, D] (audio, text) embeddings under --contrastive, else None


def classify(model: AudioEmotionClassifier, features: Sequence[torch.Tensor], device: torch.device,
             text: Sequence[torch.Tensor] | None = None, batch_size: int = 16) -> Scores:
    """Class probabilities for variable-length log-mel clips (and, for a fused model, their transcripts'
    byte ids), batched by similar length."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]))  # little padding per batch
    probs = torch.empty(len(features), model.config.num_classes)
    gates = torch.empty(len(features), 2) if model.config.fusion == "gated" else None
    aligned: list[torch.Tensor | None] = [None] * len(features)  # each clip's (audio, text) embeddings
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = collate_padded([(features[i], torch.tensor(0)) for i in index])
            if text is not None:
                batch["text"], batch["text_mask"] = pad_text([text[i] for i in index])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(batch["features"], batch["mask"], batch.get("text"), batch.get("text_mask"))
            probs[index] = logits.float().softmax(-1).cpu()
            if gates is not None:
                gates[index] = model.gate_weights().float().cpu()
            if (embedded := alignment_embeddings(model)) is not None:
                for row, i in enumerate(index):
                    aligned[i] = torch.stack([embedded[0][row], embedded[1][row]]).float().cpu()
    return Scores(probs, gates, torch.stack(aligned) if aligned and aligned[0] is not None else None)


def evaluate(model: AudioEmotionClassifier, examples: Examples, classes: Sequence[str], device: torch.device
             ) -> dict[str, Any]:
    """Accuracy, macro and per-class F1, the confusion matrix and, under gated fusion, the mean gates."""
    probs, gates, aligned = classify(model, examples.features, device, examples.text)
    true, pred = examples.targets(classes), probs.argmax(-1)
    matrix = confusion_matrix(true, pred, len(classes))
    f1 = per_class_f1(matrix)
    report = {"accuracy": accuracy(true, pred), "macro_f1": float(f1.mean()),
              "f1": {c: float(v) for c, v in zip(classes, f1)}, "confusion": matrix.tolist()}
    if gates is not None:  # how much the model listens to each modality, on average
        report["gate_audio"], report["gate_text"] = (round(float(g), 4) for g in gates.mean(0))
    if aligned is not None:  # audio -> transcript and transcript -> audio retrieval among the held-out clips
        report.update(retrieval_recall(aligned[:, 0], aligned[:, 1]))
    return report


def classification_loss(net: torch.nn.Module, batch: dict[str, torch.Tensor], moe: bool
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy with a little label smoothing (+ the experts' balancing loss under --ffn moe)."""
    logits = net(batch["features"], batch["mask"], batch.get("text"), batch.get("text_mask"))
    loss = F.cross_entropy(logits, batch["labels"], label_smoothing=0.05)
    stats = {"train_acc": float((logits.argmax(-1) == batch["labels"]).float().mean())}
    if moe:  # keep the experts evenly loaded
        aux = moe_aux_loss(net)
        loss, stats["moe_aux"] = loss + aux, float(aux)
    if weight := unwrap(net).config.contrastive:  # align each clip's audio with its own transcript
        align = contrastive_loss(net)
        loss, stats["contrastive"] = loss + weight * align, float(align)
    return loss, stats


# --------------------------------------------------------------------------- train

def check_options(options: SpeechEmotionOptions) -> None:
    """Refuse what the options' types do not: a crop too short to hear, a width the fusion's heads cannot split."""
    if not options.crop_seconds > 0.5:
        raise UsageError(f"crop-seconds must be above 0.5, got {options.crop_seconds}", "--crop-seconds")
    if options.fused and options.dim % 4:
        raise UsageError(f"dim must be a multiple of 4 under --fusion, got {options.dim}", "--dim")
    if options.unfreeze and options.encoder == "mel":
        raise UsageError("--unfreeze fine-tunes a pretrained --encoder; log-mels have no layers", "--unfreeze")
    check_contrastive(options.contrastive, options.fused)


def training_set(data: TrainingData, options: SpeechEmotionOptions, encoder: Encoder
                 ) -> tuple[Dataset, Callable[[list], Any]]:
    """The training clips as random crops, log-mels with SpecAugment (with their transcripts under fusion),
    and their collate."""
    crop_frames = round(options.crop_seconds * encoder.frame_rate)
    clips = LogMelClips(data.train.features, data.train.targets(data.classes), crop_frames,
                        augment=not encoder.pretrained)
    if data.train.text is None:
        return clips, collate_padded
    return TranscribedClips(clips, data.train.text), collate_transcribed


def train(options: SpeechEmotionOptions, run_dir: Path, *, resume: bool, force: bool, explicit: Collection[str],
          device: torch.device, quiet: bool) -> tuple[TrainResult, dict[str, Any]]:
    """Train (or continue, with `resume`) a classifier on the clips; the run and its held-out report."""
    meta = None
    if resume:
        options, meta = runs.resume_options(options, run_dir, KIND, explicit)
    check_options(options)
    train_cfg = TrainConfig.of(options, quiet=quiet)  # checks them, too
    encoder = open_encoder(options.encoder, n_mels=options.n_mels, unfreeze=options.unfreeze,
                           params=meta.config.get("ssl") if meta else None,
                           expected_sha256=meta.setup.get("encoder_sha256") if meta else None, device=device,
                           quiet=quiet)
    cache = FeatureCache(Path(run_dir) / "features", encoder, options.unfreeze) if encoder.pretrained else None
    data = load_training_data(options, quiet, encoder.featurize, cache)
    if meta is not None and list(meta.classes) != data.classes:
        raise UsageError(f"the run was trained on the classes {', '.join(meta.classes)}, this data has "
                         f"{', '.join(data.classes)}", options.data)
    run_dir = runs.prepare_run_dir(run_dir, resume, force)
    seed_everything(options.seed)
    if meta is not None:
        model = build_model(meta)
    else:
        model = AudioEmotionClassifier(model_config(options, data, encoder))
        if encoder.network is not None:  # the fine-tuned top layers start from the pretrained ones
            model.encoder.front.load_top(encoder.network)
    dataset, collate = training_set(data, options, encoder)
    fusion_note = f", {options.fusion} fusion" if options.fused else ""
    report: dict[str, Any] = {}

    def evaluate_heldout(net: AudioEmotionClassifier, step: int) -> dict[str, float]:
        report.update(evaluate(net, data.heldout, data.classes, device))
        plot_confusion(report["confusion"], data.classes, run_dir / "confusion.png",
                       title=f"held-out confusion{fusion_note}, step {step} (accuracy {report['accuracy']:.1%})")
        return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                **{k: v for k, v in report.items() if k.startswith("recall@")}}

    setup = {"encoder_sha256": encoder.sha256} if encoder.pretrained else {}  # the encoder's weights: named, not copied
    result = fit(model, dataset, partial(classification_loss, moe=options.ffn == "moe"), train_cfg, run_dir,
                 meta=CheckpointMeta.of(KIND, model.config, classes=tuple(data.classes), options=options.record(),
                                        setup=setup),
                 device=device, resume=resume, evaluate=evaluate_heldout,
                 collate_fn=collate)
    plot_curves(read_metrics(run_dir), ["loss", "train_acc", "accuracy", "macro_f1"], run_dir / "curves.png",
                title=f"audio-emotion{' + transcript' if options.fused else ''}{fusion_note}", log_keys=("loss",))
    summary = {"fusion": options.fusion, "encoder": options.encoder, "classes": data.classes,
               "train_clips": len(data.train.clips), "heldout_clips": len(data.heldout.clips),
               "speaker_norm": options.speaker_norm,
               "split": "heldout folder" if options.heldout else options.split_by, **report}
    if encoder.pretrained:  # which of the encoder's layers the classifier listens to
        summary["layer_weights"] = layer_weights(model)
        plot_bars(summary["layer_weights"], [str(i + 1) for i in range(len(summary["layer_weights"]))],
                  run_dir / "layer_weights.png", title=f"{options.encoder} layer weights learned by the classifier",
                  xlabel="layer", ylabel="softmax weight")
    return result, summary


def layer_weights(model: AudioEmotionClassifier) -> list[float]:
    """The softmax weight the classifier gives each of the encoder's layers (bottom first)."""
    return [round(float(w), 4) for w in model.encoder.front.mix.weights().detach()]


# --------------------------------------------------------------------------- predict

def load_model(checkpoint: Path, device: torch.device) -> tuple[AudioEmotionClassifier, CheckpointMeta]:
    """A speech-emotion model and its record; an old "audio-text" checkpoint is refused in one line."""
    if read_metadata(checkpoint).kind == LEGACY_FUSED_KIND:
        raise UsageError(f"an {LEGACY_FUSED_KIND!r} checkpoint, from before fused models became kind {KIND!r}: "
                         "retrain it with audio-emotion train --fusion", checkpoint)
    return load_checkpoint(checkpoint, kind=KIND, device=device)


def top_label(probs: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    best = int(probs.argmax())
    return {"label": classes[best], "score": round(float(probs[best]), 4)}


@dataclass
class SpeechClassifier:
    """A trained model ready to label files, with its classes, features and speakers' baselines."""

    model: AudioEmotionClassifier
    classes: list[str]
    featurize: Featurize
    device: torch.device
    normalizer: Callable[[Path], Normalize]

    @property
    def fusion(self) -> Fusion:
        return self.model.config.fusion

    def transcript(self, path: Path) -> torch.Tensor | None:
        """The byte ids of the transcript beside `path` for a fused model (missing: that file's InputError)."""
        if not self.model.config.fused:
            return None
        return encode_text(read_transcript(path), self.model.config.text.max_bytes)

    def label_file(self, path: Path) -> dict[str, Any]:
        """One label for a whole file: decoded, trimmed of silence, (speaker-normalised,) classified."""
        text = self.transcript(path)  # first: no transcript, no decoding
        wave = load_audio(path, SAMPLE_RATE)
        if is_silent(wave):
            raise InputError("audio is silent: nothing to classify", path)
        speech = trim_silence(wave, SAMPLE_RATE)
        if speech.numel() < MIN_SPEECH_SECONDS * SAMPLE_RATE:
            warn(f"only {speech.numel() / SAMPLE_RATE:.3f} s of sound: too short to judge an emotion, "
                 f"the label is a guess ({path})")
        # Long files: classify 30 s windows (each with the whole transcript) and average by length,
        # so attention never spans a whole hour, nor an encoder's features a whole file.
        normalize = self.normalizer(path)
        windows = [normalize(self.featurize(w)) for w in speech.split(round(WINDOW_SECONDS * SAMPLE_RATE))]
        weights = torch.tensor([len(w) for w in windows], dtype=torch.float32)
        scores = classify(self.model, windows, self.device, None if text is None else [text] * len(windows))
        probs = (scores.probs * weights[:, None]).sum(0) / weights.sum()
        record = {**top_label(probs, self.classes),
                  "probabilities": {c: round(float(p), 4) for c, p in zip(self.classes, probs)},
                  "duration": round(wave.numel() / SAMPLE_RATE, 3)}
        if self.model.config.fused:
            record["fusion"] = self.fusion
        if scores.gates is not None:
            record["gate_text"] = round(float(scores.gates[:, 1].mean()), 4)
        return record

    def timeline(self, path: Path, segment: float) -> Iterator[dict[str, Any]]:
        """One record per `segment` seconds, decoding the file block by block (memory stays flat)."""
        rate, normalize = SAMPLE_RATE, self.normalizer(path)
        start = 0.0
        for block in stream_audio(path, segment, rate):
            end = start + block.numel() / rate
            record: dict[str, Any] = {"start": round(start, 3), "end": round(end, 3)}
            if is_silent(block):
                record.update(label=None, score=None, silent=True)
            else:
                record.update(top_label(classify(self.model, [normalize(self.featurize(block))], self.device).probs[0],
                                        self.classes))
            yield record
            start = end


def open_classifier(checkpoint: Path, paths: Sequence[Path], *, segment: float | None, speaker_by: SpeakerBy | None,
                    device: torch.device, quiet: bool) -> SpeechClassifier:
    """The checkpoint's classifier for labelling `paths` (their speakers' baselines gathered, if it needs them)."""
    model, meta = load_model(checkpoint, device)
    if segment is not None and model.config.fused:
        raise UsageError("--segment needs an audio-only checkpoint: a transcript covers the whole file", "--segment")
    config = model.config
    encoder = open_encoder(config.encoder, n_mels=config.n_mels, unfreeze=config.unfreeze, params=config.ssl,
                           expected_sha256=meta.setup.get("encoder_sha256"), device=device, quiet=quiet)
    return SpeechClassifier(model, meta.class_names(checkpoint), encoder.featurize, device,
                            speaker_normalizer(paths, meta.options, speaker_by, encoder.featurize, quiet))


# --------------------------------------------------------------------------- synthetic set

def make_synthetic(out: Path, *, voices: int, sentences: int, heldout_voices: int, heldout_sentences: int,
                   emotions: Sequence[str], transcripts: bool, seed: int, force: bool, quiet: bool) -> dict[str, Any]:
    """Write OUT/{train,heldout}/EMOTION/VOICE_sNN.wav (espeak-ng, one prosody per emotion); what was written."""
    plan = synthetic_split(voices, sentences, heldout_voices, heldout_sentences)
    if len(emotions) < 2:
        raise UsageError("give at least 2 emotions", "--emotions")
    claim_output_folder(out, force)
    total = len(emotions) * sum(len(v) * len(s) for v, s in plan.values())
    splits = {}
    with tqdm(total=total, desc="synthetic speech", disable=quiet, leave=False, file=sys.stderr) as bar:
        for name, (split_voices, split_sentences) in plan.items():
            paths = write_synthetic_set(out / name, split_voices, split_sentences, emotions, seed,
                                        on_clip=lambda _: bar.update(1), transcripts=transcripts)
            splits[name or "all"] = {"folder": str(out / name), "clips": len(paths), "voices": split_voices,
                                     "sentences": split_sentences}
    return {"out": str(out), "clips": total, "classes": list(emotions), "splits": splits}
