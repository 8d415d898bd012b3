"""A token classifier made of DeepSeekMoE blocks: what `train-moe` trains (kind "moe")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsfuse import choices
from dsfuse.nn.moe import MoE, MoEConfig


@dataclass
class MoEModelConfig:
    in_dim: int = 16
    dim: int = 64
    n_layers: int = 2
    n_classes: int = 64
    n_experts: int = 16
    top_k: int = 2
    n_shared: int = 1
    expert_hidden: int = 32
    router: choices.Router = "topk"
    capacity_factor: float = 0.0
    balance_weight: float = 0.01
    z_weight: float = 0.001
    bias_update_rate: float = 0.01

    def moe(self) -> MoEConfig:
        return MoEConfig(dim=self.dim, n_experts=self.n_experts, top_k=self.top_k, n_shared=self.n_shared,
                         expert_hidden=self.expert_hidden, router=self.router, capacity_factor=self.capacity_factor,
                         balance_weight=self.balance_weight, z_weight=self.z_weight,
                         bias_update_rate=self.bias_update_rate)


class MoEBlock(nn.Module):
    def __init__(self, cfg: MoEModelConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.dim)
        self.moe = MoE(cfg.moe())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(self.norm(x))


class MoEClassifier(nn.Module):
    """Embed each token, n_layers residual MoE blocks, classify each token: [B, T, in_dim] -> [B, T, classes]."""

    Config = MoEModelConfig

    def __init__(self, config: MoEModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.in_dim, config.dim)
        self.blocks = nn.ModuleList(MoEBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))
