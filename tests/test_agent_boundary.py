"""The agent's tools are a boundary: what a hostile model's tool calls (and a hostile server) cannot do."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from chat_server import Reply, ScriptedServer, chunk, text_reply
from conftest import assert_one_line_error, run_cli
from dsfuse.agent.boundary import Boundary
from dsfuse.agent.client import ApiError, ChatClient, check_base_url
from dsfuse.agent.loop import Agent, Transcript
from dsfuse.agent.tools import ToolArgumentError, build_tools, check_call, run_tool, validate_arguments
from dsfuse.errors import UsageError

TOOLS = build_tools()


def call(tool: str, root: Path, **arguments):
    """The confined command line of a call, or ToolArgumentError."""
    return check_call(TOOLS[tool], validate_arguments(TOOLS[tool], arguments), Boundary.at(root))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "work"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "rocket.jpg").write_bytes(b"jpg")
    (root / "photos" / "family.png").write_bytes(b"png")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.png").write_bytes(b"png")
    (root / "escape").symlink_to(tmp_path / "elsewhere")
    return root


# ---------------------------------------------------------------- paths stay inside the root

@pytest.mark.parametrize("tool, arguments", [
    ("sample", {"checkpoint": "run", "out": "/tmp/somewhere"}),                      # absolute --out
    ("sample", {"checkpoint": "../run", "out": "grid.png"}),                         # .. in --checkpoint
    ("tokenize-image", {"images": ["/etc/passwd"], "checkpoint": "run"}),            # absolute input
    ("tokenize-image", {"images": ["escape/secret.png"], "checkpoint": "run"}),      # through a symlink
    ("tokenize-image", {"images": ["escape/*.png"], "checkpoint": "run"}),           # a glob through it
    ("tokenize-image", {"images": ["ELSEWHERE/**/*.png"], "checkpoint": "run"}),     # an absolute glob
    ("tokenize-image", {"images": ["../elsewhere/*.png"], "checkpoint": "run"}),     # a glob going up
    ("audio-emotion-synthetic", {"out": "/tmp/x"}),                                  # a positional output
    ("moe-inspect", {"model": "~/models/v3", "text": "essay.txt"}),                  # a home folder, expanded
    ("sample", {"checkpoint": "~/run", "out": "grid.png"}),                          # the same in an option
])
def test_paths_outside_the_root_are_refused(folder, tool, arguments):
    arguments = {k: [v.replace("ELSEWHERE", str(folder.parent / "elsewhere")) for v in val]
                 if isinstance(val, list) else val for k, val in arguments.items()}
    with pytest.raises(ToolArgumentError, match="outside the working folder|stay inside|no file matches"):
        call(tool, folder, **arguments)


def test_globs_are_expanded_and_each_match_checked(folder):
    (folder / "photos" / "link.png").symlink_to(folder.parent / "elsewhere" / "secret.png")
    with pytest.raises(ToolArgumentError, match="outside the working folder"):
        call("tokenize-image", folder, images=["photos/*.png"], checkpoint="run")
    (folder / "photos" / "link.png").unlink()
    argv = call("tokenize-image", folder, images=["photos/*"], checkpoint="run").argv
    assert argv[argv.index("--"):] == ["--", "photos/family.png", "photos/rocket.jpg"]


def test_values_never_become_options(folder):
    with pytest.raises(ToolArgumentError, match="may not start with '-'"):
        call("tokenize-image", folder, images=["photos/rocket.jpg", "--out", "/x"], checkpoint="run")
    with pytest.raises(ToolArgumentError, match="may not start with '-'"):
        call("sample", folder, checkpoint="run", out="grid.png", class_name="--force")
    argv = call("sample", folder, checkpoint="run", out="grid.png", eta=-0.5).argv  # a number is a value
    assert argv[argv.index("--eta") + 1] == "-0.5" and argv[-1] == "--"


def test_the_model_cannot_set_force_debug_or_help(folder):
    for name in ("force", "debug", "help", "json"):
        assert name not in TOOLS["sample"].schema["properties"]
        with pytest.raises(ToolArgumentError, match="unknown argument"):
            validate_arguments(TOOLS["sample"], {"checkpoint": "run", "out": "o.png", name: True})


def test_the_model_cannot_pass_a_config_file(folder):  # its paths would escape the boundary's checks
    assert "config" not in TOOLS["train-ddpm"].schema["properties"]
    assert "precision" in TOOLS["train-ddpm"].schema["properties"]  # the engine's options are tools' too
    with pytest.raises(ToolArgumentError, match="unknown argument"):
        validate_arguments(TOOLS["train-ddpm"], {"data": "photos", "config": "photos/args.yaml"})


def test_writing_over_an_existing_path_is_asked_even_with_yes(folder):
    checked = call("sample", folder, checkpoint="run", out="photos/family.png")
    assert checked.overwrites == [folder / "photos" / "family.png"]
    for tool, arguments in (("classify-video-predict", {"videos": ["photos"], "render": "photos/family.png"}),
                            ("moe-inspect", {"model": "photos", "routes_out": "photos/family.png"})):
        assert call(tool, folder, **arguments).overwrites == [folder / "photos" / "family.png"], tool
    asked = []

    def user(argv, overwrites):
        asked.append((argv, overwrites))
        return False

    turns = [tool_calls_reply([("sample", {"checkpoint": "run", "out": "photos/family.png"}),
                               ("sample", {"checkpoint": "run", "out": "new.png"})]), text_reply("done")]
    with ScriptedServer(turns) as server:
        agent = Agent(ChatClient(None, server.url, "m", max_retries=0), TOOLS, Boundary.at(folder),
                      Transcript(None, {}), user, yes=True)
        reply = agent.ask("draw")
    assert [a[1] for a in asked] == [[folder / "photos" / "family.png"]]  # only the overwrite was asked
    assert reply.tool_calls[0]["result"] == {"error": "the user declined to run this command"}
    assert (folder / "photos" / "family.png").read_bytes() == b"png"
    assert "exit_code" in reply.tool_calls[1]["result"]  # the new file's call ran (and failed: no run there)


# ---------------------------------------------------------------- the tool's process

def test_a_module_in_the_working_folder_is_never_imported(folder):
    marker = folder / "imported"
    for name in ("typer", "torch", "dsfuse", "rich"):
        (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('{name}')\n")
    result = run_tool(TOOLS["info"], {}, Boundary.at(folder))
    assert result["exit_code"] in (0, 1) and "output" in result, result
    assert not marker.exists()


def test_tools_get_no_secrets_and_no_import_path_into_the_root(folder, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-secret")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), ".", "/opt/lib"]))
    env = Boundary.at(folder).environment()
    assert "DEEPSEEK_API_KEY" not in env and "GITHUB_TOKEN" not in env and env["PATH"] == os.environ["PATH"]
    assert env["PYTHONPATH"] == "/opt/lib"
    assert env["DSFUSE_OFFLINE"] == env["HF_HUB_OFFLINE"] == "1"  # no downloads into caches outside the root


# ---------------------------------------------------------------- limits and a consistent history

def tool_calls_reply(calls: list[tuple[str, dict]]) -> Reply:
    return Reply(events=[chunk({"tool_calls": [{"index": i, "id": f"c{i}", "function": {
        "name": name, "arguments": json.dumps(args)}} for i, (name, args) in enumerate(calls)]}),
        chunk({}, "tool_calls"), "data: [DONE]"])


def assert_history_is_valid(messages: list[dict]) -> None:
    """Every tool call of an assistant message has its tool reply, as a real server demands."""
    for i, message in enumerate(messages):
        for tool_call in message.get("tool_calls", []):
            assert any(m.get("tool_call_id") == tool_call["id"] for m in messages[i + 1:]), tool_call


def test_a_flood_of_tool_calls_is_capped_and_the_history_stays_valid(folder):
    flood = tool_calls_reply([("list_files", {})] * 30)
    with ScriptedServer([flood, flood, text_reply("late"), text_reply("next answer")]) as server:
        agent = Agent(ChatClient(None, server.url, "m", max_retries=0), TOOLS, Boundary.at(folder),
                      Transcript(None, {}), lambda *a: False, max_tool_calls=5)
        reply = agent.ask("go")
        assert len(reply.tool_calls) == 5 and "--max-tool-calls" in reply.stopped
        agent.ask("and then?")
    assert_history_is_valid(server.requests[-1]["messages"])
    not_run = [m for m in server.requests[1]["messages"] if m["role"] == "tool" and "not run" in m["content"]]
    assert len(not_run) == 25


def test_a_model_that_ignores_the_round_cap_ends_the_turn(folder):
    loop = tool_calls_reply([("list_files", {})])
    with ScriptedServer([loop, loop, loop, text_reply("fine")]) as server:
        agent = Agent(ChatClient(None, server.url, "m", max_retries=0), TOOLS, Boundary.at(folder),
                      Transcript(None, {}), lambda *a: False, max_rounds=1)
        reply = agent.ask("go")
        assert reply.stopped and "--max-rounds" in reply.stopped and reply.answer == ""
        agent.ask("again")  # the next question's request carries the whole history
    assert_history_is_valid(server.requests[-1]["messages"])


def test_keep_alives_forever_hit_the_idle_timeout_and_data_forever_the_deadline():
    keepalives = Reply(events=[": keep-alive"] * 40, delay=0.1)
    trickle = Reply(events=[chunk({"content": "x"})] * 40, delay=0.1)
    with ScriptedServer([keepalives, trickle]) as server:
        started = time.monotonic()
        with pytest.raises(ApiError, match="no data for 0.5 s"):
            ChatClient(None, server.url, "m", timeout=0.5, max_retries=0).complete([])
        with pytest.raises(ApiError, match="deadline of 1 s"):
            ChatClient(None, server.url, "m", timeout=5, max_retries=0, deadline=1).complete([])
        assert time.monotonic() - started < 3.5


# ---------------------------------------------------------------- the key

def test_plain_http_to_another_host_is_refused_and_bad_urls_are_one_line():
    assert check_base_url("http://127.0.0.1:8080/v1") and check_base_url("http://localhost:1")
    assert check_base_url("https://api.example.com")
    assert check_base_url("http://example.com", allow_http=True)
    for url, words in [("http://example.com", "plain http"), ("ftp://x", "http:// or https://"),
                       ("htp:/x", "http:// or https://"), ("http://", "http:// or https://")]:
        with pytest.raises(UsageError, match=words):
            check_base_url(url)


def test_an_error_body_echoing_the_key_is_redacted():
    echo = Reply(401, body={"error": {"message": "invalid key sk-very-secret-123"}})
    with ScriptedServer([echo]) as server, pytest.raises(ApiError) as error:
        ChatClient("sk-very-secret-123", server.url, "m", max_retries=0).complete([])
    assert "sk-very-secret-123" not in str(error.value) and "[API key]" in str(error.value)


# ---------------------------------------------------------------- the command

@pytest.mark.slow
def test_chat_cli_refuses_insecure_http_and_reports_a_cap_in_one_line(folder):
    proc = run_cli("chat", "hi", "--base-url", "http://example.com", cwd=folder, env={"DEEPSEEK_API_KEY": "k"})
    assert_one_line_error(proc, 2, "plain http")
    loop = tool_calls_reply([("list_files", {})])
    with ScriptedServer([loop, loop]) as server:
        proc = run_cli("chat", "go", "--base-url", server.url, "--max-rounds", "1", "--retries", "0",
                       "--transcript", folder / "t.jsonl", cwd=folder, env={"DEEPSEEK_API_KEY": "k"})
    assert_one_line_error(proc, 1, "--max-rounds")


def test_the_confirmation_shows_the_exact_command_escaped_and_quoted(monkeypatch, capsys):
    from dsfuse.cli.chat import _confirm_on_terminal

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda *a: "n")
    assert not _confirm_on_terminal(["sample", "--class", "[conceal]", "--out", "a b.png", "--", "[/]"], [])
    shown = capsys.readouterr().err
    assert "dsfuse sample --class '[conceal]' --out 'a b.png' -- '[/]'" in shown and "[y/N]" in shown
