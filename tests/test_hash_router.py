"""Hash routing (DeepSeek-V4's first MoE layers) and V4's learned router, against transformers' routers with
the same weights: identical expert ids, weights within 1e-5."""

from __future__ import annotations

import pytest
import torch

from v4_reference import ref, tiny_config

from dsfuse.nn.moe import MoE, MoEConfig, hash_table


def _config(router: str) -> MoEConfig:
    config = tiny_config()
    return MoEConfig(dim=config.hidden_size, n_experts=config.n_routed_experts, top_k=config.num_experts_per_tok,
                     n_shared=1, expert_hidden=config.moe_intermediate_size, router=router,
                     affinity=config.scoring_func, route_scale=config.routed_scaling_factor,
                     vocab_size=config.vocab_size)


def test_hash_router_matches_transformers():
    config = tiny_config()
    theirs = ref.DeepseekV4HashRouter(config)
    torch.nn.init.normal_(theirs.weight)
    theirs.tid2eid.copy_(torch.randint(0, config.n_routed_experts, (config.vocab_size, 2)))
    layer = MoE(_config("hash"))
    layer.router.gate.weight.data.copy_(theirs.weight)
    layer.router.tid2eid.copy_(theirs.tid2eid)
    x, ids = torch.randn(2, 9, 64), torch.randint(0, config.vocab_size, (2, 9))
    _, weights, experts = theirs(x, ids)
    routing = layer.router(x.reshape(-1, 64), ids)
    assert torch.equal(routing.expert_ids, experts)
    torch.testing.assert_close(routing.weights, weights, atol=1e-5, rtol=1e-5)
    layer(x, token_ids=ids)  # the whole layer routes by token id
    assert torch.equal(layer.last_routing.expert_ids, theirs.tid2eid[ids.reshape(-1)])


def test_learned_router_with_sqrt_softplus_matches_transformers():
    """V4's top-k router is the aux-free router with sqrt-softplus affinities and a routed scale."""
    config = tiny_config()
    theirs = ref.DeepseekV4TopKRouter(config)
    torch.nn.init.normal_(theirs.weight)
    theirs.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts))
    layer = MoE(_config("aux-free"))
    layer.router.gate.weight.data.copy_(theirs.weight)
    layer.router.bias.copy_(theirs.e_score_correction_bias)
    x = torch.randn(30, 64)
    _, weights, experts = theirs(x)
    routing = layer.router(x)
    order_ours, order_theirs = routing.expert_ids.argsort(-1), experts.argsort(-1)
    assert torch.equal(routing.expert_ids.gather(-1, order_ours), experts.gather(-1, order_theirs))
    torch.testing.assert_close(routing.weights.gather(-1, order_ours), weights.gather(-1, order_theirs))


def test_a_fresh_hash_table_gives_each_token_distinct_experts_and_spreads_the_load():
    table = hash_table(vocab_size=1000, n_experts=8, top_k=2)
    assert all(len(set(row.tolist())) == 2 for row in table)
    load = torch.bincount(table.flatten(), minlength=8)
    assert load.min() >= 200 and load.max() <= 300


def test_the_hash_router_needs_its_table_and_the_token_ids():
    with pytest.raises(ValueError, match="vocab_size"):
        MoEConfig(dim=8, n_experts=4, top_k=2, router="hash")
    layer = MoE(MoEConfig(dim=8, n_experts=4, top_k=2, router="hash", vocab_size=10))
    with pytest.raises(ValueError, match="token_ids"):
        layer(torch.randn(3, 8))
