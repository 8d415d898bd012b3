"""Diffusion apart from the network: noise schedules, prediction targets and the loss, samplers.

A sampler knows the schedule and what the network predicts; the network knows nothing about either.
"""

from dsfuse.diffusion.objectives import Objective, diffusion_loss
from dsfuse.diffusion.samplers import make_sampler, sample
from dsfuse.diffusion.schedules import NoiseSchedule

__all__ = ["Objective", "diffusion_loss", "make_sampler", "sample", "NoiseSchedule"]
