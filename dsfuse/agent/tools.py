"""dsfuse's commands as tools: JSON schemas derived from their Typer parameters, calls run the real command.

A tool call becomes `dsfuse COMMAND ARGS --json -q` in the working folder, built and confined by
`agent.boundary`, and the model gets back the command's JSON output (or its one error line).
`list_files` lets it see the folder.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, get_args

import typer

from dsfuse.agent.boundary import OUTPUT_PARAMS, Boundary, BoundaryError, CheckedCall, tool_command

# Options the agent sets itself (machine-readable, quiet), and those a model may never set (a --config
# file's paths would pass the boundary unchecked).
MANAGED_OPTIONS = {"json", "quiet", "debug", "force", "help", "config"}
# `chat` and `mcp` would recurse (an agent serving agents); `demo` runs every command for minutes.
EXCLUDED_COMMANDS = {"chat", "demo", "mcp"}
LIST_FILES = "list_files"
MAX_LISTED_FILES = 200

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


@dataclass
class Param:
    """How one JSON argument maps back onto the command line."""

    name: str
    flag: str | None  # "--checkpoint"; None for a positional argument
    off_flag: str | None = None  # "--no-think" for a boolean with an off switch
    is_bool: bool = False
    is_list: bool = False
    required: bool = False


@dataclass
class Tool:
    name: str
    description: str
    schema: dict[str, Any]
    params: list[Param] = field(default_factory=list)
    command: list[str] = field(default_factory=list)  # e.g. ["audio-emotion", "train"]
    writes_files: bool = False
    external: Any = None  # another MCP server's tool (agent.mcp_client.ExternalTool): it runs there

    def call_writes(self, arguments: dict[str, Any]) -> bool:
        """Whether this call writes files: a trainer (it has --resume) or a required output always does,
        other commands only when the call names an output (`tokenize-image` without `--out` only reads)."""
        if not self.writes_files:
            return False
        outputs = [p for p in self.params if p.name in OUTPUT_PARAMS]
        return (any(p.name == "resume" for p in self.params) or not outputs
                or any(p.required or arguments.get(p.name) is not None for p in outputs))

    def spec(self) -> dict[str, Any]:
        """The OpenAI `tools` entry."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                  "parameters": self.schema}}


def _json_schema(descriptor: Any, help_text: str | None, positional: bool) -> dict[str, Any]:
    annotation = descriptor.annotation
    is_list = descriptor.is_list
    inner = get_args(annotation)[0] if is_list and get_args(annotation) else annotation
    item: dict[str, Any] = {"type": _JSON_TYPES.get(inner, "string")}
    # Path options, and positional inputs (files, folders or globs by the CLI contract), are paths.
    if (isinstance(inner, type) and issubclass(inner, PurePath)) or (positional and item["type"] == "string"):
        item["format"] = "path"
    if descriptor.choices:
        item["enum"] = [getattr(c, "value", c) for c in descriptor.choices]
    info = descriptor.parameter_info
    if item["type"] in ("integer", "number"):
        if info.min is not None:
            item["minimum"] = info.min
        if info.max is not None:
            item["maximum"] = info.max
    schema = {"type": "array", "items": item} if is_list else item
    if help_text:
        schema["description"] = help_text
    return schema


def _description(command: Any) -> str:
    """The command's help: its first paragraph and its example line."""
    text = (command.help or "").strip()
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    example = next((p for p in paragraphs if p.startswith("Example:")), None)
    summary = " ".join(paragraphs[0].split()) if paragraphs else command.name
    return f"{summary} {example}" if example and example != paragraphs[0] else summary


