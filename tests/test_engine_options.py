"""The engine's options every trainer shares: workers with exact resume, precision, TensorBoard, compile."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from dsfuse.checkpoint import CheckpointMeta
from dsfuse.data.images import save_grid
from dsfuse.engine import TrainConfig, Trainer, autocast_dtype, read_metrics
from dsfuse.errors import UsageError
from engine_job import make_trainer, mse, toy_data
from toy_model import ToyConfig, ToyRegressor


class NoisyToy(Dataset):
    """The toy regression set with a random augmentation drawn in __getitem__ (as crops are)."""

    def __init__(self):
        self.data = toy_data()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x + 0.1 * torch.randn_like(x), y


def noisy_trainer(run_dir, **overrides) -> Trainer:
    torch.manual_seed(0)
    config = ToyConfig(dropout=0.1)
    cfg = TrainConfig(**{"steps": 8, "batch_size": 8, "lr": 1e-2, "log_every": 1, "quiet": True, **overrides})
    return Trainer(ToyRegressor(config), NoisyToy(), mse, cfg, run_dir, meta=CheckpointMeta.of("toy", config),
                   device=torch.device("cpu"))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resume_is_exact_with_workers_and_workers_change_nothing(tmp_path):
    straight = noisy_trainer(tmp_path / "straight", num_workers=0)
    straight.fit()
    half = noisy_trainer(tmp_path / "halves", num_workers=2)

    def stop_after_four(model, batch):  # what the first Ctrl-C does, at a known step
        if half.step == 3:
            half.request_stop()
        return mse(model, batch)

    half.loss_fn = stop_after_four
    assert half.fit().step == 4
    resumed = noisy_trainer(tmp_path / "halves", num_workers=2)
    resumed.fit(resume=True)
    assert resumed.step == 8
    for name, value in weights(straight).items():  # 0 workers straight == 2 workers, stopped and resumed
        assert torch.equal(value, weights(resumed)[name]), name
    other_seed = noisy_trainer(tmp_path / "seed1", num_workers=0, seed=1)
    other_seed.fit()
    assert not torch.equal(weights(other_seed)["net.0.weight"], weights(straight)["net.0.weight"])


def test_precision_choices_on_cpu(tmp_path):
    cpu = torch.device("cpu")
    assert autocast_dtype(None, cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(UsageError, match="fp16 training needs CUDA"):
        autocast_dtype("fp16", cpu)
    with pytest.raises(UsageError, match="fp16"):
        make_trainer(tmp_path / "fp16", precision="fp16")
    fp32 = make_trainer(tmp_path / "fp32", steps=40, dropout=0.0).fit()
    bf16 = make_trainer(tmp_path / "bf16", steps=40, dropout=0.0, precision="bf16").fit()
    first = read_metrics(tmp_path / "bf16")[0]["loss"]
    assert bf16.metrics["loss"] < first * 0.8  # bf16 autocast on CPU trains
    assert bf16.metrics["loss"] == pytest.approx(fp32.metrics["loss"], rel=0.1, abs=0.01)


def test_engine_settings_refused_in_one_line():
    with pytest.raises(UsageError, match="accumulate must be at least 1"):
        TrainConfig(grad_accum=0)
    with pytest.raises(UsageError, match="workers must be 0 or more"):
        TrainConfig(num_workers=-1)
    with pytest.raises(ValueError, match="logger"):
        TrainConfig(logger="wandb")


def test_tensorboard_event_file_reads_back_scalars_lr_and_pictures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def evaluate(model, step):
        save_grid(torch.rand(2, 3, 8, 8), tmp_path / "grids" / f"step_{step:06d}.png")
        return {"score": float(step)}

    trainer = make_trainer(tmp_path, steps=4, eval_every=2, logger="tensorboard")
    trainer.evaluate = evaluate
    trainer.fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr", "grad_norm", "eval/score"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("eval/score")] == [2.0, 4.0]
    lrs = [r["lr"] for r in read_metrics(tmp_path) if "lr" in r]
    assert [e.value for e in events.Scalars("lr")] == pytest.approx(lrs)
    assert tags["images"] == ["grids/step"]
    pictures = events.Images("grids/step")
    assert [p.step for p in pictures] == [2, 4] and pictures[0].width > 0


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    eager = make_trainer(tmp_path / "eager", steps=3, dropout=0.0)
    eager.fit()
    compiled = make_trainer(tmp_path / "compiled", steps=3, dropout=0.0, compile=True)
    compiled.fit()
    for name, value in weights(eager).items():
        assert torch.allclose(value, weights(compiled)[name], atol=1e-5), name


def test_step_seeded_samples_repeat_and_leave_the_callers_rng_alone():
    from dsfuse.engine import Distributed, StepBatchSampler, StepSeeded

    seeded = StepSeeded(NoisyToy(), seed=3)
    assert len(seeded) == 64 and len(StepBatchSampler(64, 8, 10, 3, Distributed(), start=4)) == 6
    state = torch.get_rng_state()
    first, again, other = seeded[(5, 2, 7)], seeded[(5, 2, 7)], seeded[(5, 3, 7)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])
    keyed = list(StepBatchSampler(10, 4, 2, 3, Distributed(rank=1, world=2), keyed=True))
    assert [k[:2] for k in keyed[0]] == [(0, 2), (0, 3)]  # this rank's half of the global batch
