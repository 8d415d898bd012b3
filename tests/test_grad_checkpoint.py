"""Activation checkpointing (--grad-checkpoint) recomputes the transformer and UNet blocks in the backward
pass: the same loss and gradients (dropout included), for less memory."""

from __future__ import annotations

import pytest
import torch

from dsfuse.models.audio import AudioEmotionClassifier, AudioEmotionConfig
from dsfuse.models.unet import UNet, UNetConfig
from dsfuse.nn.checkpointing import saved_activation_bytes, set_grad_checkpointing


def loss_and_grads(model: torch.nn.Module, run, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    assert set_grad_checkpointing(model, checkpointing) > 0
    torch.manual_seed(7)  # the same dropout masks both times
    loss = run(model)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ffn", ["swiglu", "moe"])
def test_audio_mla_model_gets_the_same_gradients(ffn):
    torch.manual_seed(0)
    model = AudioEmotionClassifier(AudioEmotionConfig(n_mels=16, dim=32, depth=2, ffn=ffn, ffn_hidden=64)).train()
    features = torch.randn(3, 40, 16)
    run = lambda m: m(features).logsumexp(-1).mean()  # noqa: E731
    plain, grads = loss_and_grads(model, run, False)
    if ffn == "moe":  # the router's aux-free bias moves on every forward: run it back to the same state
        torch.manual_seed(0)
        model = AudioEmotionClassifier(AudioEmotionConfig(n_mels=16, dim=32, depth=2, ffn=ffn, ffn_hidden=64)).train()
    checkpointed, again = loss_and_grads(model, run, True)
    assert checkpointed == pytest.approx(plain, abs=1e-6)
    assert grads.keys() == again.keys()
    for name in grads:
        assert torch.allclose(grads[name], again[name], atol=1e-5), name


def test_unet_gets_the_same_gradients_with_dropout():
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                            attention_resolutions=(4,), head_channels=8, dropout=0.3)).train()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 500])
    run = lambda m: m(x, t).square().mean()  # noqa: E731
    plain, grads = loss_and_grads(model, run, False)
    checkpointed, again = loss_and_grads(model, run, True)
    assert checkpointed == pytest.approx(plain, abs=1e-6)
    for name in grads:
        assert torch.allclose(grads[name], again[name], atol=1e-5), name


def test_checkpointing_keeps_fewer_activations():
    model = UNet(UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=2,
                            attention_resolutions=(8,), head_channels=8)).train()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    run = lambda m: m(x, t).square().mean()  # noqa: E731
    set_grad_checkpointing(model, False)
    plain = saved_activation_bytes(lambda: run(model))
    set_grad_checkpointing(model, True)
    assert saved_activation_bytes(lambda: run(model)) < plain / 2


def test_checkpointing_is_off_in_eval_and_without_gradients():
    model = UNet(UNetConfig(image_size=8, base_channels=16, channel_mults=(1,), num_res_blocks=1,
                            attention_resolutions=(), head_channels=8)).eval()
    set_grad_checkpointing(model, True)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 8, 8), torch.tensor([1])).shape == (1, 3, 8, 8)
