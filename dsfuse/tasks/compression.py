"""Visual-token compression: compress token sets and judge what survives, compare every method and
ratio, and train the learnable compressors (pixel-shuffle, resampler) on a tokenizer's latents.

Inputs are images (their latents from a vqvae tokenizer's encoder, judged by the PSNR of the decoded
image), tokens files from `tokenize-image` (looked up in the tokenizer's codebook, judged the same way)
and feature tensors [N, D] (judged by the cosine of attention outputs for fixed queries).
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from dsfuse import choices
from dsfuse.checkpoint import CheckpointMeta, build_model, load_checkpoint, read_metadata
from dsfuse.choices import CompressMethod, TrainableCompressMethod
from dsfuse.data.crops import RandomCrops
from dsfuse.data.features import read_features, safetensors_metadata, write_compressed
from dsfuse.data.images import ImageFolder, load_image, save_grid
from dsfuse.data.tokens import read_tokens
from dsfuse.device import seed_everything
from dsfuse.engine import TrainConfig, TrainResult, fit, read_metrics
from dsfuse.errors import UsageError
from dsfuse.io import check_writable
from dsfuse.metrics import psnr
from dsfuse.models.compressor import (CompressorConfig, TokenCompressor, Trial, attention_queries,
                                      decode_latent_tokens, run_trial)
from dsfuse.nn.compress import CompressionError, Grid, attention_fidelity, square_grid
from dsfuse.plots import plot_curves
from dsfuse.report import warn
from dsfuse.runs import TrainOptions, prepare_run_dir, resume_options

TASK = "compressor"
KIND = "compressor"
COMPARE_RATIOS = (2, 4, 16)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
INPUT_SUFFIXES = (*IMAGE_SUFFIXES, ".safetensors", ".npy", ".jsonl")
# what a CompressionError is about -> the option to change
OPTION_AT_FAULT = {"ratio": "--ratio", "grid": "--grid", "model": "--checkpoint"}


# --------------------------------------------------------------------------- what every input shares

@dataclass
class Compression:
    """What one call applies to every input: the tokenizer and trained compressors, and how to judge."""

    device: torch.device
    tokenizer: Any | None = None  # the VQVAE
    tokenizer_id: str | None = None
    compressors: dict[tuple[str, int], TokenCompressor] = field(default_factory=dict)  # (method, ratio) -> model
    grid: Grid | None = None  # the grid of [N, D] tensors, when given
    tome_r: int | None = None
    queries: int = 64
    seed: int = 0

    def trained(self, method: str, ratio: float) -> TokenCompressor | None:
        """The compressor for (method, ratio), else one of the method at another ratio (to name it in errors)."""
        if ratio == int(ratio) and (method, int(ratio)) in self.compressors:
            return self.compressors[method, int(ratio)]
        return next((model for (m, _), model in self.compressors.items() if m == method), None)

    def need_tokenizer(self, path: Path) -> Any:
        if self.tokenizer is None:
            raise UsageError("images and tokens files need the tokenizer: pass --checkpoint with a vqvae run", path)
        return self.tokenizer


def load_compression(checkpoints: list[Path], device: torch.device, **settings: Any) -> Compression:
    """Sort the --checkpoint files by kind: one vqvae tokenizer, any number of trained compressors."""
    setup = Compression(device, **settings)
    trained_on: dict[tuple[str, int], tuple[str | None, Path]] = {}
    for path in checkpoints:
        kind = read_metadata(path).kind
        if kind == "vqvae":
            if setup.tokenizer is not None:
                raise UsageError("give one tokenizer (vqvae) checkpoint, not several", path)
            setup.tokenizer, _ = load_checkpoint(path, "vqvae", device)
            setup.tokenizer_id = setup.tokenizer.fingerprint()
        elif kind == KIND:
            model, meta = load_checkpoint(path, KIND, device)
            key = (model.config.method, model.config.ratio)
            setup.compressors[key], trained_on[key] = model, (meta.setup.get("tokenizer"), path)
        else:
            raise UsageError(f"checkpoint holds a {kind!r} model; compress-tokens takes a vqvae tokenizer "
                             "and/or trained compressors", path)
    for tokenizer_id, path in trained_on.values():
        if setup.tokenizer_id and tokenizer_id and tokenizer_id != setup.tokenizer_id:
            raise UsageError("this compressor was trained on the latents of a different tokenizer", path)
    return setup


# --------------------------------------------------------------------------- inputs

@dataclass
class TokenSource:
    """One set of tokens to compress: [1, N, D] on a grid, with the tokenizer that decodes them (if any)."""

    name: str
    tokens: torch.Tensor
    grid: Grid | None
    from_tokenizer: bool  # latents of a tokenizer: judged by PSNR of the decoded image, else by attention


def load_sources(path: Path, setup: Compression) -> list[TokenSource]:
    """An image (its encoder latents), a tokens file from tokenize-image, or a [N, D] tensor file."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return [image_source(path, setup)]
    if suffix == ".jsonl" or (suffix == ".safetensors" and is_tokens_file(path)):
        return tokens_file_sources(path, setup)
    if suffix not in (".safetensors", ".npy"):
        raise UsageError(f"unsupported input type {suffix or '(none)'}; use an image, .safetensors, .npy or a "
                         "tokens .jsonl", path)
    features = read_features(path)
    grid = setup.grid or features.grid or square_grid(features.tokens.shape[0])
    return [TokenSource(path.name, features.tokens[None].to(setup.device), grid, False)]


