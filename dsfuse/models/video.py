"""Video classifiers: an encoder (clip -> features [B, D]) plus a linear head, or, with a fusion
strategy other than "none", the encoder's tokens fused with the video's soundtrack.

Encoders: a small 3D CNN that trains on a CPU in minutes, and torchvision's r3d_18, mc3_18,
r2plus1d_18, s3d, mvit_v2_s and swin3d_t, built without weights. Each backbone carries its own
preprocessing (frames, fps, resize, crop, mean/std). `VideoClassifier.load_kinetics` takes torchvision's
Kinetics-400 state dict, which the task finds through `dsfuse.weights` (cache, download, offline rules).

The soundtrack (log-mel frames of its first `audio_seconds`) goes through the audio-emotion MLA
encoder (`models/audio.py`), and an `nn.fusion` strategy classifies from both. The small 3D CNN then
gives one token per remaining time step (its feature map pooled over space); torchvision backbones
give one pooled token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import rearrange, reduce
from torch import nn

from dsfuse import choices
from dsfuse.checkpoint import CheckpointMeta, build_model, read_metadata, resolve_checkpoint
from dsfuse.errors import UsageError
from dsfuse.models.audio import AudioConfig, AudioEncoder
from dsfuse.nn.fusion import ContrastiveAlignment, FusionConfig, ModalityFusion


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone wants its clips: T frames at fps, resized (short side, or exactly [h, w]), centre crop."""

    frames: int
    fps: float
    resize: tuple[int, ...]
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_KINETICS_MEAN, _KINETICS_STD = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)

# The clip lengths and frame rates of torchvision's Kinetics-400 recipes; sizes and mean/std from the weights.
BACKBONES: dict[str, Preprocessing] = {
    # small enough to train on two CPU cores in minutes: 8 frames of 32 x 32
    "small3d": Preprocessing(8, 8.0, (40,), 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    "r3d_18": Preprocessing(16, 15.0, (128, 171), 112, _KINETICS_MEAN, _KINETICS_STD),
    "mc3_18": Preprocessing(16, 15.0, (128, 171), 112, _KINETICS_MEAN, _KINETICS_STD),
    "r2plus1d_18": Preprocessing(16, 15.0, (128, 171), 112, _KINETICS_MEAN, _KINETICS_STD),
    "s3d": Preprocessing(64, 15.0, (256, 256), 224, _KINETICS_MEAN, _KINETICS_STD),
    "mvit_v2_s": Preprocessing(16, 7.5, (256,), 224, (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)),
    "swin3d_t": Preprocessing(32, 15.0, (256,), 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
TORCHVISION_WEIGHTS = {  # backbone -> name of its weights enum in torchvision.models.video
    "r3d_18": "R3D_18_Weights", "mc3_18": "MC3_18_Weights", "r2plus1d_18": "R2Plus1D_18_Weights",
    "s3d": "S3D_Weights", "mvit_v2_s": "MViT_V2_S_Weights", "swin3d_t": "Swin3D_T_Weights",
}


def small_audio_config() -> AudioConfig:
    """A soundtrack encoder sized to train beside a video model on a CPU."""
    return AudioConfig(dim=64, depth=2, n_heads=4, ffn_hidden=128, conv_channels=16)


@dataclass
class VideoConfig:
    backbone: choices.Backbone = "small3d"
    num_classes: int = 4
    frames: int = 8
    fps: float = 8.0
    resize: list[int] = field(default_factory=lambda: [40])
    crop: int = 32
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    width: int = 16  # small3d: channels of the first stage, doubled at each of the next three
    dropout: float = 0.2
    fusion: choices.Fusion = "none"  # how the frames meet the soundtrack; "none": frames alone, no audio encoder
    audio: AudioConfig | None = None  # the soundtrack's encoder when fused (default: small_audio_config())
    fusion_dim: int = 64
    fusion_depth: int = 1
    audio_seconds: float = 10.0  # how much of the soundtrack, from its start, the model hears
    contrastive: float = 0.0  # weight of the CLIP-style alignment of frames and soundtrack (fused only; 0: none)

    def __post_init__(self) -> None:
        choices.check(self.backbone, choices.Backbone, "backbone")
        choices.check(self.fusion, choices.Fusion, "fusion")
        if isinstance(self.audio, dict):  # from a checkpoint's JSON
            self.audio = AudioConfig(**self.audio)
        if self.fused and self.audio is None:
            self.audio = small_audio_config()

    @property
    def fused(self) -> bool:
        return self.fusion != "none"

    @classmethod
    def for_backbone(cls, backbone: str, num_classes: int, **overrides) -> VideoConfig:
        """A config with `backbone`'s own preprocessing; `overrides` (frames, fps, fusion, ...) win when not None."""
        pre = BACKBONES[choices.check(backbone, choices.Backbone, "backbone")]
        values = dict(frames=pre.frames, fps=pre.fps, resize=list(pre.resize), crop=pre.crop,
                      mean=list(pre.mean), std=list(pre.std))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(backbone=backbone, num_classes=num_classes, **values)

    @property
    def decode_size(self) -> int | tuple[int, int]:
        """What the decoder scales frames to: the short side, or an exact (h, w)."""
        return self.resize[0] if len(self.resize) == 1 else (self.resize[0], self.resize[1])


# --------------------------------------------------------------------------- the small 3D CNN

class ConvBlock3d(nn.Module):
    """Conv3d -> BatchNorm -> ReLU, twice; the first conv may stride in time and space."""

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int, int]):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True),
            nn.Conv3d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Small3DCNN(nn.Module):
    """Four 3D conv stages, then the mean over time and space: [B, 3, T, H, W] -> [B, 8 * width]."""

    def __init__(self, width: int):
        super().__init__()
        w = width
        # Space is halved early (cheap); time is kept for two stages, since motion lives there.
        self.stages = nn.Sequential(
            nn.Conv3d(3, w, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2), bias=False), nn.BatchNorm3d(w),
            nn.ReLU(inplace=True),
            ConvBlock3d(w, 2 * w, stride=(1, 2, 2)),
            ConvBlock3d(2 * w, 4 * w, stride=(2, 2, 2)),
            ConvBlock3d(4 * w, 8 * w, stride=(2, 2, 2)),
        )
        self.out_dim = 8 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce(self.stages(x), "b c t h w -> b c", "mean")


