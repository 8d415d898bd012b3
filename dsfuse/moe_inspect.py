"""What `moe-inspect` computes: routing statistics of MoE layers, and the load-balancing simulation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from dsfuse.nn.moe import MoE, RoutingRecord, moe_aux_loss, moe_layers

# The three ways of balancing --simulate compares (overrides of MoEModelConfig).
BALANCING = {
    "aux-loss": {"router": "topk", "balance_weight": 0.01},
    "aux-free": {"router": "aux-free", "balance_weight": 0.0},
    "none": {"router": "topk", "balance_weight": 0.0},
}


def max_violation(load: torch.Tensor) -> float:
    """MaxVio (DeepSeek-V3): max load / mean load - 1; 0 when perfectly even."""
    load = load.float()
    return float(load.max() / load.mean().clamp_min(1e-9) - 1)


def frequent_pairs(expert_ids: torch.Tensor, n_experts: int, top: int = 5) -> list[dict[str, Any]]:
    """The expert pairs most often chosen together for one token."""
    k = expert_ids.shape[1]
    if k < 2:
        return []
    first, second = torch.combinations(torch.arange(k, device=expert_ids.device), 2).T
    a, b = expert_ids[:, first], expert_ids[:, second]
    codes = (torch.minimum(a, b) * n_experts + torch.maximum(a, b)).flatten()
    counts = torch.bincount(codes, minlength=n_experts * n_experts)
    values, codes = counts.topk(min(top, int((counts > 0).sum())))
    return [{"experts": [int(c) // n_experts, int(c) % n_experts], "count": int(v)} for v, c in zip(values, codes)]


def routing_stats(record: RoutingRecord) -> dict[str, Any]:
    """Per-expert load, imbalance, drops, entropy, losses and frequent pairs of one layer's last forward."""
    n_tokens, n_experts = record.probs.shape
    load = record.load.float()
    entropy = -(record.probs * record.probs.clamp_min(1e-12).log()).sum(-1).mean()
    dropped_tokens = int((~record.kept).all(-1).sum()) if record.kept is not None else 0
    return {
        "tokens": n_tokens,
        "experts": n_experts,
        "top_k": record.expert_ids.shape[1],
        "load": record.load.tolist(),
        "max_load": int(load.max()),
        "mean_load": float(load.mean()),
        "max_over_mean": float(load.max() / load.mean().clamp_min(1e-9)),
        "maxvio": max_violation(load),
        "dropped_assignments": int(record.demand.sum() - record.load.sum()),
        "dropped_tokens": dropped_tokens,
        "routing_entropy": float(entropy),
        "routing_entropy_max": float(np.log(n_experts)),
        "balance_loss": float(record.losses["balance"]),
        "z_loss": float(record.losses["z"]),
        "top_pairs": frequent_pairs(record.expert_ids, n_experts),
    }


def layer_names(model: nn.Module) -> dict[int, str]:
    """id(MoE layer) -> its dotted name in the model."""
    return {id(m): name or "moe" for name, m in model.named_modules() if isinstance(m, MoE)}


def plot_load_heatmap(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """One row per layer, one column per expert: load / mean load."""
    from dsfuse.plots import _pyplot, save_figure

    plt = _pyplot()
    matrix = np.array([np.array(r["load"], dtype=float) / max(r["mean_load"], 1e-9) for r in rows])
    fig, ax = plt.subplots(figsize=(min(2 + 0.18 * matrix.shape[1], 16), 1.2 + 0.45 * len(rows)))
    image = ax.imshow(matrix, aspect="auto", cmap="magma", vmin=0)
    ax.set_yticks(range(len(rows)), [r["layer"] for r in rows])
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, label="load / mean load")
    ax.set_title(title)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- simulation

def model_max_violation(model: nn.Module) -> float:
    """The worst MaxVio over a model's MoE layers in their last forward."""
    return max(max_violation(layer.last_routing.load) for layer in moe_layers(model))


def cluster_task_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    """Cross-entropy of each token's cluster plus every MoE layer's auxiliary losses."""
    tokens, labels = batch
    logits = model(tokens)
    task = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    return task + moe_aux_loss(model), {"task_loss": task.item(), "maxvio": model_max_violation(model)}


