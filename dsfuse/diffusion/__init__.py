"""Diffusion apart from the network: noise schedules, prediction targets and the loss, samplers.

A sampler knows the schedule and what the network predicts; the network knows nothing about either.
"""

from dsfuse.diffusion.objectives import OBJECTIVES, Objective, diffusion_loss
from dsfuse.diffusion.samplers import SAMPLERS, make_sampler, sample
from dsfuse.diffusion.schedules import SCHEDULES, NoiseSchedule

__all__ = ["OBJECTIVES", "Objective", "diffusion_loss", "SAMPLERS", "make_sampler", "sample", "SCHEDULES",
           "NoiseSchedule"]
