"""train-vqvae and tokenize-image, end to end in a subprocess, with good and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from conftest import REPO, assert_one_line_error, json_lines, run_cli
from dsfuse.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from dsfuse.data.images import load_image
from dsfuse.data.tokens import read_tokens
from dsfuse.models.vqvae import VQVAE, VQVAEConfig

SAMPLES = REPO / "samples" / "images"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: threads only contend on a shared machine
TINY = ["--image-size", "32", "--downsample", "8", "--codebook-size", "64", "--base-channels", "8",
        "--latent-channels", "4", "--batch-size", "4", "-q", "--device", "cpu"]


def cli(*args):
    return run_cli(*args, env=ONE_THREAD)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny vqvae with a data-made codebook (k-means on a few images), saved like a trained run."""
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(image_size=32, downsample=8, codebook_size=64, latent_channels=4,
                              base_channels=8, channel_mult=(1, 2)))
    images = torch.stack([load_image(p, 32) for p in sorted((SAMPLES / "generated").glob("*.png"))])
    model.train()(images)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_checkpoint(path, model.eval(), CheckpointMeta.of("vqvae", model.config))
    return path


@pytest.fixture
def messy_folder(tmp_path):
    """Good images (a grayscale and an RGBA among them), a corrupt PNG and a text file."""
    folder = tmp_path / "data" / "nested"
    folder.mkdir(parents=True)
    for p in sorted((SAMPLES / "generated").glob("*.png"))[:6]:
        shutil.copy(p, folder / p.name)
    Image.open(SAMPLES / "photos" / "rocket.jpg").convert("L").save(folder / "gray.png")
    Image.open(SAMPLES / "photos" / "coffee.jpg").convert("RGBA").save(folder / "rgba.webp")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (folder / "notes.txt").write_text("not an image")
    return tmp_path / "data"


# --------------------------------------------------------------------------- train-vqvae

