"""Writing media files atomically: H.264/AAC mp4 with PyAV, wav/flac/ogg with soundfile."""

from __future__ import annotations

import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import einops
import numpy as np
import soundfile as sf
import torch

from dsfuse.errors import UsageError
from dsfuse.io import atomic_path

# suffix -> (soundfile format, subtype); 16-bit PCM keeps the samples small and readable everywhere
AUDIO_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}
AUDIO_CHUNK = 1024  # AAC's frame size; PyAV regroups anyway, this just keeps frames modest


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last row/column where H or W is odd: yuv420p halves the chroma planes."""
    _, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _channels_first(audio: torch.Tensor | np.ndarray) -> np.ndarray:
    """[n] or [n, ch] float samples -> planar float32 [ch, n], clipped to [-1, 1]."""
    audio = _as_numpy(audio).astype(np.float32)
    if audio.ndim == 1:
        audio = audio[:, None]
    if audio.ndim != 2 or audio.shape[1] not in (1, 2):
        raise ValueError(f"audio must be [n] or [n, 1|2], got shape {audio.shape}")
    return np.ascontiguousarray(einops.rearrange(np.clip(audio, -1.0, 1.0), "n c -> c n"))


def _add_audio_stream(container: av.container.OutputContainer, channels: int, sample_rate: int) -> av.AudioStream:
    stream = container.add_stream("aac", rate=sample_rate)
    stream.layout = "mono" if channels == 1 else "stereo"
    stream.bit_rate = 64_000 * channels
    return stream


def _encode_audio(
    container: av.container.OutputContainer, stream: av.AudioStream, planar: np.ndarray, start: int, stop: int
) -> int:
    """Encode samples [start, stop) of planar [ch, n] audio in AAC-sized frames; return where it stopped."""
    stop = min(stop, planar.shape[1])
    layout = "mono" if planar.shape[0] == 1 else "stereo"
    for begin in range(start, stop, AUDIO_CHUNK):
        chunk = np.ascontiguousarray(planar[:, begin : min(begin + AUDIO_CHUNK, stop)])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = stream.rate
        frame.pts = begin
        frame.time_base = Fraction(1, stream.rate)
        container.mux(stream.encode(frame))
    return max(start, stop)


def write_video(
    path: str | os.PathLike,
    frames: torch.Tensor | np.ndarray,
    fps: float,
    audio: torch.Tensor | np.ndarray | None = None,
    sample_rate: int = 16000,
) -> Path:
    """Write uint8 frames [T, H, W, 3] as H.264 mp4 (odd sizes padded to even), with an AAC track if `audio`."""
    frames = _as_numpy(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be non-empty uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    frames = _pad_even(frames)
    path = Path(path)
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        video = _add_video_stream(container, fps, frames.shape[2], frames.shape[1])
        planar = _channels_first(audio) if audio is not None else None
        audio_stream = _add_audio_stream(container, planar.shape[0], sample_rate) if planar is not None else None
        audio_done = 0
        for index, rgb in enumerate(frames):
            _encode_frame(container, video, rgb, index)
            if audio_stream is not None:  # interleave: the audio that plays up to the end of this frame
                until = round((index + 1) * sample_rate / fps)
                audio_done = _encode_audio(container, audio_stream, planar, audio_done, until)
        container.mux(video.encode(None))
        if audio_stream is not None:  # audio longer than the video, then the encoder's tail
            _encode_audio(container, audio_stream, planar, audio_done, planar.shape[1])
            container.mux(audio_stream.encode(None))
    return path


def _add_video_stream(container: av.container.OutputContainer, fps: float, width: int, height: int
                      ) -> av.VideoStream:
    video = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
    video.width, video.height = width, height
    video.pix_fmt = "yuv420p"
    # one thread: the bytes come out the same on every machine, so committed samples do not churn
    video.options = {"crf": "23", "preset": "medium", "threads": "1"}
    return video


def _encode_frame(container: av.container.OutputContainer, video: av.VideoStream, rgb: np.ndarray, index: int) -> None:
    # converted here, not inside encode(): PyAV's implicit conversion there is not repeatable
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
    frame.pts = index
    container.mux(video.encode(frame))


def caption_frame(rgb: np.ndarray, text: str) -> np.ndarray:
    """The frame with `text` drawn at its top left, white on a dark band, sized to the frame."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, image.height // 16))
    left, top, right, bottom = draw.textbbox((4, 2), text, font=font)
    draw.rectangle((0, 0, right + 4, bottom + 3), fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def write_video_frames(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float) -> Path:
    """Write uint8 frames [H, W, 3] as H.264 mp4 as they come (memory flat over length; odd sizes padded)."""
    path = Path(path)
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        video, count = None, 0
        for rgb in frames:
            rgb = _pad_even(np.asarray(rgb)[None])[0]
            if video is None:
                video = _add_video_stream(container, fps, rgb.shape[1], rgb.shape[0])
            _encode_frame(container, video, rgb, count)
            count += 1
        if video is None:
            raise ValueError("no frames to write")
        container.mux(video.encode(None))
    return path


def write_audio(path: str | os.PathLike, samples: torch.Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write float samples [n] or [n, ch] in [-1, 1] as wav/flac/ogg (chosen by the suffix)."""
    path = Path(path)
    if path.suffix.lower() not in AUDIO_FORMATS:
        raise UsageError(f"audio output must end in one of {', '.join(AUDIO_FORMATS)}", path)
    file_format, subtype = AUDIO_FORMATS[path.suffix.lower()]
    samples = np.clip(_as_numpy(samples).astype(np.float32), -1.0, 1.0)
    with atomic_path(path) as tmp:
        # the temp file ends in .tmp, so the format cannot be guessed from the name
        sf.write(tmp, samples, sample_rate, format=file_format, subtype=subtype)
    return path
