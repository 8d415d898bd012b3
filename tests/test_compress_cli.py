from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import REPO, assert_one_line_error, json_lines, run_cli
from dsfuse.checkpoint import CheckpointMeta, load_checkpoint, read_metadata, save_checkpoint
from dsfuse.data.tokens import TokenGrid, write_tokens
from dsfuse.models.compressor import CompressorConfig, TokenCompressor, compress, expand, run_trial
from dsfuse.models.vqvae import VQVAE, VQVAEConfig
from dsfuse.nn.compress import CompressionError

PHOTOS = REPO / "samples" / "images" / "photos"
SHAPES = REPO / "samples" / "images" / "generated"


def smooth_features(side: int = 8, dim: int = 16, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, dim, 2, 2, generator=generator)
    field = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    field = field + 0.05 * torch.randn(1, dim, side, side, generator=generator)
    return field[0].permute(1, 2, 0).reshape(side * side, dim).numpy()


@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory):
    """A tiny, untrained VQ-VAE: 32 px images -> 8x8 grids of 8-d latents."""
    torch.manual_seed(0)
    cfg = VQVAEConfig(image_size=32, downsample=4, codebook_size=64, latent_channels=8, base_channels=8,
                      channel_mult=(1, 2, 2), attention=False)
    path = tmp_path_factory.mktemp("vq") / "model.safetensors"
    save_checkpoint(path, VQVAE(cfg).eval(), CheckpointMeta.of("vqvae", cfg))
    return path


@pytest.fixture
def features(tmp_path):
    path = tmp_path / "feat.npy"
    np.save(path, smooth_features())
    return path


# --------------------------------------------------------------------------- the core, in process

def test_trainable_compressors_reconstruct_shapes_and_round_trip_through_checkpoints(tmp_path):
    x = torch.randn(2, 64, 8)
    for method in ("resampler", "pixel-shuffle"):
        model = TokenCompressor(CompressorConfig(method, dim=8, grid=(8, 8), ratio=4, width=16, heads=2)).eval()
        out = compress(x, (8, 8), method, 4, model)
        assert out.tokens.shape == (2, 16, 8) and torch.allclose(out.sizes, torch.full((2, 16), 4.0))
        assert expand(out, (8, 8), method, 4, model).shape == x.shape
        save_checkpoint(tmp_path / f"{method}.safetensors", model, CheckpointMeta.of("compressor", model.config))
        loaded, _ = load_checkpoint(tmp_path / f"{method}.safetensors", "compressor")
        assert loaded.config.grid == (8, 8)
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_compress_refuses_what_a_method_cannot_do():
    x = torch.randn(1, 64, 8)
    with pytest.raises(CompressionError, match="at least 1"):
        compress(x, (8, 8), "tome", 0.5)
    with pytest.raises(CompressionError, match="does not split"):
        compress(x, (8, 8), "pixel-shuffle", 3)
    with pytest.raises(CompressionError, match="trained compressor"):
        compress(x, (8, 8), "resampler", 4)
    model = TokenCompressor(CompressorConfig("resampler", dim=8, grid=(8, 8), ratio=4, width=16, heads=2))
    with pytest.raises(CompressionError, match="trained for ratio 4"):
        compress(x, (8, 8), "resampler", 2, model)
    with pytest.raises(CompressionError, match="8x8 grid of 8-d"):
        compress(torch.randn(1, 64, 4), (8, 8), "resampler", 4, model)
    with pytest.raises(CompressionError, match="needs the token grid"):
        compress(torch.randn(1, 60, 8), None, "pool", 4)


def test_pool_and_tome_trials_lose_less_at_lower_ratios():
    x = torch.from_numpy(smooth_features(side=16))[None]
    for method in ("pool", "tome"):
        errors = [(run_trial(x, (16, 16), method, r, repeats=1).expanded - x).pow(2).mean() for r in (2, 4, 16)]
        assert errors[0] < errors[1] < errors[2], (method, errors)


# --------------------------------------------------------------------------- the command

