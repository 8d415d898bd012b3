"""mHC against transformers' DeepseekV4HyperConnection / HyperHead with the same random weights, the
Sinkhorn projection, and mHC as TransformerBlock's residual path."""

from __future__ import annotations

import torch

from v4_reference import randomize, ref, tiny_config

from dsfuse.nn.attention import AttentionConfig
from dsfuse.nn.hyper_connections import HyperConfig, HyperConnection, HyperHead, expand_streams, sinkhorn
from dsfuse.nn.transformer import TransformerBlock


def test_hyper_connection_matches_transformers():
    config = tiny_config()
    theirs = ref.DeepseekV4HyperConnection(config)
    randomize(theirs, seed=3)
    ours = HyperConnection(64, HyperConfig(4, config.hc_sinkhorn_iters, config.hc_eps), config.rms_norm_eps)
    ours.load_state_dict(theirs.state_dict())
    streams = torch.randn(2, 7, 4, 64)
    sublayer = torch.nn.Linear(64, 64)
    with torch.no_grad():
        post, comb, collapsed = theirs(streams)
        expected = post.unsqueeze(-1) * sublayer(collapsed).unsqueeze(-2) + comb.transpose(-1, -2) @ streams
        torch.testing.assert_close(ours(streams, sublayer), expected, atol=1e-5, rtol=1e-5)


def test_hyper_head_matches_transformers():
    config = tiny_config()
    theirs = ref.DeepseekV4HyperHead(config)
    randomize(theirs, seed=4)
    ours = HyperHead(64, HyperConfig(4, eps=config.hc_eps), config.rms_norm_eps)
    ours.load_state_dict(theirs.state_dict())
    streams = torch.randn(2, 7, 4, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(streams), theirs(streams), atol=1e-5, rtol=1e-5)


def test_sinkhorn_makes_doubly_stochastic_matrices():
    torch.manual_seed(0)
    matrix = sinkhorn(torch.randn(100, 4, 4), iterations=20)  # logits of mHC's size; columns exact, rows close
    torch.testing.assert_close(matrix.sum(-1), torch.ones(100, 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(matrix.sum(-2), torch.ones(100, 4), atol=1e-5, rtol=0)
    assert (matrix > 0).all()
    one_pass = sinkhorn(torch.randn(100, 4, 4), iterations=1)
    assert (one_pass.sum(-1) - 1).abs().max() > 1e-2  # the iterations are what make the rows sum to 1


def test_transformer_block_takes_mhc_as_its_residual_path():
    torch.manual_seed(0)
    block = TransformerBlock(32, AttentionConfig(dim=32, n_heads=4), hyper=HyperConfig(streams=3)).eval()
    x = torch.randn(2, 5, 32)
    streams = expand_streams(x, 3)
    with torch.no_grad():
        out = block(streams, causal=True)
        mid = block.attn_hc(streams, lambda h: block.attn(block.attn_norm(h), causal=True))
        expected = block.ffn_hc(mid, lambda h: block.ffn(block.ffn_norm(h)))
    assert out.shape == (2, 5, 3, 32)
    torch.testing.assert_close(out, expected)
    pre, post, comb = block.attn_hc.mixing(streams)
    assert pre.shape == post.shape == (2, 5, 3) and comb.shape == (2, 5, 3, 3)
    plain = TransformerBlock(32, AttentionConfig(dim=32, n_heads=4))
    assert plain.attn_hc is None and plain(x).shape == x.shape
