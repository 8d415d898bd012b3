"""nn/fusion.py: one interface, masks honoured, interaction where promised and none in late fusion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsfuse.nn.fusion import STRATEGIES, FusionConfig, ModalityFusion, masked_mean
from dsfuse.nn.transformer import CrossAttentionBlock

DIMS = (12, 20)


def make(strategy: str, **overrides) -> ModalityFusion:
    torch.manual_seed(0)
    cfg = FusionConfig(strategy, input_dims=overrides.pop("input_dims", DIMS), out_dim=3, dim=16, n_heads=2,
                       **overrides)
    return ModalityFusion(cfg).eval()


def inputs(batch: int = 3, lengths=(5, 7)) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    tokens = [torch.randn(batch, t, d) for t, d in zip(lengths, DIMS)]
    masks = [torch.ones(batch, t, dtype=torch.bool) for t in lengths]
    masks[1][0, 4:] = False  # the first sample's audio is shorter
    masks[0][1, 3:] = False  # the second sample's video is shorter
    return tokens, masks


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_maps_sequences_to_logits_and_trains_every_parameter(strategy):
    fusion = make(strategy).train()
    tokens, masks = inputs()
    out = fusion(tokens, masks)
    assert out.shape == (3, 3) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    unused = [name for name, p in fusion.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unused, f"parameters that never get a gradient: {unused}"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_padded_tokens_do_not_change_the_output(strategy):
    fusion = make(strategy)
    tokens, masks = inputs()
    before = fusion(tokens, masks)
    garbage = [t.clone() for t in tokens]
    garbage[1][0, 4:] = 1e3 * torch.randn_like(garbage[1][0, 4:])
    garbage[0][1, 3:] = -1e3
    after = fusion(garbage, masks)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_padding_to_a_longer_batch_gives_the_same_result_as_alone(strategy):
    """A sample's output does not depend on how much padding its batch needed."""
    fusion = make(strategy)
    alone = [torch.randn(1, 5, DIMS[0]), torch.randn(1, 3, DIMS[1])]
    padded = [torch.cat([x, torch.zeros(1, 4, x.shape[-1])], 1) for x in alone]
    masks = [torch.arange(x.shape[1] + 4)[None] < x.shape[1] for x in alone]
    torch.testing.assert_close(fusion(padded, masks), fusion(alone), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_fully_padded_modality_gives_finite_output(strategy):
    fusion = make(strategy)
    tokens, masks = inputs()
    masks[1][2] = False
    assert torch.isfinite(fusion(tokens, masks)).all()


@torch.no_grad()
def _interaction(fusion: ModalityFusion) -> float:
    """f(a1,v1) + f(a2,v2) - f(a1,v2) - f(a2,v1): zero exactly when the modalities add up independently."""
    a1, a2 = torch.randn(2, 4, 5, DIMS[0])
    v1, v2 = torch.randn(2, 4, 6, DIMS[1])
    return float((fusion([a1, v1]) + fusion([a2, v2]) - fusion([a1, v2]) - fusion([a2, v1])).abs().max())


@pytest.mark.parametrize("strategy", ["none", "late"])
def test_no_fusion_and_late_fusion_have_no_cross_modal_interaction(strategy):
    assert _interaction(make(strategy)) < 1e-5


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s not in ("none", "late")])
def test_the_other_strategies_let_modalities_interact(strategy):
    assert _interaction(make(strategy)) > 1e-3


def test_no_fusion_reads_the_first_modality_alone_which_may_come_alone():
    fusion = make("none")
    tokens, masks = inputs()
    with torch.no_grad():
        both = fusion(tokens, masks)
        other_audio = fusion([tokens[0], torch.randn_like(tokens[1])], masks)
        alone = fusion(tokens[:1], masks[:1])
    torch.testing.assert_close(other_audio, both)
    torch.testing.assert_close(alone, both)
    unimodal = ModalityFusion(FusionConfig("none", input_dims=DIMS[:1], out_dim=3, dim=16, n_heads=2))
    assert unimodal(tokens[:1]).shape == (3, 3)
    with pytest.raises(ValueError, match="at least two modalities"):
        FusionConfig("early", input_dims=DIMS[:1])


def test_gated_fusion_exposes_gates_that_sum_to_one_per_sample():
    fusion = make("gated")
    tokens, masks = inputs()
    fusion(tokens, masks)
    gates = fusion.gate_weights()
    assert gates.shape == (3, 2)
    torch.testing.assert_close(gates.sum(-1), torch.ones(3))
    assert make("early").gate_weights() is None


