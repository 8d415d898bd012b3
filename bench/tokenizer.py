"""Image tokenizer benchmark: dsfuse's vq and fsq against vector-quantize-pytorch's VectorQuantize and FSQ.

Two tables from one run, every quantizer behind the same VQ-VAE encoder/decoder:
1. speed: tokenisation images/s (encoder + quantizer) and quantizer-only tokens/s, and the peak memory
   of tokenising, at 256 px, F=16, K=8192 (fsq: levels [8, 8, 8, 4, 4]); each contender in a fresh process;
2. quality: the same data, steps, seed and encoder/decoder trained with each quantizer; held-out PSNR
   and codebook usage at K=512. Data: crops of the bundled photos plus generated shape images, written
   nowhere (made in memory); the held-out images are other crops and other shapes.

    python bench/tokenizer.py                  # small defaults: a few minutes on 2 CPU cores
    python bench/tokenizer.py --steps 1000 --device cuda
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from einops import rearrange
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsfuse.data import samples_dir  # noqa: E402
from dsfuse.data.images import find_images, read_rgb, to_tensor  # noqa: E402
from dsfuse.data.synth import shapes_image  # noqa: E402
from dsfuse.models.vqvae import VQVAE, VQVAEConfig, evaluate_tokenizer, training_loss  # noqa: E402
from dsfuse.nn.quantize import Quantized, code_statistics, fsq_levels  # noqa: E402

console = Console(stderr=False, width=160)
CONTENDERS = ("dsfuse vq", "dsfuse fsq", "vqp VectorQuantize", "vqp FSQ")


# --------------------------------------------------------------------------- the reference, adapted

class ReferenceVQ(nn.Module):
    """vector-quantize-pytorch's VectorQuantize with the options dsfuse's vq uses (EMA 0.99, k-means
    init, dead-code replacement, commitment 0.25), speaking dsfuse's quantizer interface."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.codebook_size = codebook_size
        self.vq = VectorQuantize(dim, codebook_size, decay=0.99, kmeans_init=True, threshold_ema_dead_code=2,
                                 commitment_weight=0.25)

    def forward(self, x: torch.Tensor) -> Quantized:
        z_q, indices, loss = self.vq(x.flatten(1, -2))
        counts = torch.bincount(indices.flatten(), minlength=self.codebook_size)
        return Quantized(z_q.reshape(x.shape), indices.reshape(x.shape[:-1]), {"loss": loss.sum(), **code_statistics(counts)})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vq(x.flatten(1, -2))[1].reshape(x.shape[:-1])

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.vq.get_output_from_indices(indices)


class ReferenceFSQ(nn.Module):
    """vector-quantize-pytorch's FSQ with dsfuse's levels for the same codebook size."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        from vector_quantize_pytorch import FSQ

        self.fsq = FSQ(fsq_levels(codebook_size), dim=dim)
        self.codebook_size = self.fsq.codebook_size

    def forward(self, x: torch.Tensor) -> Quantized:
        z_q, indices = self.fsq(x.flatten(1, -2))  # [b, n, d]: a 4-d input would be read channel-first
        counts = torch.bincount(indices.flatten(), minlength=self.codebook_size)
        return Quantized(z_q.reshape(x.shape), indices.reshape(x.shape[:-1]),
                         {"loss": z_q.new_zeros(()), **code_statistics(counts)})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.fsq(x.flatten(1, -2))[1].reshape(x.shape[:-1])

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.fsq.indices_to_codes(indices)


def reference_available() -> bool:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def build(contender: str, cfg: VQVAEConfig, seed: int) -> VQVAE:
    """The same encoder/decoder weights (seeded) with the contender's quantizer."""
    torch.manual_seed(seed)
    model = VQVAE(VQVAEConfig(**{**cfg.__dict__, "quantizer": "fsq" if "fsq" in contender.lower() else "vq"}))
    if contender == "vqp VectorQuantize":
        model.quantizer = ReferenceVQ(cfg.latent_channels, cfg.codebook_size)
    elif contender == "vqp FSQ":
        model.quantizer = ReferenceFSQ(cfg.latent_channels, cfg.codebook_size)
    return model


# --------------------------------------------------------------------------- speed and memory

