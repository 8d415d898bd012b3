"""`dsfuse tokenize-image`: images to token grids and back, with a trained `train-vqvae` checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dsfuse.cli.common import (CheckpointOpt, DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, command,
                               console, emit_json, error_line, expand_inputs, for_each_input, print_table)
from dsfuse.errors import InputError, UsageError
from dsfuse.io import check_writable


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


@command
def tokenize_image(
    images: Annotated[list[str] | None, typer.Argument(help="Image files, folders (searched recursively), globs, or - for stdin.")] = None,
    checkpoint: CheckpointOpt = ...,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Tokens file (.safetensors or .jsonl); a folder of PNGs with --decode or --reconstruct.")] = None,
    decode: Annotated[Path | None, typer.Option("--decode", help="Turn this tokens file back into PNGs in --out.")] = None,
    reconstruct: Annotated[bool, typer.Option("--reconstruct", help="Tokenize and decode; write the PNGs to --out and report PSNR/SSIM.")] = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Turn images into grids of discrete tokens (and tokens back into images) with a VQ-VAE checkpoint.

    Images of any size are resized (short side) and centre-cropped to the model's image size.

    --json: one line per image {"file", "grid" (h, w), "tokens" (h*w ids, row-major), "tokenizer"}.

    Token files record the tokenizer's fingerprint; --decode refuses tokens another tokenizer made.

    Example: dsfuse tokenize-image samples/images/photos --checkpoint runs/vq --out tokens.safetensors
    """
    import torch

    from dsfuse.checkpoint import load_checkpoint
    from dsfuse.device import seed_everything, select_device

    torch_device = select_device(device)
    seed_everything(seed)
    if decode is not None and (images or reconstruct):
        raise UsageError("--decode takes a tokens file, not images or --reconstruct", "--decode")
    if decode is None and not images:
        raise UsageError("give images to tokenize, or --decode TOKENS", "IMAGES")
    if (decode is not None or reconstruct) and out is None:
        raise UsageError("--decode and --reconstruct write PNGs: give --out DIR", "--out")
    model, _ = load_checkpoint(checkpoint, kind="vqvae", device=torch_device)
    torch.set_grad_enabled(False)
    if decode is not None:
        return decode_tokens_file(model, decode, out, json=json, force=force)
    if reconstruct:
        return reconstruct_images(model, images, out, json=json, quiet=quiet, force=force)
    return tokenize_images(model, images, out, json=json, quiet=quiet, force=force)


def run_per_file(paths: list[Path], process, json: bool, quiet: bool, desc: str) -> bool:
    """Run `process` on every file (see for_each_input); True when some failed, so the caller can
    still write what the others produced before exiting 1."""
    try:
        for _ in for_each_input(paths, process, as_json=json, quiet=quiet, desc=desc):
            pass
    except typer.Exit as e:
        if e.exit_code != 1:
            raise
        return True
    return False


def _load(model, path: Path):
    from dsfuse.data.images import load_image

    return load_image(path, model.config.image_size).unsqueeze(0).to(next(model.parameters()).device)


def tokenize_images(model, images: list[str], out: Path | None, *, json: bool, quiet: bool, force: bool) -> None:
    from dsfuse.data.images import IMAGE_SUFFIXES
    from dsfuse.data.tokens import TokenGrid, check_token_path, write_tokens

    if out is not None:
        check_writable(check_token_path(out), force)
    fingerprint, grids = model.fingerprint(), []

    def tokenize(path: Path) -> dict[str, Any]:
        grid = TokenGrid(str(path), model.tokenize(_load(model, path))[0].cpu(), fingerprint, model.codebook_size)
        grids.append(grid)
        record = grid.to_json()
        record.pop("file")
        return record

    failures = run_per_file(expand_inputs(images, IMAGE_SUFFIXES), tokenize, json, quiet, "tokenize")
    if out is not None and grids:  # the images that did tokenize are written even when others failed
        write_tokens(out, grids)
    if not json and grids:
        h, w = grids[0].tokens.shape
        print_table(f"{len(grids)} image(s) -> {h}x{w} tokens each (K={model.codebook_size})",
                    ["file", "distinct", "first tokens"],
                    [(g.file, int(g.tokens.unique().numel()), " ".join(map(str, g.tokens.flatten()[:8].tolist())))
                     for g in grids])
        if out is not None:
            console.print(f"wrote {out}")
    if failures:
        raise typer.Exit(1)


