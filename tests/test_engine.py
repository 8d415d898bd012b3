from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from dsfuse.checkpoint import load_checkpoint
from dsfuse.engine import Distributed, StepBatchSampler, TrainConfig, lr_factor, read_metrics
from dsfuse.runs import prepare_run_dir
from dsfuse.errors import UsageError
from engine_job import make_trainer


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


def test_n_steps_then_resume_equals_2n_steps(tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight.fit()

    first = make_trainer(tmp_path / "b")
    original_loss = first.loss_fn

    def stop_after_six(model, batch):  # what the first Ctrl-C does, at a known step
        if first.step == 5:
            first.request_stop()
        return original_loss(model, batch)

    first.loss_fn = stop_after_six
    result = first.fit()
    assert result.interrupted and result.step == 6
    with pytest.raises(AssertionError):  # the interrupted run really is half-trained
        _assert_same(_weights(first.model), _weights(straight.model))

    resumed = make_trainer(tmp_path / "b")
    resumed.fit(resume=True)
    assert resumed.step == 12
    _assert_same(_weights(resumed.model), _weights(straight.model))
    steps = [r["step"] for r in read_metrics(tmp_path / "b")]
    assert steps == list(range(1, 13)), "metrics after resume continue without gaps or repeats"


def test_a_killed_save_leaves_nothing_that_later_runs_trip_on(tmp_path):
    make_trainer(tmp_path, steps=4).fit()
    stale = tmp_path / ".train_state.pt.abc123.tmp"
    stale.write_bytes(b"")  # what SIGKILL during a save leaves
    mine = tmp_path / ".notes.tmp"
    mine.write_text("the user's")
    prepare_run_dir(tmp_path, resume=True, force=False)
    assert not stale.exists() and mine.exists()
    resumed = make_trainer(tmp_path, steps=4).fit(resume=True)  # nothing left to train: its last numbers
    assert resumed.step == 4 and resumed.metrics["loss"] is not None


def test_training_reduces_loss_and_writes_run_files(tmp_path):
    trainer = make_trainer(tmp_path, steps=60, ema_decay=0.9)
    result = trainer.fit()
    records = read_metrics(tmp_path)
    assert records[-1]["loss"] < records[0]["loss"] * 0.5
    assert {"lr", "samples_per_s", "grad_norm"} <= records[0].keys()
    model, meta = load_checkpoint(tmp_path, kind="toy")
    ema = trainer.ema.module.state_dict()
    _assert_same({k: v for k, v in model.state_dict().items()}, ema)  # the file holds the EMA weights
    assert (tmp_path / "train_state.pt").exists() and result.step == 60


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    big = make_trainer(tmp_path / "big", dropout=0.0, batch_size=8, steps=4)
    big.fit()
    accum = make_trainer(tmp_path / "acc", dropout=0.0, batch_size=4, grad_accum=2, steps=4)
    accum.fit()
    _assert_same(_weights(big.model), _weights(accum.model), atol=1e-6)


def test_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] < factors[5] < factors[9] <= 1.0
    assert factors[10] == pytest.approx(1.0, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-2)


def test_step_sampler_is_a_function_of_the_step():
    full = StepBatchSampler(10, 4, 8, seed=3, dist_info=Distributed())
    late = StepBatchSampler(10, 4, 8, seed=3, dist_info=Distributed(), start=5)
    assert list(full)[5:] == list(late)
    epoch0 = sum(list(full)[:2], []) + list(full)[2][:2]  # the first 10 indices are one permutation
    assert sorted(epoch0) == list(range(10))
    halves = [StepBatchSampler(10, 4, 8, 3, Distributed(rank=r, world=2)).indices_for_step(1) for r in (0, 1)]
    assert halves[0] + halves[1] == full.indices_for_step(1)


def test_bad_config_and_run_dir_refusals(tmp_path):
    with pytest.raises(UsageError, match="steps must be at least 1"):
        TrainConfig(steps=0)
    with pytest.raises(UsageError, match="learning rate"):
        TrainConfig(lr=-1)
    with pytest.raises(UsageError, match="nothing to resume"):
        prepare_run_dir(tmp_path / "new", resume=True, force=False)
    make_trainer(tmp_path / "run", steps=2).fit()
    with pytest.raises(UsageError, match="--resume to continue or --force"):
        prepare_run_dir(tmp_path / "run", resume=False, force=False)
    prepare_run_dir(tmp_path / "run", resume=False, force=True)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_damaged_train_state_is_one_clear_error(tmp_path):
    make_trainer(tmp_path, steps=2).fit()
    (tmp_path / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="cannot read training state"):
        make_trainer(tmp_path, steps=4).fit(resume=True)


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    single = make_trainer(tmp_path / "single", dropout=0.0, batch_size=8, steps=6)
    single.fit()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", str(REPO / "tests" / "engine_job.py"), str(tmp_path / "ddp"), "4"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp_model, _ = load_checkpoint(tmp_path / "ddp", kind="toy")
    _assert_same(_weights(ddp_model), _weights(single.model), atol=1e-5)
    assert len(read_metrics(tmp_path / "ddp")) == 6, "only rank 0 logs"


def test_ctrl_c_finishes_the_step_saves_and_resume_continues(tmp_path):
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    job = [sys.executable, str(REPO / "tests" / "engine_job.py"), str(tmp_path), "8"]
    proc = subprocess.Popen([*job, "1000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "interrupted=True" in out and "Traceback" not in err
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert 0 < state["step"] < 1_000_000
    assert read_metrics(tmp_path)[-1]["step"] == state["step"]
    load_checkpoint(tmp_path, kind="toy")  # the weights file is complete


def test_ema_warms_up_instead_of_clinging_to_the_initial_weights():
    from dsfuse.engine import ema_with_warmup

    ema, current = [torch.zeros(3)], [torch.ones(3)]
    update = ema_with_warmup(0.999)
    update(ema, current, torch.tensor(0))  # first update: decay 0.1, not 0.999
    assert torch.allclose(ema[0], torch.full((3,), 0.9))
    update(ema, current, torch.tensor(10_000))  # late updates use the configured decay
    assert torch.allclose(ema[0], torch.full((3,), 0.9 + 0.1 * 0.001))
    counts = [torch.tensor([1, 2])]
    update(counts, [torch.tensor([5, 6])], torch.tensor(3))
    assert counts[0].tolist() == [5, 6]
