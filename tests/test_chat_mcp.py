"""`chat --mcp`: another MCP server's tools beside dsfuse's, called by a scripted model, hints respected."""

from __future__ import annotations

import json
import shlex
import sys
import textwrap

from chat_server import Reply, ScriptedServer, chunk, text_reply
from conftest import assert_one_line_error, json_lines, run_cli

TINY_SERVER = textwrap.dedent('''
    """A tiny MCP server: a read-only tool, one with a side effect, a destructive one (MCP's default hints)."""
    from pathlib import Path

    from mcp.server.mcpserver import MCPServer
    from mcp_types import ToolAnnotations

    server = MCPServer("tiny")

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @server.tool(annotations=ToolAnnotations(destructive_hint=False))
    def note(text: str) -> str:
        """Add a note (a side effect, not a destructive one)."""
        Path("note.txt").write_text(text)
        return "noted"

    @server.tool()
    def wipe(target: str) -> str:
        """Delete everything (it leaves a mark instead)."""
        Path("wiped").write_text(target)
        return "wiped"

    server.run()
''')


def tool_calls(*calls: tuple[str, dict]) -> Reply:
    return Reply(events=[chunk({"tool_calls": [{"index": i, "id": f"c{i}", "type": "function", "function": {
        "name": name, "arguments": json.dumps(arguments)}} for i, (name, arguments) in enumerate(calls)]}),
        chunk({}, "tool_calls"), "data: [DONE]"])


def test_an_mcp_servers_tools_are_called_and_a_destructive_one_is_asked_for(tmp_path):
    (tmp_path / "tiny_server.py").write_text(TINY_SERVER)
    server_line = shlex.join([sys.executable, str(tmp_path / "tiny_server.py")])
    script = [tool_calls(("tiny_add", {"a": 2, "b": 3}), ("tiny_wipe", {"target": "all"}),
                         ("tiny_add", {"a": "two"}), ("tiny_note", {"text": "hello"})), text_reply("2 + 3 = 5.")]
    with ScriptedServer(script) as model:
        proc = run_cli("chat", "What is 2 + 3?", "--base-url", model.url, "--mcp", server_line, "--yes", "--json",
                       "--retries", "0", cwd=tmp_path, env={"DEEPSEEK_API_KEY": "k"})
    assert proc.returncode == 0, proc.stderr
    reply = json_lines(proc.stdout)[0]
    added, wiped, bad, noted = (call["result"] for call in reply["tool_calls"])
    assert added["output"] == {"result": 5} and "error" not in added
    assert wiped == {"error": "the user declined to run this tool"}  # destructive: asked even with --yes
    assert not (tmp_path / "wiped").exists()
    assert "error" in bad  # the server checks its own schema
    assert "error" not in noted and (tmp_path / "note.txt").read_text() == "hello"  # a side effect: --yes runs it
    offered = {t["function"]["name"]: t["function"] for t in model.requests[0]["tools"]}
    assert {"tiny_add", "tiny_wipe", "tokenize-image"} <= set(offered)
    assert offered["tiny_add"]["parameters"]["properties"]["a"]["type"] == "integer"
    assert reply["answer"] == "2 + 3 = 5."


def test_a_server_that_does_not_start_is_one_line(tmp_path):
    proc = run_cli("chat", "hi", "--base-url", "http://127.0.0.1:9", "--mcp", "/nonexistent/server --flag",
                   cwd=tmp_path, env={"DEEPSEEK_API_KEY": "k"})
    assert_one_line_error(proc, 2, "cannot start the MCP server")


def test_without_yes_only_read_only_tools_run(tmp_path):
    (tmp_path / "tiny_server.py").write_text(TINY_SERVER)
    server_line = shlex.join([sys.executable, str(tmp_path / "tiny_server.py")])
    script = [tool_calls(("tiny_add", {"a": 1, "b": 1}), ("tiny_note", {"text": "hello"})), text_reply("2.")]
    with ScriptedServer(script) as model:
        proc = run_cli("chat", "1 + 1?", "--base-url", model.url, "--mcp", server_line, "--json", "--retries", "0",
                       cwd=tmp_path, env={"DEEPSEEK_API_KEY": "k"})
    assert proc.returncode == 0, proc.stderr
    added, noted = (call["result"] for call in json_lines(proc.stdout)[0]["tool_calls"])
    assert added["output"] == {"result": 2}
    assert noted == {"error": "the user declined to run this tool"} and not (tmp_path / "note.txt").exists()
    assert "a tool of the MCP server" in proc.stderr  # no terminal to ask on: it says what it did not run
