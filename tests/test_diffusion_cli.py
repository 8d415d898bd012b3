"""End to end: `train-ddpm` and `sample` as real subprocesses, on tiny images, and their bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, json_lines, run_cli
from dsfuse.checkpoint import CheckpointMeta, read_metadata, save_checkpoint
from dsfuse.data.synth import shapes_image

pytestmark = pytest.mark.slow

TINY_UNET = ["--base-channels", "16", "--channel-mults", "1,2", "--res-blocks", "1", "--attention", "8",
             "--batch-size", "8", "--lr", "1e-3", "-q", "--device", "cpu"]


def write_class_folders(root, sizes=(("discs", (20, 24)), ("shapes", (16, 40)))):
    """Two classes of images of mixed sizes (train-ddpm resizes them rather than refusing)."""
    rng = np.random.default_rng(0)
    for name, sides in sizes:
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(shapes_image(sides[i % len(sides)], rng)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A class-conditional run of 6 steps at 16 px, shared by the tests below."""
    root = tmp_path_factory.mktemp("ddpm")
    data = write_class_folders(root / "data")
    run = root / "run"
    proc = run_cli("train-ddpm", data, "--out", run, "--class-conditional", "--image-size", "16", "--steps", "6",
                   "--sample-every", "3", "--json", *TINY_UNET)
    assert proc.returncode == 0, proc.stderr
    return root, data, run, json_lines(proc.stdout)[0]


def test_train_writes_a_samplable_run_with_grids_and_classes(trained):
    _, _, run, record = trained
    assert record["step"] == 6 and record["classes"] == ["discs", "shapes"] and record["images"] == 12
    meta = read_metadata(run)
    assert meta.kind == "unet" and list(meta.classes) == ["discs", "shapes"]
    assert meta.setup["schedule"] == "cosine" and meta.config["image_size"] == 16
    for name in ("samples_000003.png", "samples_000006.png", "samples.png", "curves.png", "train_state.pt"):
        assert (run / name).is_file(), name
    grid = np.asarray(Image.open(run / "samples.png"))
    assert grid.shape[0] > 16 * 4 and grid.std() > 0  # a 4x4 grid of real pictures, not a blank


def test_sample_writes_pngs_and_a_grid_and_repeats_with_the_same_seed(trained):
    root, _, run, _ = trained
    a, b, c = root / "a", root / "b", root / "c"
    for out, seed in ((a, "3"), (b, "3"), (c, "4")):
        proc = run_cli("sample", "--checkpoint", run / "model.safetensors", "--out", out, "--n", "3",
                       "--sampler", "dpm++", "--steps", "4", "--class", "shapes", "--seed", seed, "--json", "-q",
                       "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
    record = json_lines(proc.stdout)[0]
    assert record["n"] == 3 and len(record["files"]) == 3 and record["seconds_per_image"] > 0
    files = sorted(p.name for p in a.glob("*.png"))
    assert files == ["0_shapes.png", "1_shapes.png", "2_shapes.png", "grid.png"]
    assert Image.open(a / "0_shapes.png").size == (16, 16)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files), "same seed, same images"
    assert (a / "grid.png").read_bytes() != (c / "grid.png").read_bytes(), "another seed, other images"