def decode_tokens_file(model, tokens_path: Path, out: Path, *, json: bool, force: bool) -> None:
    from dsfuse.data.images import save_png
    from dsfuse.data.tokens import read_tokens

    grids = read_tokens(tokens_path)
    fingerprint = model.fingerprint()
    if all(g.tokenizer != fingerprint for g in grids):
        raise UsageError(f"tokens were made by another tokenizer ({grids[0].tokenizer}, this checkpoint is "
                         f"{fingerprint})", tokens_path)
    names, failed, written = OutputNames(out, force), 0, []
    for grid in grids:
        try:
            if grid.tokenizer != fingerprint:
                raise InputError(f"tokens of {grid.file} were made by another tokenizer ({grid.tokenizer})", tokens_path)
            low, high = int(grid.tokens.min()), int(grid.tokens.max())
            if low < 0 or high >= model.codebook_size:
                raise InputError(f"tokens of {grid.file} lie in [{low}, {high}], outside the codebook "
                                 f"[0, {model.codebook_size - 1}]", tokens_path)
            image = model.decode_tokens(grid.tokens.unsqueeze(0).to(next(model.parameters()).device))[0]
            target = save_png(image, names(grid.file))
        except InputError as e:
            failed += 1
            error_line(e)
            continue
        written.append(target)
        if json:
            emit_json({"file": grid.file, "out": str(target), "grid": list(grid.tokens.shape)})
    if not json and written:
        console.print(f"decoded {len(written)} image(s) into {out}")
    if failed:
        raise typer.Exit(1)


def reconstruct_images(model, images: list[str], out: Path, *, json: bool, quiet: bool, force: bool) -> None:
    from dsfuse.data.images import IMAGE_SUFFIXES, save_png
    from dsfuse.metrics import psnr, ssim

    names = OutputNames(out, force)
    scores: list[tuple[str, float, float]] = []

    def reconstruct(path: Path) -> dict[str, Any]:
        original = _load(model, path)
        target = names(str(path))
        image = model.decode_tokens(model.tokenize(original)).clamp(-1, 1)
        save_png(image[0], target)
        p, s = float(psnr(image, original)[0]), float(ssim(image, original)[0])
        scores.append((str(path), p, s))
        return {"out": str(target), "psnr": round(p, 3), "ssim": round(s, 4)}

    failures = run_per_file(expand_inputs(images, IMAGE_SUFFIXES), reconstruct, json, quiet, "reconstruct")
    if scores:
        overall = {"images": len(scores), "psnr": round(sum(s[1] for s in scores) / len(scores), 3),
                   "ssim": round(sum(s[2] for s in scores) / len(scores), 4)}
        if json:
            emit_json({"overall": overall})
        else:
            print_table(f"reconstructions in {out}", ["file", "PSNR dB", "SSIM"],
                        [*scores, ("overall", overall["psnr"], overall["ssim"])])
    if failures:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("tokenize-image")(tokenize_image)


def demo_steps(samples: Path, out: Path) -> list:
    from dsfuse.cli.demo import DemoStep

    base = out / "tokenizer"
    run, tokens, photos = base / "run", base / "tokens.safetensors", str(samples / "images" / "photos")

    def tokenized(records: list[dict]) -> str:
        h, w = records[0]["grid"]
        return f"{len(records)} photos -> {h}x{w} tokens each, e.g. {records[0]['tokens'][:6]}"

    def reconstructed(records: list[dict]) -> str:
        overall = records[-1]["overall"]
        return f"{overall['images']} reconstructions: PSNR {overall['psnr']:.1f} dB, SSIM {overall['ssim']:.3f}"

    return [
        DemoStep("tokenize-image", ["tokenize-image", photos, "-c", str(run), "--out", str(tokens)], tokenized,
                 [tokens]),
        DemoStep("tokenize-image --decode", ["tokenize-image", "--decode", str(tokens), "-c", str(run), "--out",
                                             str(base / "decoded")],
                 lambda records: f"{len(records)} PNGs from {tokens.name}", [base / "decoded"]),
        DemoStep("tokenize-image --reconstruct", ["tokenize-image", photos, "-c", str(run), "--reconstruct", "--out",
                                                  str(base / "reconstructed")], reconstructed,
                 [base / "reconstructed"]),
    ]
