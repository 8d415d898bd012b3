"""Speech synthesis, media writers, synthetic generators and the committed samples/."""

from __future__ import annotations

import importlib.util
import sys

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from dsfuse.data import samples_dir, speech
from dsfuse.data.media import write_audio, write_video
from dsfuse.data.synth import DIRECTIONS, moving_shape_clip, shapes_image, tone
from dsfuse.errors import UsageError

# the `test` extra installs it: the voice is its shared library
needs_espeak = pytest.mark.skipif(importlib.util.find_spec("espeakng_loader") is None, reason="no espeakng-loader")


def decode(path) -> tuple[np.ndarray, np.ndarray | None]:
    """All frames [T, H, W, 3] and, if there is an audio track, its samples [ch, n]."""
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return frames, None
        audio = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    return frames, audio


def dominant_hz(samples: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * sample_rate / len(samples))


def shape_centroids(clip: np.ndarray) -> np.ndarray:
    """(x, y) of the saturated pixels per frame: the shape is coloured, the background grey."""
    saturation = clip.max(axis=-1).astype(int) - clip.min(axis=-1)
    mask = saturation > 80
    ys, xs = np.mgrid[0 : clip.shape[1], 0 : clip.shape[2]]
    return np.array([(xs[m].mean(), ys[m].mean()) for m in mask])


# --- speech -----------------------------------------------------------------------------------


@needs_espeak
def test_synthesize_speaks() -> None:
    samples, rate = speech.synthesize("Hello there.")
    assert rate == speech.SAMPLE_RATE == 22050
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert np.abs(samples).max() <= 1.0
    assert np.sqrt(np.mean(samples**2)) > 0.02  # not silence
    assert 0.3 < len(samples) / rate < 3.0


@needs_espeak
def test_longer_text_longer_audio_faster_rate_shorter() -> None:
    short, _ = speech.synthesize("One two.")
    long, _ = speech.synthesize("One two three four five six seven eight.")
    fast, _ = speech.synthesize("One two three four five six seven eight.", speech.Prosody(rate=350))
    assert len(long) > 2 * len(short)
    assert len(fast) < 0.7 * len(long)


@needs_espeak
def test_emotions_differ_in_pace_and_loudness() -> None:
    text = "We are leaving for the station in ten minutes."
    sad, _ = speech.synthesize(text, speech.EMOTION_PROSODY["sad"])
    angry, _ = speech.synthesize(text, speech.EMOTION_PROSODY["angry"])
    assert len(sad) > 1.3 * len(angry)
    assert np.sqrt(np.mean(angry**2)) > 1.5 * np.sqrt(np.mean(sad**2))


@needs_espeak
def test_every_listed_voice_speaks_and_bad_voices_are_errors() -> None:
    voices = speech.list_voices()
    assert len(voices) >= 5 and "en" in voices
    lengths = {len(speech.synthesize("Yes.", speech.Prosody(voice=v))[0]) for v in voices}
    assert min(lengths) > 0
    for bad in ("xx-nowhere", "en+nosuchvariant"):
        with pytest.raises(UsageError):
            speech.synthesize("Yes.", speech.Prosody(voice=bad))


def test_missing_loader_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speech, "_engine", None)
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import now fails
    with pytest.raises(UsageError, match="pip install espeakng-loader"):
        speech.synthesize("Hello.")


# --- media writers ----------------------------------------------------------------------------


def test_write_video_round_trip_with_audio(tmp_path) -> None:
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(moving_shape_clip("right", 18, 48, rng))
    audio = tone(440.0, 1.5, 16000, rng)
    path = write_video(tmp_path / "clip.mp4", frames, fps=12, audio=audio, sample_rate=16000)
    decoded, sound = decode(path)
    assert decoded.shape == (18, 48, 48, 3)
    assert np.abs(decoded.astype(int) - frames.numpy()).mean() < 8  # lossy, but the same picture
    assert sound is not None and sound.shape[0] == 1
    assert abs(sound.shape[1] / 16000 - 1.5) < 0.1
    assert abs(dominant_hz(sound[0], 16000) - 440.0) < 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temp file left


def test_write_video_without_audio_and_odd_size(tmp_path) -> None:
    frames = np.random.default_rng(1).integers(0, 256, size=(5, 31, 45, 3), dtype=np.uint8)
    decoded, sound = decode(write_video(tmp_path / "odd.mp4", frames, fps=25))
    assert decoded.shape == (5, 32, 46, 3)  # padded to even for yuv420p
    assert sound is None


