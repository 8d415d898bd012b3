"""Benchmark: two of the engine's options on real trainers, each against its reference in the same run.

- `--workers 2` against `--workers 0` on classify-video training (samples/s: decoding in worker
  processes against decoding in the training process), on a generated moving-shapes set.
- `--precision bf16` against fp32 on train-vqvae: samples/s, and whether the loss curve stays within
  noise (the fp32 curves of two seeds measure the noise).
- `--compile` against eager on train-vqvae: samples/s once compiled, and the seconds the run took in all
  (compiling included).

    python bench/train_options.py [--steps 40] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's dsfuse, not an installed one

from dsfuse.engine import read_metrics
from dsfuse.report import console, print_table
from dsfuse.tasks import tokenizer, video

RUN = {"resume": False, "force": True, "explicit": (), "quiet": True}


def samples_per_s(run: Path) -> float:
    rates = [r["samples_per_s"] for r in read_metrics(run) if "samples_per_s" in r]
    return statistics.median(rates[1:] or rates)  # the first window includes starting the workers


def workers_rows(work: Path, steps: int, device: str) -> list[list]:
    data = work / "videos"
    video.make_dataset(data, per_class=8, frames=16, size=64, fps=8.0, audio=False, seed=0, force=False, quiet=True)
    rows = []
    for workers in (0, 2):
        options = video.VideoTrainOptions(data=data, backbone="small3d", pretrained=False, frames=None, fps=None,
                                          held_out=0.25, fusion="none", steps=steps, batch_size=8, lr=2e-3,
                                          workers=workers)
        result, _ = video.train(options, work / f"video-w{workers}", device=device, **RUN)
        rows.append([f"classify-video train --workers {workers}", f"{samples_per_s(result.run_dir):.1f} samples/s",
                     f"loss {result.metrics['loss']:.4f}"])
    rows[0][0] += " (reference)"
    return rows


def train_vqvae(out: Path, steps: int, device: str, **options) -> tuple[float, float, list[float]]:
    """A small train-vqvae run: its samples/s, seconds in all and loss curve."""
    settings = {"image_size": 32, "downsample": 8, "codebook_size": 64, "base_channels": 16, "latent_channels": 8,
                "batch_size": 8, "steps": steps, "eval_every": 0, **options}
    result, _ = tokenizer.train(tokenizer.TokenizerOptions(data=ROOT / "samples" / "images", **settings), out,
                                device=device, **RUN)
    curve = [r["loss"] for r in read_metrics(result.run_dir) if "loss" in r]
    return samples_per_s(result.run_dir), result.seconds, curve


def precision_rows(work: Path, steps: int, device: str) -> list[list]:
    losses, rows = {}, []
    for name, precision, seed in (("fp32", "fp32", 0), ("fp32, seed 1", "fp32", 1), ("bf16", "bf16", 0)):
        rate, _, curve = train_vqvae(work / f"vq-{precision}-{seed}", steps, device, precision=precision, seed=seed)
        losses[name] = curve
        rows.append([f"train-vqvae --precision {precision} --seed {seed}", f"{rate:.1f} samples/s",
                     f"final loss {curve[-1]:.4f}"])
    noise = max(abs(a - b) for a, b in zip(losses["fp32"], losses["fp32, seed 1"]))
    gap = max(abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"]))
    rows.append(["loss curves: largest gap", f"bf16 vs fp32 {gap:.4f}",
                 f"seed 1 vs seed 0 (noise) {noise:.4f}: {'within' if gap <= noise else 'outside'} noise"])
    rows[0][0] += " (reference)"
    return rows


def compile_rows(work: Path, steps: int, device: str) -> list[list]:
    rows = []
    for compiled in (False, True):
        rate, seconds, curve = train_vqvae(work / f"vq-compile-{compiled}", steps, device, precision="fp32",
                                           compile=compiled)
        rows.append([f"train-vqvae{' --compile' if compiled else ' (reference)'}", f"{rate:.1f} samples/s",
                     f"{seconds:.1f} s in all, final loss {curve[-1]:.4f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [row for section in (workers_rows, precision_rows, compile_rows)
                for row in section(Path(work), args.steps, args.device)]
    print_table(f"engine options on {args.device}, {args.steps} steps", ["run", "speed", "result"], rows)
    console.print("samples/s: median of the logged windows after the first (which starts the workers)")


if __name__ == "__main__":
    main()
