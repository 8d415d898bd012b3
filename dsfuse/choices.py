"""Every closed set of choices dsfuse offers, declared once and torch-free.

`nn/`, `models/` and `diffusion/` validate against these; Typer lists and checks them in `--help`
(an option annotated `Fusion` accepts only its values); the agent's tool schemas carry them as enums.
"""

from __future__ import annotations

from typing import Literal, get_args

Fusion = Literal["none", "early", "mid", "late", "gated", "bottleneck", "qformer", "hybrid"]
Router = Literal["topk", "noisy", "aux-free"]  # the routers a fresh or trained layer uses
MoERouter = Literal[Router, "hash"]  # and a released model's: DeepSeek-V4's token-id hash
Affinity = Literal["sigmoid", "sqrtsoftplus"]
V4Attention = Literal["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
V4Mlp = Literal["hash_moe", "moe"]
Balancing = Literal["aux-loss", "aux-free", "none"]
Sampler = Literal["ddpm", "ddim", "dpm++"]
Schedule = Literal["linear", "cosine", "sigmoid"]
Objective = Literal["eps", "v", "x0"]
Quantizer = Literal["vq", "fsq"]
TokenizerPreset = Literal["chameleon"]
CompressMethod = Literal["pool", "pixel-shuffle", "tome", "resampler"]
TrainableCompressMethod = Literal["pixel-shuffle", "resampler"]
Backbone = Literal["small3d", "r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v2_s", "swin3d_t"]
PretrainedBackbone = Literal["r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v2_s", "swin3d_t"]
FeedForward = Literal["swiglu", "moe"]
SpeechEncoder = Literal["mel", "wav2vec2-base", "hubert-base", "wavlm-base", "wavlm-base-plus"]
LabelScheme = Literal["folders", "ravdess", "crema-d"]
SplitBy = Literal["random", "speaker"]
SpeakerBy = Literal["name", "file", "all"]
McpTransport = Literal["stdio", "http"]
Precision = Literal["fp32", "bf16", "fp16"]
TrainLogger = Literal["none", "tensorboard"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]  # auto: the checkpoint's own dtype
UnifiedFusion = Literal["early", "parallel"]  # one shared stream, or the seed's parallel cross-attention
AttentionVariant = Literal["mla", "differential"]
CaptionOrder = Literal["shape-first", "colour-first"]  # make-shapes' captions: which attribute is named first


def values(choice: object) -> tuple[str, ...]:
    """The values of a choice, in declaration order: `values(Fusion)` -> ("none", "early", ...)."""
    return get_args(choice)


def check(value: str, choice: object, what: str) -> str:
    """`value` if it is one of `choice`, else ValueError naming the allowed values."""
    allowed = values(choice)
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value
