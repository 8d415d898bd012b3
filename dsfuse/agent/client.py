"""An OpenAI-compatible chat-completions client: streaming (SSE), retries with backoff, clear errors.

Defaults reach the DeepSeek API; `base_url` and `model` reach any compatible server (ollama,
llama.cpp, vLLM). One call streams one assistant turn and returns it assembled.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from dsfuse.errors import DsfuseError, UsageError

DEEPSEEK_BASE_URL = "https://api.deepseek.com"
DEFAULT_MODEL = "deepseek-v4-flash"
MODELS = ("deepseek-v4-flash", "deepseek-v4-pro")
# Retired names still work: they map to v4-flash with thinking off (chat) or on (reasoner).
RETIRED_MODELS = {"deepseek-chat": (DEFAULT_MODEL, False), "deepseek-reasoner": (DEFAULT_MODEL, True)}
KEY_ENV = "DEEPSEEK_API_KEY"
KEY_FILE = Path("~/.config/dsfuse/deepseek_api_key")

RETRY_STATUSES = {429, 500, 502, 503, 504}
STATUS_MESSAGES = {
    400: "the server rejected the request as malformed",
    401: "authentication failed: the API key is wrong or revoked (set DEEPSEEK_API_KEY or the key file)",
    402: "insufficient balance on the API account: top it up to continue",
    404: "not found: check --base-url and --model",
    422: "the server rejected the request's parameters",
}


class ApiError(DsfuseError):
    """The API (or the way to it) failed; the chat stops with one line and exit 1."""


def resolve_model(model: str, think: bool | None) -> tuple[str, bool | None]:
    """Map a retired model name to its successor and the thinking mode it implied (unless `think` is given)."""
    if model in RETIRED_MODELS:
        successor, implied = RETIRED_MODELS[model]
        return successor, implied if think is None else think
    return model, think


def read_api_key(key_file: Path | None = None) -> str | None:
    """The key from an explicit key file, else DEEPSEEK_API_KEY, else the default key file; a key file
    must be private (mode 0600)."""
    if key_file is None and os.environ.get(KEY_ENV, "").strip():
        return os.environ[KEY_ENV].strip()
    path = (key_file or KEY_FILE).expanduser()
    if not path.is_file():
        if key_file is not None:
            raise UsageError("key file not found", path)
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UsageError(f"key file is readable by others (mode {mode:o}); run chmod 600 on it", path)
    key = path.read_text().strip()
    if not key:
        raise UsageError("key file is empty", path)
    return key


LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


def check_base_url(url: str, allow_http: bool = False) -> str:
    """A usable server URL: http(s) with a host; plain http only to this machine unless `allow_http`
    (the key travels as a Bearer token)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise UsageError(f"not a URL ({_reason(e)})", "--base-url") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UsageError(f"expected an http:// or https:// URL with a host, got {url!r}", "--base-url")
    loopback = parsed.host in LOOPBACK_HOSTS or parsed.host.startswith("127.")
    if parsed.scheme == "http" and not loopback and not allow_http:
        raise UsageError("refusing to send the API key over plain http to another machine; use https, "
                         "or pass --allow-http", "--base-url")
    return url


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def to_message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class AssistantTurn:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None

    def to_message(self) -> dict[str, Any]:
        """The turn as a history message; reasoning is kept only where tool calls need it sent back."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_message() for call in self.tool_calls]
            if self.reasoning:
                message["reasoning_content"] = self.reasoning
        return message


# on_delta(kind, text) with kind "content" or "reasoning": how the caller shows the stream.
DeltaHandler = Callable[[str, str], None]


@dataclass
class ChatClient:
    api_key: str | None
    base_url: str = DEEPSEEK_BASE_URL
    model: str = DEFAULT_MODEL
    think: bool | None = None  # None: the server's default
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    max_tokens: int | None = None
    deadline: float = 600.0  # seconds one answer may take in all, keep-alives or not

    @property
    def name(self) -> str:
        return f"{self.model} at {self.base_url}"

    def request_body(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True}
        if tools:
            body["tools"] = tools
        if self.think is not None:
            body["thinking"] = {"type": "enabled" if self.think else "disabled"}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        return body

    def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 on_delta: DeltaHandler | None = None) -> AssistantTurn:
        """Stream one assistant turn; retry 429/5xx/timeouts before any of it arrived."""
        url = self.base_url.rstrip("/") + "/chat/completions"
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = self.request_body(messages, tools)
        timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))
        for attempt in range(self.max_retries + 1):
            delay = self.backoff * 2 ** attempt
            try:
                with httpx.Client(timeout=timeout) as http, http.stream("POST", url, json=body, headers=headers) as response:
                    if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                        time.sleep(_retry_after(response, delay))
                        continue
                    if response.status_code != 200:
                        response.read()
                        raise ApiError(self._redact(_status_message(response)), url)
                    return _read_stream(response, on_delta, self.timeout, self.deadline)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as e:  # before any reply
                if attempt == self.max_retries:
                    raise ApiError(f"cannot reach the server ({_reason(e)})", url) from None
            except httpx.TimeoutException:
                if attempt == self.max_retries:
                    raise ApiError(f"the server did not answer within {self.timeout:g} s", url) from None
            time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _redact(self, text: str) -> str:
        """An error text without the API key, should a server echo it back."""
        return text.replace(self.api_key, "[API key]") if self.api_key else text


def _read_stream(response: httpx.Response, on_delta: DeltaHandler | None, idle: float = 60.0,
                 deadline: float = 600.0) -> AssistantTurn:
    """Assemble a streamed turn: content, reasoning_content and tool-call fragments keyed by index.

    Fails after `idle` seconds without data (keep-alive comments do not count) or `deadline` in all."""
    turn = AssistantTurn()
    calls: dict[int, dict[str, str]] = {}
    done = False
    started = last_data = time.monotonic()
    try:
        for line in response.iter_lines():
            now = time.monotonic()
            if now - started > deadline:
                raise ApiError(f"the answer took longer than the deadline of {deadline:g} s (--deadline)")
            if not line.startswith("data:"):
                if now - last_data > idle:
                    raise ApiError(f"the server sent no data for {idle:g} s, only keep-alives (--timeout)")
                continue  # blank separators, ": keep-alive" comments, event:/id: fields
            last_data = now
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise ApiError(f"the server sent malformed JSON in the stream: {data[:80]!r}") from None
            if "error" in chunk:
                raise ApiError(f"the server reported an error mid-stream: {_error_text(chunk)}")
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                for kind, key in (("reasoning", "reasoning_content"), ("content", "content")):
                    text = delta.get(key)
                    if text:
                        setattr(turn, kind, getattr(turn, kind) + text)
                        if on_delta:
                            on_delta(kind, text)
                for fragment in delta.get("tool_calls") or []:
                    call = calls.setdefault(fragment.get("index", len(calls)), {"id": "", "name": "", "arguments": ""})
                    call["id"] = fragment.get("id") or call["id"]
                    function = fragment.get("function") or {}
                    call["name"] += function.get("name") or ""
                    call["arguments"] += function.get("arguments") or ""
                if choice.get("finish_reason"):
                    turn.finish_reason = choice["finish_reason"]
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        raise ApiError(f"the connection dropped mid-stream ({_reason(e)})") from None
    except httpx.TimeoutException:
        raise ApiError("the server stopped sending mid-stream (read timeout)") from None
    if not done and turn.finish_reason is None:
        raise ApiError("the stream ended before the answer was complete")
    turn.tool_calls = [ToolCall(c["id"] or f"call_{i}", c["name"], c["arguments"] or "{}")
                       for i, c in sorted(calls.items())]
    return turn


def _retry_after(response: httpx.Response, fallback: float) -> float:
    try:
        return min(float(response.headers.get("retry-after", fallback)), 60.0)
    except ValueError:
        return fallback


def _status_message(response: httpx.Response) -> str:
    base = STATUS_MESSAGES.get(response.status_code, f"the server answered HTTP {response.status_code}")
    try:
        detail = _error_text(response.json())
    except (json.JSONDecodeError, ValueError):
        detail = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
    return f"{base} (HTTP {response.status_code}{': ' + detail if detail else ''})"


def _error_text(payload: Any) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)[:200]
    return str(error or payload)[:200]


def _reason(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
