"""A DeepSeek-V4 decoder layer built from dsfuse's blocks (TransformerBlock with V4 attention, the V4 MoE
with hash or learned routing and clipped SwiGLU experts, mHC residuals) against transformers'
DeepseekV4DecoderLayer with the same random weights: fp32 within 1e-4, the same indexer picks and the same
experts, for a prefill and while decoding with the cache."""

from __future__ import annotations

import pytest
import torch

from v4_reference import LAYER_TYPES, ReferenceAttention, block, block_state, randomize_layer, tiny_config

from dsfuse.nn.hyper_connections import expand_streams
from dsfuse.nn.v4_attention import V4Cache


@pytest.mark.parametrize("layer", range(3), ids=[f"{t}+{m}" for t, m in zip(LAYER_TYPES, ["hash", "learned",
                                                                                          "learned"])])
def test_decoder_layer_matches_transformers(layer):
    config = tiny_config()
    reference = ReferenceAttention(config, layer, decoder=True)
    randomize_layer(reference.module, config, seed=10 + layer)
    ours = block(config, layer).eval()
    ours.load_state_dict(block_state(reference.module.state_dict()), strict=True)
    generator = torch.Generator().manual_seed(5)
    streams = expand_streams(torch.randn(1, 30, 64, generator=generator), 4)
    token_ids = torch.randint(0, config.vocab_size, (1, 30), generator=generator)
    reference.start_cache()
    cache = V4Cache()
    start = 0
    with torch.no_grad():
        for size in [21, 1, 1, 4, 1, 1, 1]:
            piece, ids = streams[:, start:start + size], token_ids[:, start:start + size]
            torch.testing.assert_close(ours(piece, causal=True, cache=cache, token_ids=ids), reference(piece, ids),
                                       atol=1e-4, rtol=1e-4)
            assert torch.equal(ours.ffn.last_routing.expert_ids.sort(-1).values,
                               reference.experts[-1].sort(-1).values)
            if ours.attn.indexer is not None:
                assert torch.equal(ours.attn.last_selection.sort(-1).values, reference.selections[-1].sort(-1).values)
            start += size
    with torch.no_grad():  # the clip is exercised, not idle: without it the layer computes something else
        clipped = ours(streams, causal=True, token_ids=token_ids)
        ours.ffn.experts.limit = ours.ffn.shared.limit = 0.0
        assert not torch.allclose(ours(streams, causal=True, token_ids=token_ids), clipped, atol=1e-3)
