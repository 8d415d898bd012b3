"""A small byte-level text encoder for transcripts: UTF-8 bytes are the vocabulary (256 ids + padding),
so no tokenizer has to be downloaded. The speech-emotion model fuses it with the audio (models/audio.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsfuse.nn.attention import AttentionConfig
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
