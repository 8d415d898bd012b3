"""The prompt a local model was trained on: ChatML (SmolLM2), or a model folder's own Jinja
`chat_template` (tokenizer_config.json or chat_template.jinja), rendered as transformers renders it;
and the reasoning a model writes between <think> and </think>, told apart from its answer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsfuse.errors import UsageError

Template = Callable[[list[dict[str, Any]]], str]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def chatml(messages: list[dict[str, Any]]) -> str:
    """<|im_start|>role\\ncontent<|im_end|> per message, then the assistant's turn opened."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def _token_text(token: Any) -> str:
    return token.get("content", "") if isinstance(token, dict) else (token or "")


def folder_template(folder: Path) -> Template | None:
    """The folder's chat template as a function of the messages, or None when it has none."""
    config_path = folder / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        raise UsageError("tokenizer_config.json is not valid JSON", config_path) from None
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not source and (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not source:
        return None
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        compiled = environment.from_string(source)
    except TemplateError as e:
        raise UsageError(f"the chat template does not compile ({e})", config_path) from None
    special = {"bos_token": _token_text(config.get("bos_token")), "eos_token": _token_text(config.get("eos_token"))}

    def render(messages: list[dict[str, Any]]) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=True, **special)
        except TemplateError as e:
            raise UsageError(f"the model's chat template refused the conversation ({e})", config_path) from None

    return render


def split_reasoning(text: str, thinking: bool) -> tuple[str, str]:
    """(reasoning, answer) of a reply so far. The reply thinks when it opens with <think> or when the
    prompt already opened it (`thinking`); a tag still being written is held back from both."""
    stripped = text.lstrip()
    if not thinking:
        if THINK_OPEN.startswith(stripped):  # empty, or "<thi...": cannot tell yet
            return "", ""
        if not stripped.startswith(THINK_OPEN):
            return "", text
        text = stripped[len(THINK_OPEN):]
    reasoning, closed, answer = text.partition(THINK_CLOSE)
    if closed:
        return reasoning.lstrip(), answer.lstrip()
    held = next((n for n in range(len(THINK_CLOSE) - 1, 0, -1) if reasoning.endswith(THINK_CLOSE[:n])), 0)
    return reasoning[:len(reasoning) - held].lstrip(), ""
