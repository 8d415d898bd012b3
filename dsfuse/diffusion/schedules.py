"""Noise schedules: how much signal is left at each of T forward-process steps (alpha-bar_t).

x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with abar_t falling from ~1 to ~0 over t = 0..T-1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsfuse.choices import Schedule, check


def linear_alphas_cumprod(steps: int) -> torch.Tensor:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 (rescaled so any T spans the same noise)."""
    scale = 1000 / steps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def _from_alpha_bar(alpha_bar, steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Discretise a continuous abar(s), s in [0, 1], into T steps with betas clipped at `max_beta`."""
    s = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    ab = alpha_bar(s)
    betas = (1 - ab[1:] / ab[:-1]).clamp(0, max_beta)
    return torch.cumprod(1 - betas, dim=0)


def cosine_alphas_cumprod(steps: int, offset: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021: abar follows cos^2, so little signal is destroyed early on."""
    return _from_alpha_bar(lambda s: torch.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2, steps)


def sigmoid_alphas_cumprod(steps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """Jabri et al. 2022: abar is a reversed, rescaled sigmoid; suits larger images better than cosine."""
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))

    def alpha_bar(s: torch.Tensor) -> torch.Tensor:
        return ((v_end - torch.sigmoid((s * (end - start) + start) / tau)) / (v_end - v_start)).clamp(1e-9, 1)

    return _from_alpha_bar(alpha_bar, steps)


_BUILDERS: dict[Schedule, Callable[[int], torch.Tensor]] = {
    "linear": linear_alphas_cumprod, "cosine": cosine_alphas_cumprod, "sigmoid": sigmoid_alphas_cumprod}


@dataclass
class NoiseSchedule:
    """abar_t for t = 0..T-1 and the forward process built on it."""

    alphas_cumprod: torch.Tensor  # [T], float64

    @classmethod
    def make(cls, name: Schedule, steps: int = 1000) -> NoiseSchedule:
        return cls(_BUILDERS[check(name, Schedule, "schedule")](steps))

    @property
    def num_steps(self) -> int:
        return len(self.alphas_cumprod)

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) for timesteps t [B], shaped to broadcast over `like`."""
        abar = self.alphas_cumprod.to(like.device)[t.long()].to(like.dtype)
        abar = abar.reshape(-1, *([1] * (like.ndim - 1)))
        return abar.sqrt(), (1 - abar).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) per timestep."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return (abar / (1 - abar)).float()
