"""Transcripts beside audio files (`clip.wav` + `clip.txt`) and a dataset of log-mel clips with their
transcripts' byte ids, for audio-text fusion.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dsfuse.data.emotion_speech import LogMelClips, collate_padded
from dsfuse.errors import InputError


def transcript_path(audio: Path) -> Path:
    """Where an audio file's transcript sits: the same name with a .txt suffix."""
    return Path(audio).with_suffix(".txt")


def read_transcript(audio: Path) -> str:
    """The transcript beside `audio`; a missing, unreadable or empty one is that file's InputError."""
    path = transcript_path(audio)
    if not path.is_file():
        raise InputError(f"no transcript {path.name} beside the audio file", audio)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"unreadable transcript: {e}", path) from e
    if not text:
        raise InputError("transcript is empty", path)
    return text


class TranscribedClips(Dataset):
    """LogMelClips (random crops, SpecAugment) paired with each clip's transcript as byte ids."""

    def __init__(self, clips: LogMelClips, text_ids: Sequence[torch.Tensor]):
        if len(clips) != len(text_ids):
            raise ValueError(f"{len(clips)} clips but {len(text_ids)} transcripts")
        self.clips, self.text_ids = clips, list(text_ids)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features, label = self.clips[index]
        return features, label, self.text_ids[index]


def collate_transcribed(items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """collate_padded's {"features", "mask", "labels"} plus {"text", "text_mask"} padded the same way."""
    from dsfuse.models.text import pad_text

    batch = collate_padded([(features, label) for features, label, _ in items])
    batch["text"], batch["text_mask"] = pad_text([text for _, _, text in items])
    return batch
