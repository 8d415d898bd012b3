"""A small audio-visual classifier for comparing fusion strategies: two light tokenizers and a fusion.

A clip [B, 3, T, H, W] becomes one token per frame that carries motion; spectrogram frames
[B, T_a, F] become one token each. `nn.fusion` does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsfuse.nn.fusion import FusionConfig, ModalityFusion


@dataclass
class AVFusionConfig:
    fusion: str = "mid"
    n_classes: int = 2
    dim: int = 64
    n_heads: int = 4
    depth: int = 2
    spectrum_bins: int = 129


class ClipTokenizer(nn.Module):
    """One token per step between frames, [B, T-1, dim]: where the shape is and how it just moved.

    The generated shapes are saturated colours on grey, so each pixel's saturation (max - min over
    RGB) above the frame's mean maps the shape; its centroid is the shape's position. Motion is then
    linearly present from the start, so the benchmark measures fusion, not how fast a CNN finds motion.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        saturation = clip.amax(1) - clip.amin(1)  # [B, T, H, W]
        shape = (saturation - saturation.mean((-2, -1), keepdim=True)).clamp_min(0)
        weights = shape / shape.sum((-2, -1), keepdim=True).clamp_min(1e-6)
        ys = torch.linspace(-1, 1, clip.shape[-2], device=clip.device)
        xs = torch.linspace(-1, 1, clip.shape[-1], device=clip.device)
        position = torch.stack([torch.einsum("bthw,w->bt", weights, xs), torch.einsum("bthw,h->bt", weights, ys)], -1)
        motion = (position[:, 1:] - position[:, :-1]) * clip.shape[2]  # per clip length, about unit scale
        return self.net(torch.cat([position[:, 1:], motion], -1))


class SpectrumTokenizer(nn.Module):
    """A per-frame MLP over log-spectrogram frames: [B, T_a, F] -> [B, T_a, dim]."""

    def __init__(self, bins: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(bins), nn.Linear(bins, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames)


class AVFusionClassifier(nn.Module):
    Config = AVFusionConfig

    def __init__(self, config: AVFusionConfig):
        super().__init__()
        self.config = config
        self.video = ClipTokenizer(config.dim)
        self.audio = SpectrumTokenizer(config.spectrum_bins, config.dim)
        self.fusion = ModalityFusion(FusionConfig(
            config.fusion, input_dims=(config.dim, config.dim), out_dim=config.n_classes,
            dim=config.dim, n_heads=config.n_heads, depth=config.depth))

    def forward(self, video: torch.Tensor, audio: torch.Tensor, audio_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits [B, n_classes] for clips [B, 3, T, H, W] and spectrogram frames [B, T_a, F]."""
        return self.fusion([self.video(video), self.audio(audio)], [None, audio_mask])
