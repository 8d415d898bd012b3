"""`dsfuse compress-tokens`: fewer visual tokens for the same information, and how much of it survives.

    dsfuse compress-tokens INPUT... --method pool|pixel-shuffle|tome|resampler --ratio R
    dsfuse compress-tokens INPUT... --compare          every method at ratios 2, 4 and 16, one table
    dsfuse compress-tokens train DATA --out RUN --method resampler|pixel-shuffle --checkpoint VQVAE
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from dsfuse.cli.common import (DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, ResumeOpt, SeedOpt, command,
                               console, emit_json, expand_inputs, print_table, report_training,
                               tabulate_each_input, warn)
from dsfuse.errors import UsageError

if TYPE_CHECKING:
    import torch

    from dsfuse.models.compressor import TokenCompressor, Trial

METHOD_NAMES = ("pool", "pixel-shuffle", "tome", "resampler")
COMPARE_RATIOS = (2, 4, 16)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
INPUT_SUFFIXES = (*IMAGE_SUFFIXES, ".safetensors", ".npy", ".jsonl")


class DefaultToRun(TyperGroup):
    """`compress-tokens INPUT...` runs `compress-tokens run INPUT...`; `train` is the other subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


compress_app = typer.Typer(
    cls=DefaultToRun, no_args_is_help=True, add_completion=False,
    help="Compress visual tokens (pool, pixel-shuffle, ToMe, a learned resampler) and measure what survives.\n\n"
         "Example: dsfuse compress-tokens photo.jpg --checkpoint runs/vq --method tome --ratio 4\n\n"
         "Example: dsfuse compress-tokens train photos/ --out runs/rs4 --method resampler --checkpoint runs/vq")

MethodOpt = Annotated[str | None, typer.Option("--method", "-m", help="pool | pixel-shuffle | tome | resampler.")]
CheckpointsOpt = Annotated[list[Path] | None, typer.Option(
    "--checkpoint", "-c", help="A vqvae tokenizer (needed for images and tokens files) and/or trained compressor "
                               "checkpoints (pixel-shuffle, resampler); repeat the option for several.")]


# --------------------------------------------------------------------------- inputs

@dataclass
class TokenSource:
    """One set of tokens to compress: [1, N, D] on a grid, with the tokenizer that decodes them (if any)."""

    name: str
    tokens: torch.Tensor
    grid: tuple[int, int] | None
    from_tokenizer: bool  # latents of a tokenizer: judged by PSNR of the decoded image, else by attention


@dataclass
class Models:
    tokenizer: Any | None  # the VQVAE
    tokenizer_id: str | None
    compressors: dict[tuple[str, int], TokenCompressor]  # (method, ratio) -> trained compressor

    def trained(self, method: str, ratio: float) -> TokenCompressor | None:
        """The compressor for (method, ratio), else one of the method at another ratio (to name it in errors)."""
        if ratio == int(ratio) and (method, int(ratio)) in self.compressors:
            return self.compressors[method, int(ratio)]
        return next((model for (m, _), model in self.compressors.items() if m == method), None)


def load_models(checkpoints: list[Path], device: torch.device) -> Models:
    """Sort the --checkpoint files by kind: one vqvae tokenizer, any number of trained compressors."""
    from dsfuse.checkpoint import load_checkpoint, read_metadata

    tokenizer, tokenizer_id, compressors = None, None, {}
    for path in checkpoints:
        kind = read_metadata(path)["kind"]
        if kind == "vqvae":
            if tokenizer is not None:
                raise UsageError("give one tokenizer (vqvae) checkpoint, not several", path)
            tokenizer, _ = load_checkpoint(path, "vqvae", device)
            tokenizer_id = tokenizer.fingerprint()
        elif kind == "compressor":
            model, meta = load_checkpoint(path, "compressor", device)
            compressors[(model.config.method, model.config.ratio)] = (model, meta["extra"].get("tokenizer"), path)
        else:
            raise UsageError(f"checkpoint holds a {kind!r} model; compress-tokens takes a vqvae tokenizer "
                             "and/or trained compressors", path)
    for model, trained_on, path in compressors.values():
        if tokenizer_id and trained_on and trained_on != tokenizer_id:
            raise UsageError("this compressor was trained on the latents of a different tokenizer", path)
    return Models(tokenizer, tokenizer_id, {key: entry[0] for key, entry in compressors.items()})


