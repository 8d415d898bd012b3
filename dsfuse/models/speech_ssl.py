"""Self-supervised speech encoders (torchaudio's wav2vec2, HuBERT and WavLM base bundles) for classifiers.

Split in two: `SslFeatures`, the frozen encoder (waveform -> the hidden states of its lower layers,
computed once per clip and cached by the task), and `SslFront`, the trainable part a classifier puts
on top: the encoder's top `unfreeze` layers (fine-tuned), then a learned softmax mix of every layer's
hidden states (which layers carry the task) and a projection to the classifier's width. The encoder's
weights come from the task (`dsfuse.weights`); a checkpoint keeps only what `SslFront` holds.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from einops import rearrange
from torch import nn

from dsfuse import choices
from dsfuse.choices import SpeechEncoder

# encoder name -> torchaudio.pipelines bundle
SSL_BUNDLES = {"wav2vec2-base": "WAV2VEC2_BASE", "hubert-base": "HUBERT_BASE", "wavlm-base": "WAVLM_BASE",
               "wavlm-base-plus": "WAVLM_BASE_PLUS"}
WEIGHTS_ROOT = "https://download.pytorch.org/torchaudio/models/"  # where torchaudio's bundles fetch from
SAMPLE_RATE = 16000
FRAME_SAMPLES = 320  # one hidden state per 20 ms
MIN_SAMPLES = 400  # the convolutional feature extractor's receptive field
WINDOW_SECONDS = 20.0  # long audio goes through the encoder window by window: memory stays flat


def _bundle(encoder: str) -> Any:
    import torchaudio.pipelines

    if encoder not in SSL_BUNDLES:
        choices.check(encoder, SpeechEncoder, "encoder")
        raise ValueError(f"{encoder!r} is not a self-supervised encoder")
    return getattr(torchaudio.pipelines, SSL_BUNDLES[encoder])


def weights_url(encoder: str) -> str:
    """The URL of the bundle's weights file (torchaudio caches it under torch hub's checkpoints/)."""
    return WEIGHTS_ROOT + _bundle(encoder)._path


def architecture(encoder: str) -> dict[str, Any]:
    """The bundle's architecture parameters (torchaudio's builder arguments)."""
    return dict(_bundle(encoder)._params)


def is_wavlm(encoder: str) -> bool:
    return encoder.startswith("wavlm")


def build_ssl_model(encoder: str, params: dict[str, Any]) -> nn.Module:
    """The encoder's network at random initialisation, built by torchaudio's builder with `params`."""
    from torchaudio.models import wav2vec2_model, wavlm_model

    params = {k: [tuple(c) for c in v] if k == "extractor_conv_layer_config" else v for k, v in params.items()}
    return (wavlm_model if is_wavlm(encoder) else wav2vec2_model)(**params)


def layer_count(params: dict[str, Any]) -> int:
    return int(params["encoder_num_layers"])


class SslFeatures(nn.Module):
    """The frozen encoder: a waveform [n] at 16 kHz -> the hidden states of its first `keep` transformer
    layers [frames, keep, dim], computed window by window (`WINDOW_SECONDS`) so memory stays flat."""

    def __init__(self, model: nn.Module, keep: int):
        super().__init__()
        self.model, self.keep = model.eval().requires_grad_(False), keep

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        window = round(WINDOW_SECONDS * SAMPLE_RATE)
        pieces = []
        for chunk in wave.split(window):
            if len(chunk) < MIN_SAMPLES:
                if pieces:  # a sliver at the end adds no frame worth having
                    break
                chunk = nn.functional.pad(chunk, (0, MIN_SAMPLES - len(chunk)))
            hidden, _ = self.model.extract_features(chunk[None].to(device).float(), num_layers=self.keep)
            pieces.append(torch.stack(hidden, dim=2)[0].cpu())
        return torch.cat(pieces)


class LayerMix(nn.Module):
    """A learned softmax weight per layer: hidden states [B, T, L, D] -> their weighted sum [B, T, D]."""

    def __init__(self, layers: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(layers))

    def weights(self) -> torch.Tensor:
        return self.logits.softmax(0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btld,l->btd", hidden, self.weights())


class SslFront(nn.Module):
    """Cached hidden states [B, T, L - unfreeze, D] + mask [B, T] -> [B, T, dim]: the encoder's top
    `unfreeze` layers run on the last cached one, all L layers are mixed, then projected."""

    def __init__(self, encoder: SpeechEncoder, params: dict[str, Any], unfreeze: int, dim: int):
        super().__init__()
        layers, width = layer_count(params), int(params["encoder_embed_dim"])
        if not 0 <= unfreeze < layers:
            raise ValueError(f"unfreeze must be between 0 and {layers - 1} for {encoder}, got {unfreeze}")
        self.wavlm = is_wavlm(encoder)
        blocks = build_ssl_model(encoder, params).encoder.transformer.layers if unfreeze else []
        self.top = nn.ModuleList(list(blocks)[layers - unfreeze:])
        if self.wavlm and unfreeze:  # WavLM's relative position bias lives in layer 0: the first top layer computes it
            self._carry_position_bias(blocks[0])
        self.mix = LayerMix(layers)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, dim)

    def _carry_position_bias(self, first: nn.Module) -> None:
        attention = self.top[0].attention
        attention.rel_attn_embed = copy.deepcopy(first.attention.rel_attn_embed)
        attention.has_relative_attention_bias = True

    def load_top(self, pretrained: nn.Module) -> None:
        """Start the top layers (and WavLM's position bias) from the pretrained encoder's weights."""
        blocks = pretrained.encoder.transformer.layers
        for mine, theirs in zip(self.top, list(blocks)[len(blocks) - len(self.top):]):
            mine.load_state_dict(theirs.state_dict(), strict=False)
        if self.wavlm and len(self.top):
            self.top[0].attention.rel_attn_embed.load_state_dict(blocks[0].attention.rel_attn_embed.state_dict())

    def hidden_states(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cached [B, T, L - unfreeze, D] -> all L layers' hidden states [B, T, L, D], the top ones computed."""
        hidden = hidden.float()
        if not len(self.top):
            return hidden
        if self.wavlm:
            padding = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -10000.0)
            kwargs: dict[str, Any] = {"attention_mask": None, "key_padding_mask": padding}
        else:
            kwargs = {"attention_mask": rearrange(-10000.0 * (~mask).float(), "b t -> b 1 1 t")
                      .expand(-1, 1, mask.shape[1], -1)}
        x, bias, states = hidden[:, :, -1], None, [hidden]
        for block in self.top:
            x, bias = block(x, position_bias=bias, **kwargs)
            states.append(x[:, :, None])
        return torch.cat(states, dim=2)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.mix(self.norm(self.hidden_states(hidden, mask))))
