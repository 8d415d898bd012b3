"""A small audio-visual classifier for comparing fusion strategies: two light tokenizers and a fusion.

A clip [B, 3, T, H, W] becomes one token per frame that carries motion; spectrogram frames
[B, T_a, F] become one token each. `nn.fusion` does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
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
    frame_size: int = 16


class ClipTokenizer(nn.Module):
    """One token per frame, [B, T, dim]: where the shape is, then how that changes over time.

    The generated shapes are saturated colours on grey, so each pixel's saturation (max - min over
    RGB) is a clean map of the shape; a linear layer reads its position from the map and a temporal
    convolution turns positions into motion.
    """

    def __init__(self, frame_pixels: int, dim: int):
        super().__init__()
        self.frame = nn.Linear(frame_pixels, dim)
        self.motion = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(dim, dim))

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        saturation = clip.amax(1) - clip.amin(1)  # [B, T, H, W]
        frames = self.frame(rearrange(saturation, "b t h w -> b t (h w)"))
        motion = rearrange(self.motion(rearrange(frames, "b t d -> b d t")), "b d t -> b t d")
        return self.out(motion)


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
        self.video = ClipTokenizer(config.frame_size**2, config.dim)
        self.audio = SpectrumTokenizer(config.spectrum_bins, config.dim)
        self.fusion = ModalityFusion(FusionConfig(
            config.fusion, input_dims=(config.dim, config.dim), out_dim=config.n_classes,
            dim=config.dim, n_heads=config.n_heads, depth=config.depth))

    def forward(self, video: torch.Tensor, audio: torch.Tensor, audio_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits [B, n_classes] for clips [B, 3, T, H, W] and spectrogram frames [B, T_a, F]."""
        return self.fusion([self.video(video), self.audio(audio)], [None, audio_mask])
