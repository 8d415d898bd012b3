"""Attention family: equal to a written-out reference, masks, RoPE, KV cache, MLA absorption, sizes."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange, repeat

from dsfuse.nn.attention import (MLA, Attention, AttentionConfig, CrossAttention, KVCache, RotaryEmbedding,
                                 build_attention, kv_cache_bytes_per_token)
from dsfuse.nn.ffn import SwiGLU
from dsfuse.nn.transformer import TransformerBlock

KINDS = {
    "mha": AttentionConfig(dim=32, n_heads=4, kind="mha"),
    "gqa": AttentionConfig(dim=32, n_heads=4, kind="gqa", n_kv_heads=2),
    "mqa": AttentionConfig(dim=32, n_heads=4, kind="mqa"),
    "mla": AttentionConfig(dim=32, n_heads=4, kind="mla", q_lora_rank=16, kv_lora_rank=12,
                           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
    "mla-no-q-lora": AttentionConfig(dim=32, n_heads=4, kind="mla", kv_lora_rank=12, qk_nope_head_dim=8,
                                     qk_rope_head_dim=4, v_head_dim=6),
}


def _padding_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def reference_attention(attn: Attention, x, mask, causal):
    """Softmax attention written out, with key/value heads repeated per group."""
    cfg = attn.cfg
    q = rearrange(attn.wq(x), "b t (h d) -> b h t d", h=cfg.n_heads)
    k = rearrange(attn.wk(x), "b t (h d) -> b h t d", h=cfg.kv_heads)
    v = rearrange(attn.wv(x), "b t (h d) -> b h t d", h=cfg.kv_heads)
    if attn.rope is not None:
        q, k = attn.rope(q), attn.rope(k)
    group = cfg.n_heads // cfg.kv_heads
    k, v = (repeat(t, "b h t d -> b (h g) t d", g=group) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    T = x.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None] & (mask[:, None, None, :] if mask is not None else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.wo(rearrange(out, "b h t d -> b t (h d)"))


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_written_out_reference(kind, causal):
    torch.manual_seed(0)
    attn = build_attention(KINDS[kind]).eval()
    x = torch.randn(2, 7, 32)
    mask = _padding_mask([7, 5], 7)
    got = attn(x, mask=mask, causal=causal)
    want = reference_attention(attn, x, mask, causal)
    assert torch.allclose(got[mask], want[mask], atol=1e-5)


def test_gqa_with_repeated_kv_weights_equals_mha():
    torch.manual_seed(0)
    gqa = Attention(KINDS["gqa"]).eval()
    mha = Attention(KINDS["mha"]).eval()
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):  # each kv head serves n_heads / n_kv_heads query heads
            w = rearrange(getattr(gqa, name).weight, "(h d) c -> h d c", h=2)
            getattr(mha, name).weight.copy_(rearrange(repeat(w, "h d c -> (h g) d c", g=2), "h d c -> (h d) c"))
    x = torch.randn(2, 6, 32)
    assert torch.allclose(gqa(x, causal=True), mha(x, causal=True), atol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_padding_tokens_do_not_change_real_outputs(kind):
    torch.manual_seed(0)
    attn = build_attention(KINDS[kind]).eval()
    x = torch.randn(2, 6, 32)
    mask = _padding_mask([6, 4], 6)
    other = x.clone()
    other[1, 4:] = torch.randn(2, 32) * 10
    a, b = attn(x, mask=mask), attn(other, mask=mask)
    assert torch.isfinite(a).all()
    assert torch.allclose(a[mask], b[mask], atol=1e-5)
    assert not torch.allclose(attn(other)[1, :4], a[1, :4], atol=1e-3)  # without the mask it does change


@pytest.mark.parametrize("kind", list(KINDS))
def test_causal_outputs_ignore_the_future(kind):
    torch.manual_seed(0)
    attn = build_attention(KINDS[kind]).eval()
    x = torch.randn(1, 8, 32)
    changed = x.clone()
    changed[:, 5:] = torch.randn(1, 3, 32)
    assert torch.allclose(attn(x, causal=True)[:, :5], attn(changed, causal=True)[:, :5], atol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_step_by_step_decoding_with_cache_equals_full_pass(kind):
    torch.manual_seed(0)
    attn = build_attention(KINDS[kind]).eval()
    x = torch.randn(2, 9, 32)
    full = attn(x, causal=True)
    cache = KVCache()
    prefill = attn(x[:, :4], causal=True, cache=cache)  # a prompt of 4, then one token at a time
    steps = [attn(x[:, t:t + 1], causal=True, cache=cache) for t in range(4, 9)]
    assert cache.length == 9
    assert torch.allclose(torch.cat([prefill, *steps], 1), full, atol=1e-5)
    assert cache.nbytes() == 2 * 9 * kv_cache_bytes_per_token(KINDS[kind], dtype_bytes=4)


def test_cache_remembers_left_padding_of_the_prompt():
    torch.manual_seed(0)
    attn = build_attention(KINDS["gqa"]).eval()
    x = torch.randn(2, 6, 32)
    mask = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    full = attn(x, mask=mask, causal=True)
    cache = KVCache()
    out = torch.cat([attn(x[:, :3], mask=mask[:, :3], causal=True, cache=cache),
                     *[attn(x[:, t:t + 1], causal=True, cache=cache) for t in range(3, 6)]], 1)
    assert torch.allclose(out[mask], full[mask], atol=1e-5)


@pytest.mark.parametrize("kind", ["mla", "mla-no-q-lora"])
def test_mla_absorbed_attention_equals_expanded_attention(kind):
    torch.manual_seed(0)
    mla = MLA(KINDS[kind]).eval()
    x = torch.randn(2, 6, 32)
    q_nope, q_rope = mla._queries(x, 0)
    c_kv, k_rope = mla._latent(x, 0)
    mask = _padding_mask([6, 4], 6)
    for causal in (False, True):
        expanded = mla._attend_expanded(q_nope, q_rope, c_kv, k_rope, mask, causal, 0, 0.0)
        absorbed = mla._attend_absorbed(q_nope, q_rope, c_kv, k_rope, mask, causal, 0, 0.0)
        real = mask[:, None, :, None].expand_as(expanded)  # outputs [B, H, T, Dv] of real queries
        assert torch.allclose(absorbed[real], expanded[real], atol=1e-5)


def test_mla_cache_holds_only_the_latent_and_rope_key():
    mla = MLA(KINDS["mla"]).eval()
    cache = KVCache()
    mla(torch.randn(2, 5, 32), causal=True, cache=cache)
    mla(torch.randn(2, 1, 32), causal=True, cache=cache)
    assert set(cache.tensors) == {"c_kv", "k_rope"}
    assert cache.tensors["c_kv"].shape == (2, 6, 12) and cache.tensors["k_rope"].shape == (2, 1, 6, 4)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    scores = [(rope(q, offset=p + 3) * rope(k, offset=p)).sum() for p in (0, 5, 17)]
    assert torch.allclose(torch.stack(scores), scores[0].expand(3), atol=1e-5)
    assert torch.allclose(rope(q, 0), q)  # position 0 is the identity
    assert torch.allclose(rope(q, 11).norm(), q.norm(), atol=1e-5)  # a rotation


def test_kv_cache_bytes_follow_deepseek_v2_formulas():
    d_h, heads = 128, 128  # DeepSeek-V2: d_c = 4 d_h, d_R = d_h / 2, so MLA caches 4.5 d_h per layer
    mla = AttentionConfig(dim=5120, n_heads=heads, kind="mla", q_lora_rank=1536, kv_lora_rank=512,
                          qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    assert kv_cache_bytes_per_token(mla, dtype_bytes=1) == 4.5 * d_h
    mha = AttentionConfig(dim=5120, n_heads=heads, head_dim=d_h)
    assert kv_cache_bytes_per_token(mha, dtype_bytes=1) == 2 * heads * d_h
    gqa = AttentionConfig(dim=5120, n_heads=heads, kind="gqa", n_kv_heads=8, head_dim=d_h)
    assert kv_cache_bytes_per_token(gqa, dtype_bytes=2, n_layers=60) == 2 * 8 * d_h * 2 * 60
    assert kv_cache_bytes_per_token(AttentionConfig(dim=5120, n_heads=heads, kind="mqa", head_dim=d_h)) == 4 * d_h


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="kind"):
        AttentionConfig(kind="flash")
    with pytest.raises(ValueError, match="divide"):
        AttentionConfig(dim=32, n_heads=4, kind="gqa", n_kv_heads=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        AttentionConfig(dim=32, n_heads=4, kind="gqa")


def test_cross_attention_ignores_masked_context():
    torch.manual_seed(0)
    xattn = CrossAttention(32, 4, context_dim=20).eval()
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 20)
    context_mask = _padding_mask([7, 3], 7)
    changed = context.clone()
    changed[1, 3:] = torch.randn(4, 20)
    a = xattn(x, context, context_mask)
    assert a.shape == (2, 5, 32)
    assert torch.allclose(a, xattn(x, changed, context_mask), atol=1e-5)
    assert torch.allclose(a[1], xattn(x[1:], context[1:, :3])[0], atol=1e-5)  # same as cutting the padding off


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_transformer_block_trains(kind):
    torch.manual_seed(0)
    block = TransformerBlock(32, KINDS[kind], ffn_hidden=64)
    x, target = torch.randn(4, 6, 32), torch.randn(4, 6, 32)
    opt = torch.optim.AdamW(block.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = (block(x, causal=True) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_swiglu_is_gated():
    ffn = SwiGLU(8, 16)
    with torch.no_grad():
        ffn.w1.weight.zero_()  # silu(0) = 0 closes the gate
    assert torch.equal(ffn(torch.randn(3, 8)), torch.zeros(3, 8))


def test_a_forked_mla_cache_continues_like_the_full_sequence():
    torch.manual_seed(0)
    mla = MLA(KINDS["mla"]).eval()
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        full = mla(x, causal=True)
        cache = KVCache()
        mla(x[:, :7], causal=True, cache=cache)
        forked = cache.fork(5)  # keep 5 of the 7 cached positions, then go on from there
        steps = [mla(x[:, i:i + 1], causal=True, cache=forked) for i in range(5, 9)]
    assert forked.length == 9 and cache.length == 7 and cache.tensors["c_kv"].shape[1] == 7
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 5:], atol=1e-5, rtol=1e-4)
