"""Parity with transformers for every supported architecture: a tiny random model saved with
save_pretrained loads onto dsfuse's core and gives the same logits (padded batch, fp32), the same routed
experts in every MoE layer, and the same 20 greedy tokens decoded with the KV cache (MLA absorbed)."""

from __future__ import annotations

import pytest
import torch

from hf_models import SPECS, VOCAB, save_tiny

from dsfuse.models.hf import ModelFolder, load_model
from dsfuse.models.llama import generate
from dsfuse.nn.attention import MLA
from dsfuse.nn.moe import moe_layers


@pytest.fixture(scope="module", params=sorted(SPECS))
def pair(request, tmp_path_factory):
    """(transformers model, dsfuse model) for one architecture, built once per module."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = save_tiny(request.param, folder)
    return reference, load_model(ModelFolder(folder))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[1, 9:] = False  # right padding
    return tokens, mask


def _hf_routes(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The expert ids [B*T, k] each transformers router picked, in layer order."""
    routes: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: routes.append(out[2]))
             for m in model.modules() if type(m).__name__.lower().endswith("router")]
    try:
        with torch.no_grad():
            model(input_ids=tokens, attention_mask=mask.long())
    finally:
        for hook in hooks:
            hook.remove()
    return routes


def test_logits_match_transformers_on_a_padded_batch(pair):
    reference, model = pair
    tokens, mask = _batch()
    with torch.no_grad():
        expected = reference(input_ids=tokens, attention_mask=mask.long()).logits
        got = model(tokens, mask=mask)
    assert got.shape == expected.shape
    assert (got - expected)[mask].abs().max() < 1e-4


def test_every_moe_layer_routes_every_token_to_the_same_experts(pair):
    reference, model = pair
    tokens, mask = _batch()
    expected = _hf_routes(reference, tokens, mask)
    with torch.no_grad():
        model(tokens, mask=mask)
    layers = moe_layers(model)
    assert len(layers) == len(expected) == len(model.cfg.moe_layers)  # none in a dense model
    real = mask.flatten()
    for layer, ids in zip(layers, expected):
        got = layer.last_routing.expert_ids
        assert torch.equal(got[real].sort(-1).values, ids[real].sort(-1).values)


def test_twenty_greedy_tokens_with_the_kv_cache_match(pair, monkeypatch):
    reference, model = pair
    prompt = _batch()[0][0, :6]
    expected = reference.generate(prompt[None], max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    absorbed = []
    real_absorbed = MLA._attend_absorbed
    monkeypatch.setattr(MLA, "_attend_absorbed", lambda self, *a: absorbed.append(1) or real_absorbed(self, *a))
    got = list(generate(model, prompt.tolist(), max_new_tokens=20, stop=set()))
    assert got == expected
    if any(isinstance(m, MLA) for m in model.modules()):
        assert absorbed  # decoding went through the absorbed path
