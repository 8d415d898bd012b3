"""A trained diffusion model together with what it needs to sample: schedule, objective, class names
and, in latent mode, the tokenizer that decodes its latents. Shared by the diffusion task and bench.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dsfuse import choices
from dsfuse.diffusion.objectives import Objective
from dsfuse.diffusion.samplers import make_sampler, sample
from dsfuse.diffusion.schedules import NoiseSchedule

TOKENIZER_FILE = "tokenizer.safetensors"


@dataclass
class DiffusionSetup:
    """Everything about a diffusion model that is neither its weights nor its classes: the checkpoint's
    `CheckpointMeta.setup` (`dataclasses.asdict` of this)."""

    schedule: choices.Schedule = "cosine"
    objective: choices.Objective = "eps"
    timesteps: int = 1000
    latent_scale: float = 1.0  # latents are divided by this so they have unit variance, like pixels
    tokenizer: str | None = None  # file name of the tokenizer checkpoint beside the model (latent mode)

    @property
    def latent(self) -> bool:
        return self.tokenizer is not None

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.make(self.schedule, self.timesteps)


@dataclass
class DiffusionModel:
    """A denoiser, its setup, its class names (a conditional model's labels) and (latent mode) the
    decoder from latents to pixels."""

    net: nn.Module
    setup: DiffusionSetup
    tokenizer: nn.Module | None = None
    classes: list[str] = field(default_factory=list)

    @property
    def conditional(self) -> bool:
        return bool(self.net.config.num_classes)

    @torch.no_grad()
    def generate(self, n: int, *, sampler: choices.Sampler = "ddim", steps: int = 50, eta: float = 0.0,
                 labels: torch.Tensor | None = None, guidance: float = 1.0, generator: torch.Generator | None = None,
                 batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """n images [n, 3, H, W] in [-1, 1], drawn in batches; labels [n] (None: unconditional)."""
        device = next(self.net.parameters()).device
        cfg = self.net.config
        # Pixels are clipped to their range at every step; latents have no fixed range.
        solver = make_sampler(sampler, self.setup.noise_schedule(), Objective(self.setup.objective), steps,
                              eta=eta, clip_x0=None if self.setup.latent else 1.0)
        images = []
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            batch_labels = labels[start:start + count].to(device) if labels is not None else None
            x = sample(self.net, solver, (count, cfg.in_channels, cfg.image_size, cfg.image_size),
                       labels=batch_labels, guidance=guidance, generator=generator, device=device,
                       progress=progress)
            images.append(self.decode(x))
        return torch.cat(images).clamp(-1, 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels as they are; latents snapped to the tokenizer's codebook, which its decoder was trained on."""
        if self.tokenizer is None:
            return x
        return self.tokenizer.decode(self.tokenizer.quantize(x * self.setup.latent_scale).z_q)


def load_diffusion(checkpoint: str | Path, device: torch.device | str = "cpu") -> DiffusionModel:
    """Load a `unet` checkpoint (a run dir or model.safetensors) and, in latent mode, its tokenizer."""
    from dsfuse.checkpoint import load_checkpoint, resolve_checkpoint
    from dsfuse.errors import UsageError

    path = resolve_checkpoint(checkpoint)
    net, meta = load_checkpoint(path, kind="unet", device=device)
    if not meta.setup:
        raise UsageError("checkpoint has no diffusion setup (schedule, objective) in its metadata", path)
    setup = DiffusionSetup(**meta.setup)
    classes = meta.class_names(path) if net.config.num_classes else []
    tokenizer = None
    if setup.tokenizer:
        tokenizer_path = path.parent / setup.tokenizer
        if not tokenizer_path.is_file():
            raise UsageError(f"latent model without its tokenizer: {setup.tokenizer} must sit beside it", path)
        tokenizer, _ = load_checkpoint(tokenizer_path, kind="vqvae", device=device)
    return DiffusionModel(net, setup, tokenizer, classes)
