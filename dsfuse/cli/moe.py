"""`dsfuse moe-inspect`: route tokens through a fresh MoE layer or every MoE layer of a checkpoint and
show how the load spreads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dsfuse.choices import Router
from dsfuse.cli.common import DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, command
from dsfuse.report import console, emit_json, print_table


@command
def moe_inspect(
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
    """
    from dsfuse.device import seed_everything, select_device
    from dsfuse.tasks import moe

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


def modality_row(r: dict[str, Any], top: int = 3) -> tuple:
    def busiest(shares: list[float]) -> str:
        return " ".join(f"{e}:{shares[e]:.2f}" for e in sorted(range(len(shares)), key=lambda e: -shares[e])[:top])

    m = r["modality"]
    return r["layer"], busiest(m["text_share"]), busiest(m["image_share"]), m["specialisation"]


def layer_row(r: dict[str, Any], top: int = 3) -> tuple:
    busiest = sorted(range(r["experts"]), key=lambda e: -r["load"][e])[:top]
    pairs = " ".join(f"{a}+{b}:{p['count']}" for p in r["top_pairs"][:top] for a, b in [p["experts"]])
    return (r["layer"], r["max_over_mean"], r["maxvio"], f"{r['dropped_assignments']} ({r['dropped_tokens']})",
            f"{r['routing_entropy']:.2f}/{r['routing_entropy_max']:.2f}", r["balance_loss"], r["z_loss"],
            " ".join(f"{e}:{r['load'][e]}" for e in busiest), pairs)


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
