"""Video decoding with PyAV: clips of T frames at a target fps, seeking instead of decoding whole files.

Frames are chosen by presentation time, not by index, so variable frame rates come out evenly spaced;
rotation metadata is applied; frames are scaled by FFmpeg's swscale while decoding (cheap). Frames are
uint8 tensors [T, H, W, 3]; audio is float32 mono [n].
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset

from dsfuse.errors import InputError, UsageError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".gif")
# Seek rather than decode forward when the next wanted frame is this far ahead; below it, decoding
# the frames in between is cheaper than jumping back to a keyframe.
SEEK_AHEAD_S = 2.0

Size = int | tuple[int, int] | None  # None: as stored; int: short side; (h, w): exactly


@dataclass(frozen=True)
class VideoInfo:
    """What a video is, read from its headers: display size (rotation applied), duration, rate, audio."""

    width: int
    height: int
    duration: float  # seconds
    fps: float  # average frame rate
    rotation: int  # degrees counter-clockwise that the display matrix asks for
    has_audio: bool

    @property
    def frames(self) -> int:
        return max(1, round(self.duration * self.fps))


# --------------------------------------------------------------------------- opening and probing

def _open(path: str | os.PathLike) -> av.container.InputContainer:
    """Open a media file; anything FFmpeg cannot read is this file's one-line failure."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)", path)
    try:
        return av.open(str(path), mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"not a readable video: {_ffmpeg_reason(e)}", path) from None


def _ffmpeg_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or type(e).__name__


def _video_stream(container: av.container.InputContainer, path: str | os.PathLike) -> av.VideoStream:
    if not container.streams.video:
        kind = "an audio-only file" if container.streams.audio else "no video stream or frames"
        raise InputError(f"not a video: {kind}", path)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads: decoding is most of the cost
    return stream


def _rotation(stream: av.VideoStream, first: av.VideoFrame | None) -> int:
    """The display rotation in degrees (0, 90, 180, 270), from the frame's or the stream's display matrix."""
    degrees = first.rotation if first is not None else 0
    if not degrees:
        try:
            degrees = int(float(stream.metadata.get("rotate", 0)))
        except ValueError:
            degrees = 0
    return int(round(degrees / 90.0)) * 90 % 360


