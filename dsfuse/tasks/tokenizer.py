"""The image tokenizer task: train a VQ-VAE (`train-vqvae`), turn image files into token grids and
back, and reconstruct them with PSNR/SSIM (`tokenize-image`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsfuse import runs
from dsfuse.checkpoint import CheckpointMeta, build_model, load_checkpoint
from dsfuse.choices import Quantizer, TokenizerPreset
from dsfuse.data.images import ImageFolder, load_image, save_grid, save_png
from dsfuse.data.tokens import TokenGrid, read_tokens
from dsfuse.device import seed_everything, select_device
from dsfuse.engine import EvalFn, TrainConfig, TrainResult, fit, read_metrics
from dsfuse.errors import ConfigError, InputError, UsageError
from dsfuse.io import check_writable
from dsfuse.metrics import psnr, ssim
from dsfuse.models.vqvae import VQVAE, VQVAEConfig, evaluate_tokenizer, training_loss
from dsfuse.plots import plot_curves
from dsfuse.report import warn

TASK = "tokenizer"
KIND = "vqvae"
EVAL_IMAGES = 16  # evaluated at every --eval-every; the first 8 are drawn in the grid
GRID_IMAGES = 8

# The model options a run starts from, then what a preset sets; options given on the command line win.
DEFAULTS = {"image_size": 256, "downsample": 16, "codebook_size": 8192, "quantizer": "vq",
            "latent_channels": 16, "base_channels": 64}
PRESETS: dict[str, dict[str, Any]] = {
    "chameleon": {"image_size": 512, "downsample": 16, "codebook_size": 8192, "base_channels": 128}}


@dataclass(kw_only=True)
class TokenizerOptions(runs.TrainOptions):
    """What `train-vqvae` takes; a model option left None comes from the preset, else from DEFAULTS."""

    data: Path
    val: Path | None = None
    quantizer: Quantizer | None = None
    codebook_size: int | None = None
    downsample: int | None = None
    image_size: int | None = None
    latent_channels: int | None = None
    base_channels: int | None = None
    preset: TokenizerPreset | None = None
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    eval_every: int = 500

    def resolved(self) -> TokenizerOptions:
        """Every model option set: defaults, then the preset, then the options given. The run records
        these, so a resumed run compares like with like."""
        chosen = {**DEFAULTS, **PRESETS.get(self.preset or "", {})}
        return dataclasses.replace(self, **{name: value for name, value in chosen.items()
                                            if getattr(self, name) is None})


def model_config(options: TokenizerOptions) -> VQVAEConfig:
    """The VQVAEConfig of resolved options; a value it refuses is a UsageError naming its option."""
    try:
        return VQVAEConfig(**{name: getattr(options, name) for name in DEFAULTS})
    except ConfigError as e:
        raise e.as_usage_error() from None


def train(options: TokenizerOptions, out: Path, *, resume: bool = False, force: bool = False,
          explicit: Collection[str] = (), device: str = "auto", quiet: bool = False) -> tuple[TrainResult, dict]:
    """Train (or, with `resume`, continue) a tokenizer run in `out`; returns the result and its summary."""
    torch_device = select_device(device)
    model = None
    if resume:
        options, meta = runs.resume_options(options, out, KIND, explicit)
        model = build_model(meta)
    else:
        options = options.resolved()
    cfg = model.config if model is not None else model_config(options)
    train_config = TrainConfig.of(options, quiet=quiet)
    dataset = ImageFolder(options.data, cfg.image_size)
    for path in dataset.skipped:
        warn(f"skipped unreadable image ({path})")  # shown even with -q: data went unused
    held_out = ImageFolder(options.val, cfg.image_size) if options.val is not None else dataset
    eval_images = torch.stack([held_out[i][0] for i in range(min(EVAL_IMAGES, len(held_out)))])
    run_dir = runs.prepare_run_dir(out, resume, force)  # only now: bad input leaves no half-made run behind
    if model is None:
        seed_everything(options.seed)
        model = VQVAE(cfg)

    result = fit(model, dataset, image_loss, train_config, run_dir, device=torch_device, resume=resume,
                 meta=CheckpointMeta.of(KIND, cfg, options=options.record()),
                 evaluate=reconstruction_evaluator(eval_images, run_dir / "reconstructions"))
    plot_curves(read_metrics(run_dir), ["loss", "psnr", "usage", "perplexity"], run_dir / "curves.png",
                title=f"train-vqvae ({cfg.quantizer}, K={model.codebook_size}, F={cfg.downsample})")
    summary = {"quantizer": cfg.quantizer, "codebook_size": model.codebook_size, "grid": [cfg.grid, cfg.grid],
               "images": len(dataset), "skipped": len(dataset.skipped), "loss": result.metrics.get("loss"),
               **{k.removeprefix("eval_"): v for k, v in result.metrics.items() if k.startswith("eval_")}}
    return result, summary


def image_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """An ImageFolder batch is (images, labels); a tokenizer learns from the images alone."""
    return training_loss(model, batch[0])


def reconstruction_evaluator(images: torch.Tensor, folder: Path) -> EvalFn:
    """PSNR, SSIM and codebook use on a fixed set of images; a grid PNG per evaluation in `folder`
    (originals above, reconstructions below)."""

    def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
        metrics, reconstruction = evaluate_tokenizer(model, images)
        shown = min(GRID_IMAGES, len(images))
        save_grid(torch.cat([images[:shown], reconstruction[:shown]]), folder / f"step_{step:06d}.png", nrow=shown)
        return metrics

    return evaluate


# --------------------------------------------------------------------------- tokenize, decode, reconstruct

class OutputNames:
    """PNG paths in an output folder named after their sources, unique even when two sources share a stem."""

    def __init__(self, folder: Path, force: bool):
        if folder.exists() and not folder.is_dir():
            raise UsageError("--out must be a folder here, and this is a file", folder)
        self.folder, self.force, self.taken = folder, force, set()

    def __call__(self, source: str) -> Path:
        stem, n = Path(source).stem or "image", 1
        name = f"{stem}.png"
        while name in self.taken:
            n += 1
            name = f"{stem}_{n}.png"
        self.taken.add(name)
        return check_writable(self.folder / name, self.force)


@dataclass
class ImageTokenizer:
    """A trained tokenizer, for image files: tokens, tokens back to PNGs, and reconstructions."""

    model: VQVAE

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "auto") -> ImageTokenizer:
        model, _ = load_checkpoint(checkpoint, kind=KIND, device=select_device(device))
        return cls(model)

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint()

    def _image(self, path: Path) -> torch.Tensor:
        image = load_image(path, self.model.config.image_size)
        return image.unsqueeze(0).to(next(self.model.parameters()).device)

    @torch.no_grad()
    def tokenize(self, path: Path) -> TokenGrid:
        """The token grid of one image file (resized and centre-cropped to the model's size)."""
        tokens = self.model.tokenize(self._image(path))[0].cpu()
        return TokenGrid(str(path), tokens, self.fingerprint, self.model.codebook_size)

    @torch.no_grad()
    def reconstruct(self, path: Path, target: Path) -> dict[str, Any]:
        """Tokenize and decode one image into `target`; its PSNR and SSIM against the original."""
        original = self._image(path)
        image = self.model.decode_tokens(self.model.tokenize(original)).clamp(-1, 1)
        save_png(image[0], target)
        return {"out": str(target), "psnr": round(float(psnr(image, original)[0]), 3),
                "ssim": round(float(ssim(image, original)[0]), 4)}

    def read_tokens(self, tokens_path: Path) -> list[TokenGrid]:
        """The grids of a tokens file, refused as a whole when another tokenizer made all of them."""
        grids = read_tokens(tokens_path)
        if all(g.tokenizer != self.fingerprint for g in grids):
            raise UsageError(f"tokens were made by another tokenizer ({grids[0].tokenizer}, this checkpoint is "
                             f"{self.fingerprint})", tokens_path)
        return grids

    @torch.no_grad()
    def decode(self, grid: TokenGrid, target: Path, tokens_path: Path) -> dict[str, Any]:
        """Decode one grid of `tokens_path` into the PNG `target`; foreign or out-of-range tokens are an InputError."""
        if grid.tokenizer != self.fingerprint:
            raise InputError(f"tokens of {grid.file} were made by another tokenizer ({grid.tokenizer})", tokens_path)
        low, high, size = int(grid.tokens.min()), int(grid.tokens.max()), self.model.codebook_size
        if low < 0 or high >= size:
            raise InputError(f"tokens of {grid.file} lie in [{low}, {high}], outside the codebook [0, {size - 1}]",
                             tokens_path)
        image = self.model.decode_tokens(grid.tokens.unsqueeze(0).to(next(self.model.parameters()).device))[0]
        return {"file": grid.file, "out": str(save_png(image, target)), "grid": list(grid.tokens.shape)}


def mean_scores(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean PSNR and SSIM of reconstruction records."""
    count = len(records)
    return {"images": count, "psnr": round(sum(r["psnr"] for r in records) / count, 3),
            "ssim": round(sum(r["ssim"] for r in records) / count, 4)}
