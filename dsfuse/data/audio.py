"""Audio in: decode wav/flac/ogg (soundfile) and mp3/m4a/... (PyAV), mix to mono, resample to 16 kHz,
trim silence, and turn waveforms into log-mel features (with SpecAugment for training).

`load_audio` reads a whole file; `stream_audio` yields fixed-length blocks so memory stays flat on
long recordings.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
import torchaudio.transforms as T
from einops import rearrange

from dsfuse.errors import InputError

SAMPLE_RATE = 16000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac", ".opus", ".webm", ".mp4")
SILENCE_PEAK = 1e-4  # a peak below -80 dBFS is silence, whatever the format
TRIM_DB = 40.0  # frames this far below the loudest frame count as leading/trailing silence


@dataclass(frozen=True)
class MelConfig:
    """Log-mel analysis: 25 ms windows every 10 ms at 16 kHz."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 64


# --------------------------------------------------------------------------- decoding

def _check_nonempty(path: Path) -> None:
    if not path.is_file():
        raise InputError("file not found", path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)", path)


def _is_soundfile_readable(path: Path) -> bool:
    try:
        sf.info(str(path))
        return True
    except (sf.LibsndfileError, RuntimeError):
        return False


def to_mono(samples: np.ndarray) -> np.ndarray:
    """[n, channels] or [n] -> [n] float32, the average of the channels."""
    samples = np.asarray(samples, dtype=np.float32)
    return samples.mean(axis=1) if samples.ndim == 2 else samples


def resample(wave: torch.Tensor, from_rate: int, to_rate: int = SAMPLE_RATE) -> torch.Tensor:
    if from_rate == to_rate or wave.numel() == 0:
        return wave
    return AF.resample(wave, from_rate, to_rate)


def _pyav_blocks(path: Path, block_frames: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """Mono float32 blocks of `block_frames` native samples (None: the whole stream) and the native rate."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"not a readable audio file ({type(e).__name__})", path) from None
    with container:
        if not container.streams.audio:
            raise InputError("no audio stream in file", path)
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        # Only a sample-format change (to planar float); channel mixing and resampling happen in torch.
        converter = av.AudioResampler(format="fltp")
        pending: list[np.ndarray] = []
        held = 0
        try:
            for frame in container.decode(stream):
                for converted in converter.resample(frame):
                    mono = converted.to_ndarray().mean(axis=0).astype(np.float32)
                    pending.append(mono)
                    held += len(mono)
                    while block_frames and held >= block_frames:
                        joined = np.concatenate(pending)
                        yield joined[:block_frames], rate
                        pending, held = [joined[block_frames:]], len(joined) - block_frames
        except av.error.FFmpegError as e:
            raise InputError(f"audio stream is corrupt ({type(e).__name__})", path) from None
        if held:
            yield np.concatenate(pending), rate


def _soundfile_blocks(path: Path, block_frames: int | None) -> Iterator[tuple[np.ndarray, int]]:
    with sf.SoundFile(str(path)) as f:
        if block_frames is None:
            yield to_mono(f.read(dtype="float32", always_2d=True)), f.samplerate
            return
        while True:
            block = f.read(block_frames, dtype="float32", always_2d=True)
            if len(block) == 0:
                return
            yield to_mono(block), f.samplerate


def _native_blocks(path: Path, block_seconds: float | None) -> Iterator[tuple[np.ndarray, int]]:
    """Decode with soundfile where it can (wav/flac/ogg), else PyAV (mp3, m4a, ...); NaN or infinite
    samples (a float file can hold them) are the file's error."""
    for samples, rate in _decoded_blocks(path, block_seconds):
        if not np.isfinite(samples).all():
            raise InputError("audio holds NaN or infinite samples", path)
        yield samples, rate


def _decoded_blocks(path: Path, block_seconds: float | None) -> Iterator[tuple[np.ndarray, int]]:
    if _is_soundfile_readable(path):
        rate = sf.info(str(path)).samplerate
        yield from _soundfile_blocks(path, round(block_seconds * rate) if block_seconds else None)
        return
    # PyAV learns the rate only once the stream is open, so it converts seconds itself.
    import av

    rate = None
    try:
        with av.open(str(path)) as probe:
            if probe.streams.audio:
                rate = probe.streams.audio[0].codec_context.sample_rate
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"not a readable audio file ({type(e).__name__})", path) from None
    if rate is None:
        raise InputError("no audio stream in file", path)
    yield from _pyav_blocks(path, round(block_seconds * rate) if block_seconds else None)


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """The whole file as a mono float32 waveform [n] at `sample_rate`."""
    path = Path(path)
    _check_nonempty(path)
    blocks = list(_native_blocks(path, None))
    if not blocks or not len(blocks[0][0]):
        raise InputError("audio stream holds no samples", path)
    samples, rate = blocks[0]
    return resample(torch.from_numpy(np.ascontiguousarray(samples)), rate, sample_rate)