def simulate_balancing(out: Path, steps: int, *, device: torch.device, seed: int, quiet: bool,
                       base: Any, batch_size: int = 64, seq_len: int = 16, n_seqs: int = 4096, skew: float = 1.0,
                       noise: float = 1.0) -> dict[str, Any]:
    """Train the same MoE classifier with each of BALANCING on skewed clusters; one run dir each."""
    from dsfuse.data.clusters import skewed_cluster_tokens

    rng = np.random.default_rng(seed)
    tokens, labels, centers = skewed_cluster_tokens(n_seqs, seq_len, base.in_dim, base.n_classes, rng, skew, noise)
    held_tokens, held_labels, _ = skewed_cluster_tokens(256, seq_len, base.in_dim, base.n_classes, rng, skew, noise,
                                                        centers=centers)
    dataset = TensorDataset(torch.from_numpy(tokens), torch.from_numpy(labels))
    held = (torch.from_numpy(held_tokens).to(device), torch.from_numpy(held_labels).to(device))

    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        logits = model(held[0])
        return {"task_loss": float(F.cross_entropy(logits.flatten(0, 1), held[1].flatten())),
                "accuracy": float((logits.argmax(-1) == held[1]).float().mean()),
                "maxvio": model_max_violation(model)}

    threads = torch.get_num_threads()
    if device.type == "cpu":  # matrices this small lose more to thread hand-offs than they gain
        torch.set_num_threads(1)
    try:
        return {name: _train_balanced(dataclasses.replace(base, **overrides), name, dataset, evaluate, out / name,
                                      steps, batch_size, device, seed, quiet)
                for name, overrides in BALANCING.items()}
    finally:
        torch.set_num_threads(threads)


def _train_balanced(cfg: Any, name: str, dataset: TensorDataset, evaluate: Any, run_dir: Path, steps: int,
                    batch_size: int, device: torch.device, seed: int, quiet: bool) -> dict[str, Any]:
    """One training run of the simulation: its final held-out numbers and the MaxVio of logged steps."""
    from dsfuse.device import seed_everything
    from dsfuse.engine import TrainConfig, fit, read_metrics
    from dsfuse.models.moe import MoEClassifier

    seed_everything(seed)
    model = MoEClassifier(cfg)
    train = TrainConfig(steps=steps, batch_size=batch_size, lr=3e-3, warmup_steps=min(20, steps // 10),
                        log_every=max(1, steps // 50), eval_every=max(1, steps // 10), quiet=quiet, seed=seed,
                        amp=False)
    result = fit(model, dataset, cluster_task_loss, train, run_dir, kind="moe", config=cfg, device=device,
                 evaluate=evaluate, extra_meta={"task": "skewed clusters", "balancing": name})
    return {"run_dir": str(run_dir), "maxvio": result.metrics["eval_maxvio"],
            "task_loss": result.metrics["eval_task_loss"], "accuracy": result.metrics["eval_accuracy"],
            "history": [{"step": r["step"], "maxvio": r["maxvio"]} for r in read_metrics(run_dir) if "maxvio" in r]}


def plot_balancing(results: dict[str, Any], path: str | Path) -> Path:
    """MaxVio of each training batch against the step, one line per balancing method."""
    from dsfuse.plots import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, r in results.items():
        steps = [h["step"] for h in r["history"]]
        ax.plot(steps, [h["maxvio"] for h in r["history"]],
                label=f"{name}: eval MaxVio {r['maxvio']:.2f}, loss {r['task_loss']:.3f}")
    ax.axhline(0.3, color="grey", linestyle="--", linewidth=0.8, label="MaxVio 0.3")
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio of the training batch")
    ax.set_title("load imbalance while training on skewed clusters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- inputs

def load_feature_file(path: Path) -> torch.Tensor:
    """Token features from a .npy array or a one-tensor .safetensors file: [N, D] (or [..., D], flattened)."""
    from dsfuse.errors import UsageError

    if not path.is_file():
        raise UsageError("input file not found", path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise UsageError(f"expected one tensor in the file, found {len(tensors)}: "
                                 f"{', '.join(sorted(tensors)) or 'none'}", path)
            array = next(iter(tensors.values()))
        else:
            raise UsageError("expected a tensor file (.npy or .safetensors, [N, D] features)", path)
    except UsageError:
        raise
    except Exception as e:  # a damaged or foreign file is the user's to fix
        raise UsageError(f"cannot read tensor file ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                         path) from None
    if array.ndim < 2 or array.numel() == 0 or array.is_complex():
        raise UsageError(f"expected features of shape [N, D], got {list(array.shape)}", path)
    return array.reshape(-1, array.shape[-1]).float()


def route_features(model: nn.Module, features: torch.Tensor) -> str:
    """Send features through `model`: a whole MoE classifier when the width is its input width, else
    straight into every MoE layer (which must all have that width). Returns how it was routed."""
    from dsfuse.errors import UsageError
    from dsfuse.models.moe import MoEClassifier

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