def need_tokenizer(models: Models, path: Path) -> Any:
    if models.tokenizer is None:
        raise UsageError("images and tokens files need the tokenizer: pass --checkpoint with a vqvae run", path)
    return models.tokenizer


def load_sources(path: Path, models: Models, grid: tuple[int, int] | None, device: torch.device) -> list[TokenSource]:
    """An image (its encoder latents), a tokens file from tokenize-image, or a [N, D] tensor file."""
    import torch
    from einops import rearrange

    from dsfuse.data.features import as_token_grid, read_tensor_file

    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        from dsfuse.data.images import load_image

        tokenizer = need_tokenizer(models, path)
        image = load_image(path, tokenizer.config.image_size).to(device)
        with torch.no_grad():
            z = tokenizer.encode(image[None])
        return [TokenSource(path.name, rearrange(z, "b c h w -> b (h w) c"), tuple(z.shape[2:]), True)]
    if suffix == ".jsonl" or (suffix == ".safetensors" and is_tokens_file(path)):
        return tokens_file_sources(path, models, device)
    if suffix not in (".safetensors", ".npy"):
        raise UsageError(f"unsupported input type {suffix or '(none)'}; use an image, .safetensors, .npy or a "
                         "tokens .jsonl", path)
    from dsfuse.nn.compress import square_grid

    features = as_token_grid(read_tensor_file(path), path)
    grid = grid or features.grid or square_grid(features.tokens.shape[0])
    return [TokenSource(path.name, features.tokens[None].to(device), grid, False)]


def is_tokens_file(path: Path) -> bool:
    """A .safetensors written by tokenize-image (its metadata says so), not a feature tensor."""
    from dsfuse.data.features import safetensors_metadata

    return safetensors_metadata(path).get("format") == "dsfuse-tokens"


def tokens_file_sources(path: Path, models: Models, device: torch.device) -> list[TokenSource]:
    """Token ids written by `tokenize-image`, looked up in the tokenizer's codebook."""
    import torch
    from einops import rearrange

    from dsfuse.data.tokens import read_tokens

    tokenizer = need_tokenizer(models, path)
    grids = read_tokens(path)
    entries = [(Path(g.file).name, g.tokens) for g in grids]
    for made_by in {g.tokenizer for g in grids}:
        if made_by != models.tokenizer_id:
            raise UsageError(f"tokens file was made by a different tokenizer ({made_by}) than --checkpoint's "
                             f"({models.tokenizer_id})", path)
    grid = tokenizer.config.grid
    sources = []
    for name, ids in entries:
        if ids.numel() == 0:
            raise UsageError("the tokens file holds an empty token grid", path)
        if tuple(ids.shape) != (grid, grid) or int(ids.min()) < 0 or int(ids.max()) >= tokenizer.codebook_size:
            raise UsageError(f"tokens of a different tokenizer: a {ids.shape[0]}x{ids.shape[1]} grid of ids up to "
                             f"{int(ids.max())}, this one makes {grid}x{grid} grids of {tokenizer.codebook_size} codes",
                             path)
        with torch.no_grad():
            z_q = tokenizer.quantizer.decode_indices(ids[None].to(device))
        sources.append(TokenSource(f"{path.name}:{name}", rearrange(z_q, "b h w c -> b (h w) c"),
                                   tuple(ids.shape), True))
    return sources


# --------------------------------------------------------------------------- judging

