"""Speech-emotion classifier over log-mel features: convolutional subsampling, transformer blocks
with MLA attention (decoupled RoPE) and a SwiGLU or MoE feed-forward, attention pooling, a linear head.
With ffn="moe", train on task loss + `dsfuse.nn.moe.moe_aux_loss(model)`.

The transcript is an optional second modality: under a fusion strategy other than "none", a byte-level
text encoder (models/text.py) reads it and an `nn.fusion` strategy classifies from both sequences.

`AudioEncoder` (features [B, T, n_mels] + mask -> sequence [B, T/4, dim] + mask) is usable on its own,
e.g. as the audio branch of an audio-visual fusion model. With `encoder` a self-supervised speech model
(models/speech_ssl.py), its input is that model's cached hidden states [B, T, layers, D] at 50 Hz
instead of log-mels, mixed by learned layer weights in place of the convolutional subsampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dsfuse import choices
from dsfuse.choices import FeedForward, Fusion, SpeechEncoder
from dsfuse.models.speech_ssl import SslFront
from dsfuse.models.text import TextConfig, TextEncoder
from dsfuse.nn.attention import AttentionConfig
from dsfuse.nn.fusion import ContrastiveAlignment, FusionConfig, ModalityFusion
from dsfuse.nn.moe import MoEConfig
from dsfuse.nn.transformer import TransformerBlock


@dataclass
class AudioConfig:
    n_mels: int = 64
    num_classes: int = 4
    dim: int = 128
    depth: int = 3
    n_heads: int = 4
    conv_channels: int = 32
    # MLA: keys/values from a kv_lora_rank latent; RoPE on separate qk_rope_head_dim dimensions
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    ffn: FeedForward = "swiglu"
    ffn_hidden: int = 256
    # MoE (ffn="moe"): one shared expert plus n_experts routed ones, each of width ffn_hidden / 2
    n_experts: int = 4
    top_k: int = 2
    dropout: float = 0.1
    # log-mel statistics of the training set: the model normalizes its own input
    feature_mean: float = 0.0
    feature_std: float = 1.0
    # the input: log-mels, or a self-supervised encoder's hidden states (its architecture in `ssl`)
    encoder: SpeechEncoder = "mel"
    ssl: dict | None = None  # torchaudio's builder arguments of the encoder
    unfreeze: int = 0  # the encoder's top layers fine-tuned inside this model

    def __post_init__(self) -> None:
        choices.check(self.ffn, FeedForward, "ffn")
        choices.check(self.encoder, SpeechEncoder, "encoder")
        if (self.encoder == "mel") != (self.ssl is None):
            raise ValueError("a self-supervised encoder needs its architecture (ssl), log-mels none")


def subsampled_mask(mask: torch.Tensor) -> torch.Tensor:
    """The padding mask after one stride-2 convolution (kernel 3, padding 1): ceil(length / 2) frames."""
    lengths = (mask.sum(1) + 1) // 2
    frames = (mask.shape[1] + 1) // 2
    return torch.arange(frames, device=mask.device)[None, :] < lengths[:, None]


class ConvSubsampling(nn.Module):
    """Two stride-2 3x3 convolutions over (time, mel): 4x fewer frames, each projected to `dim`.

    Padding frames are zeroed before each convolution, so a clip's features do not depend on how
    much padding its batch needed.
    """

    def __init__(self, n_mels: int, channels: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.proj = nn.Linear(channels * ((n_mels + 3) // 4), dim)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = rearrange(features * mask[..., None], "b t m -> b 1 t m")
        mask = subsampled_mask(mask)
        x = F.gelu(self.conv1(x)) * rearrange(mask, "b t -> b 1 t 1")
        mask = subsampled_mask(mask)
        x = F.gelu(self.conv2(x))
        return self.proj(rearrange(x, "b c t m -> b t (c m)")), mask


class AudioEncoder(nn.Module):
    """Log-mel features [B, T, n_mels] -> a feature sequence [B, ceil(T/4), dim] and its padding mask."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.encoder == "mel":
            self.subsample = ConvSubsampling(cfg.n_mels, cfg.conv_channels, cfg.dim)
        else:
            self.front = SslFront(cfg.encoder, cfg.ssl, cfg.unfreeze, cfg.dim)
        attention = AttentionConfig(dim=cfg.dim, n_heads=cfg.n_heads, kind="mla", kv_lora_rank=cfg.kv_lora_rank,
                                    qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                                    v_head_dim=cfg.v_head_dim, dropout=cfg.dropout)
        moe = (MoEConfig(dim=cfg.dim, n_experts=cfg.n_experts, top_k=cfg.top_k, n_shared=1,
                         expert_hidden=cfg.ffn_hidden // 2) if cfg.ffn == "moe" else None)
        self.blocks = nn.ModuleList(TransformerBlock(cfg.dim, attention, ffn=cfg.ffn, ffn_hidden=cfg.ffn_hidden,
                                                     moe=moe) for _ in range(cfg.depth))
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.RMSNorm(cfg.dim)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mels [B, T, n_mels] (or hidden states [B, T, layers, D]) and mask [B, T] -> [B, T', dim], mask."""
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        if self.cfg.encoder == "mel":
            features = (features - self.cfg.feature_mean) / self.cfg.feature_std
            x, mask = self.subsample(features, mask)
        else:
            x = self.front(features, mask)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.norm(x), mask


class AttentionPool(nn.Module):
    """A learned score per frame, softmax over the real frames, the weighted mean: [B, T, D] -> [B, D]."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = rearrange(self.score(x), "b t 1 -> b t").masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=1)
        return torch.einsum("bt,btd->bd", weights, x)


@dataclass
class AudioEmotionConfig(AudioConfig):
    """The audio encoder's config, and what joins the transcript to it under a fusion strategy."""

    fusion: Fusion = "none"
    text: TextConfig | None = None  # the transcript's encoder (fused models only; None: its defaults)
    fusion_dim: int = 64
    fusion_depth: int = 1
    contrastive: float = 0.0  # weight of the CLIP-style alignment of audio and transcript (fused only; 0: none)

    def __post_init__(self) -> None:
        super().__post_init__()
        choices.check(self.fusion, Fusion, "fusion")
        if isinstance(self.text, dict):  # from a checkpoint's JSON
            self.text = TextConfig(**self.text)
        if self.fused and self.text is None:
            self.text = TextConfig()

    @property
    def fused(self) -> bool:
        return self.fusion != "none"


class AudioEmotionClassifier(nn.Module):
    """Log-mel features [B, T, n_mels] (+ under fusion the transcript's byte ids [B, T_t]) -> logits [B, classes].

    Without fusion: encoder, attention pooling, linear head. With a fusion strategy: the encoder's
    sequence and the text encoder's, classified by `nn.fusion.ModalityFusion`.
    """

    Config = AudioEmotionConfig

    def __init__(self, cfg: AudioEmotionConfig):
        super().__init__()
        self.config = cfg
        self.encoder = AudioEncoder(cfg)
        if cfg.fused:
            self.text = TextEncoder(cfg.text)
            self.fusion = ModalityFusion(FusionConfig(
                cfg.fusion, input_dims=(cfg.dim, cfg.text.dim), out_dim=cfg.num_classes, dim=cfg.fusion_dim,
                n_heads=4, depth=cfg.fusion_depth))
        else:
            self.pool = AttentionPool(cfg.dim)
            self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.dim, cfg.num_classes))
        self.align = ContrastiveAlignment((cfg.dim, cfg.text.dim), cfg.fusion_dim) if cfg.fused and cfg.contrastive \
            else None

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = self.encoder(features, mask)
        if not self.config.fused:
            return self.head(self.pool(x, mask))
        if text is None or text_mask is None:
            raise ValueError(f"a model with {self.config.fusion} fusion needs the transcript's byte ids and mask")
        words, text_mask = self.text(text, text_mask)
        if self.align is not None:
            self.align([x, words], [mask, text_mask])
        return self.fusion([x, words], [mask, text_mask])

    def gate_weights(self) -> torch.Tensor | None:
        """Per-sample (audio, text) gate weights [B, 2] of the last forward under gated fusion, else None."""
        return self.fusion.gate_weights() if self.config.fused else None
