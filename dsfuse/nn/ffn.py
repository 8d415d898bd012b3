"""Feed-forward blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """silu(gate) * up; with a `limit` (DeepSeek-V4's swiglu_limit) gate is clipped above at it and up to
    +-limit first."""
    if limit:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """The gated feed-forward of Llama and DeepSeek: w2(silu(w1 x) * w3 x), optionally clipped (`swiglu`)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, limit: float = 0.0):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(dim, hidden, bias=bias)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=bias)  # up
        self.w2 = nn.Linear(hidden, dim, bias=bias)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))
