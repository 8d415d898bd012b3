"""`dsfuse mcp`: every command as a Model Context Protocol tool, through the chat agent's boundary.

The tools and their schemas are `agent.tools.build_tools`'s; a call is validated and confined by
`validate_arguments` and `Boundary.check_call` exactly as a model's call in `chat`. Commands run in
this process, one at a time, in the root (`Boundary.enter`), so torch stays imported between calls.
Training sends progress notifications and stops, saved and resumable, when the client cancels.
The run folders under the root (their `metrics.jsonl` and PNGs) are resources.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import redirect_stderr, redirect_stdout
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError

from dsfuse import __version__
from dsfuse.agent.boundary import OUTPUT_PARAMS, Boundary, BoundaryError
from dsfuse.agent.tools import (LIST_FILES, Tool, ToolArgumentError, build_tools, check_call, command_argv,
                                command_result, list_files, validate_arguments)
from dsfuse.report import PROGRESS_OBSERVER
from dsfuse.runs import METRICS_FILE

MAX_IMAGES = 8  # PNGs returned as image content per call; the rest become resource links
MAX_IMAGE_BYTES = 4 << 20
MAX_LINKS = 50
PROGRESS_INTERVAL = 0.2  # seconds between progress notifications (the last step is always sent)
MIME = {".png": "image/png", ".jsonl": "application/jsonl", ".json": "application/json", ".txt": "text/plain",
        ".safetensors": "application/octet-stream", ".pt": "application/octet-stream"}
TEXT_SUFFIXES = {".jsonl", ".json", ".txt"}


class CommandRunner:
    """Runs `dsfuse ARGV` in this process, one command at a time: stdout and stderr captured per call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def run(self, argv: list[str], observer: Any = None) -> dict[str, Any]:
        from dsfuse.cli import main

        with self.lock:
            out, err = io.StringIO(), io.StringIO()
            token = PROGRESS_OBSERVER.set(observer)
            try:
                with redirect_stdout(out), redirect_stderr(err):
                    try:
                        main(argv)
                        code = 0
                    except SystemExit as e:
                        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            finally:
                PROGRESS_OBSERVER.reset(token)
            return command_result(argv, code, out.getvalue(), err.getvalue())

    def wait(self) -> None:
        """Until the running command (a cancelled training saving its run) has finished."""
        with self.lock:
            pass


def tool_spec(tool: Tool) -> types.Tool:
    """The MCP listing of a dsfuse tool: the chat schema, and hints on whether it writes."""
    return types.Tool(name=tool.name, description=tool.description, input_schema=tool.schema,
                      annotations=types.ToolAnnotations(read_only_hint=not tool.writes_files,
                                                        # commands never write over files (no --force)
                                                        destructive_hint=False, open_world_hint=False))


def error_result(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=message)], is_error=True)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def written_files(boundary: Boundary, named: list[str], since_ns: int) -> list[Path]:
    """Files under the paths a call named or reported (inside the root) that changed since `since_ns`."""
    found: list[Path] = []
    for value in named:
        try:
            path = boundary.path(value, "output")
        except (BoundaryError, OSError):
            continue
        if path == boundary.root:
            continue
        candidates = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        for c in candidates:
            if c.is_file() and c.stat().st_mtime_ns >= since_ns and c not in found and _inside(boundary, c):
                found.append(c)
    return found


def _inside(boundary: Boundary, path: Path) -> bool:
    try:
        boundary.path(str(path), "output")
    except BoundaryError:
        return False
    return True


def result_content(boundary: Boundary, result: dict[str, Any], files: list[Path]) -> types.CallToolResult:
    """The command's result as structured content, its PNGs as images, its other files as resource links."""
    content: list[Any] = [types.TextContent(text=json.dumps(result))]
    images = 0
    for path in files[:MAX_LINKS]:
        size = path.stat().st_size
        if path.suffix.lower() == ".png" and images < MAX_IMAGES and size <= MAX_IMAGE_BYTES:
            content.append(types.ImageContent(data=base64.b64encode(path.read_bytes()).decode(), mime_type="image/png"))
            images += 1
        else:
            content.append(types.ResourceLink(name=boundary.relative(path), uri=path.as_uri(), size=size,
                                              mime_type=MIME.get(path.suffix.lower())))
    return types.CallToolResult(content=content, structured_content=result, is_error=result.get("exit_code") != 0)


def run_folders(boundary: Boundary) -> list[Path]:
    """Every folder under the root holding a `metrics.jsonl` (a training run), hidden folders left out."""
    runs = []
    for metrics in sorted(boundary.root.rglob(METRICS_FILE)):
        relative = metrics.relative_to(boundary.root)
        if not any(part.startswith(".") for part in relative.parts) and _inside(boundary, metrics):
            runs.append(metrics.parent)
    return runs


def run_resources(boundary: Boundary) -> list[types.Resource]:
    resources = []
    for run in run_folders(boundary):
        for path in [run / METRICS_FILE, *sorted(run.glob("*.png"))]:
            if path.is_file() and _inside(boundary, path):
                resources.append(types.Resource(name=boundary.relative(path), uri=path.as_uri(),
                                                mime_type=MIME.get(path.suffix.lower()), size=path.stat().st_size))
    return resources