def image_source(path: Path, setup: Compression) -> TokenSource:
    """An image's latents from the tokenizer's encoder."""
    tokenizer = setup.need_tokenizer(path)
    image = load_image(path, tokenizer.config.image_size).to(setup.device)
    with torch.no_grad():
        z = tokenizer.encode(image[None])
    return TokenSource(path.name, rearrange(z, "b c h w -> b (h w) c"), tuple(z.shape[2:]), True)


def is_tokens_file(path: Path) -> bool:
    """A .safetensors written by tokenize-image (its metadata says so), not a feature tensor."""
    return safetensors_metadata(path).get("format") == "dsfuse-tokens"


def tokens_file_sources(path: Path, setup: Compression) -> list[TokenSource]:
    """Token ids written by `tokenize-image`, looked up in the tokenizer's codebook."""
    tokenizer = setup.need_tokenizer(path)
    grids = read_tokens(path)
    for made_by in {g.tokenizer for g in grids}:
        if made_by != setup.tokenizer_id:
            raise UsageError(f"tokens file was made by a different tokenizer ({made_by}) than --checkpoint's "
                             f"({setup.tokenizer_id})", path)
    side = tokenizer.config.grid
    sources = []
    for entry in grids:
        ids = entry.tokens
        if ids.numel() == 0:
            raise UsageError("the tokens file holds an empty token grid", path)
        if tuple(ids.shape) != (side, side) or int(ids.min()) < 0 or int(ids.max()) >= tokenizer.codebook_size:
            raise UsageError(f"tokens of a different tokenizer: a {ids.shape[0]}x{ids.shape[1]} grid of ids up to "
                             f"{int(ids.max())}, this one makes {side}x{side} grids of {tokenizer.codebook_size} codes",
                             path)
        with torch.no_grad():
            z_q = tokenizer.quantizer.decode_indices(ids[None].to(setup.device))
        sources.append(TokenSource(f"{path.name}:{Path(entry.file).name}", rearrange(z_q, "b h w c -> b (h w) c"),
                                   tuple(ids.shape), True))
    return sources


# --------------------------------------------------------------------------- judging

class Judge:
    """Fidelity of a trial on one source: PSNR of the decoded image against the uncompressed
    reconstruction (tokenizer latents), or the cosine of attention outputs (features)."""

    def __init__(self, source: TokenSource, setup: Compression):
        self.source, self.tokenizer = source, setup.tokenizer
        self.last_image: torch.Tensor | None = None  # the latest decoded trial, for pictures
        if source.from_tokenizer:
            self.metric = "psnr_db"
            self.reference = decode_latent_tokens(self.tokenizer, source.tokens, source.grid)
        else:
            self.metric = "attention_cosine"
            # Standardised per channel, so the score follows what varies between tokens, not their shared mean.
            self.mean = source.tokens.mean(1, keepdim=True)
            self.std = source.tokens.std(1, keepdim=True).clamp_min(1e-6) if source.tokens.shape[1] > 1 else 1.0
            self.queries = attention_queries(self.standardise(source.tokens), setup.queries, setup.seed)

    def standardise(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens - self.mean) / self.std

    def __call__(self, trial: Trial) -> float:
        if self.source.from_tokenizer:
            self.last_image = decode_latent_tokens(self.tokenizer, trial.expanded, self.source.grid)
            return float(psnr(self.last_image, self.reference).mean())
        return float(attention_fidelity(self.standardise(self.source.tokens), self.standardise(trial.expanded),
                                        self.queries).mean())


