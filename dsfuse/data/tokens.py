"""Token tensors on disk: read [N, D] (or [h, w, D]) features from .safetensors / .npy, write compressed tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsfuse import __version__
from dsfuse.errors import UsageError
from dsfuse.io import atomic_path

TENSOR_SUFFIXES = (".safetensors", ".npy")


@dataclass
class TokenGrid:
    tokens: torch.Tensor  # [N, D] float
    grid: tuple[int, int] | None  # (h, w) when the file says so


def parse_grid(text: str) -> tuple[int, int]:
    """'24x24' -> (24, 24)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"grid must look like HxW, got {text!r}", "--grid") from None
    if h < 1 or w < 1:
        raise UsageError(f"grid sides must be positive, got {text!r}", "--grid")
    return h, w


def safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"not a readable safetensors file ({str(e).splitlines()[0]})", path) from None


def read_tensor_file(path: Path) -> torch.Tensor:
    """The one array in a .npy, or in a .safetensors the tensor named `tokens` or its only tensor."""
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UsageError(f"not a readable .npy array ({str(e).splitlines()[0]})", path) from None
        return torch.from_numpy(np.ascontiguousarray(array))
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            name = "tokens" if "tokens" in names else names[0] if len(names) == 1 else None
            if name is None:
                raise UsageError(f"holds {len(names)} tensors ({', '.join(names[:5])}); name the features 'tokens'",
                                 path)
            return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"not a readable safetensors file ({str(e).splitlines()[0]})", path) from None


def as_token_grid(tensor: torch.Tensor, path: Path) -> TokenGrid:
    """Check a feature tensor: floats, [N, D] or [h, w, D], not empty."""
    if tensor.numel() == 0:
        raise UsageError(f"the tensor is empty (shape {list(tensor.shape)})", path)
    if not tensor.is_floating_point():
        raise UsageError(f"features must be floats, got {str(tensor.dtype).removeprefix('torch.')}", path)
    if tensor.dim() not in (2, 3):
        raise UsageError(f"features must be [N, D] or [h, w, D], got shape {list(tensor.shape)}", path)
    if not torch.isfinite(tensor).all():
        raise UsageError("the tensor holds NaN or infinite values", path)
    if tensor.dim() == 3:
        return TokenGrid(tensor.reshape(-1, tensor.shape[-1]).float(), (tensor.shape[0], tensor.shape[1]))
    return TokenGrid(tensor.float(), None)


def write_compressed(path: Path, tokens: torch.Tensor, sizes: torch.Tensor, meta: dict[str, Any],
                     source: torch.Tensor | None = None) -> Path:
    """tokens [M, D], sizes [M] (and ToMe's `source` [N]: where each input token went) + JSON metadata."""
    tensors = {"tokens": tokens.detach().float().cpu().contiguous(), "sizes": sizes.detach().float().cpu().contiguous()}
    if source is not None:
        tensors["source"] = source.detach().cpu().to(torch.int64).contiguous()
    metadata = {"dsfuse": __version__, "compressed": json.dumps(meta)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


TOKENIZER_KEYS = ("tokenizer", "fingerprint", "tokenizer_fingerprint")


def _tokenizer_id(record: dict[str, Any]) -> str | None:
    return next((str(record[k]) for k in TOKENIZER_KEYS if record.get(k)), None)


def read_tokens_file(path: Path) -> tuple[list[tuple[str, torch.Tensor]], str | None]:
    """Token-id grids written by `tokenize-image`: ([(name, ids [h, w])], the tokenizer's fingerprint).

    JSON Lines hold `{"file", "grid": [h, w], "tokens": [...]}` per image; a .safetensors holds integer
    grids [h, w] (or a batch [B, h, w]) with the fingerprint in its metadata.
    """
    entries: list[tuple[str, torch.Tensor]] = []
    made_by: set[str] = set()
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                h, w = (int(v) for v in record["grid"])
                ids = torch.tensor(record["tokens"], dtype=torch.long).reshape(h, w)
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                raise UsageError(f"line {number} is not a tokens record ({type(e).__name__})", path) from None
            entries.append((Path(str(record.get("file", f"image{number}"))).name, ids))
            if _tokenizer_id(record):
                made_by.add(_tokenizer_id(record))
    else:
        metadata = safetensors_metadata(path)
        if _tokenizer_id(metadata):
            made_by.add(_tokenizer_id(metadata))
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                ids = f.get_tensor(name)
                if ids.is_floating_point() or ids.dim() not in (2, 3):
                    continue  # not a grid of ids
                grids = ids if ids.dim() == 3 else ids[None]
                entries += [(f"{name}[{i}]" if len(grids) > 1 else name, g.long()) for i, g in enumerate(grids)]
    if not entries:
        raise UsageError("no token grids found in the tokens file", path)
    if len(made_by) > 1:
        raise UsageError("the tokens file mixes tokens of several tokenizers", path)
    return entries, next(iter(made_by), None)
