"""Write samples/: small real photos, generated images, short clips and spoken sentences.

Run: python scripts/make_samples.py   (needs the packages that bundle the photos and the voice:
scikit-learn, scikit-image, espeakng-loader). Deterministic: the seed is fixed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF
from PIL import Image

from dsfuse.data.media import write_audio, write_video
from dsfuse.data.speech import EMOTION_PROSODY, list_voices, synthesize
from dsfuse.data.synth import DIRECTIONS, moving_shape_clip, shapes_image, tone
from dsfuse.io import atomic_path, write_text

SEED = 1234
ROOT = Path(__file__).resolve().parent.parent / "samples"
PHOTO_SHORT_SIDE = 256
GENERATED_COUNT, GENERATED_SIZE = 16, 128
CLIP_SECONDS, CLIP_FPS, CLIP_SIZE = 2.0, 12, 64
AUDIO_RATE = 16000
TONE_HZ = {"left": 330.0, "right": 440.0, "up": 554.0, "down": 659.0}  # a pitch per clip: E4, A4, C#5, E5
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "I did not expect to see you here today.",
    "Please put the book back on the shelf.",
    "We are leaving for the station in ten minutes.",
    "That was the last train of the evening.",
    "Can you tell me where the museum is?",
)

# name -> (loader, source and licence line for the README)
PHOTOS = {
    "china.jpg": (
        lambda: _sklearn_image("china.jpg"),
        "scikit-learn `load_sample_image('china.jpg')`; photo by danielbuechele on Flickr "
        "(https://www.flickr.com/photos/danielbuechele/6061409035), CC BY 2.0",
    ),
    "flower.jpg": (
        lambda: _sklearn_image("flower.jpg"),
        "scikit-learn `load_sample_image('flower.jpg')`; photo by vultilion on Flickr "
        "(https://www.flickr.com/photos/vultilion/6056698931), CC BY 2.0",
    ),
    "astronaut.jpg": (
        lambda: _skimage_image("astronaut"),
        "scikit-image `data.astronaut()`; Eileen Collins, NASA Great Images database, public domain",
    ),
    "coffee.jpg": (
        lambda: _skimage_image("coffee"),
        "scikit-image `data.coffee()`; courtesy of Pikolo Espresso Bar, CC0 by the photographer (Rachel Michetti)",
    ),
    "chelsea.jpg": (
        lambda: _skimage_image("chelsea"),
        "scikit-image `data.chelsea()`; Chelsea the cat, CC0 by the photographer (Stefan van der Walt)",
    ),
    "rocket.jpg": (
        lambda: _skimage_image("rocket"),
        "scikit-image `data.rocket()`; DSCOVR launch on Falcon 9, SpaceX, public domain",
    ),
}


def _sklearn_image(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(name)


def _skimage_image(name: str) -> np.ndarray:
    from skimage import data  # these few images ship inside the wheel: no download

    return getattr(data, name)()


def clear(folder: Path, pattern: str) -> Path:
    """Remove the outputs of an earlier run, so a renamed sample leaves nothing stale behind."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(pattern):
        old.unlink()
    return folder


def save_image(path: Path, pixels: np.ndarray, **options: object) -> None:
    """Save an RGB uint8 array atomically, in the format named by the suffix."""
    image_format = {".jpg": "JPEG", ".png": "PNG"}[path.suffix]
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format=image_format, **options)


def short_side(pixels: np.ndarray, side: int) -> np.ndarray:
    """Resize so the shorter side is `side` px, keeping the aspect ratio."""
    image = Image.fromarray(pixels).convert("RGB")
    scale = side / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS))


def make_photos(folder: Path) -> list[str]:
    lines = []
    for name, (load, credit) in PHOTOS.items():
        save_image(folder / name, short_side(load(), PHOTO_SHORT_SIDE), quality=90)
        lines.append(f"- `images/photos/{name}`: {credit}.")
    return lines


def make_generated(folder: Path, rng: np.random.Generator) -> None:
    for index in range(GENERATED_COUNT):
        save_image(folder / f"shapes_{index:02d}.png", shapes_image(GENERATED_SIZE, rng))


