"""scikit-learn's handwritten digits (8x8, 10 classes, bundled with it: no download), upscaled.

A small labelled image set for training and judging diffusion models; needs scikit-learn.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import repeat

from dsfuse.errors import UsageError


def load_digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 3, size, size] in [-1, 1], labels [N]) for all 1797 digits, bilinearly upscaled."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise UsageError("the digits need scikit-learn: pip install scikit-learn") from None
    digits = sklearn_digits()
    pixels = torch.from_numpy(digits.images).float().div(16.0)  # [N, 8, 8], ink in 0..1
    pixels = F.interpolate(repeat(pixels, "n h w -> n 1 h w"), size=(size, size), mode="bilinear",
                           align_corners=False).clamp(0, 1)
    images = repeat(pixels.mul(2).sub(1), "n 1 h w -> n c h w", c=3)
    return images, torch.from_numpy(digits.target).long()


def write_digit_folders(root: str | Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """Write images as PNGs in one folder per class (`0/`..`9/`), the layout `train-ddpm` reads."""
    from dsfuse.data.images import save_png

    root = Path(root)
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        save_png(image, root / str(label) / f"{i:04d}.png")
    return root


def split_digits(images: torch.Tensor, labels: torch.Tensor, holdout_every: int = 5):
    """(train images, train labels, held-out images, held-out labels): every `holdout_every`-th digit held out."""
    held = torch.arange(len(images)) % holdout_every == 0
    return images[~held], labels[~held], images[held], labels[held]
