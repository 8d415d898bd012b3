"""DeepSeekMoE layer: dispatch equal to the naive loop, routers, capacity, losses, aux-free bias."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from dsfuse.nn.attention import AttentionConfig
from dsfuse.nn.moe import (DISPATCHES, MoE, MoEConfig, balance_loss, moe_aux_loss, moe_layers, moe_naive,
                           Router, plan_dispatch, seq_balance_loss, z_loss)
from dsfuse.nn.transformer import TransformerBlock


def _layer(**kw) -> MoE:
    torch.manual_seed(0)
    cfg = dict(dim=16, n_experts=8, top_k=2, n_shared=1, expert_hidden=12)
    return MoE(MoEConfig(**{**cfg, **kw}))


def _reference(layer: MoE, x: torch.Tensor, same_weights: bool = False) -> torch.Tensor:
    """The same routing run through the seed's per-expert boolean-mask loop, dropped slots weighing 0."""
    tokens = x.reshape(-1, x.shape[-1])
    routing = layer.router(tokens)
    weights = routing.weights
    rec = layer.last_routing
    if rec.kept is not None:
        weights = weights * rec.kept
    if same_weights:  # gradients must reach the layer's own parameters
        experts = [partial(layer.experts.expert, e) for e in range(layer.cfg.n_experts)]
    else:  # separate SwiGLU modules: an independent implementation of the experts
        experts = layer.experts.as_modules()
    return (moe_naive(tokens, routing.expert_ids, weights, experts) + layer.shared(tokens)).view_as(x)


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("router", ["topk", "noisy", "aux-free"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_dispatch_equals_naive_loop(dispatch, router, capacity_factor):
    layer = _layer(dispatch=dispatch, router=router, capacity_factor=capacity_factor).eval()
    x = torch.randn(3, 10, 16)
    y = layer(x)
    assert y.shape == x.shape
    assert torch.allclose(y, _reference(layer, x), atol=1e-5)
    if capacity_factor:
        assert (layer.last_routing.load <= layer.cfg.capacity(30)).all()
        assert layer.last_routing.kept.sum() == layer.last_routing.load.sum() < 60


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_gradients_match_naive_loop(dispatch):
    layer = _layer(dispatch=dispatch)
    x = torch.randn(20, 16, requires_grad=True)
    layer(x).square().sum().backward()
    got = [p.grad.clone() for p in (layer.experts.w13, layer.experts.w2, layer.router.gate.weight)] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    _reference(layer, x, same_weights=True).square().sum().backward()
    want = [layer.experts.w13.grad, layer.experts.w2.grad, layer.router.gate.weight.grad, x.grad]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


def test_capacity_keeps_the_first_tokens_of_each_expert():
    ids = torch.tensor([[0], [0], [1], [0], [0]])
    plan = plan_dispatch(ids, n_experts=2, capacity=2)
    assert plan.kept.tolist() == [True, True, True, False, False]
    assert plan.load.tolist() == [2, 1] and plan.demand.tolist() == [4, 1]
    assert plan.order.tolist() == [0, 1, 2]


def test_routers_pick_k_distinct_experts_with_normalised_gates():
    x = torch.randn(50, 16)
    for router in ("noisy", "aux-free"):
        routing = _layer(router=router).train().router(x)
        assert routing.expert_ids.shape == (50, 2)
        assert (routing.expert_ids[:, 0] != routing.expert_ids[:, 1]).all()
        assert torch.allclose(routing.weights.sum(-1), torch.ones(50), atol=1e-5)
        assert torch.allclose(routing.probs.sum(-1), torch.ones(50), atol=1e-5)


def test_noisy_router_is_noisy_only_while_training():
    layer = _layer(router="noisy")
    torch.nn.init.normal_(layer.router.noise.weight, std=1.0)
    x = torch.randn(64, 16)
    layer.eval()
    assert torch.equal(layer.router(x).expert_ids, layer.router(x).expert_ids)
    layer.train()
    assert not torch.equal(layer.router(x).expert_ids, layer.router(x).expert_ids)


def test_aux_free_bias_moves_against_load_and_only_while_training():
    layer = _layer(router="aux-free", bias_update_rate=0.1)
    with torch.no_grad():
        layer.router.gate.weight[0] += 5.0  # expert 0 wins for most tokens
    x = torch.randn(200, 16).abs()
    layer.eval()
    layer(x)
    assert torch.equal(layer.router.bias, torch.zeros(8))
    layer.train()
    layer(x)
    load = layer.last_routing.load
    assert layer.router.bias[0] == pytest.approx(-0.1) and load[0] > load.float().mean()
    assert (layer.router.bias[load.float() < load.float().mean()] == 0.1).all()


def test_balance_losses_are_one_when_even_and_larger_when_skewed():
    even_probs = torch.full((8, 4), 0.25)
    assert balance_loss(even_probs, torch.tensor([4, 4, 4, 4])) == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(8, 4)
    assert balance_loss(skewed, torch.tensor([8, 0, 0, 0])) > 2.0
    ids = torch.tensor([[0], [1], [2], [3], [0], [0], [0], [0]])
    per_seq = seq_balance_loss(torch.full((8, 4), 0.25), ids, n_seqs=2)
    assert per_seq == pytest.approx(1.0)  # each sequence's shares average to 1/4 against uniform probs
    assert z_loss(torch.logsumexp(torch.zeros(3, 4), -1)) == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)


def test_aux_losses_reach_the_router_through_the_model_helper():
    attn = AttentionConfig(dim=16, n_heads=2)
    moe = MoEConfig(dim=16, n_experts=4, top_k=2, n_shared=1, expert_hidden=8, seq_balance_weight=0.01)
    model = torch.nn.Sequential(TransformerBlock(16, attn, ffn="moe", moe=moe),
                                TransformerBlock(16, attn, ffn="moe", moe=moe))
    model(torch.randn(2, 5, 16))
    assert len(moe_layers(model)) == 2
    assert set(model[0].ffn.aux_losses) == {"balance", "seq_balance", "z"}
    loss = moe_aux_loss(model)
    loss.backward()
    assert model[0].ffn.router.gate.weight.grad.abs().sum() > 0
    assert moe_aux_loss(torch.nn.Linear(2, 2)).item() == 0.0


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="capacity"):
        MoEConfig(capacity_factor=-1)
    with pytest.raises(ValueError, match="router"):
        MoEConfig(router="hash")
    with pytest.raises(ValueError, match="moe"):
        TransformerBlock(16, AttentionConfig(dim=16, n_heads=2), ffn="moe")