def attempt(source: TokenSource, method: str, ratio: float, setup: Compression) -> Trial:
    """Run one method; what it cannot do with these tokens is a usage error naming the option at fault."""
    try:
        return run_trial(source.tokens, source.grid, method, ratio, setup.trained(method, ratio), setup.tome_r)
    except CompressionError as e:
        raise UsageError(f"{e} ({source.name})", OPTION_AT_FAULT[e.about]) from None


# --------------------------------------------------------------------------- compress one file

def output_path(out: Path | None, source: TokenSource, path: Path, method: str, ratio: float, many: bool) -> Path:
    """Where the compressed tokens of `source` go: beside the input, in the folder `out`, or `out` itself."""
    item = source.name.partition(":")[2]  # an image inside a tokens file
    stem = f"{path.stem}_{Path(item).stem}" if item else path.stem
    name = f"{stem}.{method}-x{ratio:g}.safetensors"
    if out is None:
        return path.with_name(name)
    if many and (out.suffix.lower() == ".safetensors" or out.is_file()):
        raise UsageError("several token sets are written, so --out must be a folder, not one file", out)
    return out / name if many else out


def compress_file(path: Path, setup: Compression, method: CompressMethod, ratio: float, out: Path | None,
                  many: bool, force: bool) -> dict[str, Any]:
    """Compress every token set of one input and write each; one record, or {"items": [...]} for several."""
    sources = load_sources(path, setup)
    several = many or len(sources) > 1
    records = [compress_source(path, source, setup, method, ratio,
                               output_path(out, source, path, method, ratio, several), force) for source in sources]
    return records[0] if len(records) == 1 else {"items": records}


def compress_source(path: Path, source: TokenSource, setup: Compression, method: str, ratio: float, out: Path,
                    force: bool) -> dict[str, Any]:
    check_writable(out, force)
    trial = attempt(source, method, ratio, setup)
    judge = Judge(source, setup)
    fidelity = judge(trial)
    meta = {"method": method, "ratio": ratio, "input": str(path), "item": source.name,
            "grid_in": source.grid, "grid_out": trial.compressed.grid, "tokenizer": setup.tokenizer_id}
    source_index = trial.compressed.source[0] if trial.compressed.source is not None else None
    write_compressed(out, trial.compressed.tokens[0], trial.compressed.sizes[0], meta, source_index)
    return {"item": source.name, "method": method, "ratio": ratio, "tokens_in": trial.tokens_in,
            "tokens_out": trial.tokens_out, "achieved_ratio": round(trial.tokens_in / trial.tokens_out, 4),
            "ms": round(trial.ms, 3), "fidelity": round(fidelity, 4), "fidelity_metric": judge.metric,
            "out": str(out)}


# --------------------------------------------------------------------------- compare every method

