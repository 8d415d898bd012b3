"""Plots a person would rather look at than read: training curves, confusion matrices, MoE loads.

`subplots` gives a figure on the headless backend for plots of one's own (a bench's), `save_figure`
writes it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dsfuse.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """`matplotlib.pyplot.subplots` on the headless backend: (figure, axes)."""
    return _pyplot().subplots(*args, **kwargs)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) for `key`, looking inside nested dicts such as {"eval": {...}} too."""
    steps, values = [], []
    for r in records:
        source = r if key in r else r.get("eval", {})
        if isinstance(source, Mapping) and isinstance(source.get(key), (int, float)):
            steps.append(r["step"])
            values.append(float(source[key]))
    return steps, values


def plot_curves(records: Sequence[Mapping[str, Any]], keys: Sequence[str], path: str | Path,
                title: str = "training", log_keys: Sequence[str] = ("loss",)) -> Path:
    """One panel per metric in `keys`, against the training step."""
    present = [k for k in keys if _series(records, k)[0]]
    fig, axes = subplots(1, max(len(present), 1), figsize=(4.2 * max(len(present), 1), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        steps, values = _series(records, key)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key in log_keys and all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_confusion(matrix, labels: Sequence[str], path: str | Path, title: str = "confusion matrix") -> Path:
    """A confusion-matrix heatmap with counts (rows: true, columns: predicted)."""
    import numpy as np

    m = np.asarray(matrix)
    size = max(3.5, 0.55 * len(labels) + 2)
    fig, ax = subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black", fontsize=8)
    ax.set_title(title)
    return save_figure(fig, path)


def plot_bars(values: Sequence[float], labels: Sequence[str], path: str | Path, title: str, xlabel: str = "",
              ylabel: str = "") -> Path:
    """One bar per value, labelled."""
    fig, ax = subplots(figsize=(max(4.0, 0.45 * len(values) + 1.5), 3.2))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    return save_figure(fig, path)


def plot_load_heatmap(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """MoE routing: one row per layer (`layer`, `load`, `mean_load`), one column per expert: load / mean load."""
    import numpy as np

    matrix = np.array([np.array(r["load"], dtype=float) / max(r["mean_load"], 1e-9) for r in rows])
    fig, ax = subplots(figsize=(min(2 + 0.18 * matrix.shape[1], 16), 1.2 + 0.45 * len(rows)))
    image = ax.imshow(matrix, aspect="auto", cmap="magma", vmin=0)
    ax.set_yticks(range(len(rows)), [r["layer"] for r in rows])
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, label="load / mean load")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_sparse_pattern(layers: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """DeepSeek-V4's compressed attention over the context: per layer (`layer`, `type`, `pattern` [queries,
    rows] of 0/1, `outside_window`), which compressed rows each query attended to (CSA: the indexer's picks;
    HCA: every closed row)."""
    fig, axes = subplots(1, len(layers), figsize=(1 + 3.6 * len(layers), 4.2), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        ax.imshow(layer["pattern"], aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        kind = "CSA" if layer["type"] == "compressed_sparse_attention" else "HCA"
        ax.set_title(f"{layer['layer']} {kind}: {100 * layer['outside_window']:.1f}% of mass outside the window",
                     fontsize=8)
        ax.set_xlabel("compressed row")
        ax.set_ylabel("query token")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_route_compare(rows: Sequence[Mapping[str, Any]], path: str | Path, name_a: str, name_b: str) -> Path:
    """Two texts through one model: the Jensen-Shannon divergence of each layer's expert shares (left),
    and share(A) - share(B) per layer and expert (right: red experts prefer A, blue prefer B)."""
    import numpy as np

    matrix = np.array([r["share_difference"] for r in rows])
    fig, (bars, heat) = subplots(1, 2, figsize=(min(6 + 0.18 * matrix.shape[1], 18), 1.6 + 0.45 * len(rows)),
                                 gridspec_kw={"width_ratios": [1, 3]})
    names = [r["layer"] for r in rows]
    bars.barh(range(len(rows)), [r["divergence"] for r in rows], color="tab:purple")
    bars.set_yticks(range(len(rows)), names)
    bars.invert_yaxis()
    bars.set_xlabel("JS divergence (bits)")
    limit = max(float(np.abs(matrix).max()), 1e-9)
    image = heat.imshow(matrix, aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit)
    heat.set_yticks([])
    heat.set_xlabel("expert")
    fig.colorbar(image, ax=heat, label="share A - share B")
    fig.suptitle(f"expert preference: A = {name_a}, B = {name_b}")
    return save_figure(fig, path)


def plot_balancing(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """MaxVio of each training batch against the step, one line per balancing method (its `history`)."""
    fig, ax = subplots(figsize=(6.5, 3.6))
    for name, r in results.items():
        ax.plot([h["step"] for h in r["history"]], [h["maxvio"] for h in r["history"]],
                label=f"{name}: eval MaxVio {r['maxvio']:.2f}, loss {r['task_loss']:.3f}")
    ax.axhline(0.3, color="grey", linestyle="--", linewidth=0.8, label="MaxVio 0.3")
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio of the training batch")
    ax.set_title("load imbalance while training on skewed clusters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