def read_run_file(boundary: Boundary, uri: str) -> types.ReadResourceResult:
    """A run folder's `metrics.jsonl` or PNG, by its file:// URI; anything else is refused."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ValueError(f"not a file:// resource: {uri}")
    path = boundary.path(unquote(parsed.path), "uri")
    if not (path.is_file() and (path.parent / METRICS_FILE).is_file()
            and (path.name == METRICS_FILE or path.suffix.lower() == ".png")):
        raise ValueError(f"not a run folder's metrics.jsonl or PNG: {uri}")
    mime = MIME.get(path.suffix.lower())
    if path.suffix.lower() in TEXT_SUFFIXES:
        contents: Any = types.TextResourceContents(uri=uri, mime_type=mime, text=path.read_text(errors="replace"))
    else:
        contents = types.BlobResourceContents(uri=uri, mime_type=mime, blob=base64.b64encode(path.read_bytes()).decode())
    return types.ReadResourceResult(contents=[contents])


class DsfuseServer:
    """The MCP handlers over dsfuse's tools, confined to `boundary`; writes only with `allow_writes`."""

    def __init__(self, boundary: Boundary, allow_writes: bool = False, device: str = "auto"):
        self.boundary = boundary
        self.allow_writes = allow_writes
        self.device = device
        self.tools = build_tools()
        self.runner = CommandRunner()
        self.stops: set[threading.Event] = set()
        self.server: Server[Any] = Server(
            "dsfuse", version=__version__,
            instructions=f"dsfuse's commands as tools, confined to {boundary.root}"
                         + ("" if allow_writes else "; commands that write files are refused (no --allow-writes)"),
            on_list_tools=self.list_tools, on_call_tool=self.call_tool,
            on_list_resources=self.list_resources, on_read_resource=self.read_resource)

    async def list_tools(self, ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[tool_spec(tool) for tool in self.tools.values()])

    async def list_resources(self, ctx: Any, params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=await anyio.to_thread.run_sync(run_resources, self.boundary))

    async def read_resource(self, ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        try:
            return await anyio.to_thread.run_sync(read_run_file, self.boundary, params.uri)
        except (BoundaryError, ValueError, OSError) as e:
            raise MCPError(types.INVALID_PARAMS, str(e)) from None

    async def call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        tool = self.tools.get(params.name)
        if tool is None:
            return error_result(f"no tool named {params.name!r}")
        try:
            arguments = validate_arguments(tool, params.arguments or {})
            if "device" in tool.schema["properties"]:
                arguments.setdefault("device", self.device)
            if tool.name == LIST_FILES:
                listing = list_files(arguments.get("pattern", "**/*"), self.boundary)
                return types.CallToolResult(content=[types.TextContent(text=json.dumps(listing))],
                                            structured_content=listing)
            checked = check_call(tool, arguments, self.boundary)
        except ToolArgumentError as e:
            return error_result(f"invalid call: {e}")
        if tool.call_writes(arguments) and not self.allow_writes:
            return error_result(f"this call of {tool.name} writes files; this server was started without --allow-writes")
        argv = command_argv(checked)
        stop = threading.Event()
        observer = self._progress(ctx, stop)
        since = time.time_ns() - 10_000_000
        self.stops.add(stop)
        try:
            result = await anyio.to_thread.run_sync(partial(self.runner.run, argv, observer), abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            stop.set()  # the command finishes its step, saves its run and returns in its thread
            raise
        finally:
            self.stops.discard(stop)
        named = [str(arguments[name]) for name in OUTPUT_PARAMS if arguments.get(name)]
        files = await anyio.to_thread.run_sync(written_files, self.boundary, named + list(_strings(result.get("output"))),
                                               since)
        return result_content(self.boundary, result, files)

    @staticmethod
    def _progress(ctx: Any, stop: threading.Event) -> Any:
        """The progress observer of a call: a notification per training step or input file (at most one every
        PROGRESS_INTERVAL, and the last), and True once the client has cancelled."""
        last = [0.0]

        def observe(done: int, total: int, unit: str, numbers: Mapping[str, float]) -> bool:
            if stop.is_set():
                return True
            now = time.monotonic()
            if done == total or now - last[0] >= PROGRESS_INTERVAL:
                last[0] = now
                message = f"{unit} {done}/{total}" + (f", loss {numbers['loss']:.4f}" if "loss" in numbers else "")
                try:
                    anyio.from_thread.run(ctx.session.report_progress, done, total, message)
                except Exception:  # the client went away: keep training; a cancel arrives through `stop`
                    pass
            return stop.is_set()

        return observe

    def shutdown(self) -> None:
        """Stop any training as a cancel does, and wait until its run is saved."""
        for stop in list(self.stops):
            stop.set()
        self.runner.wait()


def serve(root: Path, allow_writes: bool, transport: str = "stdio", port: int = 8765, device: str = "auto") -> None:
    """Serve dsfuse's tools until the client disconnects (stdio) or the process is stopped (http)."""
    boundary = Boundary.at(root)
    boundary.enter()
    app = DsfuseServer(boundary, allow_writes, device)
    try:
        if transport == "http":
            import socket

            import uvicorn

            # bound here, so a port in use is one OSError line (the command's), not uvicorn's log and exit
            with socket.create_server(("127.0.0.1", port)) as sock:
                config = uvicorn.Config(app.server.streamable_http_app(host="127.0.0.1"), log_level="warning")
                uvicorn.Server(config).run(sockets=[sock])
        else:
            anyio.run(_serve_stdio, app.server)
    finally:
        app.shutdown()


async def _serve_stdio(server: Server[Any]) -> None:
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())
