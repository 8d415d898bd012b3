"""`chat --local MODEL`: a Hugging Face model folder on dsfuse's core, prompted with its own chat
template, answering as transformers would; <think>...</think> streamed as reasoning."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from hf_models import save_tiny

from dsfuse.agent.chat_template import folder_template, split_reasoning
from dsfuse.agent.local import LocalBackend, plain_turns

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2")
    reference = save_tiny("Qwen2ForCausalLM", folder, eos_token_id=0, max_position_embeddings=8192)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE, "eos_token": "<|end|>"}))
    return reference, folder


def _backend(folder, tokens=12) -> LocalBackend:
    return LocalBackend.load(device="cpu", max_new_tokens=tokens, model=str(folder), quiet=True)


def test_the_prompt_is_the_template_transformers_renders(qwen):
    from transformers import AutoTokenizer

    _, folder = qwen
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(QUESTION, tokenize=False,
                                                                          add_generation_prompt=True)
    assert folder_template(folder)(plain_turns(QUESTION, None)) == expected


def test_a_model_folder_answers_as_transformers_would(qwen):
    reference, folder = qwen
    backend = _backend(folder)
    streamed = []
    turn = backend.complete(QUESTION, on_delta=lambda kind, text: streamed.append((kind, text)))
    prompt = backend.tokenizer.encode(folder_template(folder)(plain_turns(QUESTION, None)),
                                      add_special_tokens=False).ids
    ids = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=0,
                             pad_token_id=0)[0, len(prompt):].tolist()
    expected = backend.tokenizer.decode([i for i in ids if i != 0])
    assert turn.content == expected and turn.reasoning == ""
    assert "".join(text for kind, text in streamed if kind == "content") == expected
    assert backend.name.startswith("local Qwen2ForCausalLM")


def test_think_streams_as_reasoning(qwen, monkeypatch):
    _, folder = qwen
    backend = _backend(folder, tokens=40)
    script = iter(backend.tokenizer.encode("<think>plan it</think>The answer.").ids + [0])
    monkeypatch.setattr(backend, "_pick", lambda logits, temperature: next(script))
    streamed = []
    turn = backend.complete(QUESTION, on_delta=lambda kind, text: streamed.append((kind, text)))
    assert (turn.reasoning, turn.content, turn.finish_reason) == ("plan it", "The answer.", "stop")
    assert "".join(t for k, t in streamed if k == "reasoning") == "plan it"
    assert "".join(t for k, t in streamed if k == "content") == "The answer."
    assert "<" not in "".join(t for _, t in streamed)  # no tag, not even half of one, is shown


@pytest.mark.parametrize("text, thinking, expected", [
    ("<think>a b</think> c", False, ("a b", "c")), ("<thi", False, ("", "")), ("plain", False, ("", "plain")),
    ("a step</th", True, ("a step", "")), ("done</think>\nyes", True, ("done", "yes")),
    ("  <think>x", False, ("x", "")),
])
def test_split_reasoning(text, thinking, expected):
    assert split_reasoning(text, thinking) == expected


def test_chat_local_on_the_command_line(qwen, tmp_path):
    _, folder = qwen
    proc = run_cli("chat", "--local", folder, "Why is the sky blue?", "--json", "--max-tokens", "8",
                   "--max-rounds", "1", "--transcript", tmp_path / "t.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["backend"].startswith("local Qwen2ForCausalLM") and "offline" in out["backend"]


@pytest.mark.parametrize("model, env, message", [
    ("no/such/folder", {}, "no such model folder"),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", {"HF_HUB_OFFLINE": "1"}, "not in the Hugging Face cache"),
])
def test_chat_local_refuses_what_it_cannot_load(tmp_path, model, env, message):
    proc = run_cli("chat", "--local", model, "hi", "--transcript", tmp_path / "t.jsonl", cwd=tmp_path,
                   env={**env, "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(proc, 2, message)
    assert not (tmp_path / "t.jsonl").exists()
