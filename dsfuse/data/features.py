"""Feature tensors on disk: read [N, D] (or [h, w, D]) tokens from .safetensors / .npy, write compressed ones.

`read_features` is the one reader of token features the commands share (moe-inspect --input,
compress-tokens on tensor files)."""

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
from dsfuse.errors import InputError, UsageError
from dsfuse.io import atomic_path


@dataclass
class Features:
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
        raise InputError(f"not a readable safetensors file ({str(e).splitlines()[0]})", path) from None


def read_tensor_file(path: Path) -> torch.Tensor:
    """The one array in a .npy, or in a .safetensors the tensor named `tokens` or its only tensor."""
    if not path.is_file():
        raise InputError("file not found", path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            # memory-mapped first: a header that declares more data than the file holds fails here, unallocated
            array = np.array(np.load(path, allow_pickle=False, mmap_mode="r"))
        except (ValueError, OSError, EOFError) as e:
            raise InputError(f"cannot read the .npy array ({str(e).splitlines()[0]})", path) from None
        return torch.from_numpy(array)
    if suffix != ".safetensors":
        raise InputError("expected a tensor file (.npy or .safetensors, [N, D] features)", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            name = "tokens" if "tokens" in names else names[0] if len(names) == 1 else None
            if name is None:
                raise InputError(f"holds {len(names)} tensors ({', '.join(names[:5])}); name the features 'tokens'",
                                 path)
            return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"cannot read the safetensors file ({str(e).splitlines()[0]})", path) from None


def read_features(path: Path) -> Features:
    """Token features from a tensor file, checked as `as_token_grid` does."""
    return as_token_grid(read_tensor_file(path), path)


def as_token_grid(tensor: torch.Tensor, path: Path) -> Features:
    """Check a feature tensor: floats, [N, D] or [h, w, D], not empty."""
    if tensor.numel() == 0:
        raise InputError(f"the tensor is empty (shape {list(tensor.shape)})", path)
    if not tensor.is_floating_point():
        raise InputError(f"features must be floats, got {str(tensor.dtype).removeprefix('torch.')}", path)
    if tensor.dim() not in (2, 3):
        raise InputError(f"features must be [N, D] or [h, w, D], got shape {list(tensor.shape)}", path)
    if not torch.isfinite(tensor).all():
        raise InputError("the tensor holds NaN or infinite values", path)
    if tensor.dim() == 3:
        return Features(tensor.reshape(-1, tensor.shape[-1]).float(), (tensor.shape[0], tensor.shape[1]))
    return Features(tensor.float(), None)


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



def patch_tokens(image_path: Path, side: int = 16, patch: int = 4) -> torch.Tensor:
    """Real tokens without a trained encoder: the (side*patch)^2 px image cut into side x side patches,
    each flattened to a 3*patch*patch vector (ViT's patch embedding before its projection)."""
    from einops import rearrange

    from dsfuse.data.images import load_image

    image = load_image(image_path, side * patch)
    return rearrange(image, "c (h p) (w q) -> (h w) (c p q)", p=patch, q=patch)