@pytest.mark.slow
def test_tome_on_a_tensor_file_writes_tokens_sizes_and_source(features, tmp_path):
    out = tmp_path / "c.safetensors"
    proc = run_cli("compress-tokens", features, "--method", "tome", "--ratio", "2", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    [record] = json_lines(proc.stdout)
    assert (record["tokens_in"], record["tokens_out"], record["fidelity_metric"]) == (64, 32, "attention_cosine")
    assert 0.9 < record["fidelity"] <= 1.0
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("tokens").shape == (32, 16)
        assert f.get_tensor("sizes").sum() == 64
        assert f.get_tensor("source").max() == 31
        assert json.loads(f.metadata()["compressed"])["method"] == "tome"
    again = run_cli("compress-tokens", features, "--method", "tome", "--ratio", "2", "--out", out)
    assert_one_line_error(again, 2, "output exists")


@pytest.mark.slow
def test_compare_table_on_features(features):
    proc = run_cli("compress-tokens", features, "--compare", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json_lines(proc.stdout)[0]
    cells = {(r["method"], r["ratio"]): r for r in report["results"]}
    assert report["metric"] == "attention_cosine"
    for method in ("pool", "tome"):
        assert cells[method, 2]["fidelity"] > cells[method, 16]["fidelity"]
        assert cells[method, 4]["tokens_out"] == 16
    assert cells["resampler", 4]["skipped"] == "no trained checkpoint"


@pytest.mark.slow
def test_train_resampler_then_compare_on_images(tokenizer_ckpt, tmp_path):
    run = tmp_path / "rs"
    proc = run_cli("train-compressor", SHAPES, "--out", run, "--checkpoint", tokenizer_ckpt, "--method",
                   "resampler", "--ratio", "4", "--steps", "12", "--batch-size", "4", "--width", "16", "--json",
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    summary = json_lines(proc.stdout)[0]
    assert (summary["tokens_in"], summary["tokens_out"]) == (64, 16)
    assert summary["psnr"] is not None and summary["pool_psnr"] is not None
    fingerprint = load_checkpoint(tokenizer_ckpt, "vqvae")[0].fingerprint()
    assert read_metadata(run).setup["tokenizer"] == fingerprint
    for name in ("model.safetensors", "train_state.pt", "metrics.jsonl", "curves.png", "reconstructions.png"):
        assert (run / name).is_file(), name

    picture = tmp_path / "compare.png"
    proc = run_cli("compress-tokens", PHOTOS / "coffee.jpg", PHOTOS / "rocket.jpg", "--compare", "--json",
                   "-c", tokenizer_ckpt, "-c", run, "--out", picture)
    assert proc.returncode == 0, proc.stderr
    report = json_lines(proc.stdout)[0]
    cells = {(r["method"], r["ratio"]): r for r in report["results"]}
    assert report["metric"] == "psnr_db" and len(report["inputs"]) == 2
    assert "fidelity" in cells["resampler", 4] and "skipped" in cells["resampler", 2]
    assert cells["pool", 2]["fidelity"] > 0 and "fidelity" in cells["tome", 16]
    with Image.open(picture) as im:  # 4 methods x (reference + 3 ratios) tiles of 32 px
        assert im.size == (4 * 34 + 2, 4 * 34 + 2)

    tokens_file = tmp_path / "tokens.jsonl"
    write_tokens(tokens_file, [TokenGrid(f"img{i}.png", torch.randint(0, 64, (8, 8)), fingerprint, 64) for i in range(2)])
    proc = run_cli("compress-tokens", tokens_file, "--method", "tome", "--ratio", "2", "-c", tokenizer_ckpt,
                   "--out", tmp_path / "from_tokens", "--json")
    assert proc.returncode == 0, proc.stderr
    [record] = json_lines(proc.stdout)
    assert [r["tokens_out"] for r in record["items"]] == [32, 32]
    assert record["items"][0]["fidelity_metric"] == "psnr_db"
    assert (tmp_path / "from_tokens" / "tokens_img0.tome-x2.safetensors").is_file()

    out = tmp_path / "rs4.safetensors"
    proc = run_cli("compress-tokens", PHOTOS / "coffee.jpg", "--method", "resampler", "--ratio", "4",
                   "-c", tokenizer_ckpt, "-c", run, "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json_lines(proc.stdout)[0]["tokens_out"] == 16 and out.is_file()


@pytest.mark.slow
def test_bad_input_is_one_line(features, tokenizer_ckpt, tmp_path):
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 16), dtype=np.float32))
    assert_one_line_error(run_cli("compress-tokens", empty, "--method", "pool"), 1, "empty")  # that file's error
    assert_one_line_error(run_cli("compress-tokens", features, "--method", "pool", "--ratio", "0.5"), 2, "--ratio")
    assert_one_line_error(run_cli("compress-tokens", features, "--method", "pixel-shuffle", "--ratio", "3",
                                  "--out", tmp_path / "x.safetensors"), 2, "does not split")
    assert_one_line_error(run_cli("compress-tokens", features, "--method", "resampler", "--out",
                                  tmp_path / "y.safetensors"), 2, "trained compressor checkpoint")
    assert_one_line_error(run_cli("compress-tokens", PHOTOS / "coffee.jpg", "--method", "pool"), 2, "tokenizer")
    assert_one_line_error(run_cli("train-compressor", SHAPES, "--out", tmp_path / "r", "-c", tokenizer_ckpt,
                                  "--method", "pixel-shuffle", "--ratio", "3"), 2, "does not split")
    assert not (tmp_path / "r").exists()  # refused before a run directory was made
    assert_one_line_error(run_cli("train-compressor", SHAPES, "--out", tmp_path / "r", "-c", tokenizer_ckpt,
                                  "--method", "tome"), 2, "--method")
    assert_one_line_error(run_cli("compress-tokens", features), 2, "--method")
    assert_one_line_error(run_cli("compress-tokens", features, "--method", "pool", "-c", features), 2,
                          "safetensors")
    foreign = tmp_path / "foreign.jsonl"
    write_tokens(foreign, [TokenGrid("x.png", torch.ones(8, 8, dtype=torch.long), "0123456789abcdef", 64)])
    assert_one_line_error(run_cli("compress-tokens", foreign, "--method", "pool", "-c", tokenizer_ckpt), 2,
                          "different tokenizer")
    fingerprint = load_checkpoint(tokenizer_ckpt, "vqvae")[0].fingerprint()
    wrong_grid = tmp_path / "wrong_grid.safetensors"
    write_tokens(wrong_grid, [TokenGrid("x.png", torch.ones(4, 4, dtype=torch.long), fingerprint, 64)])
    assert_one_line_error(run_cli("compress-tokens", wrong_grid, "--method", "pool", "-c", tokenizer_ckpt), 2,
                          "different tokenizer")
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"not an array")
    assert_one_line_error(run_cli("compress-tokens", corrupt, "--method", "pool"), 1, "npy")
    missing = run_cli("compress-tokens", tmp_path / "nope.npy", "--method", "pool")
    assert_one_line_error(missing, 1, "file not found")


def test_one_output_file_for_several_inputs_is_refused(features, tokenizer_ckpt, tmp_path):
    other = tmp_path / "other.npy"
    other.write_bytes(features.read_bytes())
    proc = run_cli("compress-tokens", features, other, "--method", "pool", "--ratio", "4",
                   "--out", tmp_path / "X.safetensors")
    assert_one_line_error(proc, 2, "must be a folder")
    assert not (tmp_path / "X.safetensors").exists()