def compare(paths: list[Path], setup: Compression, quiet: bool = False, picture: Path | None = None
            ) -> dict[str, Any]:
    """Every method x ratio on every input; fidelity and time averaged over the inputs. A cell a method
    cannot fill says why under "skipped". `picture`: a PNG of the first input's reconstructions."""
    sources = [s for path in paths for s in load_sources(path, setup)]
    if len({s.from_tokenizer for s in sources}) > 1:
        raise UsageError("--compare needs inputs of one kind: images/tokens files or feature tensors, not both",
                         "INPUTS")
    if picture is not None and not sources[0].from_tokenizer:
        raise UsageError("--out with --compare draws decoded images; feature tensors have none", "--out")
    ratios = sorted({*COMPARE_RATIOS, *(r for _, r in setup.compressors)})
    judges = [Judge(s, setup) for s in sources]
    jobs = [(m, r) for m in choices.values(CompressMethod) for r in ratios]
    cells, shown = {}, {}
    for method, ratio in tqdm(jobs, desc="compare", disable=quiet, leave=False, file=sys.stderr):
        cells[method, ratio] = compare_cell(sources, judges, method, ratio, setup)
        if judges[0].last_image is not None and "fidelity" in cells[method, ratio]:
            shown[method, ratio] = judges[0].last_image[0]
    if picture is not None:
        save_compare_picture(judges[0].reference[0], shown, ratios, picture)
    return {"inputs": [s.name for s in sources], "metric": judges[0].metric,
            "tokens": sources[0].tokens.shape[1], "dim": sources[0].tokens.shape[2],
            "results": [{"method": m, "ratio": r, **cells[m, r]} for m, r in jobs]}


def compare_cell(sources: list[TokenSource], judges: list[Judge], method: str, ratio: int, setup: Compression
                 ) -> dict[str, Any]:
    """One method at one ratio on every source: mean fidelity and time, or why it was skipped."""
    trained = setup.trained(method, ratio)
    if method in choices.values(TrainableCompressMethod) and (trained is None or trained.config.ratio != ratio):
        return {"skipped": "no trained checkpoint"}
    for judge in judges:
        judge.last_image = None
    trials = []
    try:
        for source, judge in zip(sources, judges):
            trial = attempt(source, method, ratio, setup)
            trials.append((trial, judge(trial)))
    except UsageError as e:  # a ratio this grid cannot take is one empty cell, not the end of the table
        return {"skipped": e.what.split(" (")[0]}
    return {"fidelity": mean(f for _, f in trials), "ms": mean(t.ms for t, _ in trials),
            "tokens_in": trials[0][0].tokens_in, "tokens_out": trials[0][0].tokens_out}


def save_compare_picture(reference: torch.Tensor, shown: dict[tuple[str, int], torch.Tensor], ratios: list[int],
                         path: Path) -> None:
    """Rows: methods; columns: the uncompressed reconstruction, then each ratio (grey where skipped)."""
    blank = torch.zeros_like(reference)
    tiles = [tile for method in choices.values(CompressMethod)
             for tile in [reference, *(shown.get((method, r), blank) for r in ratios)]]
    save_grid(torch.stack(tiles), path, nrow=len(ratios) + 1)


# --------------------------------------------------------------------------- training

@dataclass(kw_only=True)
class CompressorOptions(TrainOptions):
    """What `train-compressor` takes (the checkpoint is the vqvae tokenizer whose latents are compressed)."""

    data: Path
    checkpoint: Path
    method: TrainableCompressMethod = "resampler"
    ratio: int = 4
    val: Path | None = None
    width: int = 128
    depth: int = 2
    views: int = 1024


def train(options: CompressorOptions, out: Path, *, resume: bool, force: bool, explicit: Collection[str],
          device: torch.device, quiet: bool) -> tuple[TrainResult, dict[str, Any]]:
    """Train a compressor to reconstruct the tokenizer's latents of random crops of DATA; every evaluation
    scores held-out images by PSNR against the uncompressed reconstruction, beside pooling's."""
    meta = None
    if resume:
        options, meta = resume_options(options, out, KIND, explicit)
    train_cfg = TrainConfig.of(options, quiet=quiet)
    tokenizer, _ = load_checkpoint(options.checkpoint, "vqvae", device)
    tokenizer.requires_grad_(False)
    fingerprint = tokenizer.fingerprint()
    if meta is not None and meta.setup.get("tokenizer") not in (None, fingerprint):
        raise UsageError("the run was trained on the latents of another tokenizer", "--checkpoint")
    grid, dim = latent_shape(tokenizer, device)
    try:
        cfg = CompressorConfig(method=options.method, dim=dim, grid=grid, ratio=options.ratio, width=options.width,
                               depth=options.depth)
    except CompressionError as e:
        raise UsageError(str(e), OPTION_AT_FAULT[e.about]) from None
    crops, val_images = training_images(options, tokenizer.config.image_size, quiet)
    run_dir = prepare_run_dir(out, resume, force)
    # The frozen encoder runs once per crop, not once per step: the crops' latents are the training set.
    # The crops are drawn from the seed alone, so --resume rebuilds the same set.
    seed_everything(options.seed)
    train_set = encode_crops(tokenizer, crops, quiet)
    seed_everything(options.seed)
    model = build_model(meta) if meta is not None else TokenCompressor(cfg)
    record = CheckpointMeta.of(KIND, cfg, options=options.record(), setup={"tokenizer": fingerprint})
    result = fit(model, train_set, reconstruction_loss, train_cfg, run_dir, meta=record, device=device, resume=resume,
                 evaluate=reconstruction_evaluator(tokenizer, val_images, cfg, run_dir))
    plot_curves(read_metrics(run_dir), ["loss", "psnr", "pool_psnr"], run_dir / "curves.png",
                title=f"train-compressor: {options.method} x{options.ratio}")
    return result, {"method": options.method, "ratio": options.ratio, "tokens_in": cfg.num_tokens,
                    "tokens_out": cfg.num_queries, "psnr": result.metrics.get("eval_psnr"),
                    "pool_psnr": result.metrics.get("eval_pool_psnr"), "val": str(options.val or options.data)}


