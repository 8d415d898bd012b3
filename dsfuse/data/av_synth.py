"""Synthetic audio-visual pairs for measuring fusion: a clip of a moving shape with a sound beside it.

Two tasks, each with two classes:
- `xor`: the label is (the shape moves right) XOR (the tone is high). Neither modality alone says
  anything about the label, so only a strategy that lets the modalities interact can learn it.
- `noisy-audio`: the label is the direction of motion; the audio is pure noise of random length.
  A good fusion learns to ignore the noise modality (gated fusion's gate shows whether it does).

Audio comes as log-magnitude spectrogram frames of random length (0.15-0.4 s), padded per set with
a mask, so the padding-mask paths of the fusion modules are exercised too.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import numpy as np
import torch
from torch.utils.data import Dataset

from dsfuse.data.synth import moving_shape_clip, tone

AV_TASKS = ("xor", "noisy-audio")
SAMPLE_RATE = 8000
N_FFT, HOP = 256, 256  # 31 Hz bins, so low and high tones land octaves apart; no overlap keeps sequences short
LOW_HZ, HIGH_HZ = (220.0, 440.0), (880.0, 1760.0)
SECONDS = (0.15, 0.4)


@dataclass(frozen=True)
class AVSpec:
    """Sizes of one generated set: frames and pixels of each clip."""

    frames: int = 8
    size: int = 16

    @property
    def spectrum_bins(self) -> int:
        return N_FFT // 2 + 1


def log_spectrogram(audio: np.ndarray) -> torch.Tensor:
    """Log-magnitude STFT frames [T, F] of float samples [n] (Hann window, centred)."""
    spec = torch.stft(torch.from_numpy(audio), N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    return einops.rearrange(torch.log1p(spec.abs()), "f t -> t f")


def audio_visual_pair(task: str, rng: np.random.Generator, spec: AVSpec = AVSpec()
                      ) -> tuple[np.ndarray, np.ndarray, int]:
    """One (clip uint8 [T, H, W, 3], audio float32 [n] at SAMPLE_RATE, label) of `task`."""
    if task not in AV_TASKS:
        raise ValueError(f"task must be one of {AV_TASKS}, got {task!r}")
    moves_right = bool(rng.integers(2))
    clip = moving_shape_clip("right" if moves_right else "left", spec.frames, spec.size, rng)
    seconds = rng.uniform(*SECONDS)
    if task == "xor":
        high = bool(rng.integers(2))
        audio = tone(rng.uniform(*(HIGH_HZ if high else LOW_HZ)), seconds, SAMPLE_RATE, rng)
        return clip, audio, int(moves_right != high)
    n = int(round(seconds * SAMPLE_RATE))
    audio = (rng.uniform(0.05, 0.4) * rng.standard_normal(n)).clip(-1, 1).astype(np.float32)
    return clip, audio, int(moves_right)


class AudioVisualSet(Dataset):
    """`n` generated pairs of `task`, kept in memory as model-ready tensors.

    An item is {"video": float [3, T, H, W] in [-1, 1], "audio": float [T_a, F] (zero-padded),
    "audio_mask": bool [T_a] (True = real frame), "label": int}.
    """

    def __init__(self, task: str, n: int, seed: int, spec: AVSpec = AVSpec()):
        rng = np.random.default_rng(seed)
        pairs = [audio_visual_pair(task, rng, spec) for _ in range(n)]
        clips = torch.from_numpy(np.stack([clip for clip, _, _ in pairs]))
        self.video = einops.rearrange(clips, "n t h w c -> n c t h w").float() / 127.5 - 1
        spectra = [log_spectrogram(audio) for _, audio, _ in pairs]
        longest = max(len(s) for s in spectra)
        self.audio = torch.zeros(n, longest, spec.spectrum_bins)
        self.audio_mask = torch.zeros(n, longest, dtype=torch.bool)
        for i, s in enumerate(spectra):
            self.audio[i, : len(s)] = s
            self.audio_mask[i, : len(s)] = True
        self.labels = torch.tensor([label for _, _, label in pairs])
        self.task, self.spec = task, spec

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"video": self.video[i], "audio": self.audio[i], "audio_mask": self.audio_mask[i],
                "label": self.labels[i]}