def stream_audio(path: str | os.PathLike, block_seconds: float,
                 sample_rate: int = SAMPLE_RATE) -> Iterator[torch.Tensor]:
    """Mono waveform blocks of `block_seconds` (the last may be shorter), decoded as they are needed.

    Each block is resampled on its own: a block is one analysis segment, so no state crosses blocks.
    """
    path = Path(path)
    _check_nonempty(path)
    any_samples = False
    for samples, rate in _native_blocks(path, block_seconds):
        any_samples = any_samples or len(samples) > 0
        yield resample(torch.from_numpy(np.ascontiguousarray(samples)), rate, sample_rate)
    if not any_samples:
        raise InputError("audio stream holds no samples", path)


# --------------------------------------------------------------------------- waveform clean-up

def is_silent(wave: torch.Tensor) -> bool:
    return wave.numel() == 0 or float(wave.abs().max()) < SILENCE_PEAK


def trim_silence(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE, top_db: float = TRIM_DB,
                 frame_seconds: float = 0.025) -> torch.Tensor:
    """Cut leading and trailing frames more than `top_db` below the loudest frame (silence stays empty-free)."""
    frame = max(1, round(frame_seconds * sample_rate))
    if wave.numel() < 2 * frame or is_silent(wave):
        return wave
    n_frames = wave.numel() // frame
    rms = wave[: n_frames * frame].reshape(n_frames, frame).pow(2).mean(1).sqrt()
    loud = (20 * torch.log10(rms.clamp_min(1e-10) / rms.max())) > -top_db
    kept = torch.nonzero(loud).flatten()
    start, stop = int(kept[0]) * frame, min(wave.numel(), (int(kept[-1]) + 1) * frame)
    return wave[start:stop]


def pad_to(wave: torch.Tensor, min_samples: int) -> torch.Tensor:
    """Zero-pad a short clip at the end: a clip shorter than the analysis window is padded, not rejected."""
    if wave.numel() >= min_samples:
        return wave
    return torch.nn.functional.pad(wave, (0, min_samples - wave.numel()))


# --------------------------------------------------------------------------- features

class LogMel(torch.nn.Module):
    """Waveform [..., n] -> log-mel features [..., frames, n_mels] (natural log of power, floored)."""

    def __init__(self, cfg: MelConfig = MelConfig()):
        super().__init__()
        self.cfg = cfg
        self.mel = T.MelSpectrogram(sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                                    n_mels=cfg.n_mels, power=2.0)

    @property
    def min_samples(self) -> int:
        return self.cfg.n_fft

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        mel = self.mel(pad_to(wave, self.min_samples) if wave.ndim == 1 else wave)
        return rearrange(torch.log(mel.clamp_min(1e-10)), '... mels frames -> ... frames mels').contiguous()


class SpecAugment(torch.nn.Module):
    """Training-time masking of mel bands and time spans (Park et al. 2019), on [frames, n_mels]."""

    def __init__(self, freq_mask: int = 8, time_mask: int = 20, n_freq_masks: int = 2, n_time_masks: int = 2):
        super().__init__()
        self.freq = T.FrequencyMasking(freq_mask)
        self.time = T.TimeMasking(time_mask, p=0.2)
        self.n_freq_masks, self.n_time_masks = n_freq_masks, n_time_masks

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        spec = rearrange(features, 'frames mels -> 1 mels frames')  # torchaudio masks [channel, freq, time]
        fill = float(features.mean())  # mask to the clip's mean, not to log(0)
        for _ in range(self.n_freq_masks):
            spec = self.freq(spec, mask_value=fill)
        for _ in range(self.n_time_masks):
            spec = self.time(spec, mask_value=fill)
        return rearrange(spec, '1 mels frames -> frames mels')