def test_late_fusion_weights_are_a_distribution():
    weights = make("late").modality_weights()
    torch.testing.assert_close(weights, torch.full((2,), 0.5))
    assert make("hybrid").modality_weights() is not None and make("mid").modality_weights() is None


def test_three_modalities_and_the_qformer_source():
    dims = (12, 20, 8)
    for strategy in STRATEGIES:
        fusion = make(strategy, input_dims=dims, query_modality=2)
        out = fusion([torch.randn(2, 4, d) for d in dims])
        assert out.shape == (2, 3)


def test_qformer_reads_its_source_through_a_fixed_number_of_queries():
    fusion = make("qformer", n_queries=3)
    short, long = torch.randn(1, 2, DIMS[0]), torch.randn(1, 50, DIMS[0])
    audio = torch.randn(1, 4, DIMS[1])
    assert fusion([short, audio]).shape == fusion([long, audio]).shape == (1, 3)


def test_gated_cross_attention_option_adds_gates():
    plain, gated = make("mid"), make("mid", gated_cross=True)
    assert sum(p.numel() for p in gated.parameters()) > sum(p.numel() for p in plain.parameters())
    block = CrossAttentionBlock(16, 2, 32, gated=True)
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    assert block(x, ctx, torch.tensor([[1, 1, 0, 0, 0], [1] * 5]).bool()).shape == (2, 3, 16)


def test_masked_mean_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(x, torch.tensor([[True, True, False]])).item() == 2.0


@pytest.mark.parametrize("bad, message", [
    (dict(strategy="sum"), "fusion strategy"),
    (dict(input_dims=(8,)), "at least two modalities"),
    (dict(dim=10, n_heads=4), "divisible"),
    (dict(query_modality=2), "query_modality"),
    (dict(depth=0), "at least 1"),
])
def test_bad_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        FusionConfig(**{"strategy": "early", "input_dims": DIMS, **bad})


def test_wrong_inputs_are_refused_with_what_was_expected():
    fusion = make("early")
    tokens, masks = inputs()
    with pytest.raises(ValueError, match="expected 2 modalities"):
        fusion(tokens[:1])
    with pytest.raises(ValueError, match=r"modality 1: expected tokens \[3, T, 20\]"):
        fusion([tokens[0], torch.randn(3, 7, 19)])
    with pytest.raises(ValueError, match="mask"):
        fusion(tokens, [masks[0], masks[1][:, :3]])


def _toy_pairs(n: int, task: str, generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Token sequences whose mean carries one bit per modality (+/- a fixed direction) under noise."""
    bits = torch.randint(0, 2, (2, n), generator=generator)
    fixed = torch.Generator().manual_seed(0)  # the same directions in every batch
    directions = [torch.randn(d, generator=fixed) for d in DIMS]
    tokens = [torch.randn(n, 4, d, generator=generator) + 2 * (2 * b[:, None, None] - 1) * u
              for b, u, d in zip(bits, directions, DIMS)]
    if task == "noise":  # the second modality is pure noise, the label is the first bit
        tokens[1] = 3 * torch.randn(n, 4, DIMS[1], generator=generator)
        return tokens, bits[0]
    return tokens, bits[0] ^ bits[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: on a busy machine a second thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(strategy: str, task: str, steps: int = 150) -> tuple[ModalityFusion, float]:
    g = torch.Generator().manual_seed(1)
    fusion = make(strategy).train()
    optimizer = torch.optim.AdamW(fusion.parameters(), lr=3e-3)
    for _ in range(steps):
        tokens, labels = _toy_pairs(64, task, g)
        loss = F.cross_entropy(fusion(tokens)[:, :2], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fusion.eval()
    tokens, labels = _toy_pairs(512, task, g)
    with torch.no_grad():
        accuracy = (fusion(tokens)[:, :2].argmax(-1) == labels).float().mean().item()
    return fusion, accuracy


@pytest.mark.parametrize("strategy", ["early", "gated"])
def test_interacting_fusion_learns_xor(strategy):
    assert _train(strategy, "xor")[1] >= 0.9


def test_late_fusion_cannot_learn_xor():
    assert _train("late", "xor")[1] <= 0.8  # an additive model gets at most 3 of the 4 XOR cells right


def test_gated_fusion_turns_down_a_noise_modality():
    fusion, accuracy = _train("gated", "noise")
    assert accuracy >= 0.95
    tokens, _ = _toy_pairs(256, "noise", torch.Generator().manual_seed(5))
    with torch.no_grad():
        fusion(tokens)
    assert fusion.gate_weights()[:, 1].mean() < 0.2