class Judge:
    """Fidelity of a trial on one source: PSNR of the decoded image against the uncompressed
    reconstruction (tokenizer latents), or the cosine of attention outputs (features)."""

    def __init__(self, source: TokenSource, models: Models, queries: int, seed: int):
        from dsfuse.models.compressor import attention_queries, decode_latent_tokens

        self.source, self.models = source, models
        self.last_image: torch.Tensor | None = None  # the latest decoded trial, for pictures
        if source.from_tokenizer:
            self.metric = "psnr_db"
            self.reference = decode_latent_tokens(models.tokenizer, source.tokens, source.grid)
        else:
            self.metric = "attention_cosine"
            # Standardised per channel, so the score follows what varies between tokens, not their shared mean.
            self.mean = source.tokens.mean(1, keepdim=True)
            self.std = source.tokens.std(1, keepdim=True).clamp_min(1e-6) if source.tokens.shape[1] > 1 else 1.0
            self.queries = attention_queries(self.standardise(source.tokens), queries, seed)

    def standardise(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens - self.mean) / self.std

    def __call__(self, trial: Trial) -> float:
        from dsfuse.metrics import psnr
        from dsfuse.models.compressor import decode_latent_tokens
        from dsfuse.nn.compress import attention_fidelity

        if self.source.from_tokenizer:
            self.last_image = decode_latent_tokens(self.models.tokenizer, trial.expanded, self.source.grid)
            return float(psnr(self.last_image, self.reference).mean())
        return float(attention_fidelity(self.standardise(self.source.tokens), self.standardise(trial.expanded),
                                        self.queries).mean())


def attempt(source: TokenSource, method: str, ratio: float, models: Models, tome_r: int | None) -> Trial:
    """Run one method; what it cannot do with these tokens is a usage error naming the option at fault."""
    from dsfuse.models.compressor import run_trial
    from dsfuse.nn.compress import CompressionError

    try:
        return run_trial(source.tokens, source.grid, method, ratio, models.trained(method, ratio), tome_r)
    except CompressionError as e:
        message = str(e)
        where = ("--checkpoint" if "checkpoint" in message or "trained" in message
                 else "--grid" if "needs the token grid" in message else "--ratio")
        raise UsageError(f"{e} ({source.name})", where) from None


# --------------------------------------------------------------------------- compress-tokens run

def output_path(out: Path | None, source: TokenSource, path: Path, method: str, ratio: float, many: bool) -> Path:
    item = source.name.partition(":")[2]  # an image inside a tokens file
    stem = f"{path.stem}_{Path(item).stem}" if item else path.stem
    name = f"{stem}.{method}-x{ratio:g}.safetensors"
    if out is None:
        return path.with_name(name)
    return out / name if many else out


def compress_one(path: Path, source: TokenSource, method: str, ratio: float, models: Models, judge: Judge,
                 tome_r: int | None, out: Path, force: bool) -> dict[str, Any]:
    from dsfuse.data.features import write_compressed
    from dsfuse.io import check_writable

    check_writable(out, force)
    trial = attempt(source, method, ratio, models, tome_r)
    fidelity = judge(trial)
    meta = {"method": method, "ratio": ratio, "input": str(path), "item": source.name,
            "grid_in": source.grid, "grid_out": trial.compressed.grid, "tokenizer": models.tokenizer_id}
    source_index = trial.compressed.source[0] if trial.compressed.source is not None else None
    write_compressed(out, trial.compressed.tokens[0], trial.compressed.sizes[0], meta, source_index)
    return {"item": source.name, "method": method, "ratio": ratio, "tokens_in": trial.tokens_in,
            "tokens_out": trial.tokens_out, "achieved_ratio": round(trial.tokens_in / trial.tokens_out, 4),
            "ms": round(trial.ms, 3), "fidelity": round(fidelity, 4), "fidelity_metric": judge.metric, "out": str(out)}


