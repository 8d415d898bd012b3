"""`dsfuse mcp` through the MCP SDK's own stdio client: tools, the boundary, progress, cancel, images, resources."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import torch
from mcp import Client, StdioServerParameters

from conftest import REPO, run_cli
from dsfuse.agent.tools import build_tools

SAMPLES = REPO / "samples" / "images" / "generated"
TINY_VQ = {"image_size": 32, "downsample": 8, "codebook_size": 64, "base_channels": 8, "latent_channels": 4,
           "batch_size": 4}


@asynccontextmanager
async def server(root: Path, *flags: str):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    params = StdioServerParameters(command=sys.executable, args=["-m", "dsfuse", "mcp", "--root", str(root), "-q",
                                                                  "--device", "cpu", *flags], env=env, cwd=str(root))
    async with Client(params, read_timeout_seconds=300) as client:
        yield client


def with_server(root: Path, flags: list[str], body) -> None:
    """Run `await body(client)` against a server started on `root` with `flags`."""
    async def main():
        async with server(root, *flags) as client:
            await body(client)
    anyio.run(main)


@pytest.fixture
def root(tmp_path):
    """A folder holding a few images, and a tiny trained tokenizer run (with its metrics and PNGs)."""
    shutil.copytree(SAMPLES, tmp_path / "images", ignore=lambda d, names: sorted(names)[6:])
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_VQ.items()]
    proc = run_cli("train-vqvae", "images", "--out", "runs/vq", "--steps", "2", "-q", "--device", "cpu", *args,
                   cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    (tmp_path.parent / "outside.png").write_bytes((tmp_path / "images" / "shapes_00.png").read_bytes())
    return tmp_path


@pytest.mark.parametrize("name, arguments, writes", [
    ("info", {}, False),
    ("tokenize-image", {"images": ["a.png"], "checkpoint": "vq"}, False),
    ("tokenize-image", {"images": ["a.png"], "checkpoint": "vq", "out": "t.jsonl"}, True),
    ("moe-inspect", {}, False),
    ("moe-inspect", {"plot": "load.png"}, True),
    ("train-vqvae", {"data": "images"}, True),  # a trainer writes its run folder, --out or not
    ("audio-emotion-synthetic", {"out": "speech"}, True),  # its output is its argument
])
def test_which_calls_write(name, arguments, writes):
    assert build_tools()[name].call_writes(arguments) is writes


@pytest.mark.slow
def test_read_only_server_lists_tools_runs_reads_and_refuses_writes_and_escapes(root):
    async def checks(client):
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == set(build_tools())  # every command (and subcommand), as chat has them
        quantizer = tools["train-vqvae"].input_schema["properties"]["quantizer"]
        assert quantizer["enum"] == ["vq", "fsq"]
        assert tools["info"].annotations.read_only_hint and not tools["train-vqvae"].annotations.read_only_hint

        progress = []

        async def on_progress(value, total, message):
            progress.append((value, total, message))

        tokens = await client.call_tool("tokenize-image", {"images": ["images/*.png"], "checkpoint": "runs/vq"},
                                        progress_callback=on_progress)
        assert not tokens.is_error, tokens.content[0].text
        records = tokens.structured_content["output"]
        assert len(records) == 6 and records[0]["grid"] == [4, 4] and len(records[0]["tokens"]) == 16
        assert progress[-1] == (6, 6, "file 6/6")

        outside = await client.call_tool("tokenize-image", {"images": ["../outside.png"], "checkpoint": "runs/vq"})
        assert outside.is_error and "outside the working folder" in outside.content[0].text
        absolute = await client.call_tool("tokenize-image", {"images": [str(root.parent / "outside.png")],
                                                             "checkpoint": "runs/vq"})
        assert absolute.is_error and "outside the working folder" in absolute.content[0].text
        option = await client.call_tool("tokenize-image", {"images": ["--help"], "checkpoint": "runs/vq"})
        assert option.is_error and "may not start with '-'" in option.content[0].text

        for name, arguments in [("train-vqvae", {"data": "images", "steps": 1}),
                                ("tokenize-image", {"images": ["images"], "checkpoint": "runs/vq",
                                                    "out": "tokens.jsonl"})]:
            refused = await client.call_tool(name, arguments)
            assert refused.is_error and "--allow-writes" in refused.content[0].text
        assert not (root / "tokens.jsonl").exists() and not (root / "runs" / "tokenizer").exists()

        resources = {r.name: r for r in (await client.list_resources()).resources}
        assert {"runs/vq/metrics.jsonl", "runs/vq/curves.png"} <= set(resources)
        metrics = await client.read_resource(resources["runs/vq/metrics.jsonl"].uri)
        assert '"loss"' in metrics.contents[0].text
        curves = await client.read_resource(resources["runs/vq/curves.png"].uri)
        assert curves.contents[0].mime_type == "image/png" and curves.contents[0].blob
        with pytest.raises(Exception, match="outside the working folder"):
            await client.read_resource((root.parent / "outside.png").as_uri())
        with pytest.raises(Exception, match="metrics.jsonl or PNG"):
            await client.read_resource((root / "images" / "shapes_00.png").as_uri())

    with_server(root, [], checks)


@pytest.mark.slow
def test_writes_stay_in_root_progress_images_and_a_cancelled_training_resumes(root):
    async def checks(client):
        vq = {**TINY_VQ, "data": "images"}
        progress = []

        async def on_progress(value, total, message):
            progress.append((value, total, message))

        trained = await client.call_tool("train-vqvae", {**vq, "out": "runs/a", "steps": 3},
                                         progress_callback=on_progress)
        assert not trained.is_error, trained.content[0].text
        assert trained.structured_content["output"]["step"] == 3
        assert progress[-1][:2] == (3, 3) and "loss" in progress[-1][2]
        images = [c for c in trained.content if c.type == "image"]
        assert images and all(c.mime_type == "image/png" for c in images)  # the run's curves and grids

        escape = await client.call_tool("train-vqvae", {**vq, "out": "../escaped", "steps": 1})
        assert escape.is_error and "outside the working folder" in escape.content[0].text
        assert not (root.parent / "escaped").exists()

        started = anyio.Event()

        async def note_start(value, total, message):
            if value >= 2:
                started.set()

        async with anyio.create_task_group() as tg:
            async def long_training():
                await client.call_tool("train-vqvae", {**vq, "out": "runs/b", "steps": 100000},
                                       progress_callback=note_start)
            tg.start_soon(long_training)
            with anyio.fail_after(120):
                await started.wait()
            tg.cancel_scope.cancel()

        # the cancelled command finishes its step and saves; the next call waits for it
        assert not (await client.call_tool("info", {})).is_error
        saved = torch.load(root / "runs/b/train_state.pt", weights_only=True)["step"]
        assert 2 <= saved < 100000 and (root / "runs/b/model.safetensors").exists()
        resumed = await client.call_tool("train-vqvae", {**vq, "out": "runs/b", "steps": saved + 2, "resume": True})
        assert not resumed.is_error, resumed.content[0].text
        assert resumed.structured_content["output"]["step"] == saved + 2

    with_server(root, ["--allow-writes"], checks)


@pytest.mark.slow
def test_http_transport_serves_on_loopback(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "dsfuse", "mcp", "--transport", "http", "--port", str(port),
                             "--root", str(tmp_path), "-q"], env=env, stderr=subprocess.PIPE)

    async def listed():
        for _ in range(100):
            try:
                async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                    return {t.name for t in (await client.list_tools()).tools}
            except Exception:
                assert proc.poll() is None, proc.stderr.read().decode()
                await anyio.sleep(0.2)
        raise AssertionError("the server did not answer")

    try:
        assert anyio.run(listed) == set(build_tools())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