def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def workload(contender: str, args: argparse.Namespace):
    """The contender's (tokenise every image, quantize every latent grid) closures, warmed up."""
    device = torch.device(args.device)
    cfg = VQVAEConfig(image_size=256, downsample=16, codebook_size=8192, latent_channels=16,
                      base_channels=args.base_channels)
    model = build(contender, cfg, args.seed).to(device).eval()
    images = torch.rand(args.images, 3, 256, 256, device=device) * 2 - 1
    latents = torch.randn(args.latent_images, cfg.latent_channels, 16, 16, device=device)

    @torch.no_grad()
    def tokenize_all() -> None:
        for chunk in images.split(args.batch_size):
            model.tokenize(chunk)

    @torch.no_grad()
    def quantize_all() -> None:
        for chunk in latents.split(64):
            model.quantizer.encode(rearrange(chunk, "b c h w -> b h w c"))

    tokenize_all()  # warm-up (and the reference's k-means init, which runs on its first batch)
    quantize_all()
    return tokenize_all, quantize_all


def _memory_worker(contender: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(args.threads)
    tokenize_all, quantize_all = workload(contender, args)
    queue.put({"peak_mib": peak_memory(tokenize_all, args.device),
               "quantize_peak_mib": peak_memory(quantize_all, args.device)})


def peak_memory(fn, device: str) -> float:
    """Peak memory of one call in MiB, above what was held before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - held) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS counter
    held = _rss_kib("VmRSS")
    fn()
    return max(_rss_kib("VmHWM") - held, 0) / 1024


def best_seconds(fn, device: str) -> float:
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def speed_table(args: argparse.Namespace, contenders: list[str]) -> list[dict]:
    """Memory: each contender alone in a fresh process. Speed: all in this process, timed in
    alternation (round-robin, best of --repeats), so a load change on a shared machine hits all alike."""
    context = mp.get_context("spawn")
    rows = []
    for contender in contenders:
        queue = context.Queue()
        proc = context.Process(target=_memory_worker, args=(contender, args, queue))
        proc.start()
        rows.append({"contender": contender, **queue.get()})
        proc.join()
    torch.set_num_threads(args.threads)
    loads = [workload(c, args) for c in contenders]
    best = [[float("inf"), float("inf")] for _ in contenders]
    for _ in range(args.repeats):
        for i, (tokenize_all, quantize_all) in enumerate(loads):
            best[i][0] = min(best[i][0], best_seconds(tokenize_all, args.device))
            best[i][1] = min(best[i][1], best_seconds(quantize_all, args.device))
    for row, (tokenize_s, quantize_s) in zip(rows, best):
        row.update(images_per_s=args.images / tokenize_s, tokens_per_s=args.latent_images * 256 / quantize_s)
    return rows


# --------------------------------------------------------------------------- quality

def photo_crops(count: int, size: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """Random square crops (a fifth to all of the short side) of the bundled photos, at `size` px."""
    photos = [read_rgb(p) for p in find_images(samples_dir() / "images" / "photos")]
    crops = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        side = int(min(photo.size) * rng.uniform(0.2, 1.0))
        left, top = rng.integers(0, photo.size[0] - side + 1), rng.integers(0, photo.size[1] - side + 1)
        crops.append(to_tensor(photo.crop((left, top, left + side, top + side)), size))
    return crops


def image_set(count: int, size: int, seed: int) -> torch.Tensor:
    """Half photo crops, half generated shapes, [count, 3, size, size] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    shapes = [torch.from_numpy(shapes_image(size, rng)).permute(2, 0, 1).float() / 127.5 - 1
              for _ in range(count - count // 2)]
    return torch.stack(photo_crops(count // 2, size, rng) + shapes)


def quality_table(args: argparse.Namespace, contenders: list[str]) -> list[dict]:
    from torch.utils.data import TensorDataset

    from dsfuse.checkpoint import CheckpointMeta
    from dsfuse.engine import TrainConfig, fit

    torch.set_num_threads(args.threads)
    train, held_out = image_set(args.train_images, args.size, seed=1), image_set(args.eval_images, args.size, seed=2)
    cfg = VQVAEConfig(image_size=args.size, downsample=args.quality_downsample, codebook_size=args.codebook_size,
                      latent_channels=16, base_channels=args.quality_channels, channel_mult=(1, 2, 2))
    rows = []
    for contender in contenders:
        model = build(contender, cfg, args.seed)
        train_cfg = TrainConfig(steps=args.steps, batch_size=args.train_batch, lr=args.lr, seed=args.seed, quiet=True,
                                log_every=args.steps)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            fit(model, TensorDataset(train), lambda m, batch: training_loss(m, batch[0]), train_cfg, run_dir,
                meta=CheckpointMeta.of("vqvae", cfg), device=torch.device(args.device))
        model.eval()
        metrics, _ = evaluate_tokenizer(model, held_out.to(args.device))
        rows.append({"contender": contender, **metrics, "codes": model.codebook_size,
                     "train_s": time.perf_counter() - start})
        console.print(f"  trained {contender}: held-out PSNR {metrics['psnr']:.2f} dB, usage {metrics['usage']:.1%}",
                      style="dim")
    return rows


# --------------------------------------------------------------------------- the report

def ratio(value: float, reference: float | None, smallest: float = 1e-12) -> str:
    return f"{value / reference:.2f}x" if reference and reference >= smallest else "-"


def print_speed(rows: list[dict], args: argparse.Namespace) -> None:
    by_name = {r["contender"]: r for r in rows}
    table = Table(title=f"tokenising at 256 px, F=16, K=8192 ({args.device}, {args.threads} thread(s), "
                        f"{args.images} images, best of {args.repeats})", title_justify="left")
    for col in ("quantizer", "images/s", "vs ref", "peak MiB", "vs ref", "quantizer only: tokens/s", "vs ref",
                "peak MiB", "vs ref"):
        table.add_column(col, justify="left" if col == "quantizer" else "right")
    for row in rows:
        ref = by_name.get("vqp FSQ" if "fsq" in row["contender"].lower() else "vqp VectorQuantize")
        table.add_row(row["contender"], f"{row['images_per_s']:.2f}", ratio(row["images_per_s"], ref and ref["images_per_s"]),
                      f"{row['peak_mib']:.0f}", ratio(row["peak_mib"], ref and ref["peak_mib"], smallest=1),
                      f"{row['tokens_per_s']:,.0f}", ratio(row["tokens_per_s"], ref and ref["tokens_per_s"]),
                      f"{row['quantize_peak_mib']:.1f}", ratio(row["quantize_peak_mib"], ref and ref["quantize_peak_mib"], smallest=1))
    console.print(table)


def print_quality(rows: list[dict], args: argparse.Namespace) -> None:
    by_name = {r["contender"]: r for r in rows}
    table = Table(title=f"held-out quality: {args.size} px, F={args.quality_downsample}, K={args.codebook_size}, "
                        f"{args.steps} steps x {args.train_batch} of {args.train_images} training images, "
                        f"{args.eval_images} held-out", title_justify="left")
    for col in ("quantizer", "codes", "PSNR dB", "vs ref", "SSIM", "usage", "perplexity", "train s"):
        table.add_column(col, justify="left" if col == "quantizer" else "right")
    for row in rows:
        ref = by_name.get("vqp FSQ" if "fsq" in row["contender"].lower() else "vqp VectorQuantize")
        diff = f"{row['psnr'] - ref['psnr']:+.2f} dB" if ref else "-"
        table.add_row(row["contender"], str(row["codes"]), f"{row['psnr']:.2f}", diff, f"{row['ssim']:.3f}",
                      f"{row['usage']:.1%}", f"{row['perplexity']:.0f}", f"{row['train_s']:.0f}")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=8, help="images tokenised per timing")
    parser.add_argument("--latent-images", type=int, default=256, help="latent grids per quantizer-only timing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--base-channels", type=int, default=32, help="encoder width for the speed table")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="image size for the quality table")
    parser.add_argument("--quality-downsample", type=int, default=4)
    parser.add_argument("--quality-channels", type=int, default=16)
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args(argv)

    contenders = list(CONTENDERS)
    if not reference_available():
        console.print("note: vector-quantize-pytorch is not installed (pip install -e '.[bench]'); "
                      "dsfuse is measured alone, without ratios")
        contenders = contenders[:2]
    if not args.skip_speed:
        print_speed(speed_table(args, contenders), args)
    if not args.skip_quality:
        print_quality(quality_table(args, contenders), args)


if __name__ == "__main__":
    main()
