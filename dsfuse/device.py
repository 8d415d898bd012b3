"""Device choice (CUDA, then MPS, then CPU), AMP dtype and seeding: one place for every command."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from dsfuse.errors import UsageError


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def available_devices() -> list[str]:
    """Every device this machine offers, in `--device` spelling."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        devices.append("mps")
    return devices


def select_device(spec: str = "auto") -> torch.device:
    """Resolve `auto|cpu|cuda|cuda:N|mps`; an unavailable device is an error, never a silent fallback."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps", "--device") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("CUDA was asked for but is not available on this machine", "--device")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UsageError(f"cuda:{index} does not exist; this machine has {torch.cuda.device_count()} GPU(s)", "--device")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise UsageError("MPS was asked for but is not available on this machine", "--device")
        return device
    raise UsageError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps", "--device")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Autocast dtype for training: bf16 (or fp16) on CUDA, none elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) so a run repeats on the same device."""
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (CUDA: free device memory; else free RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: do not refuse
        return 1 << 62


def check_memory(needed: int, device: torch.device, what: str, option: str) -> None:
    """Refuse, in one line naming `option`, work whose tensors would not fit in the memory left."""
    free = available_memory(device)
    if needed > free:
        raise UsageError(f"{what} needs about {needed / 2**30:.1f} GiB, and {device.type} has "
                         f"{free / 2**30:.1f} GiB free", option)
