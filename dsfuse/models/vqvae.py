"""VQ-VAE image tokenizer: a convolutional encoder, a discrete bottleneck (EMA vector quantizer or FSQ)
and a convolutional decoder. An image [B, 3, S, S] in [-1, 1] becomes a grid [B, S/F, S/F] of code ids.

    model = VQVAE(VQVAEConfig(image_size=256, downsample=16, codebook_size=8192))
    tokens = model.tokenize(images)          # [B, 16, 16] ints in [0, model.codebook_size)
    images = model.decode_tokens(tokens)     # [B, 3, 256, 256]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dsfuse.choices import Quantizer, values
from dsfuse.errors import ConfigError
from dsfuse.nn.quantize import FSQ, Quantized, VectorQuantizer, fsq_levels

DOWNSAMPLE_FACTORS = (4, 8, 16)


@dataclass
class VQVAEConfig:
    image_size: int = 256
    downsample: int = 16  # F: a token stands for an F x F patch
    codebook_size: int = 8192  # K (fsq rounds it to its levels' product, see VQVAE.codebook_size)
    latent_channels: int = 16  # channels of the continuous latent z that encode() returns
    quantizer: Quantizer = "vq"  # "vq" (EMA codebook) or "fsq"
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width per resolution level, from full size down
    res_blocks: int = 1  # residual blocks per level
    attention: bool = True  # self-attention at the lowest resolution
    commitment: float = 0.25  # vq: weight of the commitment loss
    ema_decay: float = 0.99  # vq: codebook EMA decay
    cosine: bool = False  # vq: l2-normalised codes and inputs

    def __post_init__(self) -> None:
        """Refuse what cannot be built, with a ConfigError naming the field at fault."""
        self.channel_mult = tuple(self.channel_mult)
        if self.quantizer not in values(Quantizer):
            raise ConfigError(f"quantizer must be one of {', '.join(values(Quantizer))}, got {self.quantizer!r}",
                              "quantizer")
        if self.downsample not in DOWNSAMPLE_FACTORS:
            raise ConfigError(f"downsample must be one of {DOWNSAMPLE_FACTORS}, got {self.downsample}", "downsample")
        if self.image_size % self.downsample:
            raise ConfigError(f"image size {self.image_size} is not a multiple of downsample {self.downsample}",
                              "image_size")
        if self.codebook_size < 2:
            raise ConfigError(f"codebook size must be at least 2, got {self.codebook_size}", "codebook_size")
        if self.quantizer == "fsq":
            try:
                fsq_levels(self.codebook_size)
            except ValueError as e:
                raise ConfigError(str(e), "codebook_size") from None

    @property
    def widths(self) -> list[int]:
        """Channels at each resolution level, full size first: log2(F) + 1 levels."""
        levels = int(math.log2(self.downsample)) + 1
        return [self.base_channels * self.channel_mult[min(i, len(self.channel_mult) - 1)] for i in range(levels)]

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample


def group_norm(channels: int) -> nn.GroupNorm:
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head attention over all positions of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


def middle(channels: int, attention: bool) -> nn.Sequential:
    """The lowest resolution: residual blocks around optional self-attention."""
    return nn.Sequential(ResBlock(channels, channels),
                         SelfAttention(channels) if attention else nn.Identity(),
                         ResBlock(channels, channels))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = cfg.widths
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
            blocks += [ResBlock(c_in, c_in) for _ in range(cfg.res_blocks)]
            blocks.append(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1))  # halve the resolution
        self.down = nn.Sequential(*blocks)
        self.middle = middle(widths[-1], cfg.attention)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.middle(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Upsample(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = cfg.widths[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.middle = middle(widths[0], cfg.attention)
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(widths, widths[1:]):
            blocks += [ResBlock(c_in, c_in) for _ in range(cfg.res_blocks)]
            blocks.append(Upsample(c_in, c_out))
        blocks += [ResBlock(widths[-1], widths[-1]) for _ in range(cfg.res_blocks)]
        self.up = nn.Sequential(*blocks)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.middle(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


def build_quantizer(cfg: VQVAEConfig) -> VectorQuantizer | FSQ:
    if cfg.quantizer == "fsq":
        return FSQ(cfg.latent_channels, fsq_levels(cfg.codebook_size))
    return VectorQuantizer(cfg.latent_channels, cfg.codebook_size, decay=cfg.ema_decay,
                           commitment=cfg.commitment, cosine=cfg.cosine)


class VQVAE(nn.Module):
    Config = VQVAEConfig

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = build_quantizer(config)
        self.decoder = Decoder(config)

    @property
    def codebook_size(self) -> int:
        """How many distinct tokens there are (fsq: the product of its levels)."""
        return self.quantizer.codebook_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [-1, 1] -> continuous latents z [B, C, S/F, S/F], before quantisation."""
        return self.encoder(x)

    def quantize(self, z: torch.Tensor) -> Quantized:
        """z [B, C, h, w] -> (z_q [B, C, h, w], indices [B, h, w], stats with the quantizer's loss)."""
        out = self.quantizer(rearrange(z, "b c h w -> b h w c"))
        return Quantized(rearrange(out.z_q, "b h w c -> b c h w"), out.indices, out.stats)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, C, h, w] -> images [B, 3, S, S]."""
        return self.decoder(z_q)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        """Reconstruction and what the quantizer did (its loss is in `.stats["loss"]`)."""
        quantized = self.quantize(self.encode(x))
        return self.decode(quantized.z_q), quantized

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] -> token ids [B, S/F, S/F]."""
        return self.quantizer.encode(rearrange(self.encode(x), "b c h w -> b h w c"))

    @torch.no_grad()
    def decode_tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> images [B, 3, h*F, w*F]."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"token ids must lie in [0, {self.codebook_size}), "
                             f"got [{int(indices.min())}, {int(indices.max())}]")
        z_q = self.quantizer.decode_indices(indices)
        return self.decode(rearrange(z_q, "b h w c -> b c h w"))

    def fingerprint(self) -> str:
        """A short hash of what gives token ids their meaning: the config, the codebook (or FSQ
        projections) and the decoder's first layer. Two tokenizers share it only if they decode alike."""
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self.config), sort_keys=True).encode())
        tensors = {**{f"quantizer.{k}": v for k, v in self.quantizer.state_dict().items()},
                   "decoder.conv_in.weight": self.decoder.conv_in.weight}
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def training_loss(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Pixel MSE plus the quantizer's own loss (commitment for vq); `model` may be DDP-wrapped."""
    reconstruction, quantized = model(images)
    mse = F.mse_loss(reconstruction.float(), images.float())
    stats = {"mse": mse.item(), **{k: float(v) for k, v in quantized.stats.items() if k != "loss"}}
    return mse + quantized.stats["loss"], stats


@torch.no_grad()
def evaluate_tokenizer(model: VQVAE, images: torch.Tensor, batch_size: int = 16) -> tuple[dict[str, float], torch.Tensor]:
    """PSNR, SSIM, codebook usage and perplexity over a set of images; also their reconstructions."""
    from dsfuse.metrics import codebook_usage, psnr, ssim

    device = next(model.parameters()).device
    reconstructions, tokens = [], []
    for chunk in images.split(batch_size):
        quantized = model.quantize(model.encode(chunk.to(device)))
        reconstructions.append(model.decode(quantized.z_q).float().clamp(-1, 1).cpu())
        tokens.append(quantized.indices.cpu())
    reconstruction = torch.cat(reconstructions)
    usage, perplexity = codebook_usage(torch.cat(tokens), model.codebook_size)
    return {"psnr": float(psnr(reconstruction, images).mean()), "ssim": float(ssim(reconstruction, images).mean()),
            "usage": usage, "perplexity": perplexity}, reconstruction
