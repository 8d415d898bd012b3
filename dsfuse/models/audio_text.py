"""Speech emotion from the audio and its transcript: the audio-emotion MLA encoder over log-mels, a
small byte-level text encoder over the transcript, and an `nn.fusion` strategy that classifies from both.

The text encoder needs no downloaded tokenizer: UTF-8 bytes are the vocabulary (256 ids + padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsfuse.models.audio import AudioConfig, AudioEncoder
from dsfuse.nn.attention import AttentionConfig
from dsfuse.nn.fusion import FusionConfig, ModalityFusion
from dsfuse.nn.transformer import TransformerBlock

PAD_ID = 256  # after the 256 byte values


@dataclass
class TextConfig:
    dim: int = 64
    depth: int = 2
    n_heads: int = 4
    ffn_hidden: int = 128
    max_bytes: int = 512  # longer transcripts are cut here: an utterance's words, not a document
    dropout: float = 0.1


def encode_text(text: str, max_bytes: int) -> torch.Tensor:
    """A transcript as byte ids [T] (UTF-8, cut to max_bytes; at least one id, so no row is all padding)."""
    data = text.strip().encode("utf-8")[:max_bytes] or b" "
    return torch.tensor(list(data), dtype=torch.long)


def pad_text(ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-id sequences -> ids [B, T] padded with PAD_ID and their mask bool [B, T] (True = real)."""
    padded = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=PAD_ID)
    lengths = torch.tensor([len(t) for t in ids])
    return padded, torch.arange(padded.shape[1])[None, :] < lengths[:, None]


class TextEncoder(nn.Module):
    """Byte ids [B, T] + mask -> token features [B, T, dim] (RoPE self-attention blocks) and the mask."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed = nn.Embedding(PAD_ID + 1, cfg.dim, padding_idx=PAD_ID)
        attention = AttentionConfig(dim=cfg.dim, n_heads=cfg.n_heads, dropout=cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(cfg.dim, attention, ffn_hidden=cfg.ffn_hidden)
                                    for _ in range(cfg.depth))
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.RMSNorm(cfg.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout(self.embed(ids))
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.norm(x), mask


def small_audio_config() -> AudioConfig:
    """An audio encoder sized to train beside a text encoder on a CPU."""
    return AudioConfig(dim=64, depth=2, n_heads=2, ffn_hidden=128, conv_channels=16)


@dataclass
class AudioTextConfig:
    audio: AudioConfig = field(default_factory=small_audio_config)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: str = "gated"
    num_classes: int = 4
    fusion_dim: int = 64
    fusion_depth: int = 1

    def __post_init__(self) -> None:  # from a checkpoint's JSON the parts arrive as dicts
        if isinstance(self.audio, dict):
            self.audio = AudioConfig(**self.audio)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)


class AudioTextClassifier(nn.Module):
    """Log-mels [B, T_a, n_mels] + transcript byte ids [B, T_t] -> class logits [B, num_classes]."""

    Config = AudioTextConfig

    def __init__(self, config: AudioTextConfig):
        super().__init__()
        self.config = config
        self.audio = AudioEncoder(config.audio)
        self.text = TextEncoder(config.text)
        self.fusion = ModalityFusion(FusionConfig(
            config.fusion, input_dims=(config.audio.dim, config.text.dim), out_dim=config.num_classes,
            dim=config.fusion_dim, n_heads=4, depth=config.fusion_depth))

    def forward(self, mel: torch.Tensor, mel_mask: torch.Tensor | None, text_ids: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        audio, audio_mask = self.audio(mel, mel_mask)
        text, text_mask = self.text(text_ids, text_mask)
        return self.fusion([audio, text], [audio_mask, text_mask])
