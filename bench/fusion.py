"""Fusion strategies, measured on generated audio-visual data: accuracy, parameters, speed.

Two tasks (dsfuse.data.av_synth): `xor` (motion direction XOR tone pitch: needs both modalities)
and `noisy-audio` (the label is the motion; the audio is pure noise). Each strategy trains the same
small tokenizers with its fusion on the shared engine; `none` (the video alone) is the unimodal
baseline, and late fusion, the one fusing strategy without any cross-modal interaction, is the
reference the others' costs are divided by.

    python bench/fusion.py                       # all strategies, small defaults (a few minutes on 2 cores)
    python bench/fusion.py --strategies early,late --xor-steps 400 --plot fusion.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsfuse import choices  # noqa: E402
from dsfuse.checkpoint import CheckpointMeta  # noqa: E402
from dsfuse.data.av_synth import AudioVisualSet  # noqa: E402
from dsfuse.device import seed_everything, select_device  # noqa: E402
from dsfuse.engine import TrainConfig, fit  # noqa: E402
from dsfuse.models.av_fusion import AVFusionClassifier, AVFusionConfig  # noqa: E402
from dsfuse.plots import save_figure, subplots  # noqa: E402
from dsfuse.report import console, print_table  # noqa: E402

STRATEGIES = choices.values(choices.Fusion)
REFERENCE = "late"


def av_loss(model, batch):
    logits = model(batch["video"], batch["audio"], batch["audio_mask"])
    return F.cross_entropy(logits, batch["label"])


@torch.no_grad()
def evaluate(model: AVFusionClassifier, data: AudioVisualSet, device: torch.device) -> dict[str, float]:
    """Held-out accuracy and, for gated fusion, the mean gate weight of each modality."""
    model.eval()
    logits = model(data.video.to(device), data.audio.to(device), data.audio_mask.to(device))
    out = {"accuracy": float((logits.argmax(-1).cpu() == data.labels).float().mean())}
    gates = model.fusion.gate_weights()
    if gates is not None:
        out["gate_video"], out["gate_audio"] = gates.mean(0).tolist()
    return out


@torch.no_grad()
def forward_ms(model: AVFusionClassifier, data: AudioVisualSet, device: torch.device, batch: int = 64,
               repeats: int = 10) -> float:
    """Median milliseconds of one inference forward pass on `batch` samples."""
    model.eval()
    args = (data.video[:batch].to(device), data.audio[:batch].to(device), data.audio_mask[:batch].to(device))
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first calls warm up allocators and kernels
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run_strategy(strategy: str, task: str, train: AudioVisualSet, test: AudioVisualSet, steps: int,
                 args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    seed_everything(args.seed)
    model = AVFusionClassifier(AVFusionConfig(fusion=strategy, dim=args.dim))
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, quiet=True, seed=args.seed,
                      log_every=max(steps // 10, 1))
    with tempfile.TemporaryDirectory(prefix=f"fusion-{strategy}-") as run_dir:
        result = fit(model, train, av_loss, cfg, run_dir, meta=CheckpointMeta.of("av-fusion", model.config),
                     device=device)
    return {"params": sum(p.numel() for p in model.parameters()), "train_s": result.seconds,
            "forward_ms": forward_ms(model, test, device), **evaluate(model, test, device)}


def plot(results: dict[str, dict[str, dict[str, float]]], strategies: list[str], path: Path) -> Path:
    """Held-out accuracy per task, the noise modality's gate weight, and cost against late fusion."""
    fig, (acc_ax, cost_ax) = subplots(1, 2, figsize=(12, 4))
    width = 0.38
    xs = range(len(strategies))
    for offset, task in ((-width / 2, "xor"), (width / 2, "noisy-audio")):
        acc_ax.bar([x + offset for x in xs], [results[task][s]["accuracy"] for s in strategies], width, label=task)
    acc_ax.axhline(0.9, color="black", linestyle="--", linewidth=1, label="target 0.9")
    acc_ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    acc_ax.set_xticks(list(xs), strategies, rotation=30)
    acc_ax.set_ylim(0, 1.05)
    acc_ax.set_ylabel("held-out accuracy")
    acc_ax.legend(fontsize=8, loc="lower right")
    acc_ax.set_title("accuracy per strategy")
    ref = results["xor"][REFERENCE] if REFERENCE in strategies else None
    for offset, key, label in ((-width / 2, "params", "parameters"), (width / 2, "forward_ms", "forward time")):
        values = [results["xor"][s][key] / (ref[key] if ref else 1) for s in strategies]
        cost_ax.bar([x + offset for x in xs], values, width, label=label)
    cost_ax.axhline(1.0, color="black", linewidth=1)
    cost_ax.set_xticks(list(xs), strategies, rotation=30)
    cost_ax.set_ylabel(f"x {REFERENCE} fusion" if ref else "absolute")
    cost_ax.legend(fontsize=8)
    cost_ax.set_title("cost, relative to late fusion")
    gated = results["noisy-audio"].get("gated")
    if gated and "gate_audio" in gated:
        fig.suptitle(f"fusion strategies on generated audio-visual data; gated fusion's mean gate on the "
                     f"noise modality: {gated['gate_audio']:.2f}")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated, from " + ", ".join(STRATEGIES))
    parser.add_argument("--train", type=int, default=1024, help="training pairs per task")
    parser.add_argument("--test", type=int, default=512, help="held-out pairs per task")
    parser.add_argument("--xor-steps", type=int, default=200)
    parser.add_argument("--noise-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--plot", type=Path, default=Path("fusion-bench.png"))
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        parser.error(f"unknown strategy {', '.join(unknown) or '(none)'}; choose from {', '.join(STRATEGIES)}")
    device = select_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # these models are tiny: a second thread only adds synchronisation

    results: dict[str, dict[str, dict[str, float]]] = {}
    for task, steps in (("xor", args.xor_steps), ("noisy-audio", args.noise_steps)):
        started = time.perf_counter()
        train = AudioVisualSet(task, args.train, seed=args.seed)
        test = AudioVisualSet(task, args.test, seed=args.seed + 10_000)
        console.print(f"{task}: generated {args.train} + {args.test} pairs in {time.perf_counter() - started:.1f}s")
        results[task] = {}
        for strategy in strategies:
            results[task][strategy] = r = run_strategy(strategy, task, train, test, steps, args, device)
            console.print(f"  {task:11s} {strategy:10s} accuracy {r['accuracy']:.3f}  train {r['train_s']:.1f}s")

    ref = {task: results[task].get(REFERENCE) for task in results}
    rows = []
    for s in strategies:
        xor, noisy = results["xor"][s], results["noisy-audio"][s]

        def ratio(key: str) -> str:
            return f"{xor[key] / ref['xor'][key]:.2f}x" if ref["xor"] else "-"

        rows.append([s, f"{xor['accuracy']:.3f}", f"{noisy['accuracy']:.3f}",
                     f"{noisy['gate_audio']:.3f}" if "gate_audio" in noisy else "-",
                     f"{xor['params']:,}", ratio("params"), f"{xor['forward_ms']:.2f}", ratio("forward_ms"),
                     f"{xor['train_s']:.1f}", ratio("train_s")])
    print_table(f"fusion strategies on {device} (xor: {args.xor_steps} steps, noisy-audio: {args.noise_steps} "
                f"steps, batch {args.batch_size}; ratios against {REFERENCE} fusion, same run)",
                ["fusion", "xor", "noisy", "gate", "params", "/late", "fwd ms", "/late", "train s", "/late"], rows)
    console.print("xor, noisy: held-out accuracy per task; gate: gated fusion's mean gate on the noise audio; "
                  "fwd ms: one forward pass on 64 pairs; train s: the xor run")
    console.print(f"plot: {plot(results, strategies, args.plot)}")


if __name__ == "__main__":
    main()