def test_failed_write_leaves_nothing(tmp_path) -> None:
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError):
        write_video(tmp_path / "bad.mp4", frames, fps=10, audio=np.zeros((100, 5), np.float32))
    with pytest.raises(ValueError):
        write_video(tmp_path / "bad.mp4", frames.astype(np.float32), fps=10)
    with pytest.raises(Exception):
        write_audio(tmp_path / "bad.wav", np.zeros((2, 3, 4), np.float32), 16000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_write_audio_round_trip(tmp_path, suffix: str) -> None:
    samples = tone(220.0, 0.5, 8000, np.random.default_rng(2))
    path = write_audio(tmp_path / f"a{suffix}", samples, 8000)
    back, rate = sf.read(path, dtype="float32")
    assert rate == 8000 and back.shape == samples.shape
    assert np.abs(back - samples).max() < 2 / 32768  # 16-bit PCM
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_write_audio_stereo_and_bad_suffix(tmp_path) -> None:
    stereo = np.stack([tone(220.0, 0.2, 8000, np.random.default_rng(i)) for i in range(2)], axis=1)
    back, _ = sf.read(write_audio(tmp_path / "s.wav", stereo, 8000), dtype="float32")
    assert back.shape == stereo.shape
    with pytest.raises(UsageError):
        write_audio(tmp_path / "s.mp3", stereo, 8000)


# --- synthetic generators ---------------------------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_moving_shape_moves_in_its_direction(direction: str) -> None:
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    for seed in range(3):
        clip = moving_shape_clip(direction, 16, 64, np.random.default_rng(seed))
        assert clip.shape == (16, 64, 64, 3) and clip.dtype == np.uint8
        centroids = shape_centroids(clip)
        motion = centroids[-1] - centroids[0]
        along, across = (0, 1) if step[0] else (1, 0)
        assert motion[along] * sum(step) > 5  # moved several pixels the stated way
        assert abs(motion[across]) < 1  # and not sideways
        assert np.all(np.diff(centroids[:, along]) * sum(step) > 0)  # steadily, every frame


def test_moving_shape_bad_direction() -> None:
    with pytest.raises(ValueError):
        moving_shape_clip("sideways", 4, 32, np.random.default_rng(0))


def test_generators_are_deterministic() -> None:
    a, b = (shapes_image(64, np.random.default_rng(7)) for _ in range(2))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, shapes_image(64, np.random.default_rng(8)))
    assert a.reshape(-1, 3).std(axis=0).mean() > 10  # not a flat image
    x, y = (tone(300.0, 0.25, 8000, np.random.default_rng(3)) for _ in range(2))
    assert x.dtype == np.float32 and x.shape == (2000,) and np.array_equal(x, y)
    assert abs(dominant_hz(x, 8000) - 300.0) < 5


# --- the committed samples --------------------------------------------------------------------


def test_committed_samples() -> None:
    root = samples_dir()
    assert len(list((root / "images" / "photos").glob("*.jpg"))) >= 4
    assert len(list((root / "images" / "generated").glob("*.png"))) >= 8
    pitches = {}
    for direction in DIRECTIONS:
        frames, sound = decode(root / "video" / f"{direction}.mp4")
        assert frames.shape == (24, 64, 64, 3) and sound is not None
        pitches[direction] = dominant_hz(sound[0], 16000)
    assert len({round(p) for p in pitches.values()}) == 4  # the tone tells the clips apart
    assert decode(root / "video" / "no_audio.mp4")[1] is None
    wavs = sorted((root / "speech").glob("*.wav"))
    assert {w.stem.split("_")[0] for w in wavs} == set(speech.EMOTION_PROSODY)
    info = sf.info(wavs[0])
    assert info.samplerate == 16000 and info.channels == 1
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 10_000_000


def test_writing_a_video_is_repeatable(tmp_path):
    """The same frames give the same bytes, every time: --seed makes a dataset, not a lottery."""
    import hashlib

    from dsfuse.data.motion import write_motion_dataset

    digests = {hashlib.md5(b"".join(p.read_bytes() for p in write_motion_dataset(tmp_path / str(i), 3))).hexdigest()
               for i in range(4)}
    assert len(digests) == 1
