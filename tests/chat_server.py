"""A real HTTP server on 127.0.0.1 that speaks the chat-completions protocol with scripted replies.

Each request takes the next `Reply` from the script: an HTTP status, or a stream of server-sent
events (sent as chunked transfer encoding, one event per chunk) that may end early to simulate a
dropped connection. Requests are recorded. The server stops itself after `lifetime` seconds.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    events: list[str] = field(default_factory=list)  # raw SSE lines, e.g. 'data: {...}' or ': keep-alive'
    body: dict[str, Any] | None = None  # JSON body for an error status
    headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None  # close the connection after this many events, mid-stream
    delay: float = 0.0  # seconds before each event


def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
    """One `data:` line holding a chat.completion.chunk with this delta."""
    return "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk",
                                  "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def text_reply(text: str, reasoning: str = "") -> Reply:
    events = [chunk({"role": "assistant", "content": ""})]
    if reasoning:
        events.append(chunk({"reasoning_content": reasoning}))
    events += [chunk({"content": text}), chunk({}, "stop"), "data: [DONE]"]
    return Reply(events=events)


class ScriptedServer:
    def __init__(self, replies: list[Reply], lifetime: float = 300.0):
        self.replies = list(replies)
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                server.requests.append(json.loads(self.rfile.read(length) or b"{}"))
                server.headers.append(dict(self.headers))
                reply = server.replies.pop(0) if server.replies else Reply(500, body={"error": {"message": "script ended"}})
                if reply.status != 200:
                    body = json.dumps(reply.body or {}).encode()
                    self.send_response(reply.status)
                    for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **reply.headers}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i, event in enumerate(reply.events):
                    if reply.drop_after is not None and i >= reply.drop_after:
                        self.close_connection = True
                        self.wfile.flush()
                        return  # no terminating chunk: the client sees the body cut short
                    time.sleep(reply.delay)
                    data = (event + "\n\n").encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.timer = threading.Timer(lifetime, self.stop)
        self.timer.daemon = True

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        self.timer.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()

    def __exit__(self, *exc: Any) -> None:
        self.timer.cancel()
        self.stop()
        self.httpd.server_close()
