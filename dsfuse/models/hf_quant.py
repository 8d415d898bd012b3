"""Quantised Hugging Face checkpoints: DeepSeek's FP8 block-wise weights, dequantised tensor by tensor.

DeepSeek-V3/R1 (and V4) ship with `quantization_config: {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [128, 128], ...}`: each quantised linear weight is float8_e4m3fn beside a
`<name>_scale_inv` (or `<module>.scale`) tensor holding one scale per block (float32, or V4's 1-byte
ue8m0 powers of two); the weight is the fp8 value times its block's scale. Embeddings, norms, routers and the output head are
stored unquantised. Anything else (another method, format or scheme, V4's FP4-packed experts) is refused
in one line naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Any

import torch

from dsfuse.errors import UsageError

SCALE_SUFFIX = "_scale_inv"


def scale_names(name: str) -> tuple[str, str]:
    """Where FP8 tensor `name`'s scales may be stored: `<name>_scale_inv` (V3's and transformers' name), or
    `<module>.scale` (DeepSeek's own naming, as in DeepSeek-V4-Flash)."""
    return name + SCALE_SUFFIX, name.removesuffix(".weight") + ".scale"
FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}
SCALE_FORMATS = ("float", "ue8m0")  # float32 scales (V3), or 1-byte powers of two (V4)


@dataclass(frozen=True)
class Fp8Blocks:
    """FP8 e4m3 weights with one scale per (rows, cols) block; `block` None: one scale per tensor."""

    block: tuple[int, int] | None

    def dequantise(self, name: str, weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`weight` (fp8) times its blocks' scales, computed in float32 and returned in `dtype`."""
        if weight.dtype != torch.float8_e4m3fn:
            raise UsageError(f"tensor {name} is stored as {str(weight.dtype).removeprefix('torch.')}, but "
                             "config.json's quantization_config declares fp8 e4m3")
        if weight.dim() != 2:
            raise UsageError(f"tensor {name} is fp8 but not a matrix (shape {tuple(weight.shape)})")
        rows, cols = weight.shape
        br, bc = self.block or (rows, cols)
        blocks = (ceil(rows / br), ceil(cols / bc))
        if scale_inv.numel() != blocks[0] * blocks[1] or (self.block and tuple(scale_inv.shape) != blocks):
            raise UsageError(f"the scales of FP8 tensor {name} have shape {tuple(scale_inv.shape)}; its shape "
                             f"{tuple(weight.shape)} in blocks of {br}x{bc} needs {blocks}")
        scale = scale_inv.float().reshape(blocks)
        scale = scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
        return (weight.float() * scale).to(dtype)


def quantisation_of(hf: dict[str, Any]) -> Fp8Blocks | None:
    """The scheme config.json's `quantization_config` declares (None: unquantised), or UsageError naming
    what dsfuse cannot load."""
    quant = hf.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise UsageError("config.json's quantization_config is not a JSON object")
    method = quant.get("quant_method")
    if method != "fp8":
        raise UsageError(f"quantised weights (quant_method {method!r}) are not supported: dsfuse loads DeepSeek's "
                         "fp8 block-wise checkpoints, or unquantised ones")
    for key, supported in (("fmt", "e4m3"), ("activation_scheme", "dynamic"), ("expert_dtype", "fp8")):
        if quant.get(key, supported) != supported:
            raise UsageError(f"fp8 checkpoints with {key} {quant[key]!r} are not supported yet (only {supported!r})")
    scale_fmt = quant.get("scale_fmt") or "float"
    if scale_fmt not in SCALE_FORMATS:
        raise UsageError(f"fp8 checkpoints with scale_fmt {scale_fmt!r} are not supported "
                         f"({', '.join(SCALE_FORMATS)} are)")
    block = quant.get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2
                                  and all(isinstance(b, int) and b > 0 for b in block)):
        raise UsageError(f"config.json's weight_block_size {block!r} is not two positive whole numbers")
    return Fp8Blocks(None if block is None else (block[0], block[1]))
