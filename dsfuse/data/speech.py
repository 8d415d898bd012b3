"""Offline speech synthesis: the espeak-ng C library (bundled by the `espeakng-loader` wheel) via ctypes.

Used to make small labelled speech samples (speakers, prosodies) without any download or model.
Output is repeatable for the same sequence of calls in a fresh process; espeak-ng keeps a little
waveform state (pitch flutter phase) across utterances, so the same text can differ by a few samples
depending on what was spoken before.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsfuse.errors import UsageError

SAMPLE_RATE = 22050  # espeak-ng's native output rate; espeak_Initialize reports it too

# espeak_AUDIO_OUTPUT and flags from speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit() inside the library
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
# espeak_PARAMETER
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4

# Voices checked to synthesise with this espeak-ng build; "+variant" picks a speaker variant.
_VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en+f3", "en+m3", "en-us+f2", "en+m7", "en+f5")

# int callback(short *wav, int numsamples, espeak_EVENT *events)
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_lock = threading.Lock()
_engine: _Engine | None = None


@dataclass(frozen=True)
class Prosody:
    """How to speak: rate in words/min, pitch and pitch range 0-100, volume 0-200, an espeak voice name."""

    rate: int = 175
    pitch: int = 50
    pitch_range: int = 50
    volume: int = 100
    voice: str = "en"


# Acted emotions as prosody (voice left at the default): the cues listeners use, exaggerated a little.
EMOTION_PROSODY = {
    "neutral": Prosody(),
    "happy": Prosody(rate=205, pitch=72, pitch_range=90, volume=120),  # fast, high, lively
    "sad": Prosody(rate=120, pitch=28, pitch_range=12, volume=75),  # slow, low, flat, quiet
    "angry": Prosody(rate=225, pitch=55, pitch_range=70, volume=150),  # fast, loud (louder clips)
}


class _Engine:
    """The loaded library plus the one synth callback; espeak-ng keeps global state, so one per process."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError:
            message = "speech synthesis needs the espeakng-loader package: pip install espeakng-loader"
            raise UsageError(message) from None
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Synth.restype = ctypes.c_int
        data = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({rate})")
        self.lib, self.sample_rate = lib, rate
        self.variants_dir = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
        self.chunks: list[np.ndarray] = []
        self._callback = _SynthCallback(self._collect)  # kept on self so ctypes does not free it
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, numsamples: int, events) -> int:
        """Copy each block of 16-bit samples out of the library's buffer; 0 means go on."""
        if wav and numsamples > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        return 0

    def set_voice(self, voice: str) -> None:
        """Select `voice` ("en", "en-us", "en+f3"); an unknown "+variant" is an error, not silently ignored."""
        _, _, variant = voice.partition("+")
        if variant and not (self.variants_dir / variant).is_file():
            raise UsageError(f"unknown espeak-ng voice variant {variant!r}", "voice")
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise UsageError(f"unknown espeak-ng voice {voice!r}", "voice")

    def speak(self, text: str, prosody: Prosody) -> np.ndarray:
        """Synthesize `text` with `prosody` into int16 samples (call with the lock held)."""
        self.set_voice(prosody.voice)
        # Parameters after the voice: loading a voice resets some of them.
        for param, value in (
            (_RATE, prosody.rate), (_VOLUME, prosody.volume), (_PITCH, prosody.pitch), (_RANGE, prosody.pitch_range),
        ):  # fmt: skip
            self.lib.espeak_SetParameter(param, int(value), 0)
        encoded = text.encode() + b"\0"
        self.chunks = []
        if hasattr(self.lib, "espeak_ng_SetRandSeed"):  # 1.52+: the noise source restarts every utterance
            self.lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
        status = self.lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed ({status})")
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)


def _get_engine() -> _Engine:
    """The process-wide engine, created on first use (call with the lock held)."""
    global _engine
    if _engine is None:
        _engine = _Engine()
    return _engine


def synthesize(text: str, prosody: Prosody = Prosody()) -> tuple[np.ndarray, int]:
    """Speak `text`: float32 mono samples in [-1, 1] and the sample rate (espeak-ng's native 22050)."""
    with _lock:  # espeak-ng is one global synthesizer: one utterance at a time
        engine = _get_engine()
        samples = engine.speak(text, prosody)
        rate = engine.sample_rate
    return samples.astype(np.float32) / 32768.0, rate


def list_voices() -> list[str]:
    """A handful of English voice names (accents and speaker variants) that synthesize with this build."""
    return list(_VOICES)
