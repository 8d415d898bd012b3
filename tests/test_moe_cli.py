"""`dsfuse moe-inspect` and `dsfuse train-moe`: statistics on real routing, checkpoints, tensor files, training
with each way of balancing, bad input."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import assert_one_line_error, run_cli
from dsfuse.checkpoint import CheckpointMeta, read_metadata, save_checkpoint
from dsfuse.models.moe import MoEClassifier, MoEModelConfig
from dsfuse.metrics import frequent_pairs, routing_stats
from dsfuse.nn.moe import MoE, MoEConfig
from toy_model import ToyConfig, ToyRegressor


def inspect(capsys, *args: str) -> subprocess.CompletedProcess:
    """The real command in this process (fast): exit code, stdout and stderr as a subprocess would give."""
    from dsfuse.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["moe-inspect", *map(str, args)])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_.value.code, out.out, out.err)


@pytest.fixture
def moe_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = MoEModelConfig(in_dim=6, dim=16, n_layers=2, n_classes=4, n_experts=4, top_k=2, expert_hidden=8)
    return save_checkpoint(tmp_path / "moe.safetensors", MoEClassifier(cfg), CheckpointMeta.of("moe", cfg))


def test_fresh_layer_on_a_tensor_file(capsys, tmp_path):
    features = np.random.default_rng(0).standard_normal((300, 24)).astype(np.float32)
    np.save(tmp_path / "f.npy", features)
    proc = inspect(capsys, "--input", tmp_path / "f.npy", "--experts", "8", "--top-k", "2",
                   "--capacity-factor", "1.0", "--json")
    assert proc.returncode == 0, proc.stderr
    layer = json.loads(proc.stdout)["layers"][0]
    assert layer["tokens"] == 300 and layer["experts"] == 8 and len(layer["load"]) == 8
    assert max(layer["load"]) <= 75  # capacity 1.0 * 300 * 2 / 8
    assert sum(layer["load"]) + layer["dropped_assignments"] == 600
    assert layer["maxvio"] == pytest.approx(max(layer["load"]) / np.mean(layer["load"]) - 1, rel=1e-5)
    assert 0 < layer["routing_entropy"] <= layer["routing_entropy_max"]


def test_every_moe_layer_of_a_checkpoint_with_a_plot(capsys, tmp_path, moe_checkpoint):
    features = {"features": torch.randn(2, 50, 6)}  # [B, T, in_dim]: routed through the whole model
    save_file(features, tmp_path / "f.safetensors")
    plot = tmp_path / "load.png"
    proc = inspect(capsys, "-c", moe_checkpoint, "--input", tmp_path / "f.safetensors", "--dropless", "--plot", plot,
                   "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [r["layer"] for r in result["layers"]] == ["blocks.0.moe", "blocks.1.moe"]
    assert result["routed"] == "through the whole model" and result["tokens"] == 100
    assert all(sum(r["load"]) == 200 and r["dropped_assignments"] == 0 for r in result["layers"])
    assert Image.open(plot).size[0] > 100 and result["plot"] == str(plot)


def test_routing_stats_count_pairs_and_drops():
    layer = MoE(MoEConfig(dim=8, n_experts=4, top_k=2, n_shared=0, expert_hidden=4, capacity_factor=0.5)).eval()
    layer(torch.randn(40, 8))
    stats = routing_stats(layer.last_routing)
    assert sum(stats["load"]) == 40 and stats["dropped_assignments"] == 40  # 4 experts x 10
    ids = torch.tensor([[0, 1], [1, 0], [2, 3], [0, 1]])
    assert frequent_pairs(ids, 4)[0] == {"experts": [0, 1], "count": 3}


@pytest.mark.parametrize("args, where", [
    (["--experts", "4", "--top-k", "6"], "larger than the number of experts"),
    (["--capacity-factor", "0"], "--capacity-factor"),
    (["--capacity-factor", "-1.5"], "--capacity-factor"),
    (["--router", "hash"], "--router"),
    (["--tokens", "0"], "--tokens"),
    (["--dropless", "--capacity-factor", "2"], "--dropless"),
    (["--input", "missing.npy"], "not found"),
])
def test_bad_options_are_one_line_exit_2(capsys, args, where):
    assert_one_line_error(inspect(capsys, *args), 2, where)


def test_bad_inputs_are_one_line_exit_2(capsys, tmp_path, moe_checkpoint):
    np.save(tmp_path / "narrow.npy", np.zeros((10, 12), np.float32))
    assert_one_line_error(inspect(capsys, "--input", tmp_path / "narrow.npy", "--dim", "32"), 2, "width 12")
    assert_one_line_error(inspect(capsys, "-c", moe_checkpoint, "--input", tmp_path / "narrow.npy"), 2, "width 12")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    assert_one_line_error(inspect(capsys, "--input", tmp_path / "photo.png"), 2, "tensor file")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    assert_one_line_error(inspect(capsys, "--input", tmp_path / "junk.npy"), 2, "cannot read")
    toy = save_checkpoint(tmp_path / "toy.safetensors", ToyRegressor(ToyConfig()), CheckpointMeta.of("toy", ToyConfig()))
    assert_one_line_error(inspect(capsys, "-c", toy), 2, "no MoE layer")
    assert_one_line_error(inspect(capsys, "-c", moe_checkpoint, "--experts", "8"), 2, "--experts")
    assert_one_line_error(inspect(capsys, "-c", tmp_path / "none.safetensors"), 2, "not found")


@pytest.mark.slow
def test_training_balances_with_the_aux_free_bias_and_its_checkpoints_inspect(tmp_path):
    out = tmp_path / "balancing"
    proc = run_cli("train-moe", "--steps", "40", "--out", out, "--json", "-q", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    runs = result["results"]
    assert set(runs) == {"aux-loss", "aux-free", "none"} and result["step"] == 40
    assert runs["none"]["maxvio"] > runs["aux-free"]["maxvio"]  # no balancing piles the clusters up
    assert all(0 < r["task_loss"] < np.log(64) for r in runs.values())  # every variant learns the task
    assert (out / "imbalance.png").stat().st_size > 0 and result["plot"] == str(out / "imbalance.png")
    assert read_metadata(out / "aux-free").config["router"] == "aux-free"

    proc = run_cli("moe-inspect", "--checkpoint", out / "aux-free", "--tokens", "512", "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["layers"]) == 2
    written = (out / "aux-loss" / "model.safetensors").stat().st_mtime_ns
    again = run_cli("train-moe", "--steps", "40", "--out", out, "--device", "cpu")
    assert_one_line_error(again, 2, "--force")
    assert (out / "aux-loss" / "model.safetensors").stat().st_mtime_ns == written  # refused before any work


def test_train_moe_refuses_a_top_k_above_the_experts_before_making_a_run(tmp_path):
    proc = run_cli("train-moe", "--experts", "4", "--top-k", "6", "--out", tmp_path / "run")
    assert_one_line_error(proc, 2, "--top-k")
    assert not (tmp_path / "run").exists()


def test_tokens_beyond_memory_are_refused_before_any_work():
    proc = run_cli("moe-inspect", "--tokens", "100000000000", "--json")
    assert_one_line_error(proc, 2, "--tokens")
    assert "GiB free" in proc.stderr and proc.stdout == ""


def test_train_moe_refuses_an_existing_plot_before_making_anything(tmp_path):
    (tmp_path / "imbalance.png").write_bytes(b"mine")
    proc = run_cli("train-moe", "--steps", "2", "--out", tmp_path, "--device", "cpu")
    assert_one_line_error(proc, 2, "imbalance.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imbalance.png"]
