"""`moe-inspect MODEL --text ...` on a real (tiny, random) DeepSeek-V3-architecture folder: the per-layer
table, the heatmap, the routes file, --compare, --json, and bad input as one line with nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, json_lines, run_cli
from hf_models import save_tiny

from dsfuse.models.hf import ModelFolder, load_model, skeleton, streamed_layers
from dsfuse.nn.moe import moe_layers
from dsfuse.tasks.model_routing import read_text, route_text

PROSE = "The quick brown fox jumps over the lazy dog, and the dog sleeps on."


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v3")
    save_tiny("DeepseekV3ForCausalLM", folder)
    return folder


def test_the_table_heatmap_and_routes_of_a_real_model(v3, tmp_path):
    text = tmp_path / "essay.txt"
    text.write_text(PROSE)
    plot, routes = tmp_path / "load.png", tmp_path / "routes.jsonl"
    proc = run_cli("moe-inspect", v3, "--text", text, "--plot", plot, "--routes-out", routes)
    assert proc.returncode == 0, proc.stderr
    assert "DeepseekV3ForCausalLM" in proc.stderr and "layer 1" in proc.stderr and "layer 2" in proc.stderr
    assert "MaxVio over layers" in proc.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = json_lines(routes.read_text())
    tokens = {r["token_index"] for r in records}
    assert len(records) == 2 * len(tokens)  # one per token and MoE layer (layers 1 and 2; layer 0 is dense)
    assert "".join(r["token"] for r in records if r["layer"] == "layer 1") == PROSE  # tokens as the text reads
    first = records[0]
    assert len(first["experts"]) == 2 and first["weights"] == sorted(first["weights"], reverse=True)


def test_streamed_routes_equal_the_whole_model_s(v3):
    folder = ModelFolder(v3)
    routes = route_text(folder, folder.tokenizer(), PROSE, "prose", None, 4096)
    model = load_model(folder)
    with torch.no_grad():
        model(torch.tensor([folder.tokenizer().encode(PROSE).ids]))
    for (_, streamed), whole in zip(routes.layers, moe_layers(model), strict=True):
        assert torch.equal(streamed.expert_ids, whole.last_routing.expert_ids)


def test_streaming_keeps_one_decoder_layer_resident(v3):
    folder = ModelFolder(v3)
    model = skeleton(folder)
    resident = []
    for layer in streamed_layers(folder, model):
        resident.append({name.split(".")[1] for name, p in model.named_parameters() if p.device.type != "meta"})
        assert all(p.device.type == "cpu" for p in layer.parameters())
    assert resident == [{"0"}, {"1"}, {"2"}]
    assert all(p.device.type == "meta" for p in model.parameters())


def test_compare_two_texts_as_json_from_stdin(v3, tmp_path):
    code = tmp_path / "code.py"
    code.write_text("def add(a, b):\n    return a + b\n" * 3)
    proc = run_cli("moe-inspect", v3, "--text", code, "--compare", "-", "--json", "--plot",
                   tmp_path / "compare.png", input=PROSE)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["text"] == str(code) and result["compare"]["text_b"] == "stdin"
    layers = result["compare"]["layers"]
    assert [r["layer"] for r in layers] == ["layer 1", "layer 2"]
    assert all(0 <= r["divergence"] <= 1 for r in layers) and any(r["divergence"] > 0 for r in layers)
    assert abs(sum(layers[0]["share_difference"])) < 1e-6
    assert (tmp_path / "compare.png").is_file()


def test_bad_text_is_refused(tmp_path):
    empty, latin = tmp_path / "empty.txt", tmp_path / "latin.txt"
    empty.write_text("  \n")
    latin.write_bytes("café".encode("latin-1"))
    for arg, message in ((empty, "empty"), (latin, "not UTF-8"), (tmp_path / "missing.txt", "no such text file")):
        with pytest.raises(Exception, match=message):
            read_text(str(arg))
    assert read_text("a sentence.txt with spaces") == ("a sentence.txt with spaces", "the given text")
    essay = "a long paragraph given inline " * 20  # longer than any file name the OS accepts
    assert read_text(essay) == (essay, "the given text")


@pytest.mark.parametrize("fault, message", [
    ("no config", "no config.json"), ("latin text", "not UTF-8"), ("dense", "has no MoE layer"),
    ("hub offline", "is not in the Hugging Face cache"),
])
def test_bad_input_is_one_line_and_nothing_is_written(v3, tmp_path, fault, message):
    model, text, env = str(v3), PROSE, {}
    if fault == "no config":
        model = str(tmp_path)
    elif fault == "latin text":
        (tmp_path / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
        text = str(tmp_path / "latin.txt")
    elif fault == "dense":
        save_tiny("Qwen3ForCausalLM", tmp_path / "dense")
        model = str(tmp_path / "dense")
    else:
        model, env = "deepseek-ai/DeepSeek-V2-Lite", {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / "out"
    proc = run_cli("moe-inspect", model, "--text", text, "--plot", out / "load.png", "--routes-out",
                   out / "routes.jsonl", env=env)
    assert_one_line_error(proc, 2, message)
    assert not out.exists() or not any(out.iterdir())


def test_outputs_are_not_overwritten_without_force(v3, tmp_path):
    plot = tmp_path / "load.png"
    plot.write_bytes(b"mine")
    proc = run_cli("moe-inspect", v3, "--text", PROSE, "--plot", plot)
    assert_one_line_error(proc, 2, "exists")
    assert plot.read_bytes() == b"mine"
