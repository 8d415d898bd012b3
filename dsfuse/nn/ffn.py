"""Feed-forward blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """The gated feed-forward of Llama and DeepSeek: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=bias)  # up
        self.w2 = nn.Linear(hidden, dim, bias=bias)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