@pytest.mark.parametrize("sampler, extra", [("ddpm", []), ("ddim", ["--eta", "1"])])
def test_sample_to_a_grid_file_with_each_sampler(trained, sampler, extra):
    root, _, run, _ = trained
    grid = root / f"grid_{sampler}.png"
    proc = run_cli("sample", "-c", run, "--out", grid, "--n", "4", "--sampler", sampler, "--steps", "3",
                   "--guidance", "1", *extra, "-q", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(grid).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 grid with 2 px padding
    assert_one_line_error(run_cli("sample", "-c", run, "--out", grid, "--n", "4", "--steps", "3"), 2,
                          "pass --force")


def test_resume_continues_the_run(trained, tmp_path):
    _, data, run, _ = trained
    copy = tmp_path / "run"
    copy.mkdir()
    for f in run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    proc = run_cli("train-ddpm", data, "--out", copy, "--class-conditional", "--image-size", "16", "--steps", "8",
                   "--resume", "--json", *TINY_UNET)
    assert proc.returncode == 0, proc.stderr
    assert json_lines(proc.stdout)[0]["step"] == 8


def test_latent_mode_trains_on_tokenizer_latents_and_samples_through_its_decoder(tmp_path, trained):
    from dsfuse.models.vqvae import VQVAE, VQVAEConfig

    _, data, unet_run, _ = trained
    cfg = VQVAEConfig(image_size=16, downsample=4, codebook_size=16, latent_channels=4, base_channels=16,
                      channel_mult=(1, 2), attention=False)
    tokenizer = save_checkpoint(tmp_path / "vq.safetensors", VQVAE(cfg), CheckpointMeta.of("vqvae", cfg))
    run = tmp_path / "latent"
    proc = run_cli("train-ddpm", data, "--out", run, "--tokenizer", tokenizer, "--steps", "3", "--sample-every", "0",
                   "--json", *TINY_UNET)
    assert proc.returncode == 0, proc.stderr
    assert json_lines(proc.stdout)[0]["latent"] is True
    meta = read_metadata(run)
    assert meta.config["in_channels"] == 4 and meta.config["image_size"] == 4  # 16 px / 4
    assert meta.setup["tokenizer"] == "tokenizer.safetensors"
    assert read_metadata(run / "tokenizer.safetensors").kind == "vqvae", "the run keeps its own tokenizer"
    out = tmp_path / "latent-samples"
    proc = run_cli("sample", "-c", run, "--out", out, "--n", "2", "--steps", "3", "-q", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out / "0.png").size == (16, 16), "decoded back to pixels"
    resumed = run_cli("train-ddpm", data, "--out", run, "--steps", "4", "--resume", "--json", *TINY_UNET)
    assert resumed.returncode == 0, resumed.stderr  # through the run's own tokenizer, at the run's latent scale
    assert json_lines(resumed.stdout)[0]["latent"] is True and read_metadata(run).setup == meta.setup
    assert_one_line_error(run_cli("train-ddpm", data, "--out", unet_run, "--steps", "7", "--resume", "--tokenizer",
                                  tokenizer, "-q"), 2, "--tokenizer")

    (run / "tokenizer.safetensors").unlink()
    assert_one_line_error(run_cli("sample", "-c", run, "--out", tmp_path / "x.png"), 2, "tokenizer.safetensors")
    assert_one_line_error(run_cli("train-ddpm", data, "--out", tmp_path / "bad", "--tokenizer", unet_run, "-q"),
                          2, "expected vqvae")


def test_train_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("train-ddpm", tmp_path / "empty", "--out", tmp_path / "r1"), 2,
                          "no readable images")
    assert_one_line_error(run_cli("train-ddpm", tmp_path / "missing", "--out", tmp_path / "r2"), 2, "not a folder")
    data = write_class_folders(tmp_path / "data")
    assert_one_line_error(run_cli("train-ddpm", data, "--out", tmp_path / "r3", "--steps", "0"), 2, "steps")
    assert_one_line_error(run_cli("train-ddpm", data, "--out", tmp_path / "r4", "--schedule", "quadratic"), 2,
                          "--schedule")
    assert_one_line_error(run_cli("train-ddpm", data, "--out", tmp_path / "r5", "--objective", "score"), 2,
                          "--objective")
    assert_one_line_error(run_cli("train-ddpm", data, "--out", tmp_path / "r6", "--image-size", "20",
                                  "--channel-mults", "1,2,2,2"), 2, "divisible")
    assert not any((tmp_path / name).exists() for name in ("r1", "r3", "r6")), "bad input leaves no run dir"


def test_sample_bad_input(trained, tmp_path):
    _, _, run, _ = trained
    out = tmp_path / "out"
    assert_one_line_error(run_cli("sample", "-c", run, "--out", out, "--steps", "0"), 2, "--steps")
    assert_one_line_error(run_cli("sample", "-c", run, "--out", out, "--steps", "1001"), 2, "--steps")
    assert_one_line_error(run_cli("sample", "-c", run, "--out", out, "--n", "0"), 2, "--n")
    assert_one_line_error(run_cli("sample", "-c", run, "--out", out, "--class", "zebras"), 2,
                          "unknown class 'zebras'")
    assert_one_line_error(run_cli("sample", "-c", run, "--out", out, "--sampler", "euler"), 2, "--sampler")
    assert_one_line_error(run_cli("sample", "-c", tmp_path / "nothing", "--out", out), 2, "checkpoint not found")

    import torch

    from toy_model import ToyConfig, ToyRegressor

    toy = save_checkpoint(tmp_path / "toy.safetensors", ToyRegressor(ToyConfig()), CheckpointMeta.of("toy", ToyConfig()))
    assert_one_line_error(run_cli("sample", "-c", toy, "--out", out), 2, "expected unet")
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pickle)
    assert_one_line_error(run_cli("sample", "-c", pickle, "--out", out), 2, "refusing a pickle")
    assert not out.exists(), "nothing written on bad input"
