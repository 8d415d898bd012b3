"""Schema-guided decoding of a tool call: the JSON skeleton is forced, the model picks and fills the rest.

A tiny local model rarely writes valid JSON with the right names on its own. Here the call
`{"tool": NAME, "arguments": {...}}` is built piece by piece: the tool name and argument names are
chosen by the model among the valid ones only (logits masked to tokens that continue a valid
choice), required arguments come first, and values are free text inside their quotes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MAX_STRING_TOKENS = 48
MAX_NUMBER_TOKENS = 8
MAX_ARRAY_ITEMS = 8


@dataclass
class Vocabulary:
    """Token texts and the lookups constrained decoding needs."""

    texts: list[str]
    by_text: dict[str, list[int]]
    quote_free: torch.Tensor  # bool [V]: tokens that may sit inside a JSON string
    quote_id: int
    digits: torch.Tensor  # bool [V]: tokens made of digits, '.' or '-'

    @classmethod
    def build(cls, tokenizer: Any, special_ids: set[int], size: int | None = None) -> Vocabulary:
        """`size`: the model's vocabulary (may pad the tokenizer's; ids beyond it never match)."""
        known = tokenizer.get_vocab_size()
        size = size or known
        texts = [tokenizer.decode([i], skip_special_tokens=False) if i < known else "" for i in range(size)]
        by_text: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            if i not in special_ids and text:
                by_text.setdefault(text, []).append(i)
        quote_free = torch.tensor([i not in special_ids and bool(t) and '"' not in t and "\\" not in t
                                   and "\n" not in t and "\ufffd" not in t for i, t in enumerate(texts)])
        digits = torch.tensor([i not in special_ids and bool(t) and all(c in "0123456789.-" for c in t)
                               for i, t in enumerate(texts)])
        return cls(texts, by_text, quote_free, by_text['"'][0], digits)


class ToolCallDecoder:
    """Builds one tool call with a model session: `logits()` for the next token, `push(ids)` to extend."""

    def __init__(self, vocab: Vocabulary, logits: Callable[[], torch.Tensor], push: Callable[[list[int]], None],
                 encode: Callable[[str], list[int]], pick: Callable[[torch.Tensor], int],
                 paths: list[str] | None = None):
        self.vocab, self.logits, self.push, self.encode, self.pick = vocab, logits, push, encode, pick
        self.paths = list(paths or [])
        self.text = ""

    def force(self, text: str) -> None:
        """Append fixed text (the JSON skeleton) to the context."""
        self.push(self.encode(text))
        self.text += text

    def choose(self, options: list[str]) -> str:
        """The option the model prefers, decoded token by token among tokens that continue some option."""
        done = ""
        while True:
            alive = [o for o in options if o.startswith(done)]
            if done in alive:
                return done
            allowed = {i for o in alive for end in range(len(done) + 1, len(o) + 1)
                       for i in self.vocab.by_text.get(o[len(done):end], [])}
            logits = self.logits()
            mask = torch.full_like(logits, float("-inf"))
            mask[list(allowed)] = 0.0
            token = self.pick(logits + mask)
            self.push([token])
            done += self.vocab.texts[token]
            self.text += self.vocab.texts[token]

    def string(self) -> str:
        """A JSON string value: free tokens without quotes, ended by the model's closing quote."""
        self.force('"')
        value = ""
        for _ in range(MAX_STRING_TOKENS):
            logits = self.logits()
            allowed = self.vocab.quote_free.clone()
            allowed[self.vocab.quote_id] = bool(value)  # no empty strings
            token = self.pick(logits.masked_fill(~allowed, float("-inf")))
            if token == self.vocab.quote_id:
                self.push([token])
                break
            self.push([token])
            value += self.vocab.texts[token]
        else:
            self.push([self.vocab.quote_id])
        self.text += json.dumps(value)[1:]
        return value

    def number(self, integer: bool) -> float | int:
        """Digits while the model prefers a digit to anything else; at least one."""
        text = ""
        for _ in range(MAX_NUMBER_TOKENS):
            logits = self.logits()
            token = self.pick(logits.masked_fill(~self.vocab.digits, float("-inf")))
            if text and int(logits.argmax()) != token:
                break
            self.push([token])
            text += self.vocab.texts[token]
        self.text += text
        try:
            return int(float(text)) if integer else float(text)
        except ValueError:
            return 0

    def path(self) -> str:
        """One of the paths the user wrote; each fills one argument, so it is not offered again."""
        path = json.loads(self.choose([json.dumps(p) for p in self.paths]))
        self.paths.remove(path)
        return path

    def path_array(self, reserve: int) -> list[str]:
        """User paths for a list argument, leaving `reserve` of them for required arguments still to come."""
        self.force("[")
        items = [self.path()]
        while len(self.paths) > reserve and len(items) < MAX_ARRAY_ITEMS:
            if self.choose([", ", "]"]) == "]":
                return items
            items.append(self.path())
        self.force("]")
        return items

    def value(self, schema: dict[str, Any], reserve: int = 0) -> Any:
        """A value of `schema`; `reserve`: user paths to keep for the required path arguments after it."""
        kind = schema.get("type", "string")
        if "enum" in schema:
            options = [json.dumps(v) for v in schema["enum"]]
            return json.loads(self.choose(options))
        if kind == "boolean":
            return self.choose(["true", "false"]) == "true"
        if kind in ("integer", "number"):
            return self.number(kind == "integer")
        if _is_path(schema) and len(self.paths) > reserve:
            return self.path_array(reserve) if kind == "array" else self.path()
        if kind == "array":
            self.force("[")
            items = [self.value(schema.get("items", {}))]
            while len(items) < MAX_ARRAY_ITEMS and self.choose([", ", "]"]) == ", ":
                items.append(self.value(schema.get("items", {})))
            if len(items) == MAX_ARRAY_ITEMS:
                self.force("]")
            return items
        return self.string()

    def call(self, tools: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        """Decode `{"tool": NAME, "arguments": {...}}`; returns the name and the arguments.

        Arguments come in the command's own order. Up to the last required one, the model picks the
        next among the optional arguments before it and the required one itself (so a command's
        inputs can come first); then it adds any other optional arguments or closes the object.
        """
        self.force('{"tool": "')
        name = self.choose([f'{n}"' for n in tools])[:-1]
        self.force(', "arguments": {')
        schema = tools[name]
        properties = schema.get("properties", {})
        required = set(schema.get("required", [])) & set(properties)
        arguments: dict[str, Any] = {}
        pending = list(properties)
        while required - set(arguments):
            upto = next(i for i, k in enumerate(pending) if k in required)
            key = self.key(pending[:upto + 1], arguments, closable=False)
            pending = pending[pending.index(key) + 1:]
            reserve = sum(_is_path(properties[k]) for k in required - set(arguments) - {key})
            arguments[key] = self.value(properties[key], reserve)
        while optional := [k for k in properties if k not in arguments]:
            key = self.key(optional, arguments, closable=True)
            if key is None:  # the model closed the arguments
                break
            arguments[key] = self.value(properties[key])
        else:
            self.force("}")  # every argument is filled
        self.force("}")
        return name, arguments

    def key(self, keys: list[str], arguments: dict[str, Any], closable: bool) -> str | None:
        """The next argument name among `keys` (or None: the object closes), with its separator."""
        separator = ", " if arguments else ""
        options = [f'{separator}"{k}": ' for k in keys] + (["}"] if closable else [])
        if len(options) == 1:
            self.force(options[0])
            picked = options[0]
        else:
            picked = self.choose(options)
        return None if picked == "}" else picked[len(separator) + 1:-3]


def _is_path(schema: dict[str, Any]) -> bool:
    return schema.get("format") == "path" or schema.get("items", {}).get("format") == "path"
