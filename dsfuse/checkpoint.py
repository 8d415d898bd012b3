"""One checkpoint format for every model: a `.safetensors` file of weights plus metadata, a
`CheckpointMeta`: the kind, the config dataclass as JSON, and what training recorded beside it
(class names, the options the run was started with, a pipeline's setup).

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
    "vqvae": "dsfuse.models.vqvae:VQVAE",
    "llama": "dsfuse.models.llama:Llama",
    "moe": "dsfuse.models.moe:MoEClassifier",
    "video": "dsfuse.models.video:VideoClassifier",
    "audio": "dsfuse.models.audio:AudioEmotionClassifier",
    "compressor": "dsfuse.models.compressor:TokenCompressor",
    "unet": "dsfuse.models.unet:UNet",
    "unified": "dsfuse.models.unified:UnifiedModel",
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


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint records beside its weights."""

    kind: str
    config: dict[str, Any]  # the model's config dataclass, as JSON
    classes: tuple[str, ...] = ()  # a classifier's output names, in order
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the trainer's options (what --resume adopts)
    setup: dict[str, Any] = dataclasses.field(default_factory=dict)  # what a pipeline needs beside the network
    version: str = __version__

    @classmethod
    def of(cls, kind: str, config: Any, **fields: Any) -> CheckpointMeta:
        """The record of a model of `kind` built from the config dataclass `config`."""
        as_json = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        return cls(kind, as_json, **fields)

    def class_names(self, where: object) -> list[str]:
        """The class names, refused with one line when they are missing or do not match the outputs."""
        outputs = self.config.get("num_classes")
        if not self.classes or (outputs is not None and len(self.classes) != outputs):
            raise UsageError("checkpoint has no class names for its outputs", where)
        return list(self.classes)


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, meta: CheckpointMeta) -> Path:
    """Write weights + metadata atomically."""
    metadata = {"dsfuse": meta.version, "kind": meta.kind, "config": json.dumps(meta.config),
                "classes": json.dumps(list(meta.classes)), "options": json.dumps(meta.options, default=str),
                "setup": json.dumps(meta.setup)}
    with atomic_path(path) as tmp:
        _save_weights(model, str(tmp), metadata=metadata)
    return Path(path)


def read_metadata(path: str | os.PathLike) -> CheckpointMeta:
    """The metadata of a checkpoint, refusing anything that is not a dsfuse safetensors file."""
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
    fields = {name: _json_field(raw, name, default, path)
              for name, default in (("config", {}), ("classes", []), ("options", {}), ("setup", {}))}
    if "extra" in raw and "classes" not in raw:
        fields.update(_legacy_fields(_json_field(raw, "extra", {}, path)))
    if not all(isinstance(c, str) for c in fields["classes"]):
        raise UsageError("checkpoint metadata 'classes' is not a list of names", path)
    return CheckpointMeta(raw["kind"], fields["config"], tuple(fields["classes"]), fields["options"],
                          fields["setup"], raw.get("dsfuse", "unknown"))


def _legacy_fields(extra: dict[str, Any]) -> dict[str, Any]:
    """dsfuse 0.1.0 kept class names, run options and the pipeline setup in one untyped `extra` dict."""
    options = {name: extra.pop(name) for name in ("labels", "speaker_norm") if name in extra}
    classes = extra.pop("classes", [])
    return {"classes": classes if isinstance(classes, list) else [], "options": options,
            "setup": extra.get("diffusion", extra)}


def _json_field(raw: dict[str, str], name: str, default: Any, path: Path) -> Any:
    try:
        value = json.loads(raw[name]) if name in raw else default
    except json.JSONDecodeError:
        value = None
    if type(value) is not type(default):
        raise UsageError(f"checkpoint metadata {name!r} is not a JSON {type(default).__name__}", path)
    return value


def build_model(meta: CheckpointMeta, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild the model a checkpoint's metadata describes, from its config alone."""
    cls = model_class(meta.kind)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    try:
        config = cls.Config(**{k: v for k, v in meta.config.items() if k in fields})
        with torch.device(device):
            return cls(config)
    except (TypeError, ValueError) as e:  # a config no model of this kind can have
        raise UsageError(f"checkpoint config does not describe a {meta.kind} model "
                         f"({str(e).splitlines()[0][:200]})") from None


def check_weights_fit(meta: CheckpointMeta, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose config asks for tensors its file does not hold, before any memory is
    spent on them: the model is built on the meta device and its shapes compared with the file's header.
    Tied tensors (one parameter under several names) need to be in the file under one of their names."""
    tied: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for name, tensor in build_model(meta, "meta").state_dict(keep_vars=True).items():
        tied.setdefault(id(tensor), []).append((name, tuple(tensor.shape)))
    with safe_open(str(path), framework="pt") as f:
        present = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    for names in tied.values():
        stored = [(name, shape) for name, shape in names if name in present]
        if not stored:
            raise UsageError(f"checkpoint lacks the tensor {names[0][0]} its config needs", path)
        for name, shape in stored:
            if present[name] != shape:
                raise UsageError(f"tensor {name} has shape {list(present[name])}, the config needs {list(shape)}",
                                 path)


def load_checkpoint(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None,
                    device: torch.device | str = "cpu") -> tuple[torch.nn.Module, CheckpointMeta]:
    """Load a model and its metadata; `kind` (one or several) is checked before anything is built."""
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    check_kind(meta, kind, path)
    check_weights_fit(meta, path)
    model = build_model(meta)
    try:
        _load_weights(model, str(path), strict=True, device=str(device))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise UsageError(f"checkpoint weights do not load ({str(e).splitlines()[0][:200]})", path) from None
    return model.to(device).eval(), meta


def check_kind(meta: CheckpointMeta, kind: str | tuple[str, ...] | None, where: object) -> None:
    """Refuse a checkpoint of another kind than `kind` (one or several; None: any)."""
    wanted = (kind,) if isinstance(kind, str) else kind
    if wanted and meta.kind not in wanted:
        raise UsageError(f"checkpoint holds a {meta.kind!r} model, expected {' or '.join(wanted)}", where)
