"""A Hugging Face model folder on dsfuse's core: config.json, safetensors weights (one file, or shards
with model.safetensors.index.json) and tokenizer.json.

    folder = ModelFolder(path)            # config and architecture read, shards checked, nothing loaded
    model = load_model(folder)            # the whole model, weights in their stored dtype (FP8: bfloat16)
    model = load_model(folder, torch.float32)
    for layer in streamed_layers(folder, skeleton(folder), x):   # one decoder layer resident at a time
        x = layer(x, causal=True)

Tensors are read through memory-mapped `safe_open` handles, one module at a time; FP8 block-wise
weights (DeepSeek-V3/R1/V4's releases, see hf_quant) are dequantised one tensor at a time as they are read.
Everything wrong with the folder is a one-line `UsageError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsfuse.errors import UsageError
from dsfuse.models import deepseek_v4  # noqa: F401  registers DeepseekV4ForCausalLM
from dsfuse.models.causal_lm import CausalLMConfig
from dsfuse.models.hf_arch import Architecture, architecture_of
from dsfuse.models.hf_quant import FLOAT8, Fp8Blocks, quantisation_of, scale_names

INDEX = "model.safetensors.index.json"


class WeightFiles:
    """Tensor name -> shard, read lazily through memory-mapped safetensors handles; FP8 tensors of a
    `quant` checkpoint come back dequantised."""

    def __init__(self, folder: Path, quant: Fp8Blocks | None = None):
        self.folder = folder
        self.quant = quant
        self._handles: dict[str, Any] = {}
        index = folder / INDEX
        if index.is_file():
            try:
                self.where: dict[str, str] = dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise UsageError(f"{INDEX} is not a valid index (no weight_map)", index) from None
            for shard in sorted(set(self.where.values())):
                if not (folder / shard).is_file():
                    raise UsageError(f"missing shard {shard}, named in {INDEX}", folder)
        else:
            shards = sorted(p.name for p in folder.glob("*.safetensors"))
            if not shards:
                raise UsageError("no *.safetensors weights in the model folder", folder)
            self.where = {name: shard for shard in shards for name in self._open(shard).keys()}

    def _open(self, shard: str) -> Any:
        from safetensors import SafetensorError, safe_open

        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
            except (SafetensorError, OSError) as e:
                raise UsageError(f"not a readable safetensors shard ({str(e)[:120]})", self.folder / shard) from None
        return self._handles[shard]

    def release(self) -> None:
        """Close the shards: once no tensor read from them is left, the pages read through their
        mappings stop counting as this process's memory."""
        self._handles.clear()

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name` as stored, or, if it is FP8, dequantised with its scales into `dtype` (None:
        bfloat16, half the memory of float32)."""
        tensor = self._read(name)
        if tensor.dtype not in FLOAT8:
            return tensor
        if self.quant is None:
            raise UsageError(f"tensor {name} is stored as {str(tensor.dtype).removeprefix('torch.')}, but config.json "
                             "declares no quantization_config", self.folder)
        scales = next((s for s in scale_names(name) if s in self.where), None)
        if scales is None:
            raise UsageError(f"the FP8 tensor {name} has no scales (no {' or '.join(scale_names(name))})", self.folder)
        return self.quant.dequantise(name, tensor, self._read(scales), dtype or torch.bfloat16)

    def _read(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise UsageError(f"the checkpoint has no tensor {name}", self.folder)
        return self._open(self.where[name]).get_tensor(name)


class ModelFolder:
    """A checked model folder: its config.json, architecture, dsfuse config and weight files."""

    def __init__(self, path: Path):
        if not path.is_dir():
            raise UsageError("not a model folder", path)
        config = path / "config.json"
        if not config.is_file():
            raise UsageError("no config.json in the model folder", path)
        try:
            self.hf: dict[str, Any] = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"config.json is not valid JSON ({e})", config) from None
        if not isinstance(self.hf, dict):
            raise UsageError("config.json is not a JSON object", config)
        self.path = path
        self.arch: Architecture = architecture_of(self.hf)
        self.quant = quantisation_of(self.hf)
        self.dtype = torch.bfloat16 if self.quant else None  # what "auto" loads: FP8 becomes bfloat16
        try:
            self.config: CausalLMConfig = self.arch.config(self.hf)
        except (ValueError, TypeError) as e:
            raise UsageError(f"config.json does not describe a valid {self.arch.name} ({e})", config) from None
        self.weights = WeightFiles(path, self.quant)

    def tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer` of tokenizer.json."""
        from tokenizers import Tokenizer

        path = self.path / "tokenizer.json"
        if not path.is_file():
            raise UsageError("no tokenizer.json in the model folder", self.path)
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise UsageError(f"tokenizer.json is not a readable tokenizer ({str(e)[:120]})", path) from None


def load_module(folder: ModelFolder, module: nn.Module, prefix: str = "",
                dtype: torch.dtype | None = None) -> nn.Module:
    """Fill `module` (the model, or its submodule at `prefix`, possibly on the meta device) with its
    checkpoint tensors, in `dtype` (None: as stored, and bfloat16 for an FP8 checkpoint). A tensor whose
    shape does not fit is named."""
    dtype = dtype or folder.dtype
    state = {}
    for key, target in module.state_dict(keep_vars=True).items():
        source = folder.arch.source(prefix + key, folder.hf, folder.config)
        tensors = [folder.weights.get(name, dtype) for name in source.names]
        try:
            tensor = source.build(tensors)
        except RuntimeError:
            tensor = None
        if tensor is None or tensor.shape != target.shape:
            shapes = sorted({tuple(t.shape) for t in tensors})
            raise UsageError(f"tensor {source.names[0]} has shape {', '.join(map(str, shapes))}, which does not fit "
                             f"the config ({prefix + key} needs {tuple(target.shape)})", folder.path)
        if any(tensor is t for t in tensors):  # its own memory, so the shard's mapping can be let go
            tensor = tensor.clone()
        cast = dtype is not None and tensor.is_floating_point()  # integer tables (V4's hash routes) stay as they are
        state[key] = tensor.to(dtype) if cast else tensor
    module.load_state_dict(state, strict=True, assign=True)
    folder.weights.release()
    return module


def load_model(folder: ModelFolder, dtype: torch.dtype | None = None) -> nn.Module:
    """The whole model, in eval mode on the CPU, in `dtype` (None: as stored; bfloat16 for FP8 weights)."""
    model = skeleton(folder)
    for name, child in model.named_children():  # module by module: each one's reading pages are let go
        if name == "layers":
            for i, layer in enumerate(child):
                load_module(folder, layer, f"layers.{i}.", dtype)
        elif name != "lm_head" or not folder.config.tie_embeddings:
            load_module(folder, child, f"{name}.", dtype)
    if folder.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


def skeleton(folder: ModelFolder) -> nn.Module:
    """The model with every parameter on the meta device (no memory): `streamed_layers` fills it in turn."""
    with torch.device("meta"):
        return folder.arch.build(folder.config).eval()


def streamed_layers(folder: ModelFolder, model: nn.Module, dtype: torch.dtype | None = None
                    ) -> Iterator[nn.Module]:
    """Each decoder layer of a `skeleton` loaded in turn and emptied again (back to the meta device) once
    the caller asks for the next, so one layer's weights are resident at a time."""
    for i, layer in enumerate(model.layers):
        load_module(folder, layer, f"layers.{i}.", dtype)
        try:
            yield layer
        finally:
            layer.to("meta")
