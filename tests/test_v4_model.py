"""DeepSeek-V4 through the model-folder path: a tiny random DeepseekV4ForCausalLM saved by transformers (fp32,
every attention type, hash and learned MoE layers) loads onto dsfuse's core and gives logits within 1e-4,
the same indexer picks and experts, and the same 20 greedy tokens decoded with the cache; bad configs are
one line each."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from hf_models import tiny_tokenizer
from v4_reference import randomize_layer, ref, tiny_config

from dsfuse.errors import UsageError
from dsfuse.models.deepseek_v4 import V4CausalLM
from dsfuse.models.hf import ModelFolder, load_model
from dsfuse.models.llama import generate
from dsfuse.nn.moe import moe_layers
from dsfuse.nn.v4_attention import V4Attention


def _saved(folder, **overrides):
    """(transformers model, dsfuse model, folder) of a tiny random V4 saved by save_pretrained."""
    config = tiny_config(vocab_size=300, bos_token_id=None, eos_token_id=None, **overrides)
    torch.manual_seed(0)
    reference = ref.DeepseekV4ForCausalLM(config).eval()
    randomize_layer(reference, config, seed=7)
    reference.save_pretrained(folder)
    tiny_tokenizer(folder)
    return reference, load_model(ModelFolder(folder)), folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Sliding, CSA, HCA; one hash layer then two learned."""
    return _saved(tmp_path_factory.mktemp("v4"))


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another schedule and other sizes: CSA first, two hash layers, rates 2 and 16, an 8-token window,
    2 streams, 4 output groups, half the head rotary."""
    return _saved(tmp_path_factory.mktemp("v4-other"), num_hidden_layers=4,
                  layer_types=["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention",
                               "compressed_sparse_attention"], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
                  compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 16},
                  sliding_window=8, index_topk=5, hc_mult=2, o_groups=4, partial_rotary_factor=0.5)


YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0)


@pytest.fixture(scope="module", params=["compress", "every"])
def yarn(request, tmp_path_factory):
    """YaRN past a 16-token original context: flat as V4's releases write it (the compressed layers only, cos/sin
    unscaled), or per kind (sliding layers too, with the mscale temperature on cos/sin)."""
    if request.param == "compress":
        rope = YARN
    else:
        rope = {"main": {**YARN, "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                "compress": {**YARN, "mscale": 1.0, "rope_theta": 160000.0, "partial_rotary_factor": 0.25}}
    return _saved(tmp_path_factory.mktemp("v4-yarn"), rope_parameters=rope, max_position_embeddings=64)


def _recorded(reference, tokens) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    picks, experts = [], []
    hooks = [m.register_forward_hook(lambda mod, a, out: picks.append(out))
             for m in reference.modules() if isinstance(m, ref.DeepseekV4Indexer)]
    hooks += [m.register_forward_hook(lambda mod, a, out: experts.append(out[2]))
              for m in reference.modules() if isinstance(m, (ref.DeepseekV4HashRouter, ref.DeepseekV4TopKRouter))]
    with torch.no_grad():
        logits = reference(input_ids=tokens).logits
    for hook in hooks:
        hook.remove()
    return logits, picks, experts


@pytest.mark.parametrize("which", ["pair", "other"])
def test_logits_picks_and_experts_match_transformers(which, request):
    reference, model, _ = request.getfixturevalue(which)
    assert isinstance(model, V4CausalLM)
    tokens = torch.randint(0, 300, (2, 41), generator=torch.Generator().manual_seed(3))
    expected, picks, experts = _recorded(reference, tokens)
    with torch.no_grad():
        got = model(tokens)
    assert (got - expected).abs().max() < 1e-4
    sparse = [m for m in model.modules() if isinstance(m, V4Attention) and m.indexer is not None]
    assert len(sparse) == len(picks) == reference.config.layer_types.count("compressed_sparse_attention")
    for layer_picks, expected_picks in zip(sparse, picks, strict=True):
        assert torch.equal(layer_picks.last_selection.sort(-1).values, expected_picks.sort(-1).values)
    layers = moe_layers(model)
    kinds = {"hash_moe": "hash", "moe": "aux-free"}
    assert [layer.router.kind for layer in layers] == [kinds[t] for t in reference.config.mlp_layer_types]
    for layer, ids in zip(layers, experts, strict=True):
        assert torch.equal(layer.last_routing.expert_ids.sort(-1).values, ids.sort(-1).values)


@pytest.mark.parametrize("which", ["pair", "other"])
def test_twenty_greedy_tokens_with_the_cache_match(which, request):
    reference, model, _ = request.getfixturevalue(which)
    prompt = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(4))
    expected = reference.generate(prompt[None], max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, 10:].tolist()
    assert list(generate(model, prompt.tolist(), max_new_tokens=20, stop=set())) == expected


def test_yarn_logits_and_greedy_tokens_match_transformers(yarn):
    """41 tokens, past the original 16: the scaled frequencies (and temperature) decide the logits."""
    reference, model, _ = yarn
    scalings = {m.rope.scaling.kind for m in model.modules() if isinstance(m, V4Attention) and m.rope.scaling}
    assert scalings == {"yarn"}
    tokens = torch.randint(0, 300, (2, 41), generator=torch.Generator().manual_seed(3))
    expected, _, _ = _recorded(reference, tokens)
    with torch.no_grad():
        assert (model(tokens) - expected).abs().max() < 1e-4
    prompt = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(4))
    greedy = reference.generate(prompt[None], max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, 10:].tolist()
    assert list(generate(model, prompt.tolist(), max_new_tokens=20, stop=set())) == greedy


def _with_config(folder, tmp_path, **changes):
    """A copy of the model folder whose config.json has `changes` applied."""
    copy = tmp_path / "edited"
    copy.mkdir()
    for item in folder.iterdir():
        (copy / item.name).symlink_to(item)
    (copy / "config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


@pytest.mark.parametrize("changes, message", [
    (dict(layer_types=["sliding_attention", "linear_attention", "heavily_compressed_attention"]), "'linear_attention'"),
    (dict(mlp_layer_types=["hash_moe", "dense", "moe"]), "'dense'"),
    (dict(quantization_config={"quant_method": "fp8", "expert_dtype": "fp4"}), "expert_dtype 'fp4'"),
    (dict(compress_rates={"compressed_sparse_attention": 0, "heavily_compressed_attention": 8}), "rate 0"),
    (dict(compress_rates={"compressed_sparse_attention": 2.5, "heavily_compressed_attention": 8}), "rate 2.5"),
    (dict(rope_parameters={"main": {"rope_type": "default"}, "compress": {"rope_type": "longrope", "factor": 4}}),
     "'longrope' on V4's compressed layers"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 4}), "'dynamic' on V4's compressed layers"),
])
def test_bad_configs_are_refused_naming_what(pair, tmp_path, changes, message):
    folder = _with_config(pair[2], tmp_path, **changes)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelFolder(folder)


@pytest.mark.parametrize("yarn", ["compress"], indirect=True)
def test_a_flat_yarn_entry_scales_the_compressed_layers_as_transformers_does(yarn, tmp_path):
    """A config.json with rope_parameters written flat loads as transformers nests it (compress, factor 1)."""
    _, model, folder = yarn
    flat = load_model(ModelFolder(_with_config(folder, tmp_path, rope_parameters=YARN)))
    tokens = torch.randint(0, 300, (1, 41), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(flat(tokens), model(tokens))


def test_an_unknown_layer_type_is_one_line_from_the_shell(pair, tmp_path):
    folder = _with_config(pair[2], tmp_path, layer_types=["sliding_attention"] * 2 + ["linear_attention"])
    assert_one_line_error(run_cli("moe-inspect", folder, "--text", "hello"), 2, "linear_attention")


@pytest.mark.slow
def test_moe_inspect_shows_hash_layers_and_the_sparse_pattern(pair, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 2
    proc = run_cli("moe-inspect", pair[2], "--text", text, "--json", "--plot", tmp_path / "load.png",
                   "--attention", tmp_path / "sparse.png")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["architecture"] == "DeepseekV4ForCausalLM"
    assert [row["layer"] for row in result["layers"]] == ["layer 0 (hash)", "layer 1", "layer 2"]
    assert [(r["layer"], r["type"]) for r in result["attention"]] == [
        ("layer 1", "compressed_sparse_attention"), ("layer 2", "heavily_compressed_attention")]
    assert all(0 < r["outside_window"] < 1 for r in result["attention"])
    assert (tmp_path / "load.png").stat().st_size > 0 and (tmp_path / "sparse.png").stat().st_size > 0
    again = run_cli("moe-inspect", pair[2], "--text", text, "--attention", tmp_path / "sparse.png")
    assert_one_line_error(again, 2, "exists")


def test_outside_share_and_pattern_follow_the_picks():
    """The share is the attention weight on compressed rows; the pattern marks exactly the indexer's picks."""
    from v4_reference import ATTENTION_RENAMES, attention_config, copy_weights, randomize
    from dsfuse.tasks.model_routing import attention_facts

    config = tiny_config()
    reference = ref.DeepseekV4Attention(config, 1)
    randomize(reference, seed=1)
    attn = V4Attention(attention_config(config, 1)).eval()
    copy_weights(reference, attn, ATTENTION_RENAMES)
    with torch.no_grad():
        attn(torch.randn(1, 40, 64))
    facts = attention_facts("layer 1", attn, 40)
    pattern = torch.tensor(facts["pattern"])
    assert pattern.shape == (40, 10) and torch.equal(pattern.sum(1), (attn.last_selection[0] >= 0).sum(1).float())
    assert pattern[:3].sum() == 0 and 0 < facts["outside_window"] < 1
    share_without_rows = attn.last_outside_share
    with torch.no_grad():
        attn(torch.randn(1, 3, 64))  # too short for any row: everything inside the window
    assert attn.last_outside_share == 0 and share_without_rows > 0


