"""Videos with their soundtracks, for audio-visual classification: a clip plus the log-mel frames of
the first `audio_seconds` of the video's audio track; `collate_clips` batches clips with or without them.

A video without an audio track cannot be fused: training leaves it out (listed in `no_audio`),
prediction reports it as that file's failure.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from dsfuse.data.audio import SAMPLE_RATE, LogMel, MelConfig
from dsfuse.data.video import VideoFolder, read_audio_track
from dsfuse.errors import InputError


def soundtrack_mel(path: str | os.PathLike, seconds: float, mel: LogMel) -> torch.Tensor:
    """Log-mel frames [T, n_mels] of the first `seconds` of a video's audio track (InputError without one)."""
    wave = read_audio_track(path, SAMPLE_RATE, duration=seconds)
    if wave.numel() == 0:
        raise InputError("audio track holds no samples", path)
    return mel(wave)


class AudioVisualFolder(Dataset):
    """`(uint8 clip [T, H, W, 3], log-mel [T_a, n_mels], label)` per video of a VideoFolder with sound."""

    def __init__(self, videos: VideoFolder, audio_seconds: float, n_mels: int):
        self.mel = LogMel(MelConfig(n_mels=n_mels))
        keep, self.mels, self.no_audio = [], [], []
        for i, path in enumerate(videos.files):
            try:
                self.mels.append(soundtrack_mel(path, audio_seconds, self.mel))
                keep.append(i)
            except InputError:
                self.no_audio.append(path)
        self.videos = videos.subset(keep, videos.train)
        self.classes = videos.classes

    @property
    def labels(self) -> list[int]:
        return self.videos.labels

    def subset(self, indices: Sequence[int], train: bool) -> AudioVisualFolder:
        part = AudioVisualFolder.__new__(AudioVisualFolder)
        part.__dict__.update(self.__dict__)
        part.videos = self.videos.subset(indices, train)
        part.mels = [self.mels[i] for i in indices]
        return part

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        clip, label = self.videos[i]
        return clip, self.mels[i], label


def collate_clips(items: Sequence[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """Stack `(clip, label)` items into {"clips", "labels"}; `(clip, log-mel, label)` items add "mel",
    padded to the longest, and "mel_mask" (True = real)."""
    batch = {"clips": torch.stack([item[0] for item in items]), "labels": torch.tensor([item[-1] for item in items])}
    if len(items[0]) == 3:
        mels = [item[1] for item in items]
        padded = torch.nn.utils.rnn.pad_sequence(mels, batch_first=True)
        lengths = torch.tensor([len(m) for m in mels])
        batch |= {"mel": padded, "mel_mask": torch.arange(padded.shape[1])[None, :] < lengths[:, None]}
    return batch
