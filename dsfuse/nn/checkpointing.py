"""Activation (gradient) checkpointing: a block that keeps no activations for the backward pass and
recomputes them there, trading compute for memory. `set_grad_checkpointing(model, True)` turns it on
for every such block of a model (what `--grad-checkpoint` does); it changes no weights and no results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Checkpointable(nn.Module):
    """A block whose forward can run under activation checkpointing (off until switched on)."""

    grad_checkpoint: bool = False

    def maybe_checkpoint(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """`fn(*args)`, checkpointed when switched on and training with gradients (the RNG is replayed,
        so dropout recomputes the same mask)."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def set_grad_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Switch checkpointing on or off in every checkpointable block of `model`; how many there are."""
    blocks = [m for m in model.modules() if isinstance(m, Checkpointable)]
    for block in blocks:
        block.grad_checkpoint = enabled
    return len(blocks)


def saved_activation_bytes(run: Callable[[], Any]) -> int:
    """Bytes the autograd graph keeps for the backward pass while `run()` builds it: the memory that
    checkpointing saves (and on CPU, where torch keeps no allocator statistics, the way to measure it)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return total