def latent_shape(tokenizer: Any, device: torch.device) -> tuple[Grid, int]:
    """The tokenizer's latent grid and width."""
    size = tokenizer.config.image_size
    with torch.no_grad():
        probe = tokenizer.encode(torch.zeros(1, 3, size, size, device=device))
    return tuple(probe.shape[2:]), probe.shape[1]


def training_images(options: CompressorOptions, size: int, quiet: bool) -> tuple[RandomCrops, torch.Tensor]:
    """Random crops of DATA, and up to 16 held-out images (--val, else centre crops of DATA)."""
    crops = RandomCrops(options.data, size, views=options.views)
    val_images = torch.stack([image for image, _ in ImageFolder(options.val or options.data, size)][:16])
    if crops.skipped:
        warn(f"skipped {len(crops.skipped)} unreadable image(s) in {options.data}", quiet)
    return crops, val_images


def latent_tokens(tokenizer: Any, images: torch.Tensor) -> torch.Tensor:
    """Images -> the tokenizer's latents as tokens [B, N, C]."""
    with torch.no_grad():
        z = tokenizer.encode(images.to(next(tokenizer.parameters()).device))
    return rearrange(z, "b c h w -> b (h w) c")


def encode_crops(tokenizer: Any, crops: RandomCrops, quiet: bool) -> TensorDataset:
    """The crops' latent tokens, on the CPU: the training set."""
    batches = tqdm(DataLoader(crops, batch_size=64), desc="encode crops", disable=quiet, leave=False, file=sys.stderr)
    return TensorDataset(torch.cat([latent_tokens(tokenizer, batch) for batch in batches]).cpu())


def reconstruction_loss(net: TokenCompressor, batch: tuple[torch.Tensor]) -> torch.Tensor:
    """Compress and expand the latents again: the mean squared error of the way back."""
    z = batch[0]
    return F.mse_loss(net(z).float(), z.float())


def reconstruction_evaluator(tokenizer: Any, val_images: torch.Tensor, cfg: CompressorConfig, run_dir: Path):
    """evaluate(net, step): held-out PSNR of the learned and the pooled reconstructions; draws a few of them."""
    def evaluate(net, step: int) -> dict[str, float]:
        z = latent_tokens(tokenizer, val_images)
        images = val_images.to(z.device)
        reference = decode_latent_tokens(tokenizer, z, cfg.grid)
        learned = decode_latent_tokens(tokenizer, net(z), cfg.grid)
        pooled = decode_latent_tokens(tokenizer, run_trial(z, cfg.grid, "pool", cfg.ratio, repeats=1).expanded,
                                      cfg.grid)
        shown = slice(0, 4)  # rows: input, uncompressed reconstruction, pooled, learned
        save_grid(torch.cat([images[shown], reference[shown], pooled[shown], learned[shown]]),
                  run_dir / "reconstructions.png", nrow=min(4, len(images)))
        return {"psnr": float(psnr(learned, reference).mean()), "pool_psnr": float(psnr(pooled, reference).mean())}

    return evaluate
