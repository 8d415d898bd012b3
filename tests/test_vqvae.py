from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsfuse.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from dsfuse.errors import ConfigError, UsageError
from dsfuse.models.vqvae import VQVAE, VQVAEConfig


def tiny(quantizer: str = "vq", downsample: int = 8, **kw) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(image_size=32, downsample=downsample, codebook_size=64, latent_channels=8,
                             quantizer=quantizer, base_channels=8, channel_mult=(1, 2), **kw))


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
@pytest.mark.parametrize("downsample", [4, 8, 16])
def test_shapes_and_the_tokenize_decode_paths_agree(quantizer, downsample):
    model = tiny(quantizer, downsample)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model.train()
    rec, quantized = model(x)
    grid = 32 // downsample
    assert rec.shape == x.shape and quantized.indices.shape == (2, grid, grid)
    (rec.pow(2).mean() + quantized.stats["loss"]).backward()
    assert model.encoder.conv_in.weight.grad is not None  # gradients reach the encoder through the codes
    model.eval()
    z = model.encode(x)
    assert z.shape == (2, 8, grid, grid)
    z_q, indices, _ = model.quantize(z)
    tokens = model.tokenize(x)
    assert torch.equal(tokens, indices) and tokens.max() < model.codebook_size
    assert torch.allclose(model.decode_tokens(tokens), model.decode(z_q), atol=1e-5)


@pytest.mark.parametrize("fields, field, message", [
    ({"downsample": 32}, "downsample", "downsample"),
    ({"image_size": 100, "downsample": 16}, "image_size", "multiple"),
    ({"quantizer": "rvq"}, "quantizer", "quantizer must be one of vq, fsq"),
    ({"codebook_size": 1}, "codebook_size", "at least 2"),
    ({"quantizer": "fsq", "codebook_size": 1000}, "codebook_size", "power-of-two"),
])
def test_config_refuses_what_cannot_be_built_naming_the_field(fields, field, message):
    with pytest.raises(ConfigError, match=message) as refused:
        VQVAEConfig(**fields)
    assert refused.value.field == field


def test_a_preset_fills_the_options_not_given_and_the_run_records_them():
    from dsfuse.tasks.tokenizer import TokenizerOptions

    options = TokenizerOptions(data=Path("x"), preset="chameleon", codebook_size=1024).resolved()
    assert (options.image_size, options.codebook_size, options.base_channels, options.quantizer) == (512, 1024, 128, "vq")
    assert options.record()["image_size"] == 512
    assert TokenizerOptions(data=Path("x")).resolved().image_size == 256


def test_decode_tokens_refuses_ids_outside_the_codebook():
    model = tiny().eval()
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode_tokens(torch.full((1, 4, 4), 64))


def test_checkpoint_round_trip_keeps_tokens_and_fingerprint(tmp_path):
    model = tiny("vq")
    model.train()(torch.rand(4, 3, 32, 32) * 2 - 1)  # k-means init: the codebook is now data-made
    model.eval()
    save_checkpoint(tmp_path / "model.safetensors", model, CheckpointMeta.of("vqvae", model.config))
    loaded, meta = load_checkpoint(tmp_path, kind="vqvae")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.tokenize(x), model.tokenize(x))
    assert loaded.fingerprint() == model.fingerprint() and meta.config["quantizer"] == "vq"
    other = tiny("vq")
    assert other.fingerprint() != model.fingerprint()
    save_checkpoint(tmp_path / "toy.safetensors", torch.nn.Linear(2, 2), CheckpointMeta.of("toy", {"in_features": 2}))
    with pytest.raises(UsageError, match="expected vqvae"):
        load_checkpoint(tmp_path / "toy.safetensors", kind="vqvae")
