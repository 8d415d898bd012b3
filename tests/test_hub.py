"""A Hub id is fetched with huggingface_hub into its standard cache (here from a Hub-like server on
127.0.0.1 that the test starts), then found there offline; no test touches the network."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import run_cli
from hf_models import save_tiny

REPO_ID, SHA = "tiny-org/tiny-v3", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub(tmp_path):
    """A server answering what snapshot_download asks: the repo's revision and file tree, and each file."""
    folder = tmp_path / "repo"
    save_tiny("DeepseekV3ForCausalLM", folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(200)
            for key, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def do_GET(self):
            path = self.path.split("?")[0]
            if path in (f"/api/models/{REPO_ID}/revision/main", f"/api/models/{REPO_ID}"):
                info = {"id": REPO_ID, "sha": SHA, "siblings": [{"rfilename": name} for name in files]}
                return self._answer(json.dumps(info).encode(), "application/json")
            if path == f"/api/models/{REPO_ID}/tree/{SHA}":
                tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in files.items()]
                return self._answer(json.dumps(tree).encode(), "application/json")
            prefix = f"/{REPO_ID}/resolve/"
            name = self.path.split("?")[0].split("/")[-1]
            if self.path.startswith(prefix) and name in files:
                etag = hashlib.sha256(files[name]).hexdigest()
                return self._answer(files[name], "application/octet-stream",
                                    {"X-Repo-Commit": SHA, "ETag": f'"{etag}"'})
            self.send_error(404)

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_hub_id_is_downloaded_into_the_cache_then_found_offline(hub, tmp_path):
    env = {"HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    proc = run_cli("moe-inspect", REPO_ID, "--text", "The quick brown fox.", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["architecture"] == "DeepseekV3ForCausalLM"
    snapshot = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-v3" / "snapshots" / SHA
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in snapshot.iterdir()}
    offline = run_cli("moe-inspect", REPO_ID, "--text", "The quick brown fox.", "--json",
                      env={**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["layers"] == json.loads(proc.stdout)["layers"]
