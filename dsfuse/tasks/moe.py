"""Mixture-of-Experts: how routing spreads tokens over experts (a fresh layer, or every MoE layer of a
checkpoint), and training one small MoE classifier with each way of balancing its load.

The training runs on tokens in skewed clusters (`data.clusters`): without balancing, the popular
clusters pile onto a few experts. Each balancing method gets its own run, `OUT/<balancing>`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from dsfuse import choices
from dsfuse.checkpoint import CheckpointMeta, build_model, load_checkpoint, resolve_checkpoint
from dsfuse.choices import Balancing, Router
from dsfuse.data.clusters import skewed_cluster_tokens
from dsfuse.data.features import read_features
from dsfuse.device import check_memory, seed_everything
from dsfuse.engine import TrainConfig, TrainResult, fit, read_metrics
from dsfuse.errors import InputError, UsageError
from dsfuse.io import check_writable
from dsfuse.metrics import max_violation, routing_stats
from dsfuse.models.moe import MoEClassifier, MoEModelConfig
from dsfuse.models.unified import UnifiedModel
from dsfuse.nn.moe import MoE, MoEConfig, moe_aux_loss, moe_layers
from dsfuse.plots import plot_balancing, plot_load_heatmap
from dsfuse.runs import STATE_FILE, TrainOptions, prepare_run_dir, resume_options
from dsfuse.tasks.unified import modality_load

TASK = "moe"
KIND = "moe"
PLOT = "imbalance.png"

# How each way of balancing sets up the model (overrides of MoEModelConfig).
BALANCING: dict[Balancing, dict[str, Any]] = {
    "aux-loss": {"router": "topk", "balance_weight": 0.01},
    "aux-free": {"router": "aux-free", "balance_weight": 0.0},
    "none": {"router": "topk", "balance_weight": 0.0},
}


# --------------------------------------------------------------------------- inspection

@dataclass(kw_only=True)
class LayerOptions:
    """The fresh layer moe-inspect routes through when it has no checkpoint (None: the default), and the
    capacity that overrides a checkpoint's."""

    experts: int | None = None
    top_k: int | None = None
    shared: int | None = None
    router: Router | None = None
    capacity_factor: float | None = None
    dropless: bool = False
    dim: int | None = None
    hidden: int = 128

    def check(self) -> None:
        if self.dropless and self.capacity_factor is not None:
            raise UsageError("--dropless and --capacity-factor exclude each other", "--dropless")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise UsageError(f"--capacity-factor must be positive, got {self.capacity_factor} (use --dropless for "
                             "no capacity limit)", "--capacity-factor")
        check_top_k(self.top_k, self.experts)

    def fresh_only(self) -> dict[str, Any]:
        """The options that shape a fresh layer, by flag."""
        return {"--experts": self.experts, "--top-k": self.top_k, "--shared": self.shared, "--router": self.router,
                "--dim": self.dim}

    def layer(self, width: int) -> MoE:
        cfg = MoEConfig(dim=width, n_experts=self.experts or 64, top_k=self.top_k or 6,
                        n_shared=2 if self.shared is None else self.shared, expert_hidden=self.hidden,
                        router=self.router or "topk", capacity_factor=self.capacity(1.25))
        return MoE(cfg)

    def capacity(self, default: float) -> float:
        return 0.0 if self.dropless else self.capacity_factor or default


def check_top_k(top_k: int | None, experts: int | None) -> None:
    if experts is not None and top_k is not None and top_k > experts:
        raise UsageError(f"--top-k {top_k} is larger than the number of experts ({experts})", "--top-k")


def inspect_routing(checkpoint: Path | None, options: LayerOptions, *, features_file: Path | None = None,
                    tokens: int = 4096, device: torch.device, plot: Path | None = None, force: bool = False
                    ) -> dict[str, Any]:
    """Route tokens (random, or `features_file`) through a fresh layer or every MoE layer of `checkpoint`;
    the routing statistics of each layer, and a load heatmap in `plot`."""
    options.check()
    check_plot(plot, force)
    features = input_features(features_file) if features_file is not None else None
    if checkpoint is not None:
        model, source = checkpoint_model(checkpoint, options, device)
    else:
        model = options.layer(options.dim or (features.shape[-1] if features is not None else 256)).to(device).eval()
        cfg = model.cfg
        source = f"a fresh layer ({cfg.router}, {cfg.n_experts} experts, top-{cfg.top_k}, {cfg.n_shared} shared)"
    layers = moe_layers(model)
    for layer in layers:
        layer.cfg.capacity_factor = options.capacity(layer.cfg.capacity_factor)
    by_modality = None
    if features is None and isinstance(model, UnifiedModel):  # its own text and image tokens, not random ones
        by_modality = modality_load(model, checkpoint)
        routed, what = "the run's probe sequences through the whole model", "probe"
    else:
        if features is None:
            width = input_width(model, layers)
            check_memory(routing_bytes(tokens, width, layers), device, f"routing {tokens:,} tokens", "--tokens")
            features = torch.randn(tokens, width)
        routed = route_features(model, features.to(device))
        what = str(features_file) if features_file is not None else "random"
    names = layer_names(model)
    result = {"source": source, "tokens": int(layers[0].last_routing.probs.shape[0]), "routed": routed,
              "input": what, "layers": [{"layer": names[id(layer)], **routing_stats(layer.last_routing)}
                                        for layer in layers]}
    if by_modality is not None:
        for record, modality in zip(result["layers"], by_modality):
            record["modality"] = modality
    if plot is not None:
        result["plot"] = str(plot_load_heatmap(result["layers"], plot, f"expert load, {source}"))
    return result


