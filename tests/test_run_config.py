"""Run configs (every run writes RUN/args.yaml; every trainer takes --config FILE, the command line wins)
and the engine's options every trainer shares (--precision, --accumulate, --workers, --logger, ...)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO, assert_one_line_error, run_cli
from test_resume_rule import TINY_VQ, TRAINERS

SAMPLES = REPO / "samples"
ENGINE_FLAGS = ("--precision", "--accumulate", "--workers", "--grad-checkpoint", "--compile", "--logger", "--config")


def trainer_command(trainer: str, data: str) -> list[str]:
    _, command, _, needed, _, _ = TRAINERS[trainer]
    return [data if a == "DATA" else a for a in (*command, *needed)]


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_every_trainer_takes_the_engine_options_and_a_config_file(trainer, tmp_path):
    command = trainer_command(trainer, str(tmp_path / "no-data"))
    shown = run_cli(*command, "--help")
    assert shown.returncode == 0, shown.stderr
    for flag in ENGINE_FLAGS:
        assert flag in shown.stdout, f"{trainer} has no {flag}"
    config = tmp_path / "config.yaml"
    config.write_text("steps: ten\n")  # read before anything else: the data need not exist
    refused = run_cli(*command, "--config", config, "--out", tmp_path / "run")
    assert_one_line_error(refused, 2, "steps must be an integer, got 'ten' (")
    assert not (tmp_path / "run").exists()


BAD_INPUT = {  # what goes wrong: (config file text or None, options, words of the error line)
    "not YAML": ("steps: [1\n", [], "not valid YAML"),
    "not a mapping": ("- 1\n", [], "mapping"),
    "unknown key": ("stepz: 3\n", [], "unknown option 'stepz'"),
    "wrong type": ("lr: fast\n", [], "lr must be a number"),
    "a bool for an int": ("batch_size: true\n", [], "batch_size must be an integer"),
    "not a choice": ("precision: fp8\n", [], "precision must be one of fp32, bf16, fp16 or null"),
    "out of range in the file": ("accumulate: 0\n", [], "--accumulate"),
    "per-invocation flag": ("resume: true\n", [], "command line"),
    "fp16 on CPU": (None, ["--precision", "fp16"], "fp16 training needs CUDA"),
    "accumulate 0": (None, ["--accumulate", "0"], "--accumulate"),
    "workers -1": (None, ["--workers", "-1"], "--workers"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_config_or_engine_option_is_one_line_exit_2_and_writes_nothing(case, tmp_path):
    text, options, words = BAD_INPUT[case]
    if text is not None:
        (tmp_path / "config.yaml").write_text(text)
        options = [*options, "--config", tmp_path / "config.yaml"]
    proc = run_cli("train-vqvae", SAMPLES / "images", "--out", tmp_path / "run", "--device", "cpu", *options)
    assert_one_line_error(proc, 2, words)
    assert not (tmp_path / "run").exists()


def test_missing_config_file_names_it(tmp_path):
    proc = run_cli("train-ddpm", SAMPLES / "images", "--config", tmp_path / "nope.yaml", "--out", tmp_path / "run")
    assert_one_line_error(proc, 2, "nope.yaml")


def final(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
def test_args_yaml_repeats_a_run_and_the_command_line_wins(tmp_path):
    first, again, longer = (tmp_path / name for name in ("first", "again", "longer"))
    base = ["--device", "cpu", "--json", "-q"]
    one = final(run_cli("train-vqvae", SAMPLES / "images", "--out", first, "--steps", "2", "--accumulate", "2",
                        "--eval-every", "0", *TINY_VQ, *base))
    args = yaml.safe_load((first / "args.yaml").read_text())
    assert args["accumulate"] == 2 and args["steps"] == 2 and args["codebook_size"] == 64
    for option in ("data", "out", "lr", "seed", "device", "precision", "workers", "grad_checkpoint", "compile",
                   "logger", "quantizer", "image_size"):  # every option, given or not (null: its default)
        assert option in args, option
    assert args["precision"] is None and args["quantizer"] is None
    for flag in ("resume", "force", "json", "quiet", "debug", "config"):
        assert flag not in args

    two = final(run_cli("train-vqvae", "--config", first / "args.yaml", "--out", again, *base))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6) and two["psnr"] == pytest.approx(one["psnr"])
    assert {**yaml.safe_load((again / "args.yaml").read_text()), "out": str(first)} == args

    three = final(run_cli("train-vqvae", "--config", first / "args.yaml", "--out", longer, "--steps", "3", *base))
    assert three["step"] == 3

    # a resume keeps the run's args.yaml and updates what it was given
    final(run_cli("train-vqvae", SAMPLES / "images", "--out", first, "--resume", "--steps", "3", *base))
    assert yaml.safe_load((first / "args.yaml").read_text()) == {**args, "steps": 3}
    # a config contradicting the run is refused on --resume like the command line
    (tmp_path / "other.yaml").write_text("codebook_size: 32\n")
    refused = run_cli("train-vqvae", SAMPLES / "images", "--out", first, "--resume", "--steps", "4",
                      "--config", tmp_path / "other.yaml")
    assert_one_line_error(refused, 2, "--codebook-size")
