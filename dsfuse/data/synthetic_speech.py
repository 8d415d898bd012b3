"""A synthetic emotional-speech set: espeak-ng sentences spoken with one prosody per emotion class
(rate, pitch, pitch range, amplitude), by several voices, jittered per clip and with a little noise.

Layout: OUT/<emotion>/<voice>_s<NN>.wav (folder labels; the speaker is the name up to '_'), or, with
held-out voices/sentences, OUT/train/... and OUT/heldout/... where the held-out half shares neither
voices nor sentences with the training half.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dsfuse.data.audio import SAMPLE_RATE, resample
from dsfuse.data.media import write_audio
from dsfuse.data.speech import EMOTION_PROSODY, Prosody, synthesize
from dsfuse.data.transcripts import transcript_path
from dsfuse.errors import UsageError
from dsfuse.io import write_text

# Written for this set: short, emotionally neutral statements and questions of varied length.
SENTENCES = (
    "The meeting has been moved to Thursday afternoon.",
    "I left my umbrella on the bus this morning.",
    "Our neighbours painted their front door green.",
    "The river was higher than anyone remembered.",
    "She counted the boxes twice before signing.",
    "Dinner will be ready in about twenty minutes.",
    "He found the old letters in the attic.",
    "The train to the coast leaves at seven.",
    "Why did nobody tell me about the change?",
    "The garden needs water after such a dry week.",
    "They sold the last tickets an hour ago.",
    "Turn left at the bakery and keep walking.",
    "The printer on the second floor is broken again.",
    "We watched the storm roll in over the hills.",
    "My brother is moving to another city next month.",
    "The results came back much sooner than expected.",
    "Please close the window before you leave.",
    "The children built a tower out of blocks.",
    "Is this the road that goes to the harbour?",
    "The soup tastes different from last time.",
)


# Speakers: English accents x espeak-ng speaker variants (male, female, Klatt), so that a model has to
# hear the emotion's prosody across many pitches and timbres. Held-out voices are taken from the end.
VOICES = (
    "en+m1", "en-us+f1", "en-gb-scotland+m2", "en-gb-x-rp+f2", "en-029+m3", "en+f3", "en-us+m4",
    "en-gb-scotland+f4", "en-gb-x-rp+m5", "en-029+f5", "en+m6", "en-us+klatt", "en-gb-x-rp+m7",
    "en-us-nyc+m2", "en+klatt4", "en-gb-x-gbclan+f4", "en-us+m8", "en-029+f2", "en-gb-scotland+m6", "en+f1",
)


def _jittered(prosody: Prosody, voice: str, rng: np.random.Generator) -> Prosody:
    """The class prosody, varied per clip so the classes are regions rather than points."""
    return replace(prosody, voice=voice,
                   rate=int(prosody.rate * rng.uniform(0.95, 1.05)),
                   pitch=int(np.clip(prosody.pitch + rng.integers(-4, 5), 0, 100)),
                   pitch_range=int(np.clip(prosody.pitch_range + rng.integers(-5, 6), 0, 100)),
                   volume=int(prosody.volume * rng.uniform(0.95, 1.05)))


def synthesize_clip(text: str, prosody: Prosody, rng: np.random.Generator,
                    sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """One utterance at `sample_rate` with a short pause on each side and faint background noise."""
    samples, rate = synthesize(text, prosody)
    wave = resample(torch.from_numpy(samples), rate, sample_rate)
    pause = torch.zeros(int(rng.integers(sample_rate // 20, sample_rate // 5)))
    wave = torch.cat([pause, wave, pause])
    noise = torch.from_numpy(rng.normal(0, rng.uniform(0.001, 0.004), wave.numel()).astype(np.float32))
    return (wave + noise).clamp(-1, 1)


def write_synthetic_set(out: Path, voices: Sequence[str], sentences: Sequence[int],
                        emotions: Sequence[str] = tuple(EMOTION_PROSODY), seed: int = 0,
                        on_clip: Callable[[Path], None] | None = None, transcripts: bool = False) -> list[Path]:
    """Write every (emotion, voice, sentence) clip as OUT/<emotion>/<voice>_s<NN>.wav; return the paths.

    With `transcripts`, the sentence is also written beside each clip as <voice>_s<NN>.txt (for
    audio-text fusion). `on_clip(path)` is called after each clip (for a progress bar).
    """
    unknown = [e for e in emotions if e not in EMOTION_PROSODY]
    if unknown:
        raise UsageError(f"unknown emotion {unknown[0]!r}; choose from {', '.join(EMOTION_PROSODY)}", "--emotions")
    written = []
    for emotion in emotions:
        for voice in voices:
            for sentence in sentences:
                # one generator per clip: a clip is the same whatever else is generated with it
                rng = np.random.default_rng([seed, sentence, list(EMOTION_PROSODY).index(emotion),
                                             VOICES.index(voice)])
                prosody = _jittered(EMOTION_PROSODY[emotion], voice, rng)
                path = out / emotion / f"{voice}_s{sentence:02d}.wav"
                written.append(write_audio(path, synthesize_clip(SENTENCES[sentence], prosody, rng), SAMPLE_RATE))
                if transcripts:
                    write_text(transcript_path(path), SENTENCES[sentence] + "\n")
                if on_clip is not None:
                    on_clip(path)
    return written


def synthetic_split(n_voices: int, n_sentences: int, heldout_voices: int,
                    heldout_sentences: int) -> dict[str, tuple[list[str], list[int]]]:
    """{"train": (voices, sentences), "heldout": (...)} with nothing shared between the two, or {"": ...}."""
    voices = list(VOICES)
    if not 1 <= n_voices <= len(voices):
        raise UsageError(f"voices must be between 1 and {len(voices)}, got {n_voices}", "--voices")
    if not 1 <= n_sentences <= len(SENTENCES):
        raise UsageError(f"sentences must be between 1 and {len(SENTENCES)}, got {n_sentences}", "--sentences")
    if not 0 <= heldout_voices < n_voices:
        raise UsageError(f"held-out voices must be between 0 and {n_voices - 1}", "--heldout-voices")
    if not 0 <= heldout_sentences < n_sentences:
        raise UsageError(f"held-out sentences must be between 0 and {n_sentences - 1}", "--heldout-sentences")
    chosen, sentences = voices[:n_voices], list(range(n_sentences))
    if not heldout_voices and not heldout_sentences:
        return {"": (chosen, sentences)}
    if not (heldout_voices and heldout_sentences):
        raise UsageError("hold out both voices and sentences (or neither)", "--heldout-voices")
    # the held-out voices and sentences are the last of those chosen
    return {"train": (chosen[:-heldout_voices], sentences[:-heldout_sentences]),
            "heldout": (chosen[-heldout_voices:], sentences[-heldout_sentences:])}