def _duration(container: av.container.InputContainer, stream: av.VideoStream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def _fps(stream: av.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 25.0


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video's size, duration, frame rate, rotation and whether it has sound; decodes one frame."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        first = _first_frame(container, stream, path)
        rotation = _rotation(stream, first)
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        duration = _duration(container, stream)
        fps = _fps(stream)
        return VideoInfo(width, height, max(duration, 1.0 / fps), fps, rotation, bool(container.streams.audio))


def _first_frame(container: av.container.InputContainer, stream: av.VideoStream,
                 path: str | os.PathLike) -> av.VideoFrame:
    try:
        for frame in container.decode(stream):
            return frame
    except av.error.FFmpegError as e:
        raise InputError(f"corrupt video: {_ffmpeg_reason(e)}", path) from None
    raise InputError("video has no frames (zero length)", path)


# --------------------------------------------------------------------------- which frames

def clip_starts(duration: float, span: float, clips: int) -> list[float]:
    """Start times of `clips` clips of `span` seconds spread evenly over a video (all 0 if it is shorter)."""
    room = max(duration - span, 0.0)
    if clips == 1:
        return [room / 2]
    return [room * i / (clips - 1) for i in range(clips)]


def clip_times(start: float, frames: int, fps: float) -> np.ndarray:
    """The presentation times of a clip's frames: `frames` steps of 1/fps from `start`."""
    return start + np.arange(frames) / fps


def output_size(width: int, height: int, size: Size) -> tuple[int, int]:
    """(height, width) after scaling to `size`: the short side for an int, exactly for a pair."""
    if size is None:
        return height, width
    if isinstance(size, int):
        scale = size / min(width, height)
        return max(1, round(height * scale)), max(1, round(width * scale))
    return int(size[0]), int(size[1])


# --------------------------------------------------------------------------- decoding

class _FrameCursor:
    """Walks a stream forward in time, handing out the frame on screen at each asked time.

    Asked times must not decrease. It seeks (to the keyframe before) when the next time is more than
    SEEK_AHEAD_S past what was decoded, so a few clips from a long video cost a few short decodes.
    """

    def __init__(self, container: av.container.InputContainer, stream: av.VideoStream, path: str | os.PathLike):
        self.container, self.stream, self.path = container, stream, path
        self.frames: Iterator[av.VideoFrame] | None = None
        self.current: av.VideoFrame | None = None  # the last frame at or before the asked time
        self.upcoming: av.VideoFrame | None = None  # the first decoded frame after it
        self.ended = False
        self.seeks = 0
        self.origin = stream_start(stream)  # asked times count from the first frame, as players show them

    def _start(self, seconds: float | None) -> None:
        """(Re)start decoding, at the keyframe at or before `seconds` (stream time) when given."""
        if seconds is not None:
            # the frame on screen at `seconds` is never before the keyframe at or before it
            self.container.seek(max(int(seconds / self.stream.time_base), 0), stream=self.stream, backward=True)
            self.seeks += 1
        self.frames = self.container.decode(self.stream)
        self.current = self.upcoming = None
        self.ended = False

    def _next(self) -> av.VideoFrame | None:
        try:
            return next(self.frames)  # type: ignore[arg-type]
        except StopIteration:
            return None
        except av.error.FFmpegError as e:
            if self.current is None and self.upcoming is None:
                raise InputError(f"corrupt video: {_ffmpeg_reason(e)}", self.path) from None
            return None  # a damaged tail: keep what decoded

    def frame_at(self, seconds: float) -> av.VideoFrame:
        """The frame on screen `seconds` after the video starts (the first frame before that, the last at the end)."""
        seconds += self.origin
        known = self.upcoming or self.current
        if self.frames is None:
            self._start(seconds if seconds > self.origin + SEEK_AHEAD_S else None)
        elif known is not None and known.time is not None and seconds > known.time + SEEK_AHEAD_S:
            self._start(seconds)
        while not self.ended:
            if self.upcoming is None:
                self.upcoming = self._next()
                if self.upcoming is None:
                    self.ended = True
                    break
            t = self.upcoming.time
            if self.current is not None and t is not None and t > seconds + 1e-6:
                break
            self.current, self.upcoming = self.upcoming, None
        frame = self.current or self.upcoming
        if frame is None:
            raise InputError("video has no frames (zero length)", self.path)
        return frame


def stream_start(stream: av.VideoStream) -> float:
    """When the first frame is shown, in seconds of stream time (often 0; not in MPEG-TS or trimmed files)."""
    return float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0


def _to_rgb(frame: av.VideoFrame, rotation: int, size: Size) -> np.ndarray:
    """One frame as uint8 [H, W, 3] at the display orientation, scaled by swscale while converting."""
    display_w, display_h = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
    out_h, out_w = output_size(display_w, display_h, size)
    stored_w, stored_h = (out_h, out_w) if rotation in (90, 270) else (out_w, out_h)
    rgb = frame.to_ndarray(format="rgb24", width=stored_w, height=stored_h, interpolation="BILINEAR")
    return np.rot90(rgb, k=rotation // 90) if rotation else rgb


def _read_at(container: av.container.InputContainer, stream: av.VideoStream, path: str | os.PathLike,
             times: np.ndarray, size: Size) -> torch.Tensor:
    cursor = _FrameCursor(container, stream, path)
    rotation, last, last_rgb = 0, None, None
    picked: dict[int, np.ndarray] = {}
    for i in np.argsort(times, kind="stable"):
        frame = cursor.frame_at(float(times[i]))
        if frame is not last:  # a frame asked for twice (a low-fps video) is converted once
            if last is None:
                rotation = _rotation(stream, frame)
            last, last_rgb = frame, _to_rgb(frame, rotation, size)
        picked[int(i)] = last_rgb
    return torch.from_numpy(np.stack([picked[i] for i in range(len(times))]))


def read_frames(path: str | os.PathLike, times: Sequence[float], size: Size = None) -> torch.Tensor:
    """The frames on screen at each time in `times` (seconds): uint8 [len(times), H, W, 3].

    Times past the end repeat the last frame, so a short video still gives full clips.
    """
    with _open(path) as container:
        stream = _video_stream(container, path)
        return _read_at(container, stream, path, np.asarray(times, dtype=np.float64), size)


def read_clips(path: str | os.PathLike, frames: int, fps: float, clips: int = 1, size: Size = None,
               starts: Sequence[float] | None = None) -> torch.Tensor:
    """`clips` clips of `frames` frames at `fps`, evenly spread over the video (or at `starts`):
    uint8 [N, T, H, W, 3]."""
    if frames < 1 or clips < 1 or fps <= 0:
        raise UsageError(f"need frames >= 1, clips >= 1 and fps > 0, got {frames}, {clips}, {fps}")
    with _open(path) as container:
        stream = _video_stream(container, path)
        if starts is None:
            starts = clip_starts(_duration(container, stream), frames / fps, clips)
        times = np.concatenate([clip_times(s, frames, fps) for s in starts])
        video = _read_at(container, stream, path, times, size)
    return rearrange(video, "(n t) h w c -> n t h w c", n=len(starts))


def iter_frames(path: str | os.PathLike, size: Size = None) -> Iterator[tuple[float, np.ndarray]]:
    """Every frame of a video in order, as it is decoded: (time in seconds, uint8 [H, W, 3]).
    A video that breaks after its first frame ends there; one with no readable frame is an InputError."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        rotation, origin, count = None, stream_start(stream), 0
        try:
            for frame in container.decode(stream):
                rotation = _rotation(stream, frame) if rotation is None else rotation
                yield frame.time - origin if frame.time is not None else count / _fps(stream), \
                    _to_rgb(frame, rotation, size)
                count += 1
        except av.error.FFmpegError as e:
            if not count:
                raise InputError(f"corrupt video: {_ffmpeg_reason(e)}", path) from None
    if not count:
        raise InputError("video has no frames (zero length)", path)


def read_all_frames(path: str | os.PathLike, size: Size = None) -> tuple[np.ndarray, torch.Tensor]:
    """Every frame of a video: (times in seconds [N], uint8 frames [N, H, W, 3]); for short videos."""
    times, rgbs = zip(*iter_frames(path, size))
    return np.asarray(times, dtype=np.float64), torch.from_numpy(np.stack(rgbs))


def frames_at(times: np.ndarray, frames: torch.Tensor, wanted: np.ndarray) -> torch.Tensor:
    """From decoded (times, frames), the frame on screen at each wanted time (the first one before it)."""
    index = np.searchsorted(times, np.asarray(wanted) + 1e-6, side="right") - 1
    return frames[torch.from_numpy(np.clip(index, 0, len(times) - 1))]


# --------------------------------------------------------------------------- audio

def read_audio_track(path: str | os.PathLike, sample_rate: int = 16000, start: float = 0.0,
                     duration: float | None = None) -> torch.Tensor:
    """The first audio track, downmixed to mono and resampled: float32 [n] for [start, start + duration)."""
    with _open(path) as container:
        if not container.streams.audio:
            raise InputError("no audio track", path)
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        if start > 0:
            container.seek(int(start * av.time_base), backward=True)  # lands at or before `start`
        chunks: list[np.ndarray] = []
        first: float | None = None
        end = None if duration is None else start + duration
        try:
            for frame in container.decode(stream):
                if first is None:
                    first = frame.time if frame.time is not None else 0.0
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
                if end is not None and frame.time is not None and frame.time > end:
                    break
        except av.error.FFmpegError as e:
            if not chunks:
                raise InputError(f"corrupt audio track: {_ffmpeg_reason(e)}", path) from None
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    skip = max(0, round((start - (first or 0.0)) * sample_rate))
    stop = None if duration is None else skip + round(duration * sample_rate)
    return torch.from_numpy(np.ascontiguousarray(audio[skip:stop], dtype=np.float32))


# --------------------------------------------------------------------------- datasets

def find_videos(root: str | os.PathLike) -> list[Path]:
    """Video files under `root`, searched recursively, sorted."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


@dataclass
class VideoFolder(Dataset):
    """Labelled clips from DATA/<class>/*.mp4: `(uint8 [T, H, W, 3], label)` per video.

    In training a clip starts at a random time (torch's RNG, so --resume is exact); otherwise it is
    the middle clip. Short videos are decoded once and kept in memory up to `cache_bytes`.
    Unreadable videos are skipped and listed in `skipped`.
    """

    root: Path
    frames: int
    fps: float
    size: Size
    train: bool = True
    cache_bytes: int = 2 << 30
    files: list[Path] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise UsageError("not a folder of class folders of videos", self.root)
        candidates = self.files or find_videos(self.root)
        loose = [p for p in candidates if p.parent == self.root]
        if loose:
            raise UsageError("training data needs one folder per class; found loose videos", self.root)
        self.files, self.infos = [], []
        for path in candidates:
            try:
                self.infos.append(probe_video(path))
                self.files.append(path)
            except InputError:
                self.skipped.append(path)
        if not self.files:
            raise UsageError(f"no readable videos found ({', '.join(VIDEO_SUFFIXES[:5])}, ...)", self.root)
        names = [p.relative_to(self.root).parts[0] for p in self.files]
        self.classes = self.classes or sorted(set(names))
        self.labels = [self.classes.index(n) for n in names]
        self._cache: dict[int, tuple[np.ndarray, torch.Tensor]] = {}
        self._cached_bytes = 0

    def subset(self, indices: Sequence[int], train: bool) -> VideoFolder:
        """The same folder restricted to `indices` (a train/held-out split), sharing nothing mutable."""
        part = VideoFolder.__new__(VideoFolder)
        part.__dict__.update(self.__dict__)
        part.files = [self.files[i] for i in indices]
        part.infos = [self.infos[i] for i in indices]
        part.labels = [self.labels[i] for i in indices]
        part.train, part._cache, part._cached_bytes = train, {}, 0
        return part

    def __len__(self) -> int:
        return len(self.files)

    def clip_start(self, i: int) -> float:
        room = max(self.infos[i].duration - self.frames / self.fps, 0.0)
        return float(torch.rand(()).item() * room) if self.train else room / 2

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        times = clip_times(self.clip_start(i), self.frames, self.fps)
        if i in self._cache:
            return frames_at(*self._cache[i], times), self.labels[i]
        info = self.infos[i]
        h, w = output_size(info.width, info.height, self.size)
        cost = info.frames * h * w * 3
        if self._cached_bytes + cost <= self.cache_bytes:
            self._cache[i] = read_all_frames(self.files[i], self.size)
            self._cached_bytes += self._cache[i][1].numel()
            return frames_at(*self._cache[i], times), self.labels[i]
        return read_frames(self.files[i], times, self.size), self.labels[i]


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices holding out `fraction` of every class (at least one when it has two)."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        n = min(len(members) - 1, max(1, math.floor(len(members) * fraction))) if len(members) > 1 else 0
        held += members[:n]
        train += members[n:]
    return sorted(train), sorted(held)