def command_tool(name: str, command: Any) -> Tool:
    """A tool from one click command built by Typer."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    params: list[Param] = []
    writes = any(p.name == "force" for p in command.params)  # every command that writes has --force
    for p in command.params:
        if p.name in MANAGED_OPTIONS or getattr(p, "hidden", False) or not p.expose_value:
            continue
        descriptor = p.type_descriptor
        is_option = p.param_type_name == "option"
        schema = _json_schema(descriptor, getattr(p, "help", None), positional=not is_option)
        default = p.default
        if default is not None and not p.required and not callable(default):
            schema["default"] = str(default) if isinstance(default, PurePath) else default
        properties[p.name] = schema
        if p.required:
            required.append(p.name)
        flag = max(p.opts, key=len) if is_option else None
        off = max(p.secondary_opts, key=len) if is_option and p.secondary_opts else None
        params.append(Param(p.name, flag, off, is_bool=schema.get("type") == "boolean",
                            is_list=descriptor.is_list, required=p.required))
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return Tool(name, _description(command), schema, params, [name], writes_files=writes)


def list_files_tool() -> Tool:
    schema = {"type": "object", "additionalProperties": False, "required": [], "properties": {
        "pattern": {"type": "string", "default": "**/*",
                    "description": "A glob relative to the working folder, such as samples/**/*.png."}}}
    return Tool(LIST_FILES, "List the files in the working folder (recursively) that match a glob pattern.", schema,
                command=[LIST_FILES])


def build_tools(app: typer.Typer | None = None, exclude: set[str] = EXCLUDED_COMMANDS) -> dict[str, Tool]:
    """One tool per dsfuse command (less `exclude`), plus `list_files`."""
    if app is None:
        from dsfuse.cli import app
    tools: dict[str, Tool] = {}

    def add(path: list[str], cmd: Any) -> None:
        if getattr(cmd, "hidden", False):
            return
        if hasattr(cmd, "commands"):  # a command group: each subcommand is a tool
            for sub_name, sub in sorted(cmd.commands.items()):
                add(path + [sub_name], sub)
            return
        tool = command_tool("-".join(path), cmd)
        tool.command = path
        tools[tool.name] = tool

    for name, cmd in sorted(typer.main.get_command(app).commands.items()):
        if name not in exclude:
            add([name], cmd)
    tools[LIST_FILES] = list_files_tool()
    return tools


class ToolArgumentError(ValueError):
    """The model's arguments do not fit the tool's schema; the message goes back to the model."""


def parse_arguments(text: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ToolArgumentError(f"arguments are not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise ToolArgumentError("arguments must be a JSON object")
    return value


def validate_arguments(tool: Tool, arguments: dict[str, Any]) -> dict[str, Any]:
    """Check names, required fields and types against the schema; coerce a lone value into a list."""
    properties = tool.schema["properties"]
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        raise ToolArgumentError(f"unknown argument(s) {', '.join(unknown)}; expected some of {', '.join(properties)}")
    missing = [name for name in tool.schema["required"] if arguments.get(name) in (None, "", [])]
    if missing:
        raise ToolArgumentError(f"missing required argument(s) {', '.join(missing)}")
    clean = {}
    for name, value in arguments.items():
        schema = properties[name]
        if schema["type"] == "array":
            values = value if isinstance(value, list) else [value]
            clean[name] = [_check_value(name, v, schema["items"]) for v in values]
        else:
            clean[name] = _check_value(name, value, schema)
    return clean


def _check_value(name: str, value: Any, schema: dict[str, Any]) -> Any:
    kind = schema["type"]
    ok = {"boolean": isinstance(value, bool),
          "integer": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "string": isinstance(value, (str, int, float)) and not isinstance(value, bool)}[kind]
    if not ok:
        raise ToolArgumentError(f"argument {name} must be a JSON {kind}, got {json.dumps(value)}")
    if "enum" in schema and value not in schema["enum"]:
        raise ToolArgumentError(f"argument {name} must be one of {', '.join(map(str, schema['enum']))}")
    return str(value) if kind == "string" else value


def list_files(pattern: str, boundary: Boundary) -> dict[str, Any]:
    """Files under the root matching `pattern`, symlinks leading out of it left out; hidden files too."""
    pattern = pattern or "**/*"
    if Path(pattern).is_absolute() or ".." in PurePath(pattern).parts:
        raise ToolArgumentError("the pattern must stay inside the working folder")
    root = boundary.root
    found = []
    for p in root.glob(pattern):
        relative = p.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not p.is_file():
            continue
        try:
            boundary.path(str(relative), "pattern")
        except BoundaryError:  # a symlink to a file outside the root
            continue
        found.append(str(relative))
    found.sort()
    return {"files": found[:MAX_LISTED_FILES], "total": len(found), "truncated": len(found) > MAX_LISTED_FILES}


def check_call(tool: Tool, arguments: dict[str, Any], boundary: Boundary) -> CheckedCall:
    """The confined command line of a validated call; a call across the boundary is the model's error."""
    try:
        return boundary.check_call(tool, arguments)
    except BoundaryError as e:
        raise ToolArgumentError(str(e)) from None


def command_argv(call: CheckedCall) -> list[str]:
    """The checked call's argv with `--json -q` before the `--` that ends its options."""
    end = call.argv.index("--")
    return [*call.argv[:end], "--json", "-q", *call.argv[end:]]


def command_result(argv: list[str], exit_code: int | None, stdout: str, stderr: str) -> dict[str, Any]:
    """A finished command as the tool's result: its exit code, its JSON output and its last error line."""
    records = []
    for line in stdout.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    result: dict[str, Any] = {"command": "dsfuse " + " ".join(argv), "exit_code": exit_code}
    if records:
        result["output"] = records[0] if len(records) == 1 else records
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    if errors:
        result["error"] = errors[-1][len("error: "):]
    return result


def run_tool(tool: Tool, arguments: dict[str, Any], boundary: Boundary, timeout: float = 600) -> dict[str, Any]:
    """Run the real command with `--json -q` in the root; return its exit code and JSON output (or error line)."""
    if tool.name == LIST_FILES:
        return list_files(arguments.get("pattern", "**/*"), boundary)
    argv = command_argv(check_call(tool, arguments, boundary))
    try:
        proc = subprocess.run(tool_command(argv), cwd=boundary.root, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, env=boundary.environment())
    except subprocess.TimeoutExpired:
        return {"command": "dsfuse " + " ".join(argv), "exit_code": None, "error": f"timed out after {timeout:g} s"}
    return command_result(argv, proc.returncode, proc.stdout, proc.stderr)


def result_text(result: dict[str, Any], limit: int = 4000) -> str:
    """A tool result as the JSON text the model reads, cut to `limit` characters."""
    text = json.dumps(result)
    return text if len(text) <= limit else text[:limit] + f"... [truncated {len(text) - limit} characters]"