def check_method_and_ratio(method: str | None, ratio: float, compare: bool) -> None:
    if method is not None and method not in METHOD_NAMES:
        raise UsageError(f"unknown method {method!r}; use {', '.join(METHOD_NAMES)}", "--method")
    if method is None and not compare:
        raise UsageError("pass --method (pool, pixel-shuffle, tome, resampler) or --compare", "--method")
    if not ratio >= 1:
        raise UsageError(f"ratio must be at least 1, got {ratio:g}", "--ratio")


@compress_app.command("run")
@command
def compress_tokens(
    inputs: Annotated[list[str], typer.Argument(help="Images, tokens files (tokenize-image), .safetensors/.npy "
                                                     "[N, D] tensors, folders, globs, or - for paths on stdin.")],
    method: MethodOpt = None,
    ratio: Annotated[float, typer.Option("--ratio", "-r", help="Tokens in per token out (>= 1).")] = 4.0,
    checkpoint: CheckpointsOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output .safetensors (a folder for several "
                                             "inputs; default: beside each input); with --compare on images, a "
                                             "PNG of the first image's reconstructions (method x ratio).")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Run every method at ratios 2, 4 and 16 and print one "
                                          "table of fidelity and time (writes no token files).")] = False,
    grid: Annotated[str | None, typer.Option("--grid", help="HxW grid of an [N, D] tensor when N is not a "
                                             "square (pool and pixel-shuffle need it).")] = None,
    tome_r: Annotated[int | None, typer.Option("--tome-r", help="ToMe: tokens merged per step at most "
                                               "(default: as many as a step can, N/2).", min=1)] = None,
    queries: Annotated[int, typer.Option("--queries", help="Features: how many fixed queries judge attention "
                                         "fidelity.", min=1)] = 64,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Compress tokens with one method and report tokens in/out, time and fidelity, or --compare them all.

    Images go through the vqvae tokenizer's encoder; fidelity is the PSNR of the decoded, compressed-then-
    expanded latents against the uncompressed reconstruction. Tensors [N, D] are judged by the cosine
    similarity of attention outputs for fixed queries before and after compression.

    Example: dsfuse compress-tokens samples/images/photos/coffee.jpg -c runs/vq --method tome --ratio 4
    """
    from dsfuse.data.features import parse_grid
    from dsfuse.device import seed_everything, select_device
    from dsfuse.io import check_writable

    check_method_and_ratio(method, ratio, compare)
    fixed_grid = parse_grid(grid) if grid else None
    torch_device = select_device(device)
    seed_everything(seed)
    models = load_models(checkpoint or [], torch_device)
    paths = expand_inputs(inputs, INPUT_SUFFIXES)
    if compare:
        if out is not None:
            check_writable(out, force)
        return compare_methods(paths, models, fixed_grid, torch_device, tome_r, queries, seed, json, quiet, out)

    many = len(paths) > 1

    def process(path: Path) -> dict[str, Any]:
        sources = load_sources(path, models, fixed_grid, torch_device)
        several = many or len(sources) > 1
        results = [compress_one(path, s, method, ratio, models, Judge(s, models, queries, seed), tome_r,
                                output_path(out, s, path, method, ratio, several), force) for s in sources]
        return results[0] if len(results) == 1 else {"items": results}

    def show(rows: list[dict[str, Any]]) -> None:
        print_table(f"compress-tokens: {method} x{ratio:g}", ["input", "tokens in", "out", "ratio", "ms", "fidelity",
                                                               "written"],
                    [(r["item"], r["tokens_in"], r["tokens_out"], r["achieved_ratio"], r["ms"],
                      f"{r['fidelity']:.4g} {'dB' if r['fidelity_metric'] == 'psnr_db' else 'cos'}", r["out"])
                     for r in rows])

    tabulate_each_input(paths, process, lambda _, result: result.get("items", [result]), show, as_json=json,
                        quiet=quiet, desc="compress")


# --------------------------------------------------------------------------- --compare

def compare_methods(paths: list[Path], models: Models, grid: tuple[int, int] | None, device: torch.device,
                    tome_r: int | None, queries: int, seed: int, as_json: bool, quiet: bool,
                    picture: Path | None = None) -> None:
    """Every method x ratio on every input; fidelity and time averaged over the inputs.

    `picture`: a PNG grid of the first input's decoded reconstructions, one row per method.
    """
    from statistics import mean

    from tqdm import tqdm

    sources = [s for path in paths for s in load_sources(path, models, grid, device)]
    kinds = {s.from_tokenizer for s in sources}
    if len(kinds) > 1:
        raise UsageError("--compare needs inputs of one kind: images/tokens files or feature tensors, not both",
                         "INPUTS")
    if picture is not None and not sources[0].from_tokenizer:
        raise UsageError("--out with --compare draws decoded images; feature tensors have none", "--out")
    ratios = sorted({*COMPARE_RATIOS, *(r for _, r in models.compressors)})
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    judges = [Judge(s, models, queries, seed) for s in sources]
    jobs = [(m, r) for m in METHOD_NAMES for r in ratios]
    shown: dict[tuple[str, int], torch.Tensor] = {}
    for method, ratio in tqdm(jobs, desc="compare", disable=quiet, leave=False):
        trained = models.trained(method, ratio)
        if method in ("pixel-shuffle", "resampler") and (trained is None or trained.config.ratio != ratio):
            cells[method, ratio] = {"skipped": "no trained checkpoint"}
            continue
        trials = []
        try:
            for source, judge in zip(sources, judges):
                trial = attempt(source, method, ratio, models, tome_r)
                trials.append((trial, judge(trial)))
                if judge is judges[0] and judge.last_image is not None:
                    shown[method, ratio] = judge.last_image[0]
        except UsageError as e:  # a ratio this grid cannot take is one empty cell, not the end of the table
            cells[method, ratio] = {"skipped": e.what.split(" (")[0]}
            continue
        cells[method, ratio] = {"fidelity": mean(f for _, f in trials), "ms": mean(t.ms for t, _ in trials),
                                "tokens_in": trials[0][0].tokens_in, "tokens_out": trials[0][0].tokens_out}
    metric = judges[0].metric
    if picture is not None:
        save_compare_picture(judges[0].reference[0], shown, ratios, picture)
    if as_json:
        emit_json({"inputs": [s.name for s in sources], "metric": metric,
                   "results": [{"method": m, "ratio": r, **cells[m, r]} for m, r in jobs]})
        return
    unit = "PSNR dB" if metric == "psnr_db" else "attention cos"
    columns = ["method"] + [f"x{r} {label}" for r in ratios for label in (unit, "ms")]
    rows = []
    for method in METHOD_NAMES:
        row: list[Any] = [method]
        for ratio in ratios:
            cell = cells[method, ratio]
            row += ["-", "-"] if "skipped" in cell else [round(cell["fidelity"], 4), round(cell["ms"], 3)]
        rows.append(row)
    print_table(f"compress-tokens --compare on {len(sources)} input(s) "
                f"({sources[0].tokens.shape[1]} tokens of {sources[0].tokens.shape[2]}-d)", columns, rows)
    reasons: dict[str, list[str]] = {}
    for (m, r), cell in cells.items():
        if "skipped" in cell:
            reasons.setdefault(f"{m}: {cell['skipped']}", []).append(f"x{r}")
    for reason, where in reasons.items():
        console.print(f"- {reason} ({', '.join(where)})", markup=False, soft_wrap=True)


def save_compare_picture(reference: torch.Tensor, shown: dict[tuple[str, int], torch.Tensor], ratios: list[int],
                         path: Path) -> None:
    """Rows: methods; columns: the uncompressed reconstruction, then each ratio (grey where skipped)."""
    import torch

    from dsfuse.data.images import save_grid

    blank = torch.zeros_like(reference)
    tiles = [tile for method in METHOD_NAMES
             for tile in [reference, *(shown.get((method, r), blank) for r in ratios)]]
    save_grid(torch.stack(tiles), path, nrow=len(ratios) + 1)


# --------------------------------------------------------------------------- compress-tokens train

@compress_app.command("train")
@command
def train(
    data: Annotated[Path, typer.Argument(help="A folder of images (searched recursively); random crops of them "
                                              "are the training set.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="The vqvae tokenizer whose latents are "
                                                                        "compressed.")],
    method: Annotated[str, typer.Option("--method", "-m", help="resampler | pixel-shuffle.")] = "resampler",
    ratio: Annotated[int, typer.Option("--ratio", "-r", help="Tokens in per token out.")] = 4,
    val: Annotated[Path | None, typer.Option("--val", help="Held-out images for the PSNR evaluation "
                                                           "(default: centre crops of DATA).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 400,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 1e-3,
    width: Annotated[int, typer.Option("--width", help="Resampler: width of its layers.", min=8)] = 128,
    depth: Annotated[int, typer.Option("--depth", help="Resampler: cross-attention layers each way.", min=1)] = 2,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps (0: at the end).",
                                            min=0)] = 0,
    views: Annotated[int, typer.Option("--views", help="Random crops of DATA encoded once as the training set.",
                                       min=1)] = 1024,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Train a resampler or pixel-shuffle compressor to reconstruct a tokenizer's latents.

    Every evaluation decodes the compressed-then-expanded latents of held-out images and reports their
    PSNR against the uncompressed reconstruction, beside average pooling's at the same ratio.

    Example: dsfuse compress-tokens train photos/ --val held-out/ --out runs/rs4 -c runs/vq --method resampler
    """
    import sys

    import torch
    import torch.nn.functional as F
    from einops import rearrange
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm import tqdm

    from dsfuse.checkpoint import load_checkpoint
    from dsfuse.data.crops import RandomCrops
    from dsfuse.data.images import ImageFolder, save_grid
    from dsfuse.device import seed_everything, select_device
    from dsfuse.engine import TrainConfig, fit, prepare_run_dir, read_metrics
    from dsfuse.metrics import psnr
    from dsfuse.models.compressor import (TRAINABLE, CompressorConfig, TokenCompressor, decode_latent_tokens,
                                          run_trial)
    from dsfuse.nn.compress import CompressionError
    from dsfuse.plots import plot_curves

    if method not in TRAINABLE:
        raise UsageError(f"only {' and '.join(TRAINABLE)} are trained; got {method!r}", "--method")
    if ratio < 1:
        raise UsageError(f"ratio must be at least 1, got {ratio}", "--ratio")
    train_cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(50, steps // 10),
                            eval_every=eval_every, quiet=quiet or json, seed=seed)
    torch_device = select_device(device)
    tokenizer, _ = load_checkpoint(checkpoint, "vqvae", torch_device)
    tokenizer.requires_grad_(False)
    size = tokenizer.config.image_size
    with torch.no_grad():
        probe = tokenizer.encode(torch.zeros(1, 3, size, size, device=torch_device))
    grid = tuple(probe.shape[2:])
    try:
        cfg = CompressorConfig(method=method, dim=probe.shape[1], grid=grid, ratio=ratio, width=width, depth=depth)
    except CompressionError as e:
        raise UsageError(str(e), "--ratio") from None
    crops = RandomCrops(data, size, views=views)
    val_images = torch.stack([image for image, _ in ImageFolder(val or data, size)][:16]).to(torch_device)
    if crops.skipped:
        warn(f"skipped {len(crops.skipped)} unreadable image(s) in {data}", quiet)
    run_dir = prepare_run_dir(out, resume, force)

    def latent_tokens(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return rearrange(tokenizer.encode(images.to(torch_device)), "b c h w -> b (h w) c")

    # The frozen encoder runs once per crop, not once per step: the crops' latents are the training set.
    # The crops are drawn from `seed` alone, so --resume rebuilds the same set.
    seed_everything(seed)
    views_loader = DataLoader(crops, batch_size=64)
    train_set = TensorDataset(torch.cat([latent_tokens(batch) for batch in tqdm(
        views_loader, desc="encode crops", disable=quiet or json, leave=False, file=sys.stderr)]).cpu())
    seed_everything(seed)
    model = TokenCompressor(cfg)

    def loss_fn(net, batch):
        z = batch[0]
        return F.mse_loss(net(z).float(), z.float())

    def evaluate(net, step: int) -> dict[str, float]:
        z = latent_tokens(val_images)
        reference = decode_latent_tokens(tokenizer, z, grid)
        learned = decode_latent_tokens(tokenizer, net(z), grid)
        pooled = decode_latent_tokens(tokenizer, run_trial(z, grid, "pool", ratio, repeats=1).expanded, grid)
        shown = slice(0, 4)  # rows: input, uncompressed reconstruction, pooled, learned
        save_grid(torch.cat([val_images[shown], reference[shown], pooled[shown], learned[shown]]),
                  run_dir / "reconstructions.png", nrow=min(4, len(val_images)))
        return {"psnr": float(psnr(learned, reference).mean()), "pool_psnr": float(psnr(pooled, reference).mean())}

    result = fit(model, train_set, loss_fn, train_cfg, run_dir, kind="compressor", config=cfg, device=torch_device,
                 resume=resume, evaluate=evaluate,
                 extra_meta={"method": method, "ratio": ratio, "tokenizer": tokenizer.fingerprint()})
    plot_curves(read_metrics(run_dir), ["loss", "psnr", "pool_psnr"], run_dir / "curves.png",
                title=f"compress-tokens train: {method} x{ratio}")
    report_training(result, {"method": method, "ratio": ratio, "tokens_in": cfg.num_tokens, "tokens_out": cfg.num_queries,
                             "psnr": result.metrics.get("eval_psnr"), "pool_psnr": result.metrics.get("eval_pool_psnr"),
                             "val": str(val or data)}, json)


def register(app: typer.Typer) -> None:
    app.add_typer(compress_app, name="compress-tokens")


def patch_tokens(image_path: Path, side: int = 16, patch: int = 4) -> torch.Tensor:
    """Real tokens without a trained encoder: the (side*patch)^2 px image cut into side x side patches,
    each flattened to a 3*patch*patch vector (ViT's patch embedding before its projection)."""
    from einops import rearrange

    from dsfuse.data.images import load_image

    image = load_image(image_path, side * patch)
    return rearrange(image, "c (h p) (w q) -> (h w) (c p q)", p=patch, q=patch)


def demo_steps(samples: Path, out: Path) -> list:
    import numpy as np

    from dsfuse.cli.demo import DemoStep

    folder = out / "compress"
    folder.mkdir(parents=True, exist_ok=True)
    features = folder / "coffee_patches.npy"
    np.save(features, patch_tokens(samples / "images" / "photos" / "coffee.jpg").numpy())
    merged = folder / "coffee_patches.tome-x4.safetensors"

    def one(records: list[dict[str, Any]]) -> str:
        r = records[0]
        return f"{r['tokens_in']} -> {r['tokens_out']} tokens in {r['ms']:.1f} ms, attention cos {r['fidelity']:.3f}"

    def table(records: list[dict[str, Any]]) -> str:
        cells = {(c["method"], c["ratio"]): c for c in records[0]["results"]}
        return ", ".join(f"{m} x{r} {cells[m, r]['fidelity']:.3f}" for m in ("pool", "tome") for r in (4, 16))

    return [
        DemoStep("compress-tokens tome", ["compress-tokens", str(features), "--method", "tome", "--ratio", "4",
                                          "--out", str(merged), "--force"], one, [merged]),
        DemoStep("compress-tokens --compare", ["compress-tokens", str(features), "--compare"], table),
    ]
