"""`dsfuse tokenize-image`: images to token grids and back, with a trained `train-vqvae` checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dsfuse.cli.common import (CheckpointOpt, DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, command,
                               expand_inputs, for_each_input)
from dsfuse.errors import InputError, UsageError
from dsfuse.report import console, emit_json, error_line, print_table

if TYPE_CHECKING:  # heavy: imported where used
    from dsfuse.tasks.tokenizer import ImageTokenizer, OutputNames


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
    from dsfuse.device import seed_everything
    from dsfuse.tasks.tokenizer import ImageTokenizer, OutputNames

    if decode is not None and (images or reconstruct):
        raise UsageError("--decode takes a tokens file, not images or --reconstruct", "--decode")
    if decode is None and not images:
        raise UsageError("give images to tokenize, or --decode TOKENS", "IMAGES")
    if (decode is not None or reconstruct) and out is None:
        raise UsageError("--decode and --reconstruct write PNGs: give --out DIR", "--out")
    seed_everything(seed)
    tokenizer = ImageTokenizer.load(checkpoint, device)
    if decode is not None:
        return decode_tokens_file(tokenizer, decode, OutputNames(out, force), json)
    if reconstruct:
        return reconstruct_images(tokenizer, images, OutputNames(out, force), json, quiet)
    return tokenize_images(tokenizer, images, out, json, quiet, force)


def each_image(images: list[str], process: Callable[[Path], dict[str, Any]], finish: Callable[[], None],
               json: bool, quiet: bool, desc: str) -> None:
    """`process` every image (see for_each_input), then `finish` with the successes, even when some failed."""
    from dsfuse.data.images import IMAGE_SUFFIXES

    try:
        for _ in for_each_input(expand_inputs(images, IMAGE_SUFFIXES), process, as_json=json, quiet=quiet, desc=desc):
            pass
    finally:
        finish()


def tokenize_images(tokenizer: ImageTokenizer, images: list[str], out: Path | None, json: bool, quiet: bool,
                    force: bool) -> None:
    from dsfuse.data.tokens import check_token_path, write_tokens
    from dsfuse.io import check_writable

    if out is not None:
        check_writable(check_token_path(out), force)
    grids = []

    def tokenize(path: Path) -> dict[str, Any]:
        grids.append(tokenizer.tokenize(path))
        return {k: v for k, v in grids[-1].to_json().items() if k != "file"}

    def finish() -> None:
        if not grids:
            return
        if out is not None:  # the images that did tokenize are written even when others failed
            write_tokens(out, grids)
        if not json:
            h, w = grids[0].tokens.shape
            print_table(f"{len(grids)} image(s) -> {h}x{w} tokens each (K={tokenizer.model.codebook_size})",
                        ["file", "distinct", "first tokens"],
                        [(g.file, int(g.tokens.unique().numel()), " ".join(map(str, g.tokens.flatten()[:8].tolist())))
                         for g in grids])
            if out is not None:
                console.print(f"wrote {out}")

    each_image(images, tokenize, finish, json, quiet, "tokenize")


def reconstruct_images(tokenizer: ImageTokenizer, images: list[str], names: OutputNames, json: bool,
                       quiet: bool) -> None:
    from dsfuse.tasks.tokenizer import mean_scores

    records = []

    def reconstruct(path: Path) -> dict[str, Any]:
        record = tokenizer.reconstruct(path, names(str(path)))
        records.append({"file": str(path), **record})
        return record

    def finish() -> None:
        if not records:
            return
        overall = mean_scores(records)
        if json:
            emit_json({"overall": overall})
        else:
            print_table(f"reconstructions in {names.folder}", ["file", "PSNR dB", "SSIM"],
                        [*((r["file"], r["psnr"], r["ssim"]) for r in records),
                         ("overall", overall["psnr"], overall["ssim"])])

    each_image(images, reconstruct, finish, json, quiet, "reconstruct")


def decode_tokens_file(tokenizer: ImageTokenizer, tokens_path: Path, names: OutputNames, json: bool) -> None:
    failed, written = 0, 0
    for grid in tokenizer.read_tokens(tokens_path):
        try:
            record = tokenizer.decode(grid, names(grid.file), tokens_path)
        except InputError as e:  # one grid's failure: the others go on
            failed += 1
            error_line(e)
            continue
        written += 1
        if json:
            emit_json(record)
    if not json and written:
        console.print(f"decoded {written} image(s) into {names.folder}")
    if failed:
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
