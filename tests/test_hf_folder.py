"""Reading a Hugging Face model folder: sharded weights, and every way a folder can be wrong (one
UsageError line naming the fault)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import save_tiny

from dsfuse.errors import UsageError
from dsfuse.models.hf import ModelFolder, load_model
from dsfuse.models.hf_arch import ARCHITECTURES, Architecture, dense_config, register


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v3")
    return save_tiny("DeepseekV3ForCausalLM", folder), folder


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "model")


def test_sharded_weights_with_an_index_load_the_same_model(v3, tmp_path):
    reference, folder = v3
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="60KB")
    shutil.copy(folder / "tokenizer.json", sharded)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    tokens = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(load_model(ModelFolder(sharded))(tokens), load_model(ModelFolder(folder))(tokens))


def test_weights_keep_their_dtype_unless_asked(v3, tmp_path):
    folder = _copy(v3[1], tmp_path)
    state = load_file(folder / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, folder / "model.safetensors")
    model = load_model(ModelFolder(folder))
    assert model.layers[1].ffn.experts.w13.dtype == torch.bfloat16
    assert load_model(ModelFolder(folder), torch.float32).layers[1].ffn.experts.w13.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(6)[None]).float()).all()  # bf16 runs on the CPU


def _fault(folder, what):
    if what == "no config":
        (folder / "config.json").unlink()
    elif what == "unsupported":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    elif what == "bad json":
        (folder / "config.json").write_bytes(b"\xff{")
    elif what == "no weights":
        (folder / "model.safetensors").unlink()
    elif what == "missing shard":
        names = load_file(folder / "model.safetensors")
        index = {"metadata": {}, "weight_map": {name: "model-00002-of-00002.safetensors" for name in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif what == "bad shape":
        state = load_file(folder / "model.safetensors")
        state["model.layers.1.mlp.gate.weight"] = torch.zeros(8, 63)
        save_file(state, folder / "model.safetensors")
    elif what == "missing tensor":
        state = load_file(folder / "model.safetensors")
        del state["model.norm.weight"]
        save_file(state, folder / "model.safetensors")
    elif what == "bad config":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "n_group": 3}))


@pytest.mark.parametrize("what, message", [
    ("no config", "no config.json"), ("unsupported", "supported: DeepseekV2ForCausalLM"),
    ("bad json", "not valid JSON"), ("no weights", "no *.safetensors"),
    ("missing shard", "missing shard model-00002-of-00002.safetensors"),
    ("bad shape", "tensor model.layers.1.mlp.gate.weight has shape (8, 63)"),
    ("missing tensor", "no tensor model.norm.weight"), ("bad config", "n_groups 3 must divide"),
])
def test_a_wrong_folder_is_one_usage_error(v3, tmp_path, what, message):
    folder = _copy(v3[1], tmp_path)
    _fault(folder, what)
    with pytest.raises(UsageError, match=None) as caught:
        load_model(ModelFolder(folder))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_tokenizer_is_refused(v3, tmp_path):
    folder = _copy(v3[1], tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UsageError, match="no tokenizer.json"):
        ModelFolder(folder).tokenizer()


def test_another_module_can_register_an_architecture(v3, tmp_path):
    folder = _copy(v3[1], tmp_path)
    reference = save_tiny("LlamaForCausalLM", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MyLlamaForCausalLM"]}))
    try:
        register(Architecture("MyLlamaForCausalLM", dense_config))
        model = load_model(ModelFolder(folder))
    finally:
        ARCHITECTURES.pop("MyLlamaForCausalLM")
    with torch.no_grad():
        assert torch.allclose(model(torch.arange(5)[None]), reference(torch.arange(5)[None]).logits, atol=1e-4)
