"""Partial, interleaved RoPE (DeepSeek-V4): only the trailing `rope_dim` channels of a head rotate, in
consecutive pairs (2i, 2i+1) rather than Llama's two halves. V4 also rotates an attention output back by its
query's position (`inverse=True`), because its keys double as values and carry the rotation with them.
Context extension (YaRN and the others of `RopeScaling`) reuses the frequencies and cos/sin factor of nn.attention."""

from __future__ import annotations

import torch
from torch import nn

from dsfuse.nn.attention import RopeScaling, rope_frequencies


class InterleavedRope(nn.Module):
    def __init__(self, rope_dim: int, theta: float, scaling: RopeScaling | None = None):
        super().__init__()
        if rope_dim % 2 or rope_dim < 2:
            raise ValueError(f"the rotary dimension must be even and positive, got {rope_dim}")
        self.rope_dim, self.theta, self.scaling = rope_dim, theta, scaling  # no buffer: works built on meta

    def forward(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate the last `rope_dim` channels of x [..., T, D]; `positions` [T] (or [B, 1.., T]) are absolute."""
        inv_freq, factor = rope_frequencies(self.rope_dim, self.theta, self.scaling)
        angles = positions[..., None].float() * inv_freq.to(x.device)
        cos = (angles.cos() * factor).repeat_interleave(2, dim=-1)
        sin = (angles.sin() * factor).repeat_interleave(2, dim=-1)
        if inverse:
            sin = -sin
        keep, rope = x[..., :-self.rope_dim], x[..., -self.rope_dim:]
        pairs = rope.unflatten(-1, (-1, 2))
        swapped = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        rotated = (rope.float() * cos + swapped.float() * sin).to(x.dtype)
        return torch.cat([keep, rotated], dim=-1)