@pytest.mark.slow
def test_train_vqvae_end_to_end(tmp_path, messy_folder):
    run = tmp_path / "run"
    proc = cli("train-vqvae", messy_folder, "--out", run, "--steps", "6", "--eval-every", "3", "--json", *TINY)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["step"] == 6 and summary["images"] == 8 and summary["skipped"] == 1
    assert "corrupt.png" in proc.stderr and "skipped" in proc.stderr
    assert summary["grid"] == [4, 4] and 0 < summary["usage"] <= 1 and summary["psnr"] > 0
    evals = [json.loads(line)["eval"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals) == 2 and {"psnr", "ssim", "usage", "perplexity"} <= evals[0].keys()
    grid = Image.open(run / "reconstructions" / "step_000003.png")
    assert grid.size[1] > 2 * 32  # originals above reconstructions
    assert Image.open(run / "curves.png").size[0] > 100
    model, meta = load_checkpoint(run, kind="vqvae")
    assert meta.config["codebook_size"] == 64 and model.tokenize(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 4)

    resumed = cli("train-vqvae", messy_folder, "--out", run, "--steps", "8", "--resume", "--json", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["step"] == 8
    changed = cli("train-vqvae", messy_folder, "--out", run, "--steps", "9", "--resume", "--codebook-size", "32")
    assert_one_line_error(changed, 2, "codebook-size 64")
    again = cli("train-vqvae", messy_folder, "--out", run, *TINY)
    assert_one_line_error(again, 2, "--force")


@pytest.mark.slow
def test_train_vqvae_fsq_into_the_default_run_dir(tmp_path):
    proc = run_cli("train-vqvae", SAMPLES / "generated", "--quantizer", "fsq", "--steps", "3", "--json", *TINY,
                   cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["quantizer"] == "fsq" and summary["codebook_size"] == 64  # levels [8, 8]
    assert summary["run_dir"] == "runs/tokenizer/train" and (tmp_path / summary["run_dir"] / "model.safetensors").is_file()


@pytest.mark.parametrize("args, contains", [
    (["--quantizer", "rvq"], "quantizer"),
    (["--downsample", "5"], "downsample"),
    (["--image-size", "36"], "multiple"),
    (["--quantizer", "fsq", "--codebook-size", "1000"], "power-of-two"),
    (["--preset", "dalle"], "preset"),
    (["--steps", "0"], "steps"),
])
def test_train_vqvae_bad_options(tmp_path, args, contains):
    proc = cli("train-vqvae", SAMPLES / "generated", "--out", tmp_path / "run", *TINY, *args)
    assert_one_line_error(proc, 2, contains)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_train_vqvae_unusable_data(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("train-vqvae", tmp_path / "empty", "--out", tmp_path / "r", *TINY), 2, "no readable images")
    assert_one_line_error(cli("train-vqvae", tmp_path / "missing", "--out", tmp_path / "r", *TINY), 2, "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"junk")
    assert_one_line_error(cli("train-vqvae", tmp_path / "junk", "--out", tmp_path / "r", *TINY), 2, "no readable images")


# --------------------------------------------------------------------------- tokenize-image

def test_tokenize_json_and_token_files_round_trip(tmp_path, checkpoint):
    photos = SAMPLES / "photos"
    proc = cli("tokenize-image", photos, "-c", checkpoint, "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    records = json_lines(proc.stdout)
    model, _ = load_checkpoint(checkpoint, kind="vqvae")
    assert len(records) == 6 and all(r["grid"] == [4, 4] and len(r["tokens"]) == 16 for r in records)
    expected = model.tokenize(load_image(photos / "astronaut.jpg", 32).unsqueeze(0))[0].flatten().tolist()
    assert next(r for r in records if r["file"].endswith("astronaut.jpg"))["tokens"] == expected
    assert {r["tokenizer"] for r in records} == {model.fingerprint()}

    for name in ("tokens.safetensors", "tokens.jsonl"):
        assert cli("tokenize-image", photos, "-c", checkpoint, "--out", tmp_path / name, "-q").returncode == 0
        grids = read_tokens(tmp_path / name)
        assert [g.tokens.flatten().tolist() for g in grids] == [r["tokens"] for r in records]
        out = tmp_path / f"decoded-{name}"
        proc = cli("tokenize-image", "--decode", tmp_path / name, "-c", checkpoint, "--out", out, "--json")
        assert proc.returncode == 0, proc.stderr
        assert len(json_lines(proc.stdout)) == 6
        decoded = load_image(out / "astronaut.png")
        direct = model.decode_tokens(torch.tensor(expected).reshape(1, 4, 4))[0].clamp(-1, 1)
        assert decoded.shape == (3, 32, 32) and (decoded - direct).abs().max() < 2 / 255 + 1e-6

    stdout_file = tmp_path / "stdout.jsonl"  # what --json prints is a tokens file too
    stdout_file.write_text(proc.stdout and cli("tokenize-image", photos, "-c", checkpoint, "--json", "-q").stdout)
    assert cli("tokenize-image", "--decode", stdout_file, "-c", checkpoint, "--out", tmp_path / "d3").returncode == 0
    exists = cli("tokenize-image", photos, "-c", checkpoint, "--out", tmp_path / "tokens.jsonl")
    assert_one_line_error(exists, 2, "--force")


def test_reconstruct_reports_psnr_and_ssim(tmp_path, checkpoint):
    proc = cli("tokenize-image", SAMPLES / "generated", "-c", checkpoint, "--reconstruct", "--out", tmp_path / "rec",
               "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    records = json_lines(proc.stdout)
    per_image, overall = records[:-1], records[-1]["overall"]
    assert len(per_image) == 16 and overall["images"] == 16
    assert overall["psnr"] == pytest.approx(sum(r["psnr"] for r in per_image) / 16, abs=1e-2)
    assert all(0 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1 for r in per_image)
    assert Image.open(per_image[0]["out"]).size == (32, 32)


def test_tokenize_bad_files_fail_alone(tmp_path, checkpoint, messy_folder):
    proc = cli("tokenize-image", messy_folder, "-c", checkpoint, "--json", "-q")
    error = assert_one_line_error(proc, 1, "not a readable image")
    assert "corrupt.png" in error
    assert len(json_lines(proc.stdout)) == 8  # every other image (grayscale and RGBA too) was tokenized
    text = messy_folder / "nested" / "notes.txt"
    assert_one_line_error(cli("tokenize-image", text, "-c", checkpoint), 1, "notes.txt")
    assert_one_line_error(cli("tokenize-image", tmp_path / "nope.png", "-c", checkpoint), 1, "not found")


def test_tokenize_unusable_input(tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("tokenize-image", tmp_path / "empty", "-c", checkpoint), 2, "no input files")
    toy = tmp_path / "toy.safetensors"
    save_checkpoint(toy, torch.nn.Linear(8, 1), CheckpointMeta.of("toy", {"in_features": 8}))
    assert_one_line_error(cli("tokenize-image", SAMPLES / "photos", "-c", toy), 2, "expected vqvae")
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pickle)
    assert_one_line_error(cli("tokenize-image", SAMPLES / "photos", "-c", pickle), 2, "pickle")
    assert_one_line_error(cli("tokenize-image", SAMPLES / "photos", "-c", checkpoint, "--reconstruct"), 2, "--out")
    assert_one_line_error(cli("tokenize-image", "-c", checkpoint), 2, "images")
    assert_one_line_error(cli("tokenize-image", SAMPLES / "photos", "-c", checkpoint, "-o", tmp_path / "t.npy"), 2,
                          ".jsonl or .safetensors")


def test_decode_refuses_foreign_and_out_of_range_tokens(tmp_path, checkpoint):
    model, _ = load_checkpoint(checkpoint, kind="vqvae")
    line = {"grid": [4, 4], "tokenizer": model.fingerprint(), "codebook_size": 64}
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text(json.dumps({**line, "file": "good.png", "tokens": list(range(16))}) + "\n"
                      + json.dumps({**line, "file": "bad.png", "tokens": [70] * 16}) + "\n")
    proc = cli("tokenize-image", "--decode", tokens, "-c", checkpoint, "--out", tmp_path / "out")
    assert_one_line_error(proc, 1, "outside the codebook")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]  # the good one is still decoded

    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({**line, "tokenizer": "0123456789abcdef", "file": "a.png", "tokens": [1] * 16}))
    proc = cli("tokenize-image", "--decode", foreign, "-c", checkpoint, "--out", tmp_path / "out2")
    assert_one_line_error(proc, 2, "another tokenizer")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage")
    assert_one_line_error(cli("tokenize-image", "--decode", garbage, "-c", checkpoint, "--out", tmp_path / "o3"), 2,
                          "tokens file")