def make_clips(folder: Path, rng: np.random.Generator) -> None:
    frames = round(CLIP_SECONDS * CLIP_FPS)
    for direction in DIRECTIONS:
        clip = moving_shape_clip(direction, frames, CLIP_SIZE, rng)
        audio = tone(TONE_HZ[direction], CLIP_SECONDS, AUDIO_RATE, rng)
        write_video(folder / f"{direction}.mp4", clip, CLIP_FPS, audio, AUDIO_RATE)
    write_video(folder / "no_audio.mp4", moving_shape_clip("right", frames, CLIP_SIZE, rng), CLIP_FPS)


def make_speech(folder: Path) -> None:
    voices = list_voices()
    for emotion, prosody in EMOTION_PROSODY.items():
        for index, sentence in enumerate(SENTENCES, start=1):
            # a different speaker per sentence, the same set of speakers for every emotion
            voice = voices[(index - 1) % len(voices)]
            samples, rate = synthesize(sentence, dataclasses.replace(prosody, voice=voice))
            resampled = AF.resample(torch.from_numpy(samples), rate, AUDIO_RATE).numpy()
            # resampling can overshoot a loud voice past full scale: scale down rather than clip
            resampled *= min(1.0, 0.97 / max(float(np.abs(resampled).max()), 1e-9))
            write_audio(folder / f"{emotion}_{index:02d}.wav", resampled, AUDIO_RATE)


def readme(photo_lines: list[str]) -> str:
    voices = ", ".join(f"`{v}`" for v in list_voices()[: len(SENTENCES)])
    sentences = "\n".join(f"  {i:02d}. {s}" for i, s in enumerate(SENTENCES, start=1))
    tones = ", ".join(f"{d} {hz:g} Hz" for d, hz in TONE_HZ.items())
    return f"""# samples

Small media for the demo and the tests. All of it is written by `scripts/make_samples.py`
(seed {SEED}); regenerate with

    python scripts/make_samples.py

which needs scikit-learn, scikit-image and espeakng-loader (`pip install -e '.[test]' scikit-image`).

## images/photos/ (real photographs, short side {PHOTO_SHORT_SIDE} px, JPEG quality 90)
{chr(10).join(photo_lines)}

## images/generated/
- `shapes_NN.png`: {GENERATED_COUNT} synthetic {GENERATED_SIZE} px images of random shapes on a gradient
  (`dsfuse.data.synth.shapes_image`), made by scripts/make_samples.py, CC0.

## video/
- `left.mp4`, `right.mp4`, `up.mp4`, `down.mp4`: synthetic {CLIP_SECONDS:g} s, {CLIP_FPS} fps, {CLIP_SIZE}x{CLIP_SIZE}
  H.264 clips of a shape moving in the named direction (`dsfuse.data.synth.moving_shape_clip`), with an AAC
  mono {AUDIO_RATE} Hz track: a tone whose pitch names the clip ({tones}). Made by scripts/make_samples.py, CC0.
- `no_audio.mp4`: the same kind of clip (moving right) with no audio track. Synthetic, CC0.

## speech/
- `EMOTION_NN.wav` (EMOTION in {", ".join(EMOTION_PROSODY)}): {AUDIO_RATE} Hz mono 16-bit wav, sentence NN spoken by
  the espeak-ng synthesizer (bundled by the espeakng-loader wheel; `dsfuse.data.speech`) with the prosody
  `EMOTION_PROSODY[EMOTION]`; sentence NN uses voice NN of {voices}. Synthetic, made by
  scripts/make_samples.py, CC0. The sentences:
{sentences}
"""


def main() -> None:
    rng = np.random.default_rng(SEED)
    photo_lines = make_photos(clear(ROOT / "images" / "photos", "*.jpg"))
    make_generated(clear(ROOT / "images" / "generated", "*.png"), rng)
    make_clips(clear(ROOT / "video", "*.mp4"), rng)
    make_speech(clear(ROOT / "speech", "*.wav"))
    write_text(ROOT / "README.md", readme(photo_lines))
    files = [p for p in ROOT.rglob("*") if p.is_file()]
    print(f"wrote {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.2f} MB, under {ROOT}")


if __name__ == "__main__":
    main()
