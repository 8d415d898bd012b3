"""`dsfuse moe-inspect`: route tokens through a fresh MoE layer, every MoE layer of a checkpoint, or a
real model (a Hugging Face folder or Hub id) on real text, and show how the load spreads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dsfuse.choices import ComputeDtype, Router
from dsfuse.cli.common import DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, command
from dsfuse.errors import UsageError
from dsfuse.report import console, emit_json, print_table


@command
def moe_inspect(
    model: Annotated[str | None, typer.Argument(
        help="A Hugging Face model folder or Hub id (owner/name) with MoE layers, routed on --text.")] = None,
    text: Annotated[Path | None, typer.Option(
        "--text", "-t", help="With MODEL: a UTF-8 text file, - for stdin, or the text itself.")] = None,
    compare: Annotated[Path | None, typer.Option(
        "--compare", help="With MODEL: a second text (file, -, or the text) to compare --text with: which "
                          "experts each prefers, per layer.")] = None,
    routes_out: Annotated[Path | None, typer.Option(
        "--routes-out", help="With MODEL: JSON Lines, one record per token and layer (experts, weights).")] = None,
    attention: Annotated[Path | None, typer.Option(
        "--attention", help="With a DeepSeek-V4 MODEL: PNG of the compressed rows each query attended to; the "
                            "table adds each layer's attention mass outside the local window.")] = None,
    dtype: Annotated[ComputeDtype, typer.Option(
        "--dtype", help="With MODEL: the compute dtype (auto: the checkpoint's).")] = "auto",
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="With MODEL: route at most this many tokens "
                                                                 "of a text.", min=1)] = 4096,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", "-c", help="A checkpoint with MoE layers (model.safetensors or run dir); none: a fresh "
                                   "layer.")] = None,
    experts: Annotated[int | None, typer.Option("--experts", help="Routed experts (fresh layer: 64).", min=1)] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Experts per token (fresh layer: 6).", min=1)] = None,
    shared: Annotated[int | None, typer.Option("--shared", help="Shared experts (fresh layer: 2).", min=0)] = None,
    router: Annotated[Router | None, typer.Option("--router", help="The router (fresh layer: topk).")] = None,
    capacity_factor: Annotated[float | None, typer.Option(
        "--capacity-factor", help="Each expert takes at most cf * tokens * k / experts (fresh layer: 1.25); "
                                  "overrides a checkpoint's.")] = None,
    dropless: Annotated[bool, typer.Option("--dropless", help="No capacity limit: no token is dropped.")] = False,
    dim: Annotated[int | None, typer.Option("--dim", help="Fresh layer width (default 256, or the --input width).",
                                            min=1)] = None,
    hidden: Annotated[int, typer.Option("--hidden", help="Fresh layer's expert hidden width.", min=1)] = 128,
    tokens: Annotated[int, typer.Option("--tokens", help="Random tokens to route when there is no --input.",
                                        min=1)] = 4096,
    input: Annotated[Path | None, typer.Option(
        "--input", help="Token features to route: a .npy or .safetensors file, [N, D] (or [h, w, D]).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG: load heatmap per layer.")] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Show how MoE routing spreads tokens over experts: load, imbalance, drops, entropy, losses, pairs.

    Example: dsfuse moe-inspect --experts 64 --top-k 6 --router aux-free --plot load.png
    Example: dsfuse moe-inspect deepseek-ai/DeepSeek-V2-Lite --text essay.txt --plot load.png
    Example: dsfuse moe-inspect ./deepseek-v4-folder --text essay.txt --attention sparse.png
    Example: dsfuse moe-inspect runs/unified         # a dsfuse run: text and image tokens' expert load
    """
    from dsfuse.device import seed_everything, select_device
    from dsfuse.tasks import moe

    if model is not None and checkpoint is None and is_dsfuse_checkpoint(model):
        model, checkpoint = None, Path(model)  # `moe-inspect RUN` reads as --checkpoint RUN
    if model is not None:
        inspect_model(model, text, compare, routes_out, attention, dtype, max_tokens, plot, json, quiet, force,
                      select_device(device),
                      given=[flag for flag, value in (("--checkpoint", checkpoint), ("--input", input)) if value])
        return
    for flag, value in (("--text", text), ("--compare", compare), ("--routes-out", routes_out),
                        ("--attention", attention)):
        if value is not None:
            raise UsageError(f"{flag} needs a MODEL (a Hugging Face folder or Hub id)", flag)

    options = moe.LayerOptions(experts=experts, top_k=top_k, shared=shared, router=router,
                               capacity_factor=capacity_factor, dropless=dropless, dim=dim, hidden=hidden)
    torch_device = select_device(device)
    seed_everything(seed)
    result = moe.inspect_routing(checkpoint, options, features_file=input, tokens=tokens, device=torch_device,
                                 plot=plot, force=force)
    if json:
        emit_json(result)
        return
    print_table(f"moe-inspect: {result['source']}, {result['tokens']} tokens ({result['routed']})",
                ["layer", "max/mean", "MaxVio", "dropped (tokens)", "entropy", "balance", "z-loss", "busiest",
                 "frequent pairs"], [layer_row(r) for r in result["layers"]])
    if "modality" in result["layers"][0]:
        print_table("expert load by modality (share of each modality's assignments; specialisation: total "
                    "variation between the two, 0 same spread .. 1 disjoint experts)",
                    ["layer", "text: busiest", "image: busiest", "specialisation"],
                    [modality_row(r) for r in result["layers"]])
    if plot is not None:
        console.print(f"load heatmap: {plot}")


