"""FP8 checkpoints as DeepSeek ships them (float8_e4m3fn linear weights, a float32 `weight_scale_inv` per
block; embeddings, norms, router and head unquantised) load dequantised: a tiny random DeepseekV3 rewritten
that way gives, in fp32, the logits of the transformers model holding the dequantised weights; moe-inspect
streams it; other quantisations and broken scales are one line naming what is wrong."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from hf_models import VOCAB, save_fp8, save_tiny

from dsfuse.errors import UsageError
from dsfuse.models.hf import ModelFolder, load_model
from dsfuse.models.hf_quant import Fp8Blocks

# every nn.Linear of transformers' DeepseekV3 but lm_head: what its fp8 integration swaps for FP8Linear
V3_LINEAR = re.compile(r"\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)"
                       r"\.weight$")


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """(fp8 folder, folder of the same model dequantised to fp32)."""
    root = tmp_path_factory.mktemp("fp8")
    reference = save_tiny("DeepseekV3ForCausalLM", root / "fp32")
    linear = {f"{name}.weight" for name, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linear - {"lm_head.weight"} and all(V3_LINEAR.search(n) for n in linear - {"lm_head.weight"})
    save_fp8(root / "fp32", root / "fp8", root / "dequantised", lambda name: bool(V3_LINEAR.search(name)))
    return root / "fp8", root / "dequantised"


def _edited(folder, tmp_path, config=None, drop=()):
    """A copy of `folder` with config.json's entries `config` changed and the tensors `drop` left out."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "edited"
    copy.mkdir()
    hf = json.loads((folder / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**hf, **(config or {})}))
    state = {k: v for k, v in load_file(folder / "model.safetensors").items() if k not in drop}
    save_file(state, copy / "model.safetensors")
    (copy / "tokenizer.json").symlink_to(folder / "tokenizer.json")
    return copy


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float8_e8m0fnu])  # V3's scales, V4's ue8m0
def test_each_block_is_scaled_by_its_own_scale_ragged_edges_too(scale_dtype):
    weight = torch.randn(5, 7).to(torch.float8_e4m3fn)
    scale = (2.0 ** torch.randint(-4, 4, (3, 3)).float()).to(scale_dtype)
    got = Fp8Blocks((2, 3)).dequantise("w", weight, scale, torch.float32)
    for i in range(5):
        for j in range(7):
            assert got[i, j] == weight[i, j].float() * scale[i // 2, j // 3].float()
    assert Fp8Blocks((2, 3)).dequantise("w", weight, scale, torch.bfloat16).dtype == torch.bfloat16


def test_fp8_logits_equal_transformers_on_the_dequantised_weights(v3):
    import transformers

    fp8, dequantised = v3
    from safetensors import safe_open
    with safe_open(str(fp8 / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.0.gate_proj.weight").dtype == torch.float8_e4m3fn
    reference = transformers.DeepseekV3ForCausalLM.from_pretrained(dequantised, dtype=torch.float32).eval()
    model = load_model(ModelFolder(fp8), torch.float32)
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        got = model(tokens)
    assert (got - expected).abs().max() < 1e-4


def test_scales_under_deepseek_s_own_name_load_the_same(v3, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _edited(v3[0], tmp_path)
    state = load_file(folder / "model.safetensors")
    save_file({k.replace(".weight_scale_inv", ".scale"): v for k, v in state.items()}, folder / "model.safetensors")
    assert any(k.endswith(".scale") for k in ModelFolder(folder).weights.where)
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(load_model(ModelFolder(folder), torch.float32)(tokens),
                           load_model(ModelFolder(v3[0]), torch.float32)(tokens))


def test_auto_loads_fp8_as_bfloat16(v3):
    model = load_model(ModelFolder(v3[0]))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).float()).all()


def test_moe_inspect_streams_an_fp8_folder(v3):
    proc = run_cli("moe-inspect", v3[0], "--text", "def add(a, b): return a + b", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["architecture"] == "DeepseekV3ForCausalLM" and [r["layer"] for r in result["layers"]] == [
        "layer 1", "layer 2"]


@pytest.mark.parametrize("quant, message", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2'"),
    ({"quant_method": "fp8", "expert_dtype": "fp4"}, "expert_dtype 'fp4'"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme 'static'"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size [128]"),
])
def test_other_quantisations_are_refused_naming_them(v3, tmp_path, quant, message):
    folder = _edited(v3[0], tmp_path, {"quantization_config": quant})
    with pytest.raises(UsageError, match=re.escape(message)):
        ModelFolder(folder)


def test_an_unsupported_method_is_one_line_from_the_shell(v3, tmp_path):
    folder = _edited(v3[0], tmp_path, {"quantization_config": {"quant_method": "awq"}})
    assert_one_line_error(run_cli("moe-inspect", folder, "--text", "hello there"), 2, "quant_method 'awq'")


NAME = "model.layers.2.self_attn.kv_b_proj.weight"
FIRST = "model.layers.0.self_attn.q_a_proj.weight"  # the first fp8 tensor the loader reads


def test_a_missing_scale_is_one_line_from_the_shell(v3, tmp_path):
    folder = _edited(v3[0], tmp_path, drop=[NAME + "_scale_inv"])
    proc = run_cli("moe-inspect", folder, "--text", "hello there")
    assert_one_line_error(proc, 2, f"{NAME} has no scales (no {NAME}_scale_inv or ")


@pytest.mark.parametrize("config, drop, message", [
    (None, [NAME + "_scale_inv"], f"{NAME} has no scales (no {NAME}_scale_inv or "),
    ({"quantization_config": None}, [], f"tensor {FIRST} is stored as float8_e4m3fn, but config.json declares no"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [8, 8]}}, [],
     f"the scales of FP8 tensor {FIRST} have shape (2, 3); its shape (24, 64) in blocks of 8x8 needs (3, 8)"),
])
def test_broken_scales_name_the_tensor(v3, tmp_path, config, drop, message):
    folder = ModelFolder(_edited(v3[0], tmp_path, config, drop))
    with pytest.raises(UsageError, match=re.escape(message)):
        load_model(folder)


# DeepSeek-V4 in its own tensor names: the linears transformers' fp8 integration converts (attention
# projections, the indexer's query, the experts), not the compressors' and indexer's bf16 projections
V4_LINEAR = re.compile(r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|ffn\.(experts\.\d+|shared_experts)\.w[123])"
                       r"\.weight$")


def test_v4_fp8_logits_equal_transformers_on_the_dequantised_weights(tmp_path):
    from hf_models import tiny_tokenizer
    from v4_reference import randomize_layer, ref, tiny_config

    config = tiny_config(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = ref.DeepseekV4ForCausalLM(config).eval()
    randomize_layer(model, config, seed=7)
    model.save_pretrained(tmp_path / "fp32")
    tiny_tokenizer(tmp_path / "fp32")
    save_fp8(tmp_path / "fp32", tmp_path / "fp8", tmp_path / "dequantised", lambda name: bool(V4_LINEAR.search(name)))
    folder = ModelFolder(tmp_path / "fp8")
    assert sum(name.endswith("_scale_inv") for name in folder.weights.where) == 3 * (5 + 3 * 9) + 1  # + CSA's indexer
    reference = ref.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "dequantised", dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    tokens = torch.randint(0, VOCAB, (2, 41), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        got = load_model(folder, torch.float32)(tokens)
        assert (got - expected).abs().max() < 1e-4
        auto = load_model(folder)  # bfloat16, the hash router's token -> expert table still integers
        assert torch.isfinite(auto(tokens[:1]).float()).all()
    assert auto.layers[0].ffn.router.tid2eid.dtype == torch.int64
