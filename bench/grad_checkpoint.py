"""Benchmark: what `--grad-checkpoint` buys and costs. Peak memory and training-step time with and
without activation checkpointing, for the audio MLA transformer (audio-emotion's model) and the diffusion
UNet (train-ddpm's), each measured against itself without checkpointing in the same run.

Peak memory is `torch.cuda.max_memory_allocated` on CUDA; on CPU (no allocator statistics) it is the
bytes the autograd graph keeps for the backward pass (the activations checkpointing drops), measured
with saved-tensor hooks.

    python bench/grad_checkpoint.py                  # CPU, modest sizes
    python bench/grad_checkpoint.py --device cuda --scale 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's dsfuse, not an installed one

from dsfuse.device import select_device
from dsfuse.models.audio import AudioEmotionClassifier, AudioEmotionConfig
from dsfuse.models.unet import UNet, UNetConfig
from dsfuse.nn.checkpointing import saved_activation_bytes, set_grad_checkpointing

Workload = tuple[torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor]]


def audio_workload(scale: int, device: torch.device) -> Workload:
    """audio-emotion's MLA transformer on 4 s crops (400 log-mel frames)."""
    model = AudioEmotionClassifier(AudioEmotionConfig(n_mels=64, dim=96 * scale, depth=4, n_heads=4,
                                                      ffn_hidden=384 * scale)).to(device)
    features = torch.randn(16, 400, 64, device=device)
    labels = torch.randint(0, 4, (16,), device=device)
    return model, lambda m: torch.nn.functional.cross_entropy(m(features), labels)


def unet_workload(scale: int, device: torch.device) -> Workload:
    """train-ddpm's UNet at 32 px (its default shape), noise prediction."""
    model = UNet(UNetConfig(image_size=32, base_channels=32 * scale, channel_mults=(1, 2, 2), num_res_blocks=2,
                            attention_resolutions=(16,))).to(device)
    x = torch.randn(16, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (16,), device=device)
    return model, lambda m: (m(x, t) - x).square().mean()


def measure(model: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor], checkpointing: bool,
            device: torch.device, steps: int) -> dict[str, float]:
    """Median step time (forward, backward, AdamW) and peak memory in MiB."""
    set_grad_checkpointing(model, checkpointing)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        loss_of(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = saved_activation_bytes(lambda: loss_of(model))
    return {"step_ms": 1000 * statistics.median(times), "peak_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scale", type=int, default=1, help="Width multiplier of both models.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per measurement.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    device = select_device(args.device)
    torch.manual_seed(0)
    rows = []
    for name, build in (("audio MLA transformer", audio_workload), ("diffusion UNet", unet_workload)):
        model, loss_of = build(args.scale, device)
        plain = measure(model, loss_of, False, device, args.steps)
        checkpointed = measure(model, loss_of, True, device, args.steps)
        rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()),
                     "plain": plain, "checkpointed": checkpointed})
        del model
    memory = "peak allocated MiB" if device.type == "cuda" else "activations kept MiB"
    table = Table(title=f"--grad-checkpoint on {device} (scale {args.scale}, batch 16)")
    for column in ("model", "params", f"{memory} (off)", f"{memory} (on)", "memory ratio", "step ms (off)",
                   "step ms (on)", "time ratio"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        off, on = r["plain"], r["checkpointed"]
        table.add_row(r["model"], f"{r['params']:,}", f"{off['peak_mib']:.1f}", f"{on['peak_mib']:.1f}",
                      f"{on['peak_mib'] / off['peak_mib']:.2f}x", f"{off['step_ms']:.0f}", f"{on['step_ms']:.0f}",
                      f"{on['step_ms'] / off['step_ms']:.2f}x")
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "scale": args.scale, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