# --------------------------------------------------------------------------- torchvision backbones

FEATURE_DIMS = {"r3d_18": 512, "mc3_18": 512, "r2plus1d_18": 512, "s3d": 1024, "mvit_v2_s": 768, "swin3d_t": 768}
# The Kinetics classifier's (weight, bias) in torchvision's state dicts; the encoder is the rest.
_HEAD_KEYS = {
    "r3d_18": ("fc.weight", "fc.bias"), "mc3_18": ("fc.weight", "fc.bias"), "r2plus1d_18": ("fc.weight", "fc.bias"),
    "s3d": ("classifier.1.weight", "classifier.1.bias"),
    "mvit_v2_s": ("head.1.weight", "head.1.bias"), "swin3d_t": ("head.weight", "head.bias"),
}


def torchvision_encoder(name: str) -> nn.Module:
    """torchvision's `name` without weights and with its Kinetics classifier replaced by Identity."""
    from torchvision.models import video as tv

    model = getattr(tv, name)(weights=None)
    classifier = _HEAD_KEYS[name][0].split(".")[0]  # fc, classifier (s3d: a 1x1x1 conv, then a mean) or head
    setattr(model, classifier, nn.Identity())
    return model


def kinetics_url(backbone: str) -> str:
    """Where torchvision publishes `backbone`'s Kinetics-400 weights (the file name carries its hash prefix)."""
    from torchvision.models import video as tv

    if backbone not in TORCHVISION_WEIGHTS:
        raise UsageError(f"no pretrained weights for {backbone!r}; use one of {', '.join(TORCHVISION_WEIGHTS)}",
                         "--pretrained")
    return getattr(tv, TORCHVISION_WEIGHTS[backbone]).KINETICS400_V1.url


def kinetics_categories(backbone: str) -> list[str]:
    from torchvision.models import video as tv

    return list(getattr(tv, TORCHVISION_WEIGHTS[backbone]).KINETICS400_V1.meta["categories"])


# --------------------------------------------------------------------------- the classifier