def test_a_text_beyond_the_context_is_refused(pair, tmp_path):
    from dsfuse.tasks.model_routing import inspect_model

    folder = _with_config(pair[2], tmp_path, max_position_embeddings=8)
    with pytest.raises(UsageError, match="beyond the model's maximum context of 8"):
        inspect_model(str(folder), "The quick brown fox jumps over the lazy dog.", quiet=True)
    assert inspect_model(str(folder), "The quick brown fox jumps", max_tokens=8, quiet=True)["tokens"] <= 8


@pytest.mark.slow
def test_chat_local_talks_with_a_v4_folder(pair, tmp_path):
    """chat --local on a V4 folder answers (its cache forks whole or starts again, never cut back)."""
    proc = run_cli("chat", "--local", pair[2], "Why is the sky blue?", "--json", "--max-tokens", "6",
                   "--transcript", tmp_path / "t.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "DeepseekV4ForCausalLM" in proc.stderr or "DeepseekV4ForCausalLM" in proc.stdout


def test_a_v4_cache_forks_whole_or_empty():
    from dsfuse.nn.v4_attention import V4AttentionConfig, V4Cache

    attn = V4Attention(V4AttentionConfig(layer_type="compressed_sparse_attention")).eval()
    cache = V4Cache()
    with torch.no_grad():
        attn(torch.randn(1, 9, 64), cache=cache)
        twin = cache.fork(9)
        attn(torch.randn(1, 1, 64), cache=twin)
    assert cache.length == 9 and twin.length == 10 and cache.compressor.n_rows == 2
    assert cache.compressor.pending_kv.shape[1] == 1 and twin.compressor.pending_kv.shape[1] == 2  # apart
    assert cache.fork(0).length == 0
    with pytest.raises(ValueError, match="cannot be cut back"):
        cache.fork(5)
