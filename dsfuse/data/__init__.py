"""Data loading, decoding and synthetic sample generators."""

from __future__ import annotations

from pathlib import Path


def samples_dir() -> Path:
    """The bundled samples: the repo's samples/ in a checkout, the packaged copy once installed."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "samples", here / "_samples"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("dsfuse samples not found")
