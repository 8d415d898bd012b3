"""The chat-completions protocol against a real HTTP server on 127.0.0.1 with scripted replies."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from chat_server import Reply, ScriptedServer, chunk, text_reply
from conftest import assert_one_line_error, run_cli
from dsfuse.agent.boundary import Boundary
from dsfuse.agent.client import ApiError, ChatClient, read_api_key, resolve_model
from dsfuse.agent.loop import Agent, Transcript
from dsfuse.agent.tools import build_tools
from dsfuse.errors import UsageError


def client(url: str, **kw) -> ChatClient:
    return ChatClient(api_key="sk-test", base_url=url, model="deepseek-v4-flash", backoff=0.01, timeout=5, **kw)


def split_tool_call_reply() -> Reply:
    """Reasoning, keep-alive comments, and two tool calls whose names and arguments arrive in pieces."""
    return Reply(events=[
        ": keep-alive",
        chunk({"role": "assistant", "reasoning_content": "I should list "}),
        chunk({"reasoning_content": "the files."}),
        ": keep-alive",
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "list_", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "files", "arguments": '{"pat'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "info", "arguments": "{}"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'tern": "*.txt"}'}}]}),
        chunk({}, "tool_calls"),
        "data: [DONE]",
    ])


def test_stream_assembles_reasoning_content_and_split_tool_calls():
    deltas = []
    with ScriptedServer([split_tool_call_reply()]) as server:
        turn = client(server.url).complete([{"role": "user", "content": "hi"}], on_delta=lambda k, t: deltas.append(k))
    assert turn.reasoning == "I should list the files."
    assert [(c.id, c.name, json.loads(c.arguments)) for c in turn.tool_calls] == [
        ("call_a", "list_files", {"pattern": "*.txt"}), ("call_b", "info", {})]
    assert turn.finish_reason == "tool_calls" and deltas == ["reasoning", "reasoning"]
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert server.requests[0]["stream"] is True


def test_429_then_success_is_retried():
    replies = [Reply(429, body={"error": {"message": "rate limited"}}, headers={"Retry-After": "0"}),
               Reply(503, body={"error": {"message": "busy"}}), text_reply("done")]
    with ScriptedServer(replies) as server:
        turn = client(server.url).complete([{"role": "user", "content": "hi"}])
    assert turn.content == "done" and len(server.requests) == 3


def test_retries_give_up_with_the_status():
    with ScriptedServer([Reply(429, body={"error": {"message": "slow down"}})] * 3) as server:
        with pytest.raises(ApiError, match="HTTP 429: slow down"):
            client(server.url, max_retries=2).complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 3


@pytest.mark.parametrize("status, words", [(400, "malformed"), (401, "authentication failed"),
                                           (402, "insufficient balance")])
def test_client_errors_are_clear_and_not_retried(status, words):
    with ScriptedServer([Reply(status, body={"error": {"message": "server says no"}})]) as server:
        with pytest.raises(ApiError) as e:
            client(server.url).complete([{"role": "user", "content": "hi"}])
    assert words in str(e.value) and "server says no" in str(e.value) and len(server.requests) == 1


def test_malformed_json_in_the_stream():
    reply = Reply(events=[chunk({"content": "par"}), "data: {not json", "data: [DONE]"])
    with ScriptedServer([reply]) as server, pytest.raises(ApiError, match="malformed JSON"):
        client(server.url).complete([{"role": "user", "content": "hi"}])


def test_connection_dropped_mid_stream():
    reply = text_reply("a long answer")
    reply.drop_after = 2
    with ScriptedServer([reply]) as server, pytest.raises(ApiError, match="dropped mid-stream|before the answer"):
        client(server.url).complete([{"role": "user", "content": "hi"}])


def test_unreachable_server():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ApiError, match="cannot reach"):
        client(f"http://127.0.0.1:{port}", max_retries=1).complete([{"role": "user", "content": "hi"}])


def test_retired_models_map_to_v4_flash_with_thinking():
    assert resolve_model("deepseek-chat", None) == ("deepseek-v4-flash", False)
    assert resolve_model("deepseek-reasoner", None) == ("deepseek-v4-flash", True)
    assert resolve_model("deepseek-reasoner", False) == ("deepseek-v4-flash", False)
    assert resolve_model("deepseek-v4-pro", None) == ("deepseek-v4-pro", None)


def test_key_file_must_be_private(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    key = tmp_path / "key"
    key.write_text("sk-file\n")
    key.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        read_api_key(key)
    key.chmod(0o600)
    assert read_api_key(key) == "sk-file"
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-env")
    assert read_api_key(key) == "sk-file"  # the explicit file wins over the environment
    assert read_api_key(None) == "sk-env"


def refuse(argv, overwrites) -> bool:
    """No user at the terminal: every command that writes is declined."""
    return False


def test_agent_runs_tools_and_sends_reasoning_back(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    replies = [split_tool_call_reply(), text_reply("There is one text file: notes.txt.")]
    with ScriptedServer(replies) as server:
        log = tmp_path / "t.jsonl"
        agent = Agent(client(server.url, think=True), build_tools(), Boundary.at(tmp_path), Transcript(log, {}),
                      refuse)
        reply = agent.ask("Which text files are here?")
    assert reply.answer == "There is one text file: notes.txt." and reply.rounds == 1
    listed = reply.tool_calls[0]["result"]
    assert listed["files"] == ["notes.txt"]
    assert reply.tool_calls[1]["result"]["exit_code"] == 0  # `dsfuse info --json -q` really ran
    first, second = server.requests
    assert first["thinking"] == {"type": "enabled"}
    assert {t["function"]["name"] for t in first["tools"]} >= {"list_files", "info"}
    assistant = [m for m in second["messages"] if m["role"] == "assistant"][0]
    assert assistant["reasoning_content"] == "I should list the files."
    assert [c["id"] for c in assistant["tool_calls"]] == ["call_a", "call_b"]
    tool_messages = [m for m in second["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["call_a", "call_b"]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["type"] == "session" and lines[-1]["content"] == reply.answer


def test_tool_round_cap_forces_an_answer(tmp_path):
    call = Reply(events=[chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "list_files",
                                                                                   "arguments": "{}"}}]}),
                         chunk({}, "tool_calls"), "data: [DONE]"])
    with ScriptedServer([call, call, text_reply("enough")]) as server:
        agent = Agent(client(server.url), build_tools(), Boundary.at(tmp_path), Transcript(None, {}), refuse,
                      max_rounds=2)
        reply = agent.ask("loop")
    assert reply.rounds == 2 and reply.answer == "enough"
    assert "tools" in server.requests[1] and "tools" not in server.requests[2]


def test_a_bad_tool_call_goes_back_to_the_model(tmp_path):
    call = Reply(events=[chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {
        "name": "list_files", "arguments": '{"pattern": "../*"}'}}]}), chunk({}, "tool_calls"), "data: [DONE]"])
    with ScriptedServer([call, text_reply("sorry")]) as server:
        agent = Agent(client(server.url), build_tools(), Boundary.at(tmp_path), Transcript(None, {}), refuse)
        reply = agent.ask("list the parent")
    assert "inside the working folder" in reply.tool_calls[0]["result"]["error"]
    assert "inside the working folder" in server.requests[1]["messages"][-1]["content"]


# ---------------------------------------------------------------- the command, end to end

def chat_cli(url: str, *args: str, cwd: Path, **kw):
    env = {"DEEPSEEK_API_KEY": "sk-test"}
    return run_cli("chat", "--base-url", url, "--retries", "1", "--timeout", "5", *args, cwd=cwd, env=env, **kw)


@pytest.mark.slow
def test_cli_json_one_shot_from_stdin(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    replies = [Reply(events=[chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {
        "name": "list_files", "arguments": '{"pattern": "*.txt"}'}}]}), chunk({}, "tool_calls"), "data: [DONE]"]),
        text_reply("One file: a.txt.", reasoning="Looked at the listing.")]
    with ScriptedServer(replies) as server:
        proc = chat_cli(server.url, "-", "--json", "--transcript", "t.jsonl", cwd=tmp_path, input="What files?\n")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["answer"] == "One file: a.txt." and out["tool_calls"][0]["result"]["files"] == ["a.txt"]
    assert server.requests[0]["messages"][-1] == {"role": "user", "content": "What files?"}
    roles = [json.loads(x).get("role") for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert roles == [None, "user", "assistant", "tool", "assistant"]


@pytest.mark.slow
def test_cli_streams_reasoning_dimmed_to_stderr_and_answer_to_stdout(tmp_path):
    with ScriptedServer([text_reply("Paris.", reasoning="The capital of France")]) as server:
        proc = chat_cli(server.url, "Capital of France?", "--transcript", "t.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "Paris." and "The capital of France" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong key", "unreachable", "dropped"])
def test_cli_failures_are_one_line_exit_1_and_keep_the_transcript(tmp_path, case):
    dropped = text_reply("a partial answer")
    dropped.drop_after = 2
    replies = {"wrong key": [Reply(401, body={"error": {"message": "invalid api key"}})],
               "unreachable": [], "dropped": [dropped]}[case]
    with ScriptedServer(replies) as server:
        url = server.url
        if case == "unreachable":
            server.stop()
            server.httpd.server_close()
        proc = chat_cli(url, "hello there", "--transcript", "t.jsonl", cwd=tmp_path)
    line = assert_one_line_error(proc, 1, "transcript so far")
    assert {"wrong key": "authentication failed", "unreachable": "cannot reach",
            "dropped": "mid-stream"}[case] in line or (case == "dropped" and "before the answer" in line)
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert lines[-1] == {"role": "user", "content": "hello there"}


@pytest.mark.slow
def test_cli_no_key_with_remote_forced(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DEEPSEEK_API_KEY"}
    env["HOME"] = str(tmp_path)  # no key file either
    proc = run_cli("chat", "hi", "--backend", "remote", cwd=tmp_path, env={**env, "DEEPSEEK_API_KEY": ""})
    assert_one_line_error(proc, 1, "no API key")


@pytest.mark.slow
@pytest.mark.parametrize("args, stdin, words", [
    (["", "--backend", "remote"], None, "question is empty"),
    (["-", "--backend", "remote"], "", "no question on stdin"),
    (["hi", "--max-rounds", "-1"], None, "max-rounds"),
    (["hi", "--key-file", "missing-key"], None, "key file not found"),
])
def test_cli_bad_input(tmp_path, args, stdin, words):
    proc = run_cli("chat", *args, cwd=tmp_path, input=stdin, env={"DEEPSEEK_API_KEY": ""})
    assert_one_line_error(proc, 2, words)


def test_repl_commands(tmp_path, monkeypatch, capsys):
    from dsfuse.cli.chat import Display, _repl

    lines = iter(["/tools", "Capital of France?", f"/save {tmp_path / 'saved.jsonl'}", "/reset", "/bogus",
                  "second question", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    failing = Reply(401, body={"error": {"message": "bad key"}})
    with ScriptedServer([text_reply("Paris."), failing]) as server:
        agent = Agent(client(server.url), build_tools(), Boundary.at(tmp_path), Transcript(tmp_path / "t.jsonl", {}),
                      refuse)
        _repl(agent, Display(as_json=False, quiet=True), quiet=True)
    out, err = capsys.readouterr()
    assert "Paris." in out and "list_files" in err and "unknown command /bogus" in err
    assert "error: authentication failed" in err  # the session went on after a failed question
    saved = [json.loads(x) for x in (tmp_path / "saved.jsonl").read_text().splitlines()]
    assert [m.get("role") for m in saved] == [None, "user", "assistant"]
    assert {"type": "reset"} in [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(agent.messages) == 2  # system + the failed question after /reset
    assert (tmp_path / "state" / "dsfuse" / "chat_history").is_file()