@pytest.mark.parametrize("router", ["topk", "aux-free"])
def test_group_limited_routing_chooses_within_the_best_groups(router):
    torch.manual_seed(0)
    grouped = Router(MoEConfig(dim=16, n_experts=16, top_k=4, router=router, n_groups=4, topk_groups=2))
    free = Router(MoEConfig(dim=16, n_experts=16, top_k=4, router=router))
    free.load_state_dict(grouped.state_dict())
    x = torch.randn(256, 16)
    ids = grouped(x).expert_ids
    assert all(len(set(row.tolist())) <= 2 for row in ids // 4)  # experts from at most topk_groups groups
    assert not torch.equal(ids.sort(-1).values, free(x).expert_ids.sort(-1).values)  # the limit binds


def test_gate_weights_can_be_renormalised_and_scaled():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    plain = Router(MoEConfig(dim=16, n_experts=8, top_k=2))
    scaled = Router(MoEConfig(dim=16, n_experts=8, top_k=2, norm_topk=True, route_scale=2.5))
    scaled.load_state_dict(plain.state_dict())
    a, b = plain(x), scaled(x)
    assert torch.equal(a.expert_ids, b.expert_ids)
    assert torch.allclose(b.weights, 2.5 * a.weights / a.weights.sum(-1, keepdim=True))
    assert torch.allclose(b.weights.sum(-1), torch.full((32,), 2.5))


def test_a_gated_shared_expert_of_its_own_width():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=16, n_experts=4, top_k=1, n_shared=0, expert_hidden=8, shared_hidden=24,
                          shared_gate=True)).eval()
    assert layer.shared.w1.weight.shape == (24, 16)
    x = torch.randn(10, 16)
    with torch.no_grad():
        layer.shared_gate.weight.zero_()  # sigmoid(0): half the shared expert's output
        half = layer(x)
        layer.shared_gate = None
        ungated = layer(x)
        layer.shared = None
        routed_only = layer(x)
    assert torch.allclose(half - routed_only, (ungated - routed_only) / 2, atol=1e-6)
    assert not torch.allclose(ungated, routed_only)
