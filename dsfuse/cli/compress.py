"""`dsfuse compress-tokens`: fewer visual tokens for the same information, and how much of it survives."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dsfuse import choices
from dsfuse.choices import CompressMethod
from dsfuse.cli.common import (DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, choice_metavar, command,
                               expand_inputs,
                               tabulate_each_input)
from dsfuse.errors import UsageError
from dsfuse.report import console, emit_json, print_table


@command
def compress_tokens(
    inputs: Annotated[list[str], typer.Argument(help="Images, tokens files (tokenize-image), .safetensors/.npy "
                                                     "[N, D] tensors, folders, globs, or - for paths on stdin.")],
    method: Annotated[CompressMethod | None, typer.Option("--method", "-m", metavar=choice_metavar(CompressMethod), help="The compression method.")] = None,
    ratio: Annotated[float, typer.Option("--ratio", "-r", help="Tokens in per token out.", min=1)] = 4.0,
    checkpoint: Annotated[list[Path] | None, typer.Option(
        "--checkpoint", "-c", help="A vqvae tokenizer (needed for images and tokens files) and/or trained compressor "
                                   "checkpoints (pixel-shuffle, resampler); repeat the option for several.")] = None,
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
    from dsfuse.tasks import compression

    if method is None and not compare:
        raise UsageError(f"pass --method ({', '.join(choices.values(CompressMethod))}) or --compare", "--method")
    torch_device = select_device(device)
    seed_everything(seed)
    setup = compression.load_compression(checkpoint or [], torch_device, grid=parse_grid(grid) if grid else None,
                                         tome_r=tome_r, queries=queries, seed=seed)
    paths = expand_inputs(inputs, compression.INPUT_SUFFIXES)
    if compare:
        report = compression.compare(paths, setup, quiet, check_writable(out, force) if out is not None else None)
        if json:
            emit_json(report)
        else:
            show_comparison(report)
        return
    tabulate_each_input(paths, lambda path: compression.compress_file(path, setup, method, ratio, out,
                                                                      len(paths) > 1, force),
                        lambda _, record: record.get("items", [record]), lambda rows: show_records(rows, method, ratio),
                        as_json=json, quiet=quiet, desc="compress")


def show_records(rows: list[dict[str, Any]], method: str, ratio: float) -> None:
    print_table(f"compress-tokens: {method} x{ratio:g}", ["input", "tokens in", "out", "ratio", "ms", "fidelity",
                                                           "written"],
                [(r["item"], r["tokens_in"], r["tokens_out"], r["achieved_ratio"], r["ms"],
                  f"{r['fidelity']:.4g} {'dB' if r['fidelity_metric'] == 'psnr_db' else 'cos'}", r["out"])
                 for r in rows])


def show_comparison(report: dict[str, Any]) -> None:
    """One row per method, fidelity and time per ratio; then why the empty cells are empty."""
    cells = {(r["method"], r["ratio"]): r for r in report["results"]}
    ratios = sorted({ratio for _, ratio in cells})
    unit = "PSNR dB" if report["metric"] == "psnr_db" else "attention cos"

    def shown(cell: dict[str, Any]) -> tuple[Any, Any]:
        return ("-", "-") if "skipped" in cell else (round(cell["fidelity"], 4), round(cell["ms"], 3))

    rows = [[method, *(value for ratio in ratios for value in shown(cells[method, ratio]))]
            for method in choices.values(CompressMethod)]
    print_table(f"compress-tokens --compare on {len(report['inputs'])} input(s) ({report['tokens']} tokens of "
                f"{report['dim']}-d)", ["method"] + [f"x{r} {label}" for r in ratios for label in (unit, "ms")], rows)
    reasons: dict[str, list[str]] = {}
    for (method, ratio), cell in cells.items():
        if "skipped" in cell:
            reasons.setdefault(f"{method}: {cell['skipped']}", []).append(f"x{ratio}")
    for reason, where in reasons.items():
        console.print(f"- {reason} ({', '.join(where)})", markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("compress-tokens")(compress_tokens)


def demo_steps(samples: Path, out: Path) -> list:
    import numpy as np

    from dsfuse.cli.demo import DemoStep
    from dsfuse.data.features import patch_tokens

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
