"""`dsfuse mcp`: serve every dsfuse command as a Model Context Protocol tool, for any agent host."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsfuse.choices import McpTransport
from dsfuse.cli.common import DebugOpt, DeviceOpt, JsonOpt, QuietOpt, command
from dsfuse.errors import UsageError
from dsfuse.report import console


@command
def mcp(
    root: Annotated[Path | None, typer.Option("--root", help="The folder tools may read (and, with "
                                              "--allow-writes, write) in; default: the working folder.")] = None,
    allow_writes: Annotated[bool, typer.Option("--allow-writes", help="Run commands that write files (trainers, "
                                               "--out); they write only inside --root.")] = False,
    transport: Annotated[McpTransport, typer.Option("--transport", help="stdio (what desktop hosts launch) or "
                                                    "http (streamable HTTP on 127.0.0.1).")] = "stdio",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="The port of --transport http.")] = 8765,
    device: DeviceOpt = "auto",
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Serve every dsfuse command as a tool over the Model Context Protocol (stdio or local HTTP).

    Calls go through the same boundary as chat's: paths stay inside --root, no option in a value, no
    --force. Training reports progress and a cancel stops it saved (continue with --resume).
    --device is the device of calls that name none. --json: a line describing the server on stderr.

    Example: dsfuse mcp --root ~/data --allow-writes
    """
    from dsfuse.agent.mcp_server import serve
    from dsfuse.device import select_device

    select_device(device)  # an unavailable device is refused now, not at every call
    folder = (root or Path.cwd()).expanduser()
    if not folder.is_dir():
        raise UsageError("not a folder", folder)
    url = f"http://127.0.0.1:{port}/mcp" if transport == "http" else "stdio"
    if json:  # stdout is the protocol's over stdio: the description goes to stderr
        import json as json_module

        console.print(json_module.dumps({"root": str(folder.resolve()), "transport": transport, "url": url,
                                         "allow_writes": allow_writes}), markup=False, highlight=False, soft_wrap=True)
    elif not quiet:
        console.print(f"dsfuse mcp: serving {folder.resolve()} over {url}"
                      + ("" if allow_writes else " (read-only: no --allow-writes)"), markup=False, highlight=False)
    serve(folder, allow_writes, transport, port, device)


def register(app: typer.Typer) -> None:
    app.command("mcp")(mcp)
