"""The weights resolver against a real HTTP server on 127.0.0.1: downloads, refusals, the cache, offline."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from dsfuse.errors import UsageError
from dsfuse.weights import WeightsFile, load_state_dict, model_folder, resolve

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
GOOD_HASH = hashlib.sha256(PAYLOAD).hexdigest()[:8]


class Server:
    """Serves /good-<hash>.pth, /bad-00000000.pth (wrong content), /cut.pth (half, then hangs up); 404 else."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                if self.path in (f"/good-{GOOD_HASH}.pth", "/bad-00000000.pth", "/cut.pth"):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(PAYLOAD)))
                    self.end_headers()
                    self.wfile.write(PAYLOAD[:len(PAYLOAD) // 2] if self.path == "/cut.pth" else PAYLOAD)
                    self.wfile.flush()
                    self.close_connection = True
                else:
                    self.send_error(404)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("DSFUSE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_verifies_and_the_second_call_is_served_from_the_cache(server, cache):
    weights = WeightsFile(f"{server.url}/good-{GOOD_HASH}.pth")
    path = resolve(weights, option="--x", quiet=True)
    assert path == cache / f"good-{GOOD_HASH}.pth" and path.read_bytes() == PAYLOAD
    assert resolve(weights, option="--x", quiet=True) == path
    assert server.requests == [f"/good-{GOOD_HASH}.pth"]  # one request for two calls
    assert leftovers(cache) == [path.name]


@pytest.mark.parametrize("name, reason", [("missing.pth", "HTTP 404"), ("cut.pth", "cut short|failed"),
                                          ("bad-00000000.pth", "corrupt")])
def test_a_failed_download_is_one_refusal_and_leaves_the_cache_clean(server, cache, name, reason):
    with pytest.raises(UsageError, match=reason) as e:
        resolve(WeightsFile(f"{server.url}/{name}"), option="--x", quiet=True)
    assert name in str(e.value) and str(cache) in str(e.value)  # says where to put the file instead
    assert leftovers(cache) == []


def test_a_corrupt_cached_file_is_refused_with_a_note_to_delete_it(server, cache):
    cache.mkdir(parents=True)
    (cache / f"good-{GOOD_HASH}.pth").write_bytes(PAYLOAD[:1000])
    with pytest.raises(UsageError, match="corrupt.*delete it"):
        resolve(WeightsFile(f"{server.url}/good-{GOOD_HASH}.pth"), option="--x")
    assert server.requests == []


def test_offline_names_the_file_and_the_folder(server, cache, monkeypatch):
    for variable in ("DSFUSE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(variable, "1")
        with pytest.raises(UsageError, match=f"put good-{GOOD_HASH}.pth .* in {cache}") as e:
            resolve(WeightsFile(f"{server.url}/good-{GOOD_HASH}.pth"), option="--pretrained")
        assert e.value.exit_code == 2 and e.value.where == "--pretrained"
        monkeypatch.delenv(variable)
    assert server.requests == []


def test_an_explicit_file_wins_and_must_exist(tmp_path, cache):
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"x")
    assert resolve(WeightsFile("http://127.0.0.1:9/w-00000000.pth"), explicit, option="--weights") == explicit
    with pytest.raises(UsageError, match="not found"):
        resolve(WeightsFile("http://127.0.0.1:9/w.pth"), tmp_path / "nope.pth", option="--weights")


def test_a_hub_model_comes_from_the_hugging_face_cache_when_downloads_are_off(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("DSFUSE_OFFLINE", "1")
    snapshot = tmp_path / "hf" / "models--org--model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hf" / "models--org--model" / "refs").mkdir()
    (tmp_path / "hf" / "models--org--model" / "refs" / "main").write_text("a" * 40)
    assert model_folder("org/model") == snapshot
    with pytest.raises(UsageError, match="org/other is not in the Hugging Face cache .* downloads are off"):
        model_folder("org/other")


def test_an_unreadable_weights_file_is_refused_in_one_line(tmp_path):
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    torch.save({"w": torch.ones(2)}, good)
    bad.write_bytes(good.read_bytes()[:50])
    assert torch.equal(load_state_dict(good)["w"], torch.ones(2))
    with pytest.raises(UsageError, match="delete it"):
        load_state_dict(bad)