def is_dsfuse_checkpoint(model: str) -> bool:
    """Whether MODEL is a dsfuse run or checkpoint rather than a Hugging Face folder or Hub id."""
    from dsfuse.checkpoint import read_metadata

    path = Path(model)
    if not path.exists() or (path / "config.json").exists():
        return False
    try:
        read_metadata(path)
    except UsageError:
        return False
    return True


def inspect_model(model: str, text: Path | None, compare: Path | None, routes_out: Path | None,
                  attention: Path | None, dtype: ComputeDtype, max_tokens: int, plot: Path | None, json: bool,
                  quiet: bool, force: bool, device: Any, given: list[str]) -> None:
    """moe-inspect MODEL: route real text through a real model and print the per-layer table."""
    from dsfuse.tasks.model_routing import inspect_model as inspect

    if given:
        raise UsageError(f"{given[0]} does not go with a MODEL", given[0])
    if text is None:
        raise UsageError("MODEL needs --text (a file, - for stdin, or the text itself)", "--text")
    result = inspect(model, str(text), compare=None if compare is None else str(compare), dtype=dtype,
                     max_tokens=max_tokens, plot=plot, routes_out=routes_out, attention=attention, force=force,
                     quiet=quiet, device=device)
    if json:
        emit_json(result)
        return
    print_table(f"moe-inspect: {result['architecture']} {model}, {result['text']}, {result['tokens']} tokens",
                ["layer", "max/mean", "MaxVio", "entropy", "busiest", "frequent pairs"],
                [model_layer_row(r) for r in result["layers"]])
    console.print(f"MaxVio over layers: mean {result['maxvio_mean']:.3f}, max {result['maxvio_max']:.3f}")
    if compare is not None:
        c = result["compare"]
        print_table(f"expert preference: A = {result['text']} ({result['tokens']} tokens), "
                    f"B = {c['text_b']} ({c['tokens_b']} tokens)",
                    ["layer", "JS divergence (bits)", "experts preferring A", "experts preferring B"],
                    [(r["layer"], f"{r['divergence']:.3f}", " ".join(map(str, r["prefers_a"])),
                      " ".join(map(str, r["prefers_b"]))) for r in c["layers"]])
    if attention is not None:
        print_table("compressed attention (DeepSeek-V4)", ["layer", "type", "rate", "rows", "mass outside window"],
                    [(r["layer"], r["type"], r["rate"], r["rows"], f"{100 * r['outside_window']:.1f}%")
                     for r in result["attention"]])
    for key, what in (("plot", "plot"), ("routes", "routes"), ("attention_plot", "sparse pattern")):
        if key in result:
            console.print(f"{what}: {result[key]}")


def modality_row(r: dict[str, Any], top: int = 3) -> tuple:
    def busiest(shares: list[float]) -> str:
        return " ".join(f"{e}:{shares[e]:.2f}" for e in sorted(range(len(shares)), key=lambda e: -shares[e])[:top])

    m = r["modality"]
    return r["layer"], busiest(m["text_share"]), busiest(m["image_share"]), m["specialisation"]


def layer_row(r: dict[str, Any], top: int = 3) -> tuple:
    return (r["layer"], r["max_over_mean"], r["maxvio"], f"{r['dropped_assignments']} ({r['dropped_tokens']})",
            _entropy(r), r["balance_loss"], r["z_loss"], _busiest(r, top), _pairs(r, top))


def model_layer_row(r: dict[str, Any], top: int = 3) -> tuple:
    """A released model's layer: dropless, and trained, so its training losses say little."""
    return r["layer"], r["max_over_mean"], r["maxvio"], _entropy(r), _busiest(r, top), _pairs(r, top)


def _entropy(r: dict[str, Any]) -> str:
    return f"{r['routing_entropy']:.2f}/{r['routing_entropy_max']:.2f}"


def _busiest(r: dict[str, Any], top: int) -> str:
    return " ".join(f"{e}:{r['load'][e]}" for e in sorted(range(r["experts"]), key=lambda e: -r["load"][e])[:top])


def _pairs(r: dict[str, Any], top: int) -> str:
    return " ".join(f"{a}+{b}:{p['count']}" for p in r["top_pairs"][:top] for a, b in [p["experts"]])


def register(app: typer.Typer) -> None:
    app.command("moe-inspect")(moe_inspect)


def demo_steps(samples: Path, out: Path):
    from dsfuse.cli.demo import DemoStep

    def summarize(records):
        layer = records[0]["layers"][0]
        return (f"{layer['experts']} experts top-{layer['top_k']}: MaxVio {layer['maxvio']:.2f}, "
                f"dropped {layer['dropped_assignments']}, entropy {layer['routing_entropy']:.2f}")

    def summarize_checkpoint(records):
        return ", ".join(f"{layer['layer']} MaxVio {layer['maxvio']:.2f}" for layer in records[0]["layers"])

    return [
        DemoStep("moe-inspect", ["moe-inspect", "--experts", "64", "--top-k", "6", "--tokens", "2048", "--plot",
                                 str(out / "moe-load.png")], summarize, [out / "moe-load.png"]),
        DemoStep("moe-inspect checkpoint", ["moe-inspect", "--checkpoint", str(out / "train-moe" / "aux-free"),
                                            "--tokens", "2048", "--plot", str(out / "moe-checkpoint-load.png")],
                 summarize_checkpoint, [out / "moe-checkpoint-load.png"]),
    ]
