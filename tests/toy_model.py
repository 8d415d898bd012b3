"""A tiny regressor: the smallest model that exercises checkpoints and the engine; the tests register
it as the checkpoint kind "toy" (dsfuse itself ships no such kind)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsfuse.checkpoint import MODEL_KINDS


@dataclass
class ToyConfig:
    in_features: int = 8
    hidden: int = 32
    out_features: int = 1
    dropout: float = 0.1


class ToyRegressor(nn.Module):
    Config = ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.net = nn.Sequential(nn.Linear(config.in_features, config.hidden), nn.SiLU(),
                                 nn.Dropout(config.dropout), nn.Linear(config.hidden, config.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODEL_KINDS["toy"] = f"{__name__}:ToyRegressor"
