"""The agent loop: ask the model, run the tools it calls, feed their results back, until it answers.

Every message is also written to a JSON Lines transcript (rewritten atomically after each one), so
a failure mid-conversation keeps everything said so far.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dsfuse.agent.client import AssistantTurn, DeltaHandler, ToolCall
from dsfuse.agent.tools import Tool, ToolArgumentError, parse_arguments, result_text, run_tool, validate_arguments
from dsfuse.io import write_text

SYSTEM_PROMPT = (
    "You are the assistant of dsfuse, a command-line toolbox of multimodal models. You can run dsfuse "
    "commands as tools in the working folder {cwd}; use list_files to find files there. Call a tool "
    "when the question needs one, then answer briefly from its JSON output. Never invent file names "
    "or results."
)


class Backend(Protocol):
    name: str

    def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 on_delta: DeltaHandler | None = None) -> AssistantTurn: ...


# confirm(tool, arguments) -> run it?
Confirm = Callable[[Tool, dict[str, Any]], bool]
# on_tool(call_record) after each tool call, for display
ToolHandler = Callable[[dict[str, Any]], None]


@dataclass
class Reply:
    answer: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    rounds: int = 0


class Transcript:
    """The conversation as JSON Lines: a header line, then one line per message."""

    def __init__(self, path: Path | None, header: dict[str, Any]):
        self.path = path
        self.lines: list[dict[str, Any]] = [{"type": "session", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime()), **header}]

    def add(self, message: dict[str, Any]) -> None:
        self.lines.append(message)
        if self.path is not None:
            self.save(self.path)

    def save(self, path: Path) -> None:
        write_text(path, "".join(json.dumps(line) + "\n" for line in self.lines))


@dataclass
class Agent:
    backend: Backend
    tools: dict[str, Tool]
    cwd: Path
    transcript: Transcript
    confirm: Confirm | None = None  # None: run file-writing commands without asking (--yes)
    max_rounds: int = 6
    tool_timeout: float = 600
    result_chars: int = 4000  # how much of a tool's output the model reads
    messages: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the transcript keeps it, marked by a reset line)."""
        if self.messages:
            self.transcript.add({"type": "reset"})
        self.messages = [{"role": "system", "content": SYSTEM_PROMPT.format(cwd=self.cwd)}]

    def _add(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.transcript.add(message)

    def ask(self, question: str, on_delta: DeltaHandler | None = None, on_tool: ToolHandler | None = None) -> Reply:
        """One user turn: model turns and tool rounds until an answer without tool calls (or the cap)."""
        self._add({"role": "user", "content": question})
        specs = [tool.spec() for tool in self.tools.values()]
        reply = Reply("")
        while True:
            capped = reply.rounds >= self.max_rounds
            turn = self.backend.complete(self.messages, None if capped else specs, on_delta)
            self._add(turn.to_message())
            if not turn.tool_calls or capped:
                reply.answer = turn.content.strip()
                return reply
            reply.rounds += 1
            for call in turn.tool_calls:
                record = self._call_tool(call)
                reply.tool_calls.append(record)
                if on_tool:
                    on_tool(record)
                self._add({"role": "tool", "tool_call_id": call.id, "content": result_text(record["result"], self.result_chars)})

    def _call_tool(self, call: ToolCall) -> dict[str, Any]:
        """Validate and run one call; a mistake of the model's goes back to it as the result."""
        record: dict[str, Any] = {"id": call.id, "name": call.name, "arguments": call.arguments}
        tool = self.tools.get(call.name)
        try:
            if tool is None:
                raise ToolArgumentError(f"no tool named {call.name!r}; the tools are {', '.join(self.tools)}")
            arguments = validate_arguments(tool, parse_arguments(call.arguments))
            record["arguments"] = arguments
            if tool.writes_files and self.confirm is not None and not self.confirm(tool, arguments):
                record["result"] = {"error": "the user declined to run this command"}
                return record
            record["result"] = run_tool(tool, arguments, self.cwd, self.tool_timeout)
        except ToolArgumentError as e:
            record["result"] = {"error": f"invalid call: {e}"}
        return record
