"""DeepSeek-V4 attention (sliding window with sinks, CSA with the lightning indexer, HCA) against transformers'
DeepseekV4Attention with the same random weights: outputs within 1e-4 in fp32 and identical indexer picks,
for a prefill and for decoding with the cache."""

from __future__ import annotations

import pytest
import torch

from v4_reference import ATTENTION_RENAMES, LAYER_TYPES, ReferenceAttention, attention_config, copy_weights, \
    randomize, tiny_config

from dsfuse.nn.v4_attention import V4Attention, V4AttentionConfig, V4Cache


def _pair(layer: int, chunk: int = 8) -> tuple[ReferenceAttention, V4Attention]:
    config = tiny_config()
    reference = ReferenceAttention(config, layer)
    randomize(reference.attn, seed=layer)
    ours = V4Attention(attention_config(config, layer, chunk=chunk)).eval()
    copy_weights(reference.attn, ours, ATTENTION_RENAMES)
    return reference, ours


def _same_picks(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(ours.sort(-1).values, theirs.sort(-1).values)


@pytest.mark.parametrize("layer", range(3), ids=LAYER_TYPES)
def test_prefill_matches_transformers(layer):
    reference, ours = _pair(layer)
    x = torch.randn(2, 45, 64, generator=torch.Generator().manual_seed(1))
    expected = reference(x)
    with torch.no_grad():
        got = ours(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if ours.indexer is not None:
        _same_picks(ours.last_selection, reference.selections[-1])
        assert (ours.last_selection >= 0).any() and (ours.last_selection[:, :3] == -1).all()


@pytest.mark.parametrize("layer", range(3), ids=LAYER_TYPES)
def test_decoding_with_the_cache_matches_transformers(layer):
    """A 13-token prompt, then 6 tokens one by one, a 5-token chunk and 14 more single tokens: windows close
    mid-chunk and between steps, and the CSA overlap carries across calls."""
    reference, ours = _pair(layer)
    reference.start_cache()
    cache = V4Cache()
    x = torch.randn(1, 38, 64, generator=torch.Generator().manual_seed(2))
    steps = [13] + [1] * 6 + [5] + [1] * 14
    start = 0
    with torch.no_grad():
        for size in steps:
            piece = x[:, start:start + size]
            torch.testing.assert_close(ours(piece, cache=cache), reference(piece), atol=1e-4, rtol=1e-4)
            if ours.indexer is not None:
                _same_picks(ours.last_selection, reference.selections[-1])
            start += size
    rate = ours.cfg.compress_rate
    assert cache.length == 38 and cache.window_kv.shape[2] == ours.cfg.window - 1
    if ours.compressor is not None:
        assert cache.compressor.n_rows == 38 // rate
    if ours.indexer is not None:
        assert cache.indexer.n_rows == 38 // rate


def test_chunking_changes_nothing():
    _, small = _pair(1, chunk=3)
    big = V4Attention(V4AttentionConfig(**{**small.cfg.__dict__, "chunk": 1024})).eval()
    big.load_state_dict(small.state_dict())
    x = torch.randn(1, 50, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(x), big(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(small.last_selection, big.last_selection)


def test_unknown_layer_type_is_named():
    with pytest.raises(ValueError, match="linear_attention"):
        V4AttentionConfig(layer_type="linear_attention")


def test_padding_masks_are_refused():
    with pytest.raises(ValueError, match="causal"):
        V4Attention(V4AttentionConfig())(torch.randn(1, 4, 64), mask=torch.ones(1, 4, dtype=torch.bool))
