"""A diffusion UNet (Ho et al. 2020, with the improvements of Nichol & Dhariwal 2021).

Sinusoidal time embedding, residual blocks (GroupNorm, SiLU, dropout) that take the time embedding,
self-attention at chosen resolutions, and optional class conditioning whose extra "null" class lets
classifier-free guidance ask for an unconditional prediction. The network predicts whatever the
objective trains it to (eps, v or x0); it knows nothing about schedules or samplers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dsfuse.errors import ConfigError
from dsfuse.nn.checkpointing import Checkpointable


@dataclass
class UNetConfig:
    in_channels: int = 3
    image_size: int = 32  # the side of the (pixel or latent) images it denoises
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)  # width of each resolution level, times base_channels
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sides that get self-attention
    head_channels: int = 32
    dropout: float = 0.1
    num_classes: int = 0  # 0: unconditional; otherwise label `num_classes` is the null class

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)
        self.attention_resolutions = tuple(self.attention_resolutions)
        halvings = len(self.channel_mults) - 1
        if self.image_size % 2 ** halvings:
            raise ConfigError(f"image side {self.image_size} must be divisible by 2^{halvings} (one halving per "
                              "extra level)", "channel_mults")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of (possibly fractional) timesteps [B], as in the Transformer."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + rearrange(self.emb(F.silu(emb)), "b c -> b c 1 1")
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.heads = max(channels // head_channels, 1)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[-2]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three heads d) h w -> three b heads (h w) d",
                            three=3, heads=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b heads (h w) d -> b (heads d) h w", h=height))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(Checkpointable):
    """One residual block, followed by self-attention at the resolutions that ask for it (the unit that
    gradient checkpointing recomputes)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, cfg: UNetConfig, attend: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, cfg.dropout)
        self.attn = SelfAttention(out_ch, cfg.head_channels) if attend else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.maybe_checkpoint(self._run, x, emb)

    def _run(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    Config = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        if cfg.image_size % 2 ** (len(cfg.channel_mults) - 1):
            raise ValueError(f"image_size {cfg.image_size} must be divisible by 2^(levels-1)")
        width = cfg.base_channels
        emb_dim = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # One extra row: the null class, what classifier-free guidance conditions on for "no class".
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, width, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels, ch, size = [width], width, cfg.image_size
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Stage(ch, width * mult, emb_dim, cfg, size in cfg.attention_resolutions))
                ch = width * mult
                skip_channels.append(ch)
            if level < len(cfg.channel_mults) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                size //= 2

        self.mid_res1 = ResBlock(ch, ch, emb_dim, cfg.dropout)
        self.mid_attn = SelfAttention(ch, cfg.head_channels)
        self.mid_res2 = ResBlock(ch, ch, emb_dim, cfg.dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(Stage(ch + skip_channels.pop(), width * mult, emb_dim, cfg,
                                     size in cfg.attention_resolutions))
                ch = width * mult
            if level > 0:
                self.up.append(Upsample(ch))
                size *= 2

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, S, S] noisy images, t [B] timesteps, y [B] class ids (the null class if None)."""
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((len(x),), self.null_class, device=x.device, dtype=torch.long)
            emb = emb + self.class_emb(y)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, Stage) else block(h)
            skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(block, Stage) else block(h)
        return self.conv_out(F.silu(self.norm_out(h)))
