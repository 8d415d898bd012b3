"""Diffusion benchmark on scikit-learn's digits upscaled to 32 px; one model, every sampler, one run.

1. speed: seconds per image of DDPM-1000, DDIM-50, DDIM-20 and DPM++-20 (same model, same batch size);
2. the UNet's forward time against diffusers' UNet2DModel of the same widths (the reference, if installed);
3. quality without downloaded weights: a small CNN classifier trained here on the training digits judges
   the samples: its mean confidence, class coverage, a Frechet distance in its feature space against
   held-out real digits, and a nearest-neighbour memorisation check against the training set.
   Held-out real digits are scored the same way as the reference row.

    python bench/diffusion.py                          # trains a small model first (a few minutes on CPU)
    python bench/diffusion.py --checkpoint RUN --n 200 # a run of `dsfuse train-ddpm` on the digits folder

`--write-digits DIR` writes the training split as class folders, the data `train-ddpm` expects.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsfuse.data.digits import load_digits, split_digits, write_digit_folders  # noqa: E402
from dsfuse.device import select_device  # noqa: E402
from dsfuse.diffusion.pipeline import DiffusionModel, load_diffusion  # noqa: E402
from dsfuse.tasks.diffusion import DiffusionOptions, train  # noqa: E402

console = Console(stderr=True)
# (sampler, steps, eta): DDIM-50 both deterministic and half-stochastic, whose fresh noise washes out
# the grain a briefly trained model leaves on deterministic trajectories
SAMPLER_RUNS = [("ddpm", 1000, 0.0), ("ddim", 50, 0.0), ("ddim", 50, 0.5), ("ddim", 20, 0.0), ("dpm++", 20, 0.0)]


class DigitClassifier(nn.Module):
    """A small CNN on 8x8 averages (the digits' native size: cheap to train well); its 64-d pooled
    features are the space the Frechet distance is measured in."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.AvgPool2d(4), nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 30, seed: int = 0) -> DigitClassifier:
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(images)).split(64):
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def judge(classifier: DigitClassifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class probabilities [N, 10], features [N, 64])."""
    features = torch.cat([classifier.features(chunk) for chunk in images.split(256)])
    return classifier.head(features).softmax(-1), features


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), as in FID."""
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def nearest_distance(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per image, the pixel L2 distance to its nearest neighbour in `reference`."""
    return torch.cdist(images.flatten(1), reference.flatten(1)).min(1).values


def quality(classifier, images, labels, real, train) -> dict[str, float]:
    """Classifier confidence, accuracy and coverage; Frechet distance and NN ratio against `real` images."""
    probs, features = judge(classifier, images)
    _, real_features = judge(classifier, real)
    row = {"confidence": float(probs.max(1).values.mean()),
           "classes": int(probs.argmax(1).unique().numel()),
           "frechet": frechet_distance(features, real_features),
           "nn_ratio": float(nearest_distance(images, train).median() / nearest_distance(real, train).median())}
    if labels is not None:
        row["accuracy"] = float((probs.argmax(1) == labels).float().mean())
    return row


def diffusers_unet(cfg):
    """diffusers' UNet2DModel with our UNet's widths, depth, attention placement and class embedding."""
    from diffusers import UNet2DModel

    widths = [cfg.base_channels * m for m in cfg.channel_mults]
    sizes = [cfg.image_size // 2**i for i in range(len(widths))]
    down = [("AttnDownBlock2D" if s in cfg.attention_resolutions else "DownBlock2D") for s in sizes]
    up = [("AttnUpBlock2D" if s in cfg.attention_resolutions else "UpBlock2D") for s in reversed(sizes)]
    return UNet2DModel(sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                       block_out_channels=widths, layers_per_block=cfg.num_res_blocks, down_block_types=down,
                       up_block_types=up, attention_head_dim=cfg.head_channels, norm_num_groups=32,
                       num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None, dropout=cfg.dropout)


@torch.no_grad()
def forward_seconds(run_forward, repeats: int) -> float:
    run_forward()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_forward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_small_model(run: Path, data: Path, steps: int, device: str) -> None:
    console.print(f"training a small model for {steps} steps -> {run}")
    options = DiffusionOptions(data=data, class_conditional=True, steps=steps, batch_size=32, lr=1e-3,
                               base_channels=32, channel_mults=(1, 2, 2), res_blocks=1, attention=(8,), sample_every=0)
    train(options, run, force=True, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a train-ddpm run on the digits (default: train one)")
    parser.add_argument("--train-steps", type=int, default=300, help="steps of the model trained without --checkpoint")
    parser.add_argument("--n", type=int, default=50, help="samples per sampler for the quality table")
    parser.add_argument("--ddpm-n", type=int, default=10, help="samples for DDPM-1000 (slow on CPU)")
    parser.add_argument("--batch-size", type=int, help="images per sampling batch, every sampler (default: --ddpm-n)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--write-digits", type=Path, help="only write the training digits as class folders")
    args = parser.parse_args()
    args.batch_size = args.batch_size or args.ddpm_n  # one batch size for all: per-image times compare

    images, labels = load_digits(32)
    train_x, train_y, held_x, held_y = split_digits(images, labels)
    if args.write_digits:
        write_digit_folders(args.write_digits, train_x, train_y)
        console.print(f"wrote {len(train_x)} digits to {args.write_digits}")
        return
    device = select_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(tmp) / "run"
            train_small_model(checkpoint, write_digit_folders(Path(tmp) / "digits", train_x, train_y),
                              args.train_steps, str(device))
        model = load_diffusion(checkpoint, device)
        report(model, args, device, train_x, train_y, held_x, held_y, checkpoint)


def report(model: DiffusionModel, args, device, train_x, train_y, held_x, held_y, checkpoint) -> None:
    cfg = model.net.config
    console.print(f"model: {checkpoint} ({sum(p.numel() for p in model.net.parameters()) / 1e6:.2f}M parameters, "
                  f"{cfg.image_size}px, classes {model.classes or 'none'}) on {device}")
    classifier = train_classifier(train_x, train_y)
    held_probs, _ = judge(classifier, held_x)
    console.print(f"classifier: held-out accuracy {float((held_probs.argmax(1) == held_y).float().mean()):.3f}")

    # Held-out digits split in two: one half is the real set every row is compared with, the other half is
    # scored like a sampler's output, the reference row (what a perfect generator would get at that n).
    real, real_as_samples, real_as_labels = held_x[1::2], held_x[::2], held_y[::2]
    rows = [("held-out real digits", "-", len(real_as_samples),
             quality(classifier, real_as_samples, real_as_labels, real, train_x))]
    speed = {}
    for sampler, steps, eta in SAMPLER_RUNS:
        n = args.ddpm_n if sampler == "ddpm" else args.n
        labels = torch.arange(n) % cfg.num_classes if cfg.num_classes else None
        generator = torch.Generator(device).manual_seed(0)
        start = time.perf_counter()
        samples = model.generate(n, sampler=sampler, steps=steps, eta=eta, labels=labels, guidance=args.guidance,
                                 generator=generator, batch_size=args.batch_size, progress=True).cpu()
        name = f"{sampler}-{steps}" + (f" (eta {eta:g})" if sampler == "ddim" else "")
        speed[name] = (time.perf_counter() - start) / n
        console.print(f"{name}: {speed[name]:.3f} s/image")
        rows.append((name, f"{speed[name]:.3f}", n, quality(classifier, samples, labels, real, train_x)))

    ddpm = speed["ddpm-1000"]
    table = Table(title="diffusion samplers on digits 32 px (same model; reference: held-out real digits)")
    for col in ("sampler", "s/image", "speed-up vs DDPM-1000", "n", "confidence", "accuracy", "classes",
                "Frechet (classifier)", "NN ratio"):
        table.add_column(col)
    for name, sec, n, q in rows:
        speedup = "-" if sec == "-" else f"{ddpm / float(sec):.1f}x"
        table.add_row(name, sec, speedup, str(n), f"{q['confidence']:.3f}", f"{q.get('accuracy', float('nan')):.3f}",
                      str(q["classes"]), f"{q['frechet']:.2f}", f"{q['nn_ratio']:.2f}")
    Console(width=200).print(table)
    console.print("NN ratio: median distance of each image to its nearest training digit, over the same for "
                  "held-out real digits; well below 1 would mean copies of the training set. Frechet distances "
                  "from few samples are biased upwards: compare samplers at the same n.")
    unet_table(model, args, device)


def unet_table(model: DiffusionModel, args, device) -> None:
    cfg = model.net.config
    x = torch.randn(args.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.full((args.batch_size,), 500, device=device)
    y = torch.zeros(args.batch_size, dtype=torch.long, device=device) if cfg.num_classes else None
    ours = forward_seconds(lambda: model.net(x, t, y), repeats=5)
    table = Table(title=f"UNet forward, batch {args.batch_size} at {cfg.image_size}px, median of 5")
    for col in ("model", "parameters", "seconds", "vs diffusers"):
        table.add_column(col)
    try:
        reference = diffusers_unet(cfg).to(device).eval()
    except ImportError:
        table.add_row("dsfuse UNet", f"{sum(p.numel() for p in model.net.parameters()) / 1e6:.2f}M", f"{ours:.4f}", "-")
        Console(width=200).print(table)
        console.print("diffusers is not installed: pip install diffusers (the bench extra) for the reference")
        return
    theirs = forward_seconds(lambda: reference(x, t, class_labels=y), repeats=5)
    for name, net, sec in (("diffusers UNet2DModel", reference, theirs), ("dsfuse UNet", model.net, ours)):
        table.add_row(name, f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M", f"{sec:.4f}",
                      f"{theirs / sec:.2f}x faster" if net is model.net else "1.00x")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
