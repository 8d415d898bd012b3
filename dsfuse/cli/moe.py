"""`dsfuse moe-inspect`: route tokens through a fresh MoE layer or every MoE layer of a checkpoint and
show how the load spreads; `--simulate N` trains with each balancing method and plots the imbalance."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dsfuse.cli.common import (DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, command, console,
                               emit_json, print_table)
from dsfuse.errors import UsageError

ROUTER_CHOICES = ("topk", "noisy", "aux-free")


def _check_options(experts: int | None, top_k: int | None, capacity_factor: float | None, tokens: int,
                   router: str | None) -> None:
    if experts is not None and experts < 1:
        raise UsageError(f"--experts must be at least 1, got {experts}", "--experts")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}", "--top-k")
    if experts is not None and top_k is not None and top_k > experts:
        raise UsageError(f"--top-k {top_k} is larger than the number of experts ({experts})", "--top-k")
    if capacity_factor is not None and not capacity_factor > 0:
        raise UsageError(f"--capacity-factor must be positive, got {capacity_factor} (use --dropless for no "
                         "capacity limit)", "--capacity-factor")
    if tokens < 1:
        raise UsageError(f"--tokens must be at least 1, got {tokens}", "--tokens")
    if router is not None and router not in ROUTER_CHOICES:
        raise UsageError(f"--router must be one of {', '.join(ROUTER_CHOICES)}, got {router!r}", "--router")


def _pairs_text(pairs: list[dict[str, Any]], top: int = 3) -> str:
    return " ".join(f"{a}+{b}:{p['count']}" for p in pairs[:top] for a, b in [p["experts"]])


@command
def moe_inspect(
    checkpoint: Annotated[Path | None, typer.Argument(
        help="A checkpoint with MoE layers (model.safetensors or run dir); none: a fresh layer.")] = None,
    experts: Annotated[int | None, typer.Option("--experts", help="Routed experts (fresh layer: 64).")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Experts per token (fresh layer: 6).")] = None,
    shared: Annotated[int | None, typer.Option("--shared", help="Shared experts (fresh layer: 2).")] = None,
    router: Annotated[str | None, typer.Option("--router", help="topk, noisy or aux-free (fresh layer: topk).")] = None,
    capacity_factor: Annotated[float | None, typer.Option(
        "--capacity-factor", help="Each expert takes at most cf * tokens * k / experts (fresh layer: 1.25); "
                                  "overrides a checkpoint's.")] = None,
    dropless: Annotated[bool, typer.Option("--dropless", help="No capacity limit: no token is dropped.")] = False,
    dim: Annotated[int | None, typer.Option("--dim", help="Fresh layer width (default 256, or the --input width).")] = None,
    hidden: Annotated[int, typer.Option("--hidden", help="Fresh layer's expert hidden width.")] = 128,
    tokens: Annotated[int, typer.Option("--tokens", help="Random tokens to route when there is no --input.")] = 4096,
    input: Annotated[Path | None, typer.Option(
        "--input", help="Token features to route: a .npy or one-tensor .safetensors file, [N, D].")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG: load heatmap per layer (or, with --simulate, "
                                                             "imbalance over training).")] = None,
    simulate: Annotated[int | None, typer.Option(
        "--simulate", help="Train a small MoE model N steps on skewed clusters with aux loss, aux-free bias "
                           "and neither; needs --out.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder for --simulate.")] = None,
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
    from dsfuse.io import check_writable

    _check_options(experts, top_k, capacity_factor, tokens, router)
    if dropless and capacity_factor is not None:
        raise UsageError("--dropless and --capacity-factor exclude each other", "--dropless")
    torch_device = select_device(device)
    if plot is not None:
        check_writable(plot, force)
        if plot.suffix.lower() != ".png":
            raise UsageError("the plot is a PNG: give a path ending in .png", plot)
    seed_everything(seed)
    if simulate is not None:
        if checkpoint is not None or input is not None:
            raise UsageError("--simulate trains its own model: give no checkpoint or --input", "--simulate")
        _simulate(simulate, out, experts, top_k, shared, router, capacity_factor, torch_device, seed, plot,
                  json, quiet, force)
        return
    if out is not None:
        raise UsageError("--out is for --simulate", "--out")
    result = _inspect(checkpoint, experts, top_k, shared, router, capacity_factor, dropless, dim, hidden, tokens,
                      input, torch_device)
    if plot is not None:
        from dsfuse.moe_inspect import plot_load_heatmap

        plot_load_heatmap(result["layers"], plot, f"expert load, {result['source']}")
        result["plot"] = str(plot)
    if json:
        emit_json(result)
        return
    print_table(f"moe-inspect: {result['source']}, {result['tokens']} tokens ({result['routed']})",
                ["layer", "max/mean", "MaxVio", "dropped (tokens)", "entropy", "balance", "z-loss", "busiest",
                 "frequent pairs"],
                [(r["layer"], r["max_over_mean"], r["maxvio"], f"{r['dropped_assignments']} ({r['dropped_tokens']})",
                  f"{r['routing_entropy']:.2f}/{r['routing_entropy_max']:.2f}", r["balance_loss"], r["z_loss"],
                  " ".join(f"{e}:{r['load'][e]}" for e in sorted(range(r["experts"]), key=lambda e: -r["load"][e])[:3]),
                  _pairs_text(r["top_pairs"])) for r in result["layers"]])
    if plot is not None:
        console.print(f"load heatmap: {plot}")


def _inspect(checkpoint, experts, top_k, shared, router, capacity_factor, dropless, dim, hidden, tokens, input,
             device) -> dict[str, Any]:
    import torch

    from dsfuse.moe_inspect import layer_names, load_feature_file, route_features, routing_stats
    from dsfuse.nn.moe import MoE, MoEConfig, moe_layers

    features = load_feature_file(input) if input is not None else None
    if checkpoint is not None:
        fresh_only = {"--experts": experts, "--top-k": top_k, "--shared": shared, "--router": router, "--dim": dim}
        given = [name for name, value in fresh_only.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} shapes a fresh layer; a checkpoint brings its own", given[0])
        from dsfuse.checkpoint import load_checkpoint, resolve_checkpoint

        model, meta = load_checkpoint(checkpoint, device=device)
        layers = moe_layers(model)
        if not layers:
            raise UsageError(f"the checkpoint ({meta['kind']!r} model) has no MoE layer", resolve_checkpoint(checkpoint))
        source = f"{meta['kind']} checkpoint {checkpoint}"
    else:
        width = dim or (features.shape[-1] if features is not None else 256)
        try:
            cfg = MoEConfig(dim=width, n_experts=experts or 64, top_k=top_k or 6,
                            n_shared=2 if shared is None else shared, expert_hidden=hidden, router=router or "topk",
                            capacity_factor=0.0 if dropless else (capacity_factor or 1.25))
        except ValueError as e:
            raise UsageError(str(e), "options") from None
        model = layers = None
        model = MoE(cfg).to(device).eval()
        layers = [model]
        source = f"a fresh layer ({cfg.router}, {cfg.n_experts} experts, top-{cfg.top_k}, {cfg.n_shared} shared)"
    for layer in layers:
        if dropless:
            layer.cfg.capacity_factor = 0.0
        elif capacity_factor is not None:
            layer.cfg.capacity_factor = capacity_factor
    if features is None:
        from dsfuse.models.moe import MoEClassifier

        width = model.config.in_dim if isinstance(model, MoEClassifier) else layers[0].cfg.dim
        if len({layer.cfg.dim for layer in layers}) > 1 and not isinstance(model, MoEClassifier):
            raise UsageError("the MoE layers differ in width: give --input features for one of them", "--input")
        features = torch.randn(tokens, width)
    routed = route_features(model, features.to(device))
    names = layer_names(model)
    return {"source": source, "tokens": int(features.shape[0]), "routed": routed,
            "input": str(input) if input is not None else "random",
            "layers": [{"layer": names[id(layer)], **routing_stats(layer.last_routing)} for layer in layers]}


def _simulate(steps, out, experts, top_k, shared, router, capacity_factor, device, seed, plot, json, quiet,
              force) -> None:
    import dataclasses

    from dsfuse.engine import prepare_run_dir
    from dsfuse.models.moe import MoEModelConfig
    from dsfuse.moe_inspect import BALANCING, plot_balancing, simulate_balancing

    if steps < 1:
        raise UsageError(f"--simulate needs at least 1 step, got {steps}", "--simulate")
    if out is None:
        raise UsageError("--simulate needs --out RUN_DIR for its three runs", "--out")
    if router is not None:
        raise UsageError("--simulate compares the routers itself; leave out --router", "--router")
    base = MoEModelConfig()
    overrides = {"n_experts": experts, "top_k": top_k, "n_shared": shared, "capacity_factor": capacity_factor}
    base = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if base.top_k > base.n_experts:
        raise UsageError(f"--top-k {base.top_k} is larger than the number of experts ({base.n_experts})", "--top-k")
    for name in BALANCING:
        prepare_run_dir(out / name, resume=False, force=force)
    plot = plot or out / "imbalance.png"
    if plot.exists() and not force:
        raise UsageError("output exists; pass --force to overwrite it", plot)
    results = simulate_balancing(out, steps, device=device, seed=seed, quiet=quiet, base=base)
    plot_balancing(results, plot)
    summary = {name: {k: v for k, v in r.items() if k != "history"} for name, r in results.items()}
    if json:
        emit_json({"out": str(out), "steps": steps, "plot": str(plot), "config": dataclasses.asdict(base),
                   "results": summary})
        return
    print_table(f"moe-inspect --simulate {steps}: {base.n_experts} experts, top-{base.top_k}, skewed clusters "
                "(held-out set)", ["balancing", "MaxVio", "task loss", "accuracy", "run"],
                [(name, r["maxvio"], r["task_loss"], r["accuracy"], r["run_dir"]) for name, r in summary.items()])
    console.print(f"imbalance plot: {plot}")


def register(app: typer.Typer) -> None:
    app.command("moe-inspect")(moe_inspect)


def demo_steps(samples: Path, out: Path):
    from dsfuse.cli.demo import DemoStep

    sim = out / "moe-simulate"

    def summarize_inspect(records):
        layer = records[0]["layers"][0]
        return (f"{layer['experts']} experts top-{layer['top_k']}: MaxVio {layer['maxvio']:.2f}, "
                f"dropped {layer['dropped_assignments']}, entropy {layer['routing_entropy']:.2f}")

    def summarize_simulate(records):
        r = records[0]["results"]
        return ", ".join(f"{name} MaxVio {v['maxvio']:.2f} loss {v['task_loss']:.3f}" for name, v in r.items())

    def summarize_checkpoint(records):
        return ", ".join(f"{layer['layer']} MaxVio {layer['maxvio']:.2f}" for layer in records[0]["layers"])

    return [
        DemoStep("moe-inspect", ["moe-inspect", "--experts", "64", "--top-k", "6", "--tokens", "2048", "--plot",
                                 str(out / "moe-load.png")], summarize_inspect, [out / "moe-load.png"]),
        DemoStep("moe-inspect --simulate", ["moe-inspect", "--simulate", "40", "--out", str(sim)],
                 summarize_simulate, [sim]),
        DemoStep("moe-inspect checkpoint", ["moe-inspect", str(sim / "aux-free"), "--tokens", "2048", "--plot",
                                            str(out / "moe-checkpoint-load.png")], summarize_checkpoint,
                 [out / "moe-checkpoint-load.png"]),
    ]
