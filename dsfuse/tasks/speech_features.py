"""What `audio-emotion` hears: log-mels, or a pretrained self-supervised encoder's hidden states.

An encoder's weights come through `dsfuse.weights` (cache, download, offline rules); a checkpoint
records their SHA-256 and refuses other weights. Training features are computed once per clip and
kept on disk under the run (`FeatureCache`), memory-mapped back, so later epochs and a resumed run cost
only the classifier.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsfuse.choices import SpeechEncoder
from dsfuse.data.audio import LogMel, MelConfig
from dsfuse.errors import UsageError
from dsfuse.io import atomic_path
from dsfuse.models.speech_ssl import SslFeatures, architecture, build_ssl_model, layer_count, weights_url
from dsfuse.weights import WeightsFile, load_state_dict, resolve, sha256_of

Featurize = Callable[[torch.Tensor], torch.Tensor]  # a waveform [n] at 16 kHz -> features [frames, ...]
MEL_FRAME_RATE, SSL_FRAME_RATE = 100.0, 50.0  # frames per second


@dataclass
class Encoder:
    """How waveforms become the classifier's input; `network` is the pretrained model (None for log-mels)."""

    name: SpeechEncoder
    featurize: Featurize
    frame_rate: float
    sha256: str | None = None  # of the encoder's weights file
    params: dict[str, Any] | None = None  # its architecture
    network: torch.nn.Module | None = None

    @property
    def pretrained(self) -> bool:
        return self.name != "mel"


def open_encoder(name: SpeechEncoder, *, n_mels: int, unfreeze: int = 0, params: dict[str, Any] | None = None,
                 expected_sha256: str | None = None, device: torch.device | str = "cpu",
                 quiet: bool = False) -> Encoder:
    """Log-mels, or the pretrained encoder `name` (architecture `params`, default the bundle's) whose first
    layers below the `unfreeze` fine-tuned ones stay frozen; with `expected_sha256` other weights are refused."""
    if name == "mel":
        return Encoder(name, LogMel(MelConfig(n_mels=n_mels)), MEL_FRAME_RATE)
    params = params or architecture(name)
    if not 0 <= unfreeze < layer_count(params):
        raise UsageError(f"{name} has {layer_count(params)} layers: unfreeze 0 to {layer_count(params) - 1} of them, "
                         f"not {unfreeze}", "--unfreeze")
    path = resolve(WeightsFile(weights_url(name)), option="--encoder", quiet=quiet)
    state = load_state_dict(path)  # first: a damaged file is told to be deleted, not to be other weights
    sha256 = sha256_of(path)
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise UsageError(f"the checkpoint was trained on other {name} weights (SHA-256 {expected_sha256[:12]}...), "
                         f"this file has {sha256[:12]}...", path)
    network = build_ssl_model(name, params)
    try:
        network.load_state_dict(state)
    except RuntimeError:
        raise UsageError(f"weights file does not fit {name}; if it is a cached download, delete it and run again",
                         path) from None
    network = network.to(device)
    return Encoder(name, SslFeatures(network, layer_count(params) - unfreeze), SSL_FRAME_RATE, sha256, params,
                   network)


class FeatureCache:
    """Each clip's features in FOLDER/<key>.pt, the key naming the file (path, size, time) and the encoder."""

    def __init__(self, folder: Path, encoder: Encoder, unfreeze: int):
        self.folder = folder
        self.tag = f"{encoder.name}|{encoder.sha256}|{unfreeze}"

    def _file(self, clip: Path) -> Path:
        stat = clip.stat()
        key = f"{clip.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.tag}"
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()}.pt"

    def load(self, clip: Path) -> torch.Tensor | None:
        """The clip's cached features, memory-mapped (None when not cached, or unreadable)."""
        file = self._file(clip)
        try:
            return torch.load(file, mmap=True, weights_only=True) if file.is_file() else None
        except Exception:
            return None  # a damaged cache entry is computed again

    def save(self, clip: Path, features: torch.Tensor) -> torch.Tensor:
        """Keep `features` (as float16) and return them memory-mapped from the cache."""
        file = self._file(clip)
        with atomic_path(file) as tmp:
            torch.save(features.to(torch.float16).contiguous(), tmp)
        return torch.load(file, mmap=True, weights_only=True)
