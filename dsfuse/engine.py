"""The one training loop every trainer uses.

AdamW with warmup + cosine decay, gradient clipping and accumulation, mixed precision (bf16, or fp16
with a GradScaler), gradient checkpointing, torch.compile, EMA weights, a progress bar,
`metrics.jsonl` (with TensorBoard beside it on request), checkpoints every N steps and at the end,
Ctrl-C that saves, exact `--resume` (with DataLoader workers too), and data parallelism through DDP
under `torchrun`.

A trainer supplies a model, a dataset and a loss function; the engine owns everything else:

    result = fit(model, dataset, loss_fn, TrainConfig(steps=1000), run_dir, meta=CheckpointMeta.of("vqvae", cfg))

Exact resume: the batch order is a function of (seed, step) and the RNG states are saved, so N steps,
then `--resume` for N more, gives the same weights as 2N steps at once.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm import tqdm

from dsfuse import choices
from dsfuse.checkpoint import MODEL_FILE, CheckpointMeta, save_checkpoint
from dsfuse.device import seed_everything
from dsfuse.errors import UsageError
from dsfuse.io import atomic_path
from dsfuse.nn.checkpointing import set_grad_checkpointing
from dsfuse.report import observed_progress
from dsfuse.runlog import RunLog, open_run_log
from dsfuse.runs import METRICS_FILE, STATE_FILE, TrainOptions

LossOutput = torch.Tensor | tuple[torch.Tensor, Mapping[str, float]]
LossFn = Callable[[nn.Module, Any], LossOutput]
EvalFn = Callable[[nn.Module, int], Mapping[str, float]]


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # per process and micro-batch; an optimizer step sees batch_size * grad_accum * world
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int | None = None  # None: a tenth of the run, at most 100 steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    ema_decay: float | None = None  # e.g. 0.999; the EMA weights are what model.safetensors holds
    precision: choices.Precision | None = None  # None: bf16 on CUDA where supported, else fp32
    grad_checkpoint: bool = False  # recompute the activations of checkpointable blocks in the backward pass
    compile: bool = False  # torch.compile the model for the training steps
    logger: choices.TrainLogger = "none"  # where curves go beside metrics.jsonl
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 0  # 0: only at the end
    num_workers: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        for name, option in (("steps", "steps"), ("batch_size", "batch-size"), ("grad_accum", "accumulate")):
            if getattr(self, name) < 1:
                raise UsageError(f"{option} must be at least 1, got {getattr(self, name)}", f"--{option}")
        if not self.lr > 0:
            raise UsageError(f"learning rate must be positive, got {self.lr}", "--lr")
        if self.num_workers < 0:
            raise UsageError(f"workers must be 0 or more, got {self.num_workers}", "--workers")
        if self.precision is not None:
            choices.check(self.precision, choices.Precision, "precision")
        choices.check(self.logger, choices.TrainLogger, "logger")
        if self.logger != "none":
            open_run_log(self.logger, None)  # a missing package is refused before the run starts
        if self.warmup_steps is None:
            self.warmup_steps = min(100, self.steps // 10)

    @classmethod
    def of(cls, options: TrainOptions, **settings: Any) -> TrainConfig:
        """The engine's settings from a trainer's options (`settings` adds or overrides the task's own)."""
        return cls(**{"steps": options.steps, "batch_size": options.batch_size, "lr": options.lr,
                      "eval_every": options.eval_every, "seed": options.seed, "precision": options.precision,
                      "grad_accum": options.accumulate, "num_workers": options.workers,
                      "grad_checkpoint": options.grad_checkpoint, "compile": options.compile,
                      "logger": options.logger, **settings})


def autocast_dtype(precision: choices.Precision | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device` (None: full fp32); refuses what the device cannot do."""
    if precision is None:  # the default: bf16 where CUDA has it, fp32 elsewhere
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if precision == "fp16" and device.type != "cuda":
        raise UsageError(f"fp16 training needs CUDA (its GradScaler); on {device.type} use bf16 or fp32",
                         "--precision")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU has no bf16; use fp16 or fp32", "--precision")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    seconds: float = 0.0


# --------------------------------------------------------------------------- distribution

@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def distributed_device(device: torch.device) -> torch.device:
    """Under torchrun each process takes the GPU of its local rank."""
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's indices for steps `start..steps-1`; the order depends only on (seed, step).

    Each epoch is a permutation seeded by (seed, epoch); a step takes the next `global_batch` indices,
    wrapping into the next epoch, so any step can be reached without replaying the ones before it.
    """

    def __init__(self, n: int, global_batch: int, steps: int, seed: int, dist_info: Distributed,
                 start: int = 0, shuffle: bool = True, keyed: bool = False):
        self.n, self.global_batch, self.steps, self.seed = n, global_batch, steps, seed
        self.dist, self.start, self.shuffle, self.keyed = dist_info, start, shuffle, keyed

    def _epoch(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def indices_for_step(self, step: int) -> list[int]:
        first = step * self.global_batch
        out: list[int] = []
        while len(out) < self.global_batch:
            epoch, offset = divmod(first + len(out), self.n)
            take = min(self.n - offset, self.global_batch - len(out))
            out += self._epoch(epoch)[offset:offset + take].tolist()
        per_rank = self.global_batch // self.dist.world
        return out[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[list[int]] | Iterator[list[tuple[int, int, int]]]:
        """Each step's indices; `keyed`: (step, position in the global batch, index) for `StepSeeded`."""
        for step in range(self.start, self.steps):
            indices = self.indices_for_step(step)
            if not self.keyed:
                yield indices
                continue
            first = self.dist.rank * len(indices)
            yield [(step, first + position, index) for position, index in enumerate(indices)]

    def __len__(self) -> int:
        return self.steps - self.start


class StepSeeded(Dataset):
    """A dataset whose every sample is drawn under a torch seed of its own, a function of (seed, step, its
    position in the step's batch): its random crops and augmentations are the same whichever process
    decodes it and however many workers there are, so `--resume` stays exact with `--workers`. The
    caller's RNG is left as it was."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        step, position, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + step) * 1_000_003 + position) % (1 << 63))
            return self.dataset[index]


# --------------------------------------------------------------------------- helpers

def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def split_batch(batch: Any, parts: int) -> list[Any]:
    """Split a collated batch into `parts` micro-batches along the first dimension."""
    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(parts))
    if isinstance(batch, Mapping):
        pieces = {k: split_batch(v, parts) for k, v in batch.items()}
        return [{k: v[i] for k, v in pieces.items()} for i in range(parts)]
    if isinstance(batch, (list, tuple)):
        pieces = [split_batch(v, parts) for v in batch]
        return [type(batch)(p[i] for p in pieces) for i in range(parts)]
    return [batch] * parts


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio`."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(cfg.steps - warmup, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def ema_with_warmup(decay: float) -> Callable:
    """EMA update whose decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates,
    so a short run's EMA weights are not dominated by the random initialisation."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged) -> None:
        if not (torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0])):
            torch._foreach_copy_(ema_params, params)  # counters and other integer buffers: take the latest
            return
        n = float(num_averaged)
        torch._foreach_lerp_(ema_params, params, 1 - min(decay, (1 + n) / (10 + n)))

    return update


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP, EMA and torch.compile wrappers."""
    while True:
        if isinstance(model, (DistributedDataParallel, AveragedModel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _rng_state() -> dict[str, Any]:
    # Plain tensors and numbers only, so the file loads with torch.load(weights_only=True).
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- the loop

class Trainer:
    """Holds the state of one training run; `fit()` below is the usual entry point."""

    def __init__(self, model: nn.Module, dataset: Dataset, loss_fn: LossFn, cfg: TrainConfig,
                 run_dir: Path, *, meta: CheckpointMeta, device: torch.device,
                 evaluate: EvalFn | None = None, collate_fn: Callable[[list], Any] | None = None):
        self.cfg, self.run_dir, self.meta = cfg, Path(run_dir), meta
        self.loss_fn, self.evaluate = loss_fn, evaluate
        self.device = distributed_device(device)
        self.dist = init_distributed(self.device)
        if cfg.batch_size * cfg.grad_accum * self.dist.world < 1 or len(dataset) == 0:  # type: ignore[arg-type]
            raise UsageError("the training set is empty")
        self.dataset, self.collate_fn = dataset, collate_fn or default_collate

        self.model = model.to(self.device)
        self.ema = (AveragedModel(self.model, multi_avg_fn=ema_with_warmup(cfg.ema_decay), use_buffers=True)
                    if cfg.ema_decay else None)
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        set_grad_checkpointing(self.model, cfg.grad_checkpoint)
        self.net: nn.Module = (DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                       if self.device.type == "cuda" else None)
                               if self.dist.world > 1 else self.model)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.step = 0
        self.stop_requested = False
        self.run_log: RunLog | None = None

    def request_stop(self) -> None:
        """Finish the current step, save, and return (what the first Ctrl-C does)."""
        self.stop_requested = True

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.request_stop()
        if self.dist.is_main and not self.cfg.quiet:
            print("\nstopping after this step and saving (Ctrl-C again to abort without saving)", file=sys.stderr)

    # ---- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "train_config": asdict(self.cfg),
        }

    def load_state(self) -> None:
        path = self.run_dir / STATE_FILE
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # a damaged state file is the user's to fix, not a traceback
            raise UsageError(f"cannot read training state ({type(e).__name__})", path) from None
        self.model.load_state_dict(state["model"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        rng["torch"] = rng["torch"].cpu()
        _set_rng_state(rng)
        self.step = int(state["step"])
        if self.dist.is_main:  # forget metrics logged after the checkpoint: they will be logged again
            kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= self.step]
            self._rewrite_metrics(kept)

    def inference_model(self) -> nn.Module:
        """The weights to evaluate and ship: EMA when enabled."""
        return self.ema.module if self.ema else self.model

    def save(self) -> None:
        """Write model.safetensors, then train_state.pt, each atomically (main process only): a kill between
        the two leaves the state a step behind the model, and --resume redoes that step."""
        if not self.dist.is_main:
            return
        save_checkpoint(self.run_dir / MODEL_FILE, self.inference_model(), self.meta)
        with atomic_path(self.run_dir / STATE_FILE) as tmp:
            torch.save(self.state_dict(), tmp)

    # ---- metrics
    def _rewrite_metrics(self, records: Sequence[Mapping[str, Any]]) -> None:
        with atomic_path(self.run_dir / METRICS_FILE) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))

    def log(self, record: Mapping[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps({"step": self.step, **record}) + "\n")
            if self.run_log is not None:
                self.run_log.scalars(self.step, record)

    def run_evaluation(self) -> dict[str, float]:
        if not (self.evaluate and self.dist.is_main):
            return {}
        model = self.inference_model()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in self.evaluate(model, self.step).items()}
        model.train(was_training)
        if metrics:
            self.log({"eval": metrics})
        if self.run_log is not None:
            self.run_log.images(self.step)
        return metrics

    # ---- the step
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batch: Any) -> dict[str, float]:
        cfg = self.cfg
        self.net.train()
        totals: dict[str, float] = {}
        micro_batches = split_batch(batch, cfg.grad_accum)
        for i, micro in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1 or self.dist.world == 1
            with (nullcontext() if sync else unwrap_compiled(self.net).no_sync()), self._autocast():
                out = self.loss_fn(self.net, to_device(micro, self.device))
                loss, extras = (out, {}) if isinstance(out, torch.Tensor) else out
                self.scaler.scale(loss / len(micro_batches)).backward()
            totals["loss"] = totals.get("loss", 0.0) + loss.detach().item() / len(micro_batches)
            for k, v in extras.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(micro_batches)
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            totals["grad_norm"] = float(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema:
            self.ema.update_parameters(self.model)
        self.step += 1
        return totals

    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.cfg
        if resume:
            self.load_state()
        else:
            seed_everything(cfg.seed + self.dist.rank)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        start = self.step
        global_batch = cfg.batch_size * cfg.grad_accum * self.dist.world
        sampler = StepBatchSampler(len(self.dataset), global_batch, cfg.steps, cfg.seed, self.dist, start=start,
                                   keyed=True)
        loader = DataLoader(StepSeeded(self.dataset, cfg.seed), batch_sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                            # Its own generator: creating the iterator must not draw from the global RNG,
                            # or a resumed run would diverge from an uninterrupted one.
                            generator=torch.Generator().manual_seed(cfg.seed + start))
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {self.meta.kind}", unit="step", dynamic_ncols=True,
                   disable=cfg.quiet or not self.dist.is_main, leave=False)
        if self.dist.is_main and cfg.logger != "none":
            self.run_log = open_run_log(cfg.logger, self.run_dir, start)
        t0, window_t, window_n = time.perf_counter(), time.perf_counter(), 0
        logged = [r for r in read_metrics(self.run_dir) if "loss" in r] if start >= cfg.steps else []
        # a finished run resumed for no more steps: report its last logged numbers
        metrics: dict[str, float] = {k: v for k, v in logged[-1].items() if k != "step"} if logged else {}
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint) if in_main_thread else None
        try:
            for batch in loader:
                stats = self.train_step(batch)
                window_n += global_batch
                bar.update(1)
                if self.dist.is_main and observed_progress(self.step, cfg.steps, "step", stats):
                    self.request_stop()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or self.stop_requested:
                    rate = window_n / max(time.perf_counter() - window_t, 1e-9)
                    stats = {**stats, "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate}
                    self.log(stats)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", sps=f"{rate:.1f}")
                    window_t, window_n = time.perf_counter(), 0
                metrics = dict(stats)
                if self.stop_requested:
                    break
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.run_evaluation()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save()
        finally:
            bar.close()
            if in_main_thread:
                signal.signal(signal.SIGINT, previous_handler)
        try:
            if not self.stop_requested:
                metrics.update({f"eval_{k}": v for k, v in self.run_evaluation().items()})
            self.save()
        finally:
            if self.run_log is not None:
                self.run_log.close()
        if dist.is_initialized():
            dist.barrier()
        return TrainResult(self.run_dir, self.step, metrics, self.stop_requested, time.perf_counter() - t0)


def unwrap_compiled(net: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (the DDP wrapper, whose no_sync the loop needs), or `net`."""
    return getattr(net, "_orig_mod", net)


def fit(model: nn.Module, dataset: Dataset, loss_fn: LossFn, cfg: TrainConfig, run_dir: str | os.PathLike, *,
        meta: CheckpointMeta, device: torch.device, resume: bool = False, evaluate: EvalFn | None = None,
        collate_fn: Callable[[list], Any] | None = None) -> TrainResult:
    """Train `model` on `dataset` with `loss_fn(model, batch) -> loss | (loss, {name: value})`; `meta` is
    what model.safetensors records beside the weights."""
    trainer = Trainer(model, dataset, loss_fn, cfg, Path(run_dir), meta=meta, device=device,
                      evaluate=evaluate, collate_fn=collate_fn)
    return trainer.fit(resume=resume)
