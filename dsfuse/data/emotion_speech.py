"""Labelled emotional speech: labels and speakers from folder names or the RAVDESS / CREMA-D file-name
conventions, speaker-disjoint splits, per-speaker feature baselines, and a dataset of log-mel clips for training.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dsfuse.choices import LabelScheme, SplitBy, values
from dsfuse.data.audio import AUDIO_SUFFIXES, SpecAugment
from dsfuse.errors import UsageError

# RAVDESS: modality-channel-EMOTION-intensity-STATEMENT-repetition-ACTOR, e.g. 03-01-05-01-02-01-12.wav
RAVDESS_EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
                    "07": "disgust", "08": "surprised"}
# CREMA-D: ACTOR_SENTENCE_EMOTION_LEVEL, e.g. 1001_DFA_ANG_XX.wav
CREMA_D_EMOTIONS = {"ANG": "angry", "DIS": "disgust", "FEA": "fearful", "HAP": "happy", "NEU": "neutral",
                    "SAD": "sad"}


@dataclass(frozen=True)
class LabelledClip:
    path: Path
    label: str
    speaker: str  # who speaks: what `--split-by speaker` keeps apart


def speaker_of(path: Path, scheme: LabelScheme = "folders", pattern: re.Pattern[str] | None = None) -> str:
    """Who speaks in `path`: the named group `speaker` of `pattern` (searched in the whole path), else by
    the file-name convention of `scheme`: the RAVDESS actor, else (folders, CREMA-D) the name up to its
    first '_'. A RAVDESS-scheme name that does not follow it is its own speaker."""
    if pattern is not None:
        match = pattern.search(path.as_posix())
        if match is None:
            raise UsageError(f"the path does not match --speaker-pattern {pattern.pattern!r}", path)
        return match["speaker"]
    if scheme == "ravdess":
        parts = path.stem.split("-")
        return f"actor{parts[6]}" if len(parts) == 7 else path.stem
    return path.stem.split("_", 1)[0]


def speaker_pattern(text: str | None) -> re.Pattern[str] | None:
    """`--speaker-pattern`: a regular expression with a named group `speaker`, such as
    `_(?P<speaker>[^_/]+)_[^/]*$` (the second field of EMOTION_VOICE_SENTENCE.wav) or `(?P<speaker>[^/]+)/[^/]+$`
    (a sub-folder per speaker)."""
    if text is None:
        return None
    try:
        pattern = re.compile(text)
    except re.error as e:
        raise UsageError(f"not a regular expression ({e})", "--speaker-pattern") from None
    if "speaker" not in pattern.groupindex:
        raise UsageError("the pattern needs a named group (?P<speaker>...)", "--speaker-pattern")
    return pattern


def check_speakers_are_not_labels(clips: Sequence[LabelledClip]) -> None:
    """Refuse speaker groups that each hold a single label: the file names give the label where the speaker
    was expected, and speaker normalisation or a speaker split would erase or confound the emotion."""
    labels_of: dict[str, set[str]] = {}
    for clip in clips:
        labels_of.setdefault(clip.speaker, set()).add(clip.label)
    if len(labels_of) >= 2 and all(len(labels) == 1 for labels in labels_of.values()):
        raise UsageError(f"each of the {len(labels_of)} speakers read from the file names holds a single label "
                         f"(e.g. {next(iter(labels_of))!r}): the names probably start with the label, not the "
                         "speaker; say where the speaker is with --speaker-pattern", "--speaker-pattern")


def _label_from_folder(path: Path, root: Path) -> str:
    """The folder right under DATA is the label."""
    relative = path.relative_to(root)
    if len(relative.parts) < 2:
        raise UsageError("with --labels folders, clips must sit in one folder per class, not directly in DATA",
                         path)
    return relative.parts[0]


def _label_from_ravdess(path: Path, root: Path) -> str:
    parts = path.stem.split("-")
    if len(parts) != 7 or parts[2] not in RAVDESS_EMOTIONS:
        raise UsageError("file name does not follow the RAVDESS convention (e.g. 03-01-05-01-02-01-12.wav)", path)
    return RAVDESS_EMOTIONS[parts[2]]


def _label_from_crema_d(path: Path, root: Path) -> str:
    parts = path.stem.split("_")
    if len(parts) != 4 or parts[2] not in CREMA_D_EMOTIONS:
        raise UsageError("file name does not follow the CREMA-D convention (e.g. 1001_DFA_ANG_XX.wav)", path)
    return CREMA_D_EMOTIONS[parts[2]]


_LABELLERS: dict[str, Callable[[Path, Path], str]] = {
    "folders": _label_from_folder, "ravdess": _label_from_ravdess, "crema-d": _label_from_crema_d,
}


def find_labelled_clips(root: str | Path, scheme: LabelScheme = "folders",
                        pattern: re.Pattern[str] | None = None) -> list[LabelledClip]:
    """Every audio file under `root` with its label and speaker (see `speaker_of`), sorted by path."""
    root = Path(root)
    if scheme not in _LABELLERS:
        raise UsageError(f"unknown label scheme {scheme!r}; use {', '.join(values(LabelScheme))}", "--labels")
    if not root.is_dir():
        raise UsageError("training data must be a folder", root)
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not paths:
        raise UsageError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) found", root)
    return [LabelledClip(p, _LABELLERS[scheme](p, root), speaker_of(p, scheme, pattern)) for p in paths]


def split_clips(clips: Sequence[LabelledClip], by: SplitBy = "random", heldout_fraction: float = 0.2,
                seed: int = 0) -> tuple[list[LabelledClip], list[LabelledClip]]:
    """(training, held-out); `by="speaker"` puts each speaker wholly on one side."""
    if not 0 < heldout_fraction < 1:
        raise UsageError(f"held-out fraction must be between 0 and 1, got {heldout_fraction}", "--heldout-fraction")
    rng = random.Random(seed)
    if by == "speaker":
        speakers = sorted({c.speaker for c in clips})
        if len(speakers) < 2:
            raise UsageError(f"--split-by speaker needs at least 2 speakers, found {len(speakers)}", "--split-by")
        rng.shuffle(speakers)
        heldout_speakers = set(speakers[: max(1, math.floor(heldout_fraction * len(speakers) + 0.5))])
        return ([c for c in clips if c.speaker not in heldout_speakers],
                [c for c in clips if c.speaker in heldout_speakers])
    if by != "random":
        raise UsageError(f"unknown split {by!r}; use {', '.join(values(SplitBy))}", "--split-by")
    order = list(range(len(clips)))
    rng.shuffle(order)
    n_heldout = max(1, round(heldout_fraction * len(clips)))
    heldout = set(order[:n_heldout])
    return [c for i, c in enumerate(clips) if i not in heldout], [c for i, c in enumerate(clips) if i in heldout]


class SpeakerBaselines:
    """Each speaker's mean log-mel frame, gathered clip by clip. Subtracting it (`--speaker-norm`) lets a
    model hear how a clip departs from its speaker's usual voice: a low, quiet voice's neutral speech
    otherwise sounds like a brighter voice's sadness. A baseline should span several clips and emotions.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._frames: dict[str, int] = {}

    def add(self, speaker: str, features: torch.Tensor) -> None:
        self._sums[speaker] = self._sums.get(speaker, 0) + features.sum(0, dtype=torch.float64)
        self._frames[speaker] = self._frames.get(speaker, 0) + len(features)

    @property
    def speakers(self) -> list[str]:
        return sorted(self._frames)

    def frames(self, speaker: str) -> int:
        """How many frames the speaker's baseline rests on (0: none yet)."""
        return self._frames.get(speaker, 0)

    def normalize(self, speaker: str, features: torch.Tensor) -> torch.Tensor:
        if not self.frames(speaker):
            raise KeyError(f"no baseline for speaker {speaker!r}")
        return features - (self._sums[speaker] / self._frames[speaker]).to(features.dtype)

    @classmethod
    def of(cls, speakers: Sequence[str], features: Sequence[torch.Tensor]) -> SpeakerBaselines:
        baselines = cls()
        for speaker, clip in zip(speakers, features, strict=True):
            baselines.add(speaker, clip)
        return baselines


class LogMelClips(Dataset):
    """Clips as log-mel features, computed once; training takes random crops with SpecAugment."""

    def __init__(self, features: Sequence[torch.Tensor], labels: Sequence[int], crop_frames: int | None = None,
                 augment: bool = False):
        self.features, self.labels = list(features), torch.as_tensor(labels, dtype=torch.long)
        self.crop_frames = crop_frames
        self.augment = SpecAugment() if augment else None

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features[index]
        if self.crop_frames and len(features) > self.crop_frames:
            # torch's global RNG: the engine saves and restores it, so --resume stays exact
            start = int(torch.randint(0, len(features) - self.crop_frames + 1, ()))
            features = features[start:start + self.crop_frames]
        if self.augment is not None:
            features = self.augment(features)
        return features, self.labels[index]


def collate_padded(items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad features to the longest clip: {"features" [B, T, M], "mask" bool [B, T] (True = real), "labels" [B]}."""
    features = torch.nn.utils.rnn.pad_sequence([f for f, _ in items], batch_first=True)
    lengths = torch.tensor([len(f) for f, _ in items])
    mask = torch.arange(features.shape[1])[None, :] < lengths[:, None]
    return {"features": features, "mask": mask, "labels": torch.stack([label for _, label in items])}