def input_features(path: Path) -> torch.Tensor:
    """The tokens of `--input`: one file the whole command rests on, so a bad one is a usage error."""
    try:
        return read_features(path).tokens
    except InputError as e:
        raise UsageError(e.what, e.where) from None


def routing_bytes(tokens: int, width: int, layers: list[MoE]) -> int:
    """About the memory routing `tokens` takes (float32): the tokens, a copy per chosen expert and the
    router scores; measured at 5.8 KB a token for 64 experts top-6 at width 256, this says 7.7 KB."""
    per_token = max((1 + layer.cfg.top_k) * max(width, layer.cfg.dim) + 2 * layer.cfg.n_experts for layer in layers)
    return 4 * tokens * per_token


def check_plot(plot: Path | None, force: bool) -> None:
    if plot is not None:
        check_writable(plot, force)
        if plot.suffix.lower() != ".png":
            raise UsageError("the plot is a PNG: give a path ending in .png", plot)


def checkpoint_model(checkpoint: Path, options: LayerOptions, device: torch.device) -> tuple[nn.Module, str]:
    """The model of a checkpoint with MoE layers, and how to name it."""
    given = [flag for flag, value in options.fresh_only().items() if value is not None]
    if given:
        raise UsageError(f"{given[0]} shapes a fresh layer; a checkpoint brings its own", given[0])
    model, meta = load_checkpoint(checkpoint, device=device)
    if not moe_layers(model):
        raise UsageError(f"the checkpoint ({meta.kind!r} model) has no MoE layer", resolve_checkpoint(checkpoint))
    return model, f"{meta.kind} checkpoint {checkpoint}"


def input_width(model: nn.Module, layers: list[MoE]) -> int:
    """The width of random tokens for `model`: a classifier's input width, else its layers' one width."""
    if isinstance(model, MoEClassifier):
        return model.config.in_dim
    if len({layer.cfg.dim for layer in layers}) > 1:
        raise UsageError("the MoE layers differ in width: give --input features for one of them", "--input")
    return layers[0].cfg.dim


def route_features(model: nn.Module, features: torch.Tensor) -> str:
    """Send features through `model`: a whole MoE classifier when the width is its input width, else
    straight into every MoE layer (which must all have that width). Returns how it was routed."""
    width = features.shape[-1]
    with torch.no_grad():
        if isinstance(model, MoEClassifier) and width == model.config.in_dim:
            model(features[None])
            return "through the whole model"
        for layer in moe_layers(model):
            if layer.cfg.dim != width:
                expected = f"{layer.cfg.dim}" + (f" (or the model's input width {model.config.in_dim})"
                                                  if isinstance(model, MoEClassifier) else "")
                raise UsageError(f"features have width {width}, the MoE layer expects {expected}", "--input")
            layer(features)
    return "into every MoE layer"


def layer_names(model: nn.Module) -> dict[int, str]:
    """id(MoE layer) -> its dotted name in the model."""
    return {id(m): name or "moe" for name, m in model.named_modules() if isinstance(m, MoE)}


# --------------------------------------------------------------------------- training with each balancing

@dataclass(kw_only=True)
class MoETrainOptions(TrainOptions):
    """What `train-moe` takes: the model's shape (its other settings are MoEModelConfig's defaults)."""

    experts: int = 16
    top_k: int = 2
    shared: int = 1
    capacity_factor: float = 0.0

    def model_config(self, balancing: Balancing) -> MoEModelConfig:
        check_top_k(self.top_k, self.experts)
        return MoEModelConfig(n_experts=self.experts, top_k=self.top_k, n_shared=self.shared,
                              capacity_factor=self.capacity_factor, **BALANCING[balancing])


