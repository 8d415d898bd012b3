"""What the network predicts (eps, v or x0), converting its output back to (x0, eps), and the loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsfuse import choices
from dsfuse.diffusion.schedules import NoiseSchedule


@dataclass(frozen=True)
class Objective:
    """A prediction target: eps (the noise), v = alpha eps - sigma x0 (Salimans & Ho 2022), or x0."""

    name: choices.Objective

    def __post_init__(self) -> None:
        choices.check(self.name, choices.Objective, "objective")

    def target(self, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.name == "eps":
            return noise
        if self.name == "v":
            return alpha * noise - sigma * x0
        return x0

    def to_x0_eps(self, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                  sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean image and the noise that the network's `output` at x_t implies."""
        if self.name == "eps":
            return (x_t - sigma * output) / alpha, output
        if self.name == "v":  # alpha^2 + sigma^2 = 1
            return alpha * x_t - sigma * output, sigma * x_t + alpha * output
        return output, (x_t - alpha * output) / sigma.clamp_min(1e-8)

    def min_snr_weight(self, snr: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al. 2023), as the x0 loss weight min(snr, gamma), per target."""
        clipped = snr.clamp(max=gamma)
        if self.name == "eps":
            return clipped / snr
        if self.name == "v":
            return clipped / (snr + 1)
        return clipped


def diffusion_loss(model: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, objective: Objective,
                   labels: torch.Tensor | None = None, min_snr_gamma: float | None = None) -> torch.Tensor:
    """Mean squared error of the prediction at a uniformly drawn timestep, optionally Min-SNR weighted."""
    t = torch.randint(0, schedule.num_steps, (len(x0),), device=x0.device)
    noise = torch.randn_like(x0)
    alpha, sigma = schedule.coefficients(t, x0)
    output = model(alpha * x0 + sigma * noise, t, labels)
    per_sample = F.mse_loss(output.float(), objective.target(x0, noise, alpha, sigma).float(),
                            reduction="none").flatten(1).mean(1)
    if min_snr_gamma:
        per_sample = per_sample * objective.min_snr_weight(schedule.snr(t), min_snr_gamma)
    return per_sample.mean()