class VideoClassifier(nn.Module):
    """`features(clip) -> [B, D]` and a linear head: `forward(clip) -> logits [B, classes]`; when fused,
    `forward(clip, mel, mel_mask)` classifies from the clip's tokens and the soundtrack's log-mels.

    Clips come in as model input [B, 3, T, H, W] (see `preprocess` for uint8 frames from the decoder).
    """

    Config = VideoConfig

    def __init__(self, config: VideoConfig):
        super().__init__()
        self.config = config
        if config.backbone == "small3d":
            self.encoder: nn.Module = Small3DCNN(config.width)
            self.feature_dim = self.encoder.out_dim
        else:
            self.encoder, self.feature_dim = torchvision_encoder(config.backbone), FEATURE_DIMS[config.backbone]
        self.dropout = nn.Dropout(config.dropout)
        if config.fused:  # the fusion classifies
            self.audio = AudioEncoder(config.audio)
            self.fusion = ModalityFusion(FusionConfig(
                config.fusion, input_dims=(self.feature_dim, config.audio.dim), out_dim=config.num_classes,
                dim=config.fusion_dim, n_heads=4, depth=config.fusion_depth))
        else:
            self.head = nn.Linear(self.feature_dim, config.num_classes)
        self.align = (ContrastiveAlignment((self.feature_dim, config.audio.dim), config.fusion_dim)
                      if config.fused and config.contrastive else None)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1, 1), persistent=False)

    def preprocess(self, frames: torch.Tensor, random_crop: bool = False) -> torch.Tensor:
        """Decoded uint8 frames [B, T, H, W, 3] -> normalised model input [B, 3, T, crop, crop].

        The crop is central, or (training) at a random place per clip, the same for all its frames.
        """
        x = rearrange(frames, "b t h w c -> b c t h w").float().div(255.0)
        size, (height, width) = self.config.crop, x.shape[-2:]
        if size > min(height, width):
            raise ValueError(f"frames of {height}x{width} are smaller than the crop {size}")
        if random_crop:
            tops = torch.randint(0, height - size + 1, (len(x),)).tolist()
            lefts = torch.randint(0, width - size + 1, (len(x),)).tolist()
            x = torch.stack([clip[..., t:t + size, l:l + size] for clip, t, l in zip(x, tops, lefts)])
        else:
            top, left = (height - size) // 2, (width - size) // 2
            x = x[..., top:top + size, left:left + size]
        return (x - self.mean) / self.std

    def features(self, clip: torch.Tensor) -> torch.Tensor:
        """Model input [B, 3, T, H, W] -> pooled clip features [B, feature_dim]."""
        return self.encoder(clip)

    def video_tokens(self, clip: torch.Tensor) -> torch.Tensor:
        """[B, T', D] for fusion: per time step for the small 3D CNN, one pooled token for torchvision backbones."""
        if isinstance(self.encoder, Small3DCNN):
            return reduce(self.encoder.stages(clip), "b c t h w -> b t c", "mean")
        return self.features(clip)[:, None]

    def forward(self, clip: torch.Tensor, mel: torch.Tensor | None = None,
                mel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, classes] from clips [B, 3, T, H, W] (and, when fused, log-mels [B, T_a, n_mels] + mask)."""
        if not self.config.fused:
            return self.head(self.dropout(self.features(clip)))
        if mel is None:
            raise ValueError(f"a video model with {self.config.fusion} fusion needs the soundtrack's log-mels")
        audio, audio_mask = self.audio(mel, mel_mask)
        tokens, masks = [self.video_tokens(clip), audio], [None, audio_mask]
        if self.align is not None:
            self.align(tokens, masks)
        return self.fusion(tokens, masks)

    def load_kinetics(self, state: dict[str, torch.Tensor], path: Path) -> None:
        """Load torchvision's Kinetics-400 state dict (read from `path`); the head too when it has 400 classes."""
        backbone = self.config.backbone
        state = dict(state)
        head_state = {k: state.pop(k) for k in _HEAD_KEYS[backbone] if k in state}
        missing, unexpected = self.encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UsageError(f"pretrained weights do not match {backbone} ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected)", path)
        if self.config.num_classes == 400 and not self.config.fused:
            weight, bias = (head_state[k] for k in _HEAD_KEYS[backbone])
            self.head.weight.data.copy_(weight.reshape(self.head.weight.shape))
            self.head.bias.data.copy_(bias)



# --------------------------------------------------------------------------- checkpoints of the old fused kind

AV_VIDEO_KIND = "av-video"  # fused video models before fusion joined VideoClassifier: {"video": {...}, ...}


def load_av_video(path: str | Path, device: torch.device | str = "cpu") -> tuple[VideoClassifier, CheckpointMeta]:
    """An `av-video` checkpoint as today's model: its nested config flattened, `video.` taken off weight names."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    old = meta.config
    config = {**old["video"], **{k: v for k, v in old.items() if k != "video"}}
    meta = dataclasses.replace(meta, kind="video", config=config)
    model = build_model(meta)
    weights = {k.removeprefix("video."): v for k, v in load_file(resolve_checkpoint(path)).items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UsageError(f"checkpoint weights do not load ({str(e).splitlines()[0][:200]})", path) from None
    return model.to(device).eval(), meta
