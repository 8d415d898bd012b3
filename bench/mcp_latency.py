"""Per-call latency of `tokenize-image` over `dsfuse mcp` against the same command in a fresh process.

The server keeps torch and dsfuse imported between calls; a shell pays for both on every call. The
reference is measured in the same run: `python -m dsfuse tokenize-image IMAGES -c CKPT --json -q`,
timed from spawn to exit. Over MCP, each call is timed from request to result on a running server
(its first call, which imports torch, is reported apart). Target: the second and later calls at
least 3x faster than a fresh process.

    python bench/mcp_latency.py --calls 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_root(folder: Path, images: int) -> None:
    """A few sample images and a tiny VQ-VAE checkpoint, as a user's folder would hold."""
    import torch

    from dsfuse.checkpoint import CheckpointMeta, save_checkpoint
    from dsfuse.models.vqvae import VQVAE, VQVAEConfig

    (folder / "images").mkdir()
    for path in sorted((REPO / "samples" / "images" / "generated").glob("*.png"))[:images]:
        shutil.copy(path, folder / "images" / path.name)
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(image_size=32, downsample=8, codebook_size=64, latent_channels=4, base_channels=8,
                              channel_mult=(1, 2)))
    save_checkpoint(folder / "vq.safetensors", model.eval(), CheckpointMeta.of("vqvae", model.config))


def fresh_process(root: Path, env: dict[str, str], calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dsfuse", "tokenize-image", "images", "-c", "vq.safetensors",
                               "--device", "cpu", "--json", "-q"], cwd=root, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if proc.returncode != 0:
            raise SystemExit(f"tokenize-image failed: {proc.stderr.strip()}")
    return times


async def over_mcp(root: Path, env: dict[str, str], calls: int) -> tuple[float, list[float]]:
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(command=sys.executable, args=["-m", "dsfuse", "mcp", "--root", str(root), "-q",
                                                                  "--device", "cpu"], env=env, cwd=str(root))
    arguments = {"images": ["images"], "checkpoint": "vq.safetensors"}
    times = []
    async with Client(params, read_timeout_seconds=300) as client:
        for _ in range(calls + 1):
            started = time.perf_counter()
            result = await client.call_tool("tokenize-image", arguments)
            times.append(time.perf_counter() - started)
            if result.is_error:
                raise SystemExit(f"tokenize-image over MCP failed: {result.content[0].text}")
    return times[0], times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5, help="timed calls of each kind")
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()

    import anyio

    from dsfuse.report import print_table

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_root(root, args.images)
        shell = fresh_process(root, env, args.calls)
        first, warm = anyio.run(over_mcp, root, env, args.calls)
    shell_s, warm_s = statistics.median(shell), statistics.median(warm)
    speedup = shell_s / warm_s
    print_table(f"tokenize-image on {args.images} images, median of {args.calls} calls (seconds)",
                ["how", "per call", "vs fresh process"],
                [["fresh process (reference)", f"{shell_s:.3f}", "1.0x"],
                 ["MCP, first call", f"{first:.3f}", f"{shell_s / first:.1f}x"],
                 ["MCP, later calls", f"{warm_s:.3f}", f"{speedup:.1f}x"]])
    print(f"target: later calls >= 3x faster than a fresh process: {'met' if speedup >= 3 else 'NOT met'} "
          f"({speedup:.1f}x)")


if __name__ == "__main__":
    main()
