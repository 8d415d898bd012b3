from __future__ import annotations

import pytest
import torch

from dsfuse.nn.compress import (CompressionError, PixelShuffleProjector, attention_fidelity, avg_pool_tokens,
                                bipartite_merge, pixel_shuffle_tokens, pixel_unshuffle_tokens, pool_kernel,
                                proportional_attention, tome_steps, tome_tokens, unpool_tokens, untome_tokens)


def test_pool_kernel_is_closest_to_square():
    assert pool_kernel(1) == (1, 1)
    assert pool_kernel(2) == (1, 2)
    assert pool_kernel(4) == (2, 2)
    assert pool_kernel(8) == (2, 4)
    assert pool_kernel(16) == (4, 4)
    with pytest.raises(CompressionError):
        pool_kernel(2.5)
    with pytest.raises(CompressionError):
        pool_kernel(0.5)


def test_avg_pool_averages_each_window_and_unpool_puts_it_back():
    grid = torch.arange(16.0).reshape(4, 4)  # row-major 4x4 grid of scalars
    x = grid.reshape(1, 16, 1)
    out = avg_pool_tokens(x, (4, 4), (2, 2))
    assert out.grid == (2, 2) and out.tokens.shape == (1, 4, 1)
    assert out.tokens[0, :, 0].tolist() == [grid[:2, :2].mean(), grid[:2, 2:].mean(), grid[2:, :2].mean(),
                                            grid[2:, 2:].mean()]
    assert out.sizes.tolist() == [[4.0] * 4]
    back = unpool_tokens(out.tokens, (4, 4), (2, 2)).reshape(4, 4)
    assert back[0, 0] == back[1, 1] == grid[:2, :2].mean()


def test_grid_that_does_not_split_is_refused():
    with pytest.raises(CompressionError, match="does not split"):
        avg_pool_tokens(torch.zeros(1, 6 * 6, 3), (6, 6), (4, 4))
    with pytest.raises(CompressionError, match="does not hold"):
        avg_pool_tokens(torch.zeros(1, 10, 3), (3, 3), (1, 1))


def test_pixel_unshuffle_round_trips_and_stacks_windows():
    x = torch.randn(2, 6 * 4, 5)
    y = pixel_unshuffle_tokens(x, (6, 4), (2, 2))
    assert y.shape == (2, 6, 20)
    assert torch.equal(y[0, 0, :5], x[0, 0]) and torch.equal(y[0, 0, 5:10], x[0, 1])
    assert torch.equal(y[0, 0, 10:15], x[0, 4])  # second row of the first window
    assert torch.equal(pixel_shuffle_tokens(y, (6, 4), (2, 2)), x)


def test_pixel_shuffle_projector_shapes():
    proj = PixelShuffleProjector(dim=8, kernel=(2, 2))
    out = proj(torch.randn(3, 16, 8), (4, 4))
    assert out.tokens.shape == (3, 4, 8) and out.grid == (2, 2)
    assert proj.expand(out.tokens, (4, 4)).shape == (3, 16, 8)


def test_bipartite_merge_merges_identical_tokens_with_size_weighted_average():
    # Tokens 0 and 1 are equal, as are 2 and 3: merging 2 must fold each A token into its twin.
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]]])
    sizes = torch.tensor([[1.0, 3.0, 2.0, 2.0, 1.0, 1.0]])
    x = x.clone()
    x[0, 1] = torch.tensor([2.0, 0.0])  # same direction as token 0 (cosine 1), different length
    tokens, new_sizes, index = bipartite_merge(x, sizes, r=2)
    assert tokens.shape == (1, 4, 2)
    # Token 0 (size 1, [1,0]) went into token 1 (size 3, [2,0]): (1*1 + 3*2) / 4 = 1.75.
    merged_into_1 = tokens[0, index[0, 1]]
    assert torch.allclose(merged_into_1, torch.tensor([1.75, 0.0]))
    assert index[0, 0] == index[0, 1] and index[0, 2] == index[0, 3]
    assert new_sizes.sum() == sizes.sum()
    assert new_sizes[0, index[0, 1]] == 4.0


def test_tome_halves_tokens_keeps_total_size_and_expands_back():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 16)
    out = tome_tokens(x, ratio=2)
    assert out.tokens.shape == (2, 32, 16)
    assert torch.allclose(out.sizes.sum(1), torch.full((2,), 64.0))
    # The size-weighted mean of all tokens is unchanged by merging.
    assert torch.allclose((out.tokens * out.sizes[..., None]).sum(1) / 64, x.mean(1), atol=1e-5)
    expanded = untome_tokens(out.tokens, out.source)
    assert expanded.shape == x.shape
    counts = torch.stack([torch.bincount(s, minlength=32) for s in out.source]).float()
    assert torch.equal(counts, out.sizes)


def test_tome_steps_respect_r_and_reach_the_ratio():
    assert tome_steps(64, 2) == [32]
    assert tome_steps(64, 4) == [32, 16]
    assert tome_steps(64, 2, r=8) == [8, 8, 8, 8]
    assert sum(tome_steps(576, 16)) == 576 - 36
    assert tome_steps(10, 1) == []
    with pytest.raises(CompressionError):
        tome_steps(10, 0.5)


def test_proportional_attention_equals_attention_over_duplicated_tokens():
    torch.manual_seed(0)
    q, k = torch.randn(1, 5, 4), torch.randn(1, 3, 4)
    v = torch.randn(1, 3, 4)
    sizes = torch.tensor([[1.0, 2.0, 3.0]])
    dup = torch.tensor([0, 1, 1, 2, 2, 2])
    expected = proportional_attention(q, k[:, dup], v[:, dup])
    assert torch.allclose(proportional_attention(q, k, v, sizes), expected, atol=1e-6)


def test_attention_fidelity_is_one_for_lossless_merges_and_lower_for_lossy():
    torch.manual_seed(0)
    base = torch.randn(1, 16, 8)
    twins = base.repeat_interleave(2, dim=1)  # every token twice: merging pairs loses nothing
    queries = torch.randn(1, 10, 8)
    merged = tome_tokens(twins, ratio=2)
    expanded = untome_tokens(merged.tokens, merged.source)
    assert torch.allclose(attention_fidelity(twins, expanded, queries), torch.ones(1), atol=1e-5)
    # Over the expanded tokens is the same as proportional attention over the merged ones.
    assert torch.allclose(proportional_attention(queries, expanded, expanded),
                          proportional_attention(queries, merged.tokens, merged.tokens, merged.sizes), atol=1e-5)
    pooled = avg_pool_tokens(base, (4, 4), (4, 4))
    lossy = unpool_tokens(pooled.tokens, (4, 4), (4, 4))
    assert attention_fidelity(base, lossy, queries).item() < 0.99
