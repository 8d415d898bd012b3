"""Other MCP servers' tools for `chat --mcp`: a server started over stdio, its tools beside dsfuse's own.

Each server runs in a background event loop (an anyio blocking portal) so the synchronous agent loop
can call it. Its tools are named `<server>_<tool>`; a tool that does not declare itself read-only
asks the user before it runs, like a dsfuse command that writes, and a destructive one (MCP's
default) asks even with `--yes`. The server checks its own arguments against its own schemas.
"""

from __future__ import annotations

import json
import re
import shlex
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsfuse.agent.tools import Tool
from dsfuse.errors import UsageError

EXTERNAL_MARK = "(mcp)"  # the first word of an external tool's confirmation, in place of a dsfuse command
MAX_NAME = 64  # what the chat-completions protocol allows for a tool's name
_NOT_A_NAME_CHAR = re.compile(r"[^A-Za-z0-9_-]+")


def tool_name(prefix: str, name: str) -> str:
    return _NOT_A_NAME_CHAR.sub("_", f"{prefix}_{name}")[:MAX_NAME]


@dataclass
class ExternalTool:
    """How the agent runs one of another server's tools, and whether to ask first."""

    server: McpServer
    name: str  # the server's own name for it
    read_only: bool
    destructive: bool

    def call(self, arguments: dict[str, Any], timeout: float) -> dict[str, Any]:
        return self.server.call(self.name, arguments, timeout)

    def asks(self, yes: bool) -> bool:
        """Whether a call needs the user's yes: not read-only and (destructive, or no `--yes`)."""
        return not self.read_only and (self.destructive or not yes)

    def describe(self, arguments: dict[str, Any]) -> list[str]:
        """What the confirmation shows: where the tool comes from, and the arguments."""
        return [EXTERNAL_MARK, self.server.command_line, self.name, json.dumps(arguments)]


class McpServer:
    """One MCP server started from a command line, connected over stdio until `close`."""

    def __init__(self, command_line: str, cwd: Path, env: dict[str, str], timeout: float = 60):
        from anyio.from_thread import start_blocking_portal
        from mcp import Client, StdioServerParameters

        argv = shlex.split(command_line)
        if not argv:
            raise UsageError("an empty server command", "--mcp")
        self.command_line = command_line
        self.stack = ExitStack()
        try:
            self.portal = self.stack.enter_context(start_blocking_portal())
            params = StdioServerParameters(command=argv[0], args=argv[1:], cwd=str(cwd), env=env)
            self.client = self.stack.enter_context(self.portal.wrap_async_context_manager(
                Client(params, read_timeout_seconds=timeout)))
            listed = self.portal.call(self.client.list_tools).tools
        except Exception as e:
            self.close()
            raise UsageError(f"cannot start the MCP server ({type(e).__name__}: {_first_line(e)})",
                             f"--mcp {command_line}") from None
        info = self.client.server_info
        self.prefix = _NOT_A_NAME_CHAR.sub("_", info.name if info and info.name else Path(argv[0]).stem)
        self.listed = listed

    def tools(self) -> dict[str, Tool]:
        tools = {}
        for spec in self.listed:
            hints = spec.annotations
            read_only = bool(hints and hints.read_only_hint)
            destructive = not read_only and (hints is None or hints.destructive_hint is not False)
            name = tool_name(self.prefix, spec.name)
            schema = dict(spec.input_schema) or {"type": "object", "properties": {}}
            tool = Tool(name, f"[{self.prefix}] {spec.description or spec.name}", schema,
                        command=[name], writes_files=not read_only)
            tool.external = ExternalTool(self, spec.name, read_only, destructive)
            tools[name] = tool
        return tools

    def call(self, name: str, arguments: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The tool's result for the model: its structured content, else its text; images are counted."""
        try:
            result = self.portal.call(lambda: self.client.call_tool(name, arguments, read_timeout_seconds=timeout))
        except Exception as e:
            return {"tool": f"{self.prefix}:{name}", "error": f"{type(e).__name__}: {_first_line(e)}"}
        texts = [c.text for c in result.content if c.type == "text"]
        record: dict[str, Any] = {"tool": f"{self.prefix}:{name}"}
        if result.structured_content is not None:
            record["output"] = result.structured_content
        elif texts:
            record["output"] = "\n".join(texts)
        images = sum(c.type == "image" for c in result.content)
        if images:
            record["images"] = images
        if result.is_error:
            record["error"] = "\n".join(texts) or "the tool failed"
        return record

    def close(self) -> None:
        self.stack.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def connect(command_lines: list[str], cwd: Path, env: dict[str, str], stack: ExitStack) -> dict[str, Tool]:
    """Start every server (closed with `stack`) and return their tools; a name clash is refused."""
    tools: dict[str, Tool] = {}
    for line in command_lines:
        server = McpServer(line, cwd, env)
        stack.callback(server.close)
        for name, tool in server.tools().items():
            if name in tools:
                raise UsageError(f"two MCP tools are both named {name}", f"--mcp {line}")
            tools[name] = tool
    return tools

