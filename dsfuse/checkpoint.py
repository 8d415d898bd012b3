"""One checkpoint format for every model: a `.safetensors` file of weights plus
metadata `{"dsfuse": version, "kind": ..., "config": <JSON of the config dataclass>}`.

Loading rebuilds the model from the config alone. Pickles are never loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as _load_weights
from safetensors.torch import save_model as _save_weights

from dsfuse import __version__
from dsfuse.errors import UsageError
from dsfuse.io import atomic_path

# kind -> "module:Class". The class takes one config dataclass, exposed as `Class.Config`.
MODEL_KINDS: dict[str, str] = {
    "toy": "dsfuse.models.toy:ToyRegressor",
    "vqvae": "dsfuse.models.vqvae:VQVAE",
    "llama": "dsfuse.models.llama:Llama",
    "moe": "dsfuse.models.moe:MoEClassifier",
    "video": "dsfuse.models.video:VideoClassifier",
    "audio": "dsfuse.models.audio:AudioEmotionClassifier",
    "compressor": "dsfuse.models.compressor:TokenCompressor",
    "av-fusion": "dsfuse.models.av_fusion:AVFusionClassifier",
    "av-video": "dsfuse.models.av_video:AudioVisualVideoClassifier",
    "audio-text": "dsfuse.models.audio_text:AudioTextClassifier",
    "unet": "dsfuse.models.unet:UNet",
}

MODEL_FILE = "model.safetensors"
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def model_class(kind: str) -> type[torch.nn.Module]:
    if kind not in MODEL_KINDS:
        raise UsageError(f"unknown model kind {kind!r}")
    module, name = MODEL_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory stands for the `model.safetensors` inside it."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise UsageError("checkpoint not found", path)
    return path


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, kind: str, config: Any,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write weights + metadata atomically; `extra` holds JSON-able facts such as class names."""
    config_json = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    metadata = {"dsfuse": __version__, "kind": kind, "config": json.dumps(config_json)}
    if extra:
        metadata["extra"] = json.dumps(extra)
    with atomic_path(path) as tmp:
        _save_weights(model, str(tmp), metadata=metadata)
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of a checkpoint, refusing anything that is not a dsfuse safetensors file."""
    path = resolve_checkpoint(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_PICKLE_MAGIC):
        raise UsageError("refusing a pickle/torch.save file; dsfuse loads only .safetensors checkpoints", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"not a readable safetensors file ({str(e).splitlines()[0]})", path) from None
    if "kind" not in raw or "config" not in raw:
        raise UsageError("not a dsfuse checkpoint (no kind/config metadata)", path)
    return {
        "dsfuse": raw.get("dsfuse"),
        "kind": raw["kind"],
        "config": json.loads(raw["config"]),
        "extra": json.loads(raw.get("extra", "{}")),
    }


def build_model(kind: str, config: dict[str, Any]) -> torch.nn.Module:
    """Rebuild a model of `kind` from its config dict alone."""
    cls = model_class(kind)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    return cls(cls.Config(**{k: v for k, v in config.items() if k in fields}))


def load_checkpoint(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None,
                    device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a model and its metadata; `kind` (one or several) is checked before anything is built."""
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    wanted = (kind,) if isinstance(kind, str) else kind
    if wanted and meta["kind"] not in wanted:
        raise UsageError(f"checkpoint holds a {meta['kind']!r} model, expected {' or '.join(wanted)}", path)
    model = build_model(meta["kind"], meta["config"])
    try:
        _load_weights(model, str(path), strict=True, device=str(device))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise UsageError(f"checkpoint weights do not load ({str(e).splitlines()[0][:200]})", path) from None
    return model.to(device).eval(), meta