def train(options: MoETrainOptions, out: Path, *, resume: bool, force: bool, explicit: Collection[str],
          device: torch.device, quiet: bool) -> tuple[TrainResult, dict[str, Any]]:
    """Train the same MoE classifier with each way of balancing (a run each in OUT/<balancing>), and plot
    MaxVio over training into OUT/imbalance.png. An interrupted run stops the rest; --resume goes on."""
    names = choices.values(Balancing)
    metas = {}
    for name in names:
        if resume and (name == names[0] or (out / name / STATE_FILE).exists()):
            options, metas[name] = resume_options(options, out / name, KIND, explicit)
    configs = {name: options.model_config(name) for name in names}
    train_cfg = TrainConfig.of(options, log_every=max(1, options.steps // 50), quiet=quiet,
                               precision=options.precision or "fp32")  # routing in fp32 unless asked
    check_writable(out / PLOT, force or resume)  # before anything is made: a refusal leaves OUT as it was
    run_dirs = {name: prepare_run_dir(out / name, name in metas, force) for name in names}
    dataset, held_out = cluster_data(configs[names[0]], options.seed, device)
    outcomes, runs = {}, []
    for name in names:
        outcomes[name], run = train_balanced(configs[name], metas.get(name), dataset, held_out, run_dirs[name],
                                             train_cfg, device, options)
        runs.append(run)
        if run.interrupted:
            break
    summary = {"experts": options.experts, "top_k": options.top_k,
               "results": {name: {k: v for k, v in o.items() if k != "history"} for name, o in outcomes.items()}}
    if not runs[-1].interrupted:
        summary["plot"] = str(plot_balancing(outcomes, out / PLOT))
    result = TrainResult(out, min(run.step for run in runs), interrupted=runs[-1].interrupted,
                         seconds=sum(run.seconds for run in runs))
    return result, summary


def cluster_data(cfg: MoEModelConfig, seed: int, device: torch.device, n_seqs: int = 4096, seq_len: int = 16,
                 skew: float = 1.0, noise: float = 1.0) -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    """Training sequences of tokens in skewed clusters (the label: each token's cluster), and 256 held out."""
    rng = np.random.default_rng(seed)
    tokens, labels, centers = skewed_cluster_tokens(n_seqs, seq_len, cfg.in_dim, cfg.n_classes, rng, skew, noise)
    held_tokens, held_labels, _ = skewed_cluster_tokens(256, seq_len, cfg.in_dim, cfg.n_classes, rng, skew, noise,
                                                        centers=centers)
    held = (torch.from_numpy(held_tokens).to(device), torch.from_numpy(held_labels).to(device))
    return TensorDataset(torch.from_numpy(tokens), torch.from_numpy(labels)), held


def model_max_violation(model: nn.Module) -> float:
    """The worst MaxVio over a model's MoE layers in their last forward."""
    return max(max_violation(layer.last_routing.load) for layer in moe_layers(model))


def cluster_task_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    """Cross-entropy of each token's cluster plus every MoE layer's auxiliary losses."""
    tokens, labels = batch
    logits = model(tokens)
    task = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    return task + moe_aux_loss(model), {"task_loss": task.item(), "maxvio": model_max_violation(model)}


def held_out_evaluator(held: tuple[torch.Tensor, torch.Tensor]):
    """evaluate(model, step): task loss, accuracy and MaxVio on the held-out sequences."""
    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        logits = model(held[0])
        return {"task_loss": float(F.cross_entropy(logits.flatten(0, 1), held[1].flatten())),
                "accuracy": float((logits.argmax(-1) == held[1]).float().mean()),
                "maxvio": model_max_violation(model)}

    return evaluate


def train_balanced(cfg: MoEModelConfig, meta: CheckpointMeta | None, dataset: TensorDataset,
                   held: tuple[torch.Tensor, torch.Tensor], run_dir: Path, train_cfg: TrainConfig,
                   device: torch.device, options: MoETrainOptions) -> tuple[dict[str, Any], TrainResult]:
    """One run (resumed when `meta` is its checkpoint record): its final held-out numbers and the MaxVio
    of the logged training batches, and the engine's result."""
    seed_everything(options.seed)
    model = build_model(meta) if meta is not None else MoEClassifier(cfg)
    threads = torch.get_num_threads()
    if device.type == "cpu":  # matrices this small lose more to thread hand-offs than they gain
        torch.set_num_threads(1)
    try:
        result = fit(model, dataset, cluster_task_loss, train_cfg, run_dir,
                     meta=CheckpointMeta.of(KIND, cfg, options=options.record()), device=device,
                     resume=meta is not None, evaluate=held_out_evaluator(held))
    finally:
        torch.set_num_threads(threads)
    history = [{"step": r["step"], "maxvio": r["maxvio"]} for r in read_metrics(run_dir) if "maxvio" in r]
    return {"run_dir": str(run_dir), "maxvio": result.metrics.get("eval_maxvio"),
            "task_loss": result.metrics.get("eval_task_loss"), "accuracy": result.metrics.get("eval_accuracy"),
            "history": history}, result
