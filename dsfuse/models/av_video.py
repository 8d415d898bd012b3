"""Audio-visual video classification: the classify-video encoder, the audio-emotion encoder over
the video's soundtrack, and an `nn.fusion` strategy that classifies from both.

The small 3D CNN gives one token per remaining time step (its feature map pooled over space);
torchvision backbones give one pooled token. The soundtrack's log-mel frames go through the MLA
audio encoder, which keeps its padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import reduce
from torch import nn

from dsfuse.models.audio import AudioConfig, AudioEncoder
from dsfuse.models.video import VideoClassifier, VideoConfig
from dsfuse.nn.fusion import FusionConfig, ModalityFusion


def small_audio_config() -> AudioConfig:
    """An audio encoder sized to train beside a video model on a CPU."""
    return AudioConfig(dim=64, depth=2, n_heads=4, ffn_hidden=128, conv_channels=16)


@dataclass
class AVVideoConfig:
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=small_audio_config)
    fusion: str = "mid"
    num_classes: int = 4
    fusion_dim: int = 64
    fusion_depth: int = 1
    audio_seconds: float = 10.0  # how much of the soundtrack, from its start, the model hears

    def __post_init__(self) -> None:  # from a checkpoint's JSON the parts arrive as dicts
        if isinstance(self.video, dict):
            self.video = VideoConfig(**self.video)
        if isinstance(self.audio, dict):
            self.audio = AudioConfig(**self.audio)


class AudioVisualVideoClassifier(nn.Module):
    Config = AVVideoConfig

    def __init__(self, config: AVVideoConfig):
        super().__init__()
        self.config = config
        self.video = VideoClassifier(config.video)
        self.video.head = nn.Identity()  # the fusion classifies
        self.audio = AudioEncoder(config.audio)
        self.fusion = ModalityFusion(FusionConfig(
            config.fusion, input_dims=(self.video.feature_dim, config.audio.dim), out_dim=config.num_classes,
            dim=config.fusion_dim, n_heads=4, depth=config.fusion_depth))

    def preprocess(self, frames: torch.Tensor, random_crop: bool = False) -> torch.Tensor:
        """Decoded uint8 frames [B, T, H, W, 3] -> the video encoder's input."""
        return self.video.preprocess(frames, random_crop)

    def video_tokens(self, clip: torch.Tensor) -> torch.Tensor:
        """[B, T', D]: per time step for the small 3D CNN, one pooled token for torchvision backbones."""
        encoder = self.video.encoder
        if hasattr(encoder, "stages"):
            return reduce(encoder.stages(clip), "b c t h w -> b t c", "mean")
        return self.video.features(clip)[:, None]

    def forward(self, clip: torch.Tensor, mel: torch.Tensor, mel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, classes] from clips [B, 3, T, H, W] and soundtrack log-mels [B, T_a, n_mels]."""
        audio, audio_mask = self.audio(mel, mel_mask)
        return self.fusion([self.video_tokens(clip), audio], [None, audio_mask])
