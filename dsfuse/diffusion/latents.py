"""Latent diffusion: train in the continuous (pre-quantisation) latent space of a VQ-VAE tokenizer.

The run directory keeps its own copy of the tokenizer (`tokenizer.safetensors`), so a run dir or its
model.safetensors stays samplable wherever it is moved, and no later retraining of the tokenizer can
silently change what the latents mean.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dsfuse.diffusion.pipeline import TOKENIZER_FILE
from dsfuse.io import atomic_path


def load_tokenizer(checkpoint: str | Path, device: torch.device) -> nn.Module:
    """A `vqvae` checkpoint (file or run dir), in eval mode."""
    from dsfuse.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint, kind="vqvae", device=device)
    return model.eval()


def keep_tokenizer(checkpoint: str | Path, run_dir: Path) -> str:
    """Copy the tokenizer checkpoint into the run dir; returns its file name there."""
    from dsfuse.checkpoint import resolve_checkpoint

    source, target = resolve_checkpoint(checkpoint), run_dir / TOKENIZER_FILE
    if source.resolve() != target.resolve():
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    return TOKENIZER_FILE


@torch.no_grad()
def encode_latents(tokenizer: nn.Module, images: torch.Tensor, device: torch.device, quiet: bool = False,
                   batch_size: int = 128, scale: float | None = None) -> tuple[torch.Tensor, float]:
    """Encode images [N, 3, H, W] to latents [N, C, h, w] divided by `scale`, by default the one that gives
    them unit variance (a resumed run passes the scale it was trained with); returns (latents, scale)."""
    latents = []
    for start in tqdm(range(0, len(images), batch_size), desc="encode latents", leave=False, disable=quiet):
        latents.append(tokenizer.encode(images[start:start + batch_size].to(device)).float().cpu())
    z = torch.cat(latents)
    if scale is None:
        scale = float(z.std().clamp_min(1e-6))  # like Stable Diffusion's scale factor: unit-variance latents
    return z / scale, scale
