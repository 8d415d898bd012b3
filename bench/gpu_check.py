"""The GPU check a maintainer runs whenever a GPU is at hand (at most ~8 minutes on one GPU): every
trainer for a few dozen steps under CUDA with bf16 and with fp16 (GradScaler), `sample` with every
sampler, the MoE and attention benches, and the local LLM's decode, each with its time and peak GPU
memory, as one table and one JSON file. Exit 1 if anything failed.

It runs unchanged on CPU (`--device cpu`, tiny sizes by default there, so CI smoke-tests it): what a
CPU cannot run (fp16) or this machine lacks (the local LLM's package) is listed as skipped, with why.

    python bench/gpu_check.py                              # CUDA, full sizes; gpu_check.json
    python bench/gpu_check.py --device cpu --only train-moe,sample --json /tmp/check.json
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's dsfuse, not an installed one

from dsfuse import choices
from dsfuse.device import select_device
from dsfuse.report import console, print_table

TRAINERS = ("train-vqvae", "train-ddpm", "train-compressor", "train-moe", "classify-video train",
            "audio-emotion train")
OTHERS = ("sample", "moe bench", "attention bench", "llm decode")


@dataclass
class Check:
    name: str
    seconds: float = 0.0
    peak_mib: float | None = None
    status: str = "ok"  # ok, failed, skipped
    detail: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sizes:
    """How big each check runs: tiny on CPU (a smoke test), a few dozen real steps on a GPU."""

    steps: int
    image: int
    width: int
    batch: int
    sample_steps: int

    @classmethod
    def of(cls, tiny: bool) -> Sizes:
        return cls(steps=3, image=16, width=8, batch=4, sample_steps=4) if tiny else \
            cls(steps=40, image=64, width=64, batch=32, sample_steps=50)


class Runner:
    """Runs each check, timing it and measuring its peak GPU memory; a failure is recorded, not raised."""

    def __init__(self, device: torch.device, only: set[str] | None):
        self.device, self.only, self.checks = device, only, []

    def wanted(self, group: str) -> bool:
        return self.only is None or group in self.only

    def skip(self, name: str, why: str) -> None:
        self.checks.append(Check(name, status="skipped", detail=why))

    def run(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        check = Check(name)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        try:
            check.numbers = fn() or {}
        except SystemExit as e:  # a bench's argparse or exit code
            if e.code not in (0, None):
                check.status, check.detail = "failed", f"exit {e.code}"
        except Exception as e:  # recorded, and the check goes on
            check.status, check.detail = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc(file=sys.stderr)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            check.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        check.seconds = time.perf_counter() - started
        self.checks.append(check)
        console.print(f"{check.status:7} {name} ({check.seconds:.2f} s) {check.detail}", markup=False)


# --------------------------------------------------------------------------- the trainers

def trainer_runs(work: Path, sizes: Sizes, device: torch.device) -> dict[str, Callable[[str, Path], Any]]:
    """Each trainer as `train(precision, out) -> result`, on data made under `work` when first needed."""
    from dsfuse.tasks import compression, diffusion, moe, speech_emotion, tokenizer, video

    images = ROOT / "samples" / "images"
    common = {"steps": sizes.steps, "batch_size": sizes.batch, "eval_every": 0}
    quiet = {"resume": False, "force": True, "explicit": (), "quiet": True}

    def vqvae(precision: str, out: Path) -> Any:
        return tokenizer.train(tokenizer.TokenizerOptions(
            data=images, image_size=max(sizes.image, 32), downsample=8, codebook_size=64, base_channels=sizes.width,
            latent_channels=4, lr=1e-3, precision=precision, **common), out, device=str(device), **quiet)

    def ddpm(precision: str, out: Path) -> Any:
        return diffusion.train(diffusion.DiffusionOptions(
            data=images, image_size=sizes.image, base_channels=sizes.width, channel_mults=(1, 2), res_blocks=1,
            attention=(sizes.image // 2,), sample_every=0, lr=1e-3, precision=precision, **common), out,
            device=str(device), **quiet)

    def compressor(precision: str, out: Path) -> Any:
        tokenizer_run = work / "vq-for-compressor"
        if not (tokenizer_run / "model.safetensors").exists():
            vqvae("fp32", tokenizer_run)
        return compression.train(compression.CompressorOptions(
            data=images, checkpoint=tokenizer_run, width=16, depth=1, views=16, lr=1e-3, precision=precision,
            **common), out, device=device, **quiet)

    def mixture(precision: str, out: Path) -> Any:
        return moe.train(moe.MoETrainOptions(experts=8, top_k=2, lr=3e-3, precision=precision, **common), out,
                         device=device, **quiet)

    def videos(precision: str, out: Path) -> Any:
        data = work / "videos"
        if not data.exists():
            video.make_dataset(data, per_class=3, frames=8, size=32, fps=8.0, audio=False, seed=0, force=False,
                               quiet=True)
        return video.train(video.VideoTrainOptions(
            data=data, backbone="small3d", pretrained=False, frames=None, fps=None, held_out=0.34, fusion="none",
            lr=2e-3, precision=precision, **common), out, device=str(device), **quiet)

    def speech(precision: str, out: Path) -> Any:
        data = work / "speech"
        if not data.exists():
            speech_emotion.make_synthetic(data, voices=3, sentences=3, heldout_voices=1, heldout_sentences=1,
                                          emotions=["neutral", "happy", "sad", "angry"], transcripts=False, seed=0,
                                          force=False, quiet=True)
        return speech_emotion.train(speech_emotion.SpeechEmotionOptions(
            data=data / "train", heldout=data / "heldout", dim=32, depth=1, lr=1e-3, precision=precision, **common),
            out, device=device, **quiet)

    return {"train-vqvae": vqvae, "train-ddpm": ddpm, "train-compressor": compressor, "train-moe": mixture,
            "classify-video train": videos, "audio-emotion train": speech}


def precisions(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The precisions to train in on `device`, and those skipped with why."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return ["bf16", "fp16"], {}
        return ["fp16"], {"bf16": "this GPU has no bf16"}
    return ["fp32", "bf16"], {"fp16": f"fp16 (GradScaler) needs CUDA, not {device.type}"}


def check_trainers(runner: Runner, work: Path, sizes: Sizes) -> Path | None:
    """Every trainer in every precision; the train-ddpm run (for `sample`), if one finished."""
    runs = trainer_runs(work, sizes, runner.device)
    wanted, skipped = precisions(runner.device)
    ddpm_run = None
    for name in TRAINERS:
        if not runner.wanted(name):
            continue
        for precision, why in skipped.items():
            runner.skip(f"{name} {precision}", why)
        for precision in wanted:
            out = work / "runs" / f"{name.replace(' ', '-')}-{precision}"

            def train(name: str = name, precision: str = precision, out: Path = out) -> dict[str, Any]:
                result, summary = runs[name](precision, out)
                loss = result.metrics.get("loss")
                return {"steps": result.step, "loss": loss, "s/step": result.seconds / max(result.step, 1)}

            runner.run(f"{name} {precision}", train)
            if name == "train-ddpm" and (out / "model.safetensors").exists():
                ddpm_run = out
    return ddpm_run


# --------------------------------------------------------------------------- the rest

def check_sampling(runner: Runner, work: Path, sizes: Sizes, ddpm_run: Path | None) -> None:
    from dsfuse.tasks import diffusion

    for sampler in choices.values(choices.Sampler):
        name = f"sample {sampler}"
        if ddpm_run is None:
            runner.skip(name, "no train-ddpm run to sample from (select train-ddpm too)")
            continue
        steps = sizes.sample_steps if sampler != "ddpm" else max(sizes.sample_steps, 10)
        runner.run(name, lambda sampler=sampler, steps=steps: diffusion.sample(
            ddpm_run, work / f"samples-{sampler}.png", diffusion.SampleOptions(n=8, sampler=sampler, steps=steps),
            device=str(runner.device), quiet=True, force=True))


def run_bench(script: str, argv: list[str]) -> None:
    """A bench script of this folder, run in this process (so its GPU memory is measured)."""
    saved = sys.argv
    sys.argv = [script, *argv]
    try:
        runpy.run_path(str(ROOT / "bench" / script), run_name="__main__")
    finally:
        sys.argv = saved


def check_benches(runner: Runner, tiny: bool) -> None:
    device = str(runner.device)
    if runner.wanted("moe bench"):
        moe_size = ["--tokens", "256", "--dim", "32", "--hidden", "16", "--experts", "8", "--top-k", "2",
                    "--rounds", "1"] if tiny else ["--rounds", "3"]
        runner.run("moe bench", lambda: run_bench("moe.py", [*moe_size, "--device", device]))
    if runner.wanted("attention bench"):
        attention_size = ["--heads", "1", "--batch", "1", "--seq", "32", "--decode", "4", "--rounds", "1"] if tiny \
            else ["--heads", "16", "--seq", "1024", "--decode", "64"]
        runner.run("attention bench", lambda: run_bench("attention.py", [*attention_size, "--device", device]))


def check_llm(runner: Runner, tiny: bool) -> None:
    if not runner.wanted("llm decode"):
        return
    from dsfuse.agent.local import gguf_path
    from dsfuse.errors import DsfuseError

    try:
        path = gguf_path()
    except DsfuseError as e:
        runner.skip("llm decode", str(e))
        return

    def decode() -> dict[str, Any]:
        from dsfuse.models.gguf import load_gguf_llama

        decode_steps = runpy.run_path(str(ROOT / "bench" / "llm.py"))["ours_decode"]
        model, tokenizer = load_gguf_llama(path)
        model = model.to(runner.device)
        ids = torch.tensor([tokenizer.encode("Explain vector quantization in one sentence.").ids],
                           device=runner.device)
        new = 8 if tiny else 64
        with torch.inference_mode():
            _, seconds = decode_steps(model, ids, new)
        return {"tokens/s": new / seconds}

    runner.run("llm decode", decode)


# --------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke test.")
    parser.add_argument("--size", choices=["auto", "tiny", "full"], default="auto",
                        help="auto: full on a GPU, tiny on CPU.")
    parser.add_argument("--only", help="Comma-separated checks: " + ", ".join(TRAINERS + OTHERS) + ".")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="Where the results go.")
    parser.add_argument("--work", type=Path, help="Folder for data and runs (default: a temporary one).")
    args = parser.parse_args()

    device = select_device(args.device)
    tiny = args.size == "tiny" or (args.size == "auto" and device.type != "cuda")
    only = {name.strip() for name in args.only.split(",")} if args.only else None
    unknown = sorted((only or set()) - set(TRAINERS + OTHERS))
    if unknown:
        parser.error(f"unknown checks: {', '.join(unknown)}")
    runner = Runner(device, only)
    sizes = Sizes.of(tiny)
    console.print(f"gpu_check on {device} ({'tiny' if tiny else 'full'} sizes), torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as temporary:
        work = args.work or Path(temporary)
        ddpm_run = check_trainers(runner, work, sizes)
        if runner.wanted("sample"):
            check_sampling(runner, work, sizes, ddpm_run)
        check_benches(runner, tiny)
        check_llm(runner, tiny)

    rows = [(c.name, c.status, f"{c.seconds:.2f}", "-" if c.peak_mib is None else f"{c.peak_mib:.0f}",
             ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.numbers.items()
                       if isinstance(v, (int, float))) or c.detail)
            for c in runner.checks]
    print_table(f"gpu_check on {device}", ["check", "status", "seconds", "peak MiB", "numbers / why"], rows)
    skipped = [c for c in runner.checks if c.status == "skipped"]
    if skipped:
        console.print("skipped: " + "; ".join(f"{c.name} ({c.detail})" for c in skipped), markup=False)
    failed = [c.name for c in runner.checks if c.status == "failed"]
    record = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "tiny": tiny, "failed": failed,
              "checks": [{"name": c.name, "status": c.status, "seconds": round(c.seconds, 3), "peak_mib": c.peak_mib,
                          "detail": c.detail, **{k: v for k, v in c.numbers.items()
                                                 if isinstance(v, (int, float, str)) or v is None}}
                         for c in runner.checks]}
    args.json.write_text(json.dumps(record, indent=2))
    console.print(f"{len(failed)} failed of {len(runner.checks) - len(skipped)} run; results in {args.json}",
                  markup=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
