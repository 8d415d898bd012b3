"""Samplers, separate from the network, in the shape of diffusers' schedulers: `set_timesteps(n)` picks
n of the T training timesteps, and `step(output, t, x)` turns the network's output at x_t into x_prev.

DDPM (ancestral), DDIM (with eta) and DPM-Solver++(2M) all take any number of steps, and all reason in
terms of (x0, eps): what the objective says the network's output means.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn
from tqdm import tqdm

from dsfuse import choices
from dsfuse.diffusion.objectives import Objective
from dsfuse.diffusion.schedules import NoiseSchedule


class Sampler(ABC):
    """Shared bookkeeping: the schedule, the objective, the chosen timesteps and x0 clipping."""

    def __init__(self, schedule: NoiseSchedule, objective: Objective, clip_x0: float | None = 1.0):
        self.schedule, self.objective, self.clip_x0 = schedule, objective, clip_x0
        self.set_timesteps(schedule.num_steps)

    def set_timesteps(self, num_steps: int) -> None:
        """Use `num_steps` timesteps, evenly spaced and "trailing": from T-1 down to T/n - 1, then to x0.

        Ending at T/n - 1 rather than 0 keeps the last jump (to no noise at all) as long as the others;
        a long jump from t = 0 would waste a step, and make multistep solvers extrapolate too far.
        """
        total = self.schedule.num_steps
        if not 1 <= num_steps <= total:
            raise ValueError(f"steps must be between 1 and {total}, got {num_steps}")
        self.timesteps = torch.linspace(total, 0, num_steps + 1)[:-1].round().long() - 1
        following = self.timesteps[1:].tolist() + [-1]
        self._previous = dict(zip(self.timesteps.tolist(), following))  # t -> the timestep after it (-1: done)
        self.reset()

    def reset(self) -> None:
        """Forget state carried between steps (multistep solvers)."""

    def alpha_bar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.schedule.alphas_cumprod[t])

    def predict(self, output: torch.Tensor, t: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) at timestep t; x0 clipped to the data range, eps made consistent with it."""
        abar = self.alpha_bar(t)
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        x0, eps = self.objective.to_x0_eps(output, x, torch.tensor(alpha), torch.tensor(sigma))
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (x - alpha * x0) / sigma
        return x0, eps

    @abstractmethod
    def step(self, output: torch.Tensor, t: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """x at the next (earlier) timestep, from the network's output at t."""


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class DDPMSampler(Sampler):
    """Ancestral sampling from the posterior q(x_s | x_t, x0) (Ho et al. 2020), for any spacing s < t."""

    def step(self, output, t, x, generator=None):
        s = self._previous[int(t)]
        abar_t, abar_s = self.alpha_bar(t), self.alpha_bar(s)
        beta = 1 - abar_t / abar_s  # the effective beta of the jump t -> s
        x0, _ = self.predict(output, t, x)
        mean = (math.sqrt(abar_s) * beta / (1 - abar_t)) * x0 + \
               (math.sqrt(abar_t / abar_s) * (1 - abar_s) / (1 - abar_t)) * x
        if s < 0:
            return mean
        variance = beta * (1 - abar_s) / (1 - abar_t)
        return mean + math.sqrt(variance) * _noise_like(x, generator)


class DDIMSampler(Sampler):
    """Song et al. 2021: eta = 0 is deterministic, eta = 1 matches DDPM's posterior noise."""

    def __init__(self, schedule, objective, clip_x0=1.0, eta: float = 0.0):
        super().__init__(schedule, objective, clip_x0)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta

    def step(self, output, t, x, generator=None):
        s = self._previous[int(t)]
        abar_t, abar_s = self.alpha_bar(t), self.alpha_bar(s)
        x0, eps = self.predict(output, t, x)
        sigma = self.eta * math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
        x_s = math.sqrt(abar_s) * x0 + math.sqrt(max(1 - abar_s - sigma**2, 0.0)) * eps
        if sigma > 0 and s >= 0:
            x_s = x_s + sigma * _noise_like(x, generator)
        return x_s


class DPMSolverPlusPlus2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the data-prediction ODE.

    Deterministic; the first step and the last (to sigma = 0) are first order, the rest reuse the
    previous step's x0 to extrapolate.
    """

    def reset(self) -> None:
        self._last_x0: torch.Tensor | None = None
        self._last_h: float | None = None

    @staticmethod
    def _lambda(abar: float) -> float:
        """log(alpha / sigma), the half log-SNR."""
        return 0.5 * math.log(abar / (1 - abar))

    def step(self, output, t, x, generator=None):
        s = self._previous[int(t)]
        abar_t, abar_s = self.alpha_bar(t), self.alpha_bar(s)
        x0, _ = self.predict(output, t, x)
        if s < 0:  # sigma_s = 0: the ODE's end point is the predicted x0
            self.reset()
            return x0
        h = self._lambda(abar_s) - self._lambda(abar_t)
        data = x0
        if self._last_x0 is not None:
            r = self._last_h / h
            data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._last_x0
        self._last_x0, self._last_h = x0, h
        sigma_ratio = math.sqrt((1 - abar_s) / (1 - abar_t))
        return sigma_ratio * x - math.sqrt(abar_s) * math.expm1(-h) * data


def make_sampler(name: choices.Sampler, schedule: NoiseSchedule, objective: Objective, steps: int,
                 eta: float = 0.0, clip_x0: float | None = 1.0) -> Sampler:
    """A sampler by name (ddpm, ddim, dpm++) with `steps` timesteps set."""
    choices.check(name, choices.Sampler, "sampler")
    if name == "ddpm":
        sampler: Sampler = DDPMSampler(schedule, objective, clip_x0)
    elif name == "ddim":
        sampler = DDIMSampler(schedule, objective, clip_x0, eta=eta)
    else:
        sampler = DPMSolverPlusPlus2M(schedule, objective, clip_x0)
    sampler.set_timesteps(steps)
    return sampler


def guided_output(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                  guidance: float) -> torch.Tensor:
    """The network's output, with classifier-free guidance u + g (c - u) when labels and g != 1 are given."""
    if labels is None or guidance == 1.0:
        return model(x, t, labels)
    null = torch.full_like(labels, model.null_class)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


@torch.no_grad()
def sample(model: nn.Module, sampler: Sampler, shape: tuple[int, ...], *, labels: torch.Tensor | None = None,
           guidance: float = 1.0, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           progress: bool = False) -> torch.Tensor:
    """Draw len(shape[0]) samples: start from noise and take one sampler step per timestep."""
    sampler.reset()
    x = torch.randn(shape, generator=generator, device=device)
    for t in tqdm(sampler.timesteps.tolist(), desc="sample", unit="step", leave=False, disable=not progress):
        timesteps = torch.full((shape[0],), t, device=device, dtype=torch.long)
        x = sampler.step(guided_output(model, x, timesteps, labels, guidance), t, x, generator)
    return x
