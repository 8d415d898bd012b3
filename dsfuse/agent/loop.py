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

from dsfuse.agent.boundary import Boundary
from dsfuse.agent.client import AssistantTurn, DeltaHandler, ToolCall
from dsfuse.agent.tools import (Tool, ToolArgumentError, check_call, parse_arguments, result_text, run_tool,
                                validate_arguments)
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


# confirm(argv, overwrites) -> run it? (argv after `dsfuse`; overwrites: existing paths it would write)
Confirm = Callable[[list[str], list[Path]], bool]
# on_tool(call_record) after each tool call, for display
ToolHandler = Callable[[dict[str, Any]], None]


@dataclass
class Reply:
    answer: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    rounds: int = 0
    stopped: str | None = None  # which limit ended the turn before the model answered on its own


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
    boundary: Boundary  # the folder tool calls are confined to
    transcript: Transcript
    confirm: Confirm  # asked before a command writes (with `yes`: only before it writes over something)
    yes: bool = False
    max_rounds: int = 6
    max_tool_calls: int = 12  # per question, all rounds together
    tool_timeout: float = 600
    result_chars: int = 4000  # how much of a tool's output the model reads
    messages: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the transcript keeps it, marked by a reset line)."""
        if self.messages:
            self.transcript.add({"type": "reset"})
        self.messages = [{"role": "system", "content": SYSTEM_PROMPT.format(cwd=self.boundary.root)}]

    def _add(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.transcript.add(message)

    def ask(self, question: str, on_delta: DeltaHandler | None = None, on_tool: ToolHandler | None = None) -> Reply:
        """One user turn: model turns and tool rounds until an answer without tool calls, or a limit.

        Every assistant message with tool calls is followed by a reply to each call (a call not run says
        why), so the history stays valid for the next question whatever ended this one.
        """
        self._add({"role": "user", "content": question})
        specs = [tool.spec() for tool in self.tools.values()]
        reply = Reply("")
        while True:
            capped = reply.rounds >= self.max_rounds or len(reply.tool_calls) >= self.max_tool_calls
            turn = self.backend.complete(self.messages, None if capped else specs, on_delta)
            self._add(turn.to_message())
            if not turn.tool_calls:
                reply.answer = turn.content.strip()
                if capped:
                    reply.stopped = self._limit_reached(reply)
                return reply
            reply.rounds += 1
            for call in turn.tool_calls:
                if capped or len(reply.tool_calls) >= self.max_tool_calls:
                    reason = self._limit_reached(reply)
                    self._add({"role": "tool", "tool_call_id": call.id, "content": json.dumps(
                        {"error": f"not run: {reason}"})})
                    continue
                record = self._call_tool(call)
                reply.tool_calls.append(record)
                if on_tool:
                    on_tool(record)
                self._add({"role": "tool", "tool_call_id": call.id,
                           "content": result_text(record["result"], self.result_chars)})
            if capped:  # the model kept calling tools after the last round: stop here, history consistent
                reply.answer, reply.stopped = turn.content.strip(), self._limit_reached(reply)
                return reply

    def _limit_reached(self, reply: Reply) -> str:
        if len(reply.tool_calls) >= self.max_tool_calls:
            return f"the limit of {self.max_tool_calls} tool calls per question was reached (--max-tool-calls)"
        return f"the limit of {self.max_rounds} tool rounds per question was reached (--max-rounds)"

    def _call_tool(self, call: ToolCall) -> dict[str, Any]:
        """Validate, confine and run one call; a mistake of the model's goes back to it as the result."""
        record: dict[str, Any] = {"id": call.id, "name": call.name, "arguments": call.arguments}
        tool = self.tools.get(call.name)
        try:
            if tool is None:
                raise ToolArgumentError(f"no tool named {call.name!r}; the tools are {', '.join(self.tools)}")
            if tool.external is not None:  # another MCP server's: it checks the arguments against its schema
                return self._call_external(tool.external, parse_arguments(call.arguments), record)
            arguments = validate_arguments(tool, parse_arguments(call.arguments))
            record["arguments"] = arguments
            if tool.writes_files:
                checked = check_call(tool, arguments, self.boundary)
                if (checked.overwrites or not self.yes) and not self.confirm(checked.argv, checked.overwrites):
                    record["result"] = {"error": "the user declined to run this command"}
                    return record
            record["result"] = run_tool(tool, arguments, self.boundary, self.tool_timeout)
        except ToolArgumentError as e:
            record["result"] = {"error": f"invalid call: {e}"}
        return record

    def _call_external(self, tool: Any, arguments: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        record["arguments"] = arguments
        if tool.asks(self.yes) and not self.confirm(tool.describe(arguments), []):
            record["result"] = {"error": "the user declined to run this tool"}
        else:
            record["result"] = tool.call(arguments, self.tool_timeout)
        return record
