"""The command-line contract every command follows (README.md, "Conventions")."""

from __future__ import annotations

import json
import os

import pytest

from conftest import assert_one_line_error, run_cli


def _all_commands() -> list[list[str]]:
    from typer.main import get_command

    from dsfuse.cli import app

    root = get_command(app)
    paths = []
    for name, cmd in root.commands.items():
        sub = getattr(cmd, "commands", None)
        paths += [[name, s] for s in sub] if sub else [[name]]
    return paths


@pytest.mark.parametrize("path", _all_commands(), ids=lambda p: " ".join(p))
def test_every_command_has_help_with_example_and_device(path):
    proc = run_cli(*path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Example" in proc.stdout, f"--help of {' '.join(path)} shows no example"
    for option in ("--device", "--json", "--quiet"):  # the demo passes all three to every step
        assert option in proc.stdout, f"{' '.join(path)} has no {option}"


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("dsfuse ")


def test_info_json_reports_ops_loading():
    proc = run_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["ops"]["torchvision"]["ok"] and info["ops"]["torchaudio"]["ok"]
    assert info["device"] in info["devices"]
    assert info["versions"]["torch"].startswith("2.")


def test_unavailable_device_is_one_line_exit_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error(run_cli("info", "--device", "cuda"), 2, "cuda")
    assert_one_line_error(run_cli("info", "--device", "tpu"), 2, "device")


def test_usage_errors_are_one_line_exit_2():
    assert_one_line_error(run_cli("info", "--no-such-option"), 2, "no such option")
    assert_one_line_error(run_cli("no-such-command"), 2, "no such command")


def test_demo_refuses_non_empty_out_without_force(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    assert_one_line_error(run_cli("demo", "--out", tmp_path), 2, "--force")
    assert (tmp_path / "keep.txt").exists()


def test_per_file_table_still_shows_the_successes_when_some_inputs_fail(tmp_path, capsys):
    import typer

    from dsfuse.cli.common import tabulate_each_input
    from dsfuse.errors import InputError

    def process(path):
        if path.name == "bad.txt":
            raise InputError("not readable", path)
        return {"size": path.stat().st_size}

    for name, text in (("a.txt", "abc"), ("bad.txt", ""), ("b.txt", "abcdef")):
        (tmp_path / name).write_text(text)
    shown = []
    with pytest.raises(typer.Exit) as failed:
        tabulate_each_input([tmp_path / n for n in ("a.txt", "bad.txt", "b.txt", "gone.txt")], process,
                            lambda path, result: [(path.name, result["size"])], shown.extend, as_json=False,
                            quiet=True)
    assert failed.value.exit_code == 1 and shown == [("a.txt", 3), ("b.txt", 6)]
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and "not readable" in errors[0] and "not found" in errors[1]


def test_json_output_is_always_valid_json(capsys):
    import math

    import torch

    from dsfuse.report import emit_json

    emit_json({"a": math.nan, "b": [math.inf, 1.5], "t": torch.tensor([1.0, float("nan")]), "n": torch.tensor(2.0)})
    assert json.loads(capsys.readouterr().out) == {"a": None, "b": [None, 1.5], "t": [1.0, None], "n": 2.0}


def test_unwritable_outputs_and_unreadable_checkpoints_are_usage_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_cli("classify-video", "make-dataset", tmp_path / "file" / "sub", "--per-class", "1")
    assert_one_line_error(proc, 2, str(tmp_path / "file"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: nothing to test
            return
        proc = run_cli("classify-video", "make-dataset", locked / "out", "--per-class", "1")
        assert_one_line_error(proc, 2, "Permission denied")
    finally:
        locked.chmod(0o700)


def test_debug_shows_the_traceback_of_a_failing_file_too(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    from dsfuse.checkpoint import CheckpointMeta, save_checkpoint
    from dsfuse.models.vqvae import VQVAE, VQVAEConfig

    cfg = VQVAEConfig(image_size=32, downsample=8, codebook_size=16, base_channels=8, latent_channels=4)
    save_checkpoint(tmp_path / "vq.safetensors", VQVAE(cfg), CheckpointMeta.of("vqvae", cfg))
    args = ["tokenize-image", tmp_path / "bad.png", "-c", tmp_path / "vq.safetensors", "--json"]
    assert "Traceback" not in run_cli(*args).stderr
    debugged = run_cli(*args, "--debug")
    assert debugged.returncode == 1 and "Traceback" in debugged.stderr
