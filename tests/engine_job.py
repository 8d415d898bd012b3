"""A tiny training job for engine tests; run directly (or under torchrun) to train into a folder."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from dsfuse.device import seed_everything
from dsfuse.checkpoint import CheckpointMeta
from dsfuse.engine import TrainConfig, Trainer
from toy_model import ToyConfig, ToyRegressor


def toy_data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def make_trainer(run_dir: Path, dropout: float = 0.1, **overrides) -> Trainer:
    seed_everything(0)
    config = ToyConfig(dropout=dropout)
    cfg = TrainConfig(**{"steps": 12, "batch_size": 8, "lr": 1e-2, "warmup_steps": 3, "log_every": 1,
                         "quiet": True, **overrides})
    return Trainer(ToyRegressor(config), toy_data(), mse, cfg, run_dir, meta=CheckpointMeta.of("toy", config),
                   device=torch.device("cpu"))


if __name__ == "__main__":  # [torchrun --nproc-per-node 2] tests/engine_job.py RUN_DIR BATCH [STEPS]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    result = make_trainer(Path(sys.argv[1]), dropout=0.0, batch_size=int(sys.argv[2]), steps=steps).fit()
    print(f"stopped at step {result.step}, interrupted={result.interrupted}", flush=True)
