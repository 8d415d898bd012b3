"""One rule for every trainer (dsfuse/runs.py): `--resume` adopts the run's recorded options, takes more
steps, and refuses an explicitly given option that contradicts the record, in one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error, run_cli

SAMPLES = REPO / "samples"
TINY_VQ = ["--image-size", "32", "--downsample", "8", "--codebook-size", "64", "--base-channels", "8",
           "--latent-channels", "4", "--batch-size", "4"]


def make_video(root: Path) -> Path:
    data = root / "video"
    assert run_cli("classify-video", "make-dataset", data, "--per-class", "3", "--frames", "8", "--size", "32",
                   "-q").returncode == 0
    return data


def make_speech(root: Path) -> Path:
    data = root / "speech"
    assert run_cli("audio-emotion", "synthetic", data, "--voices", "3", "--sentences", "3", "--heldout-voices", "1",
                   "--heldout-sentences", "1", "-q").returncode == 0
    return data / "train"


def make_tokenizer(root: Path) -> Path:
    run = root / "vq"
    assert run_cli("train-vqvae", SAMPLES / "images", "--out", run, "--steps", "2", "-q", *TINY_VQ).returncode == 0
    return run


def make_shapes(root: Path) -> Path:
    """Captioned shapes in ROOT/train and a tokenizer in ROOT/vq.safetensors (the options name them by DATA)."""
    from dsfuse.checkpoint import CheckpointMeta, save_checkpoint
    from dsfuse.models.vqvae import VQVAE, VQVAEConfig

    assert run_cli("make-shapes", root / "shapes", "--train", "8", "--heldout", "0", "--size", "16",
                   "-q").returncode == 0
    cfg = VQVAEConfig(image_size=16, downsample=4, codebook_size=16, latent_channels=4, base_channels=16,
                      channel_mult=(1, 2), attention=False)
    save_checkpoint(root / "shapes" / "vq.safetensors", VQVAE(cfg), CheckpointMeta.of("vqvae", cfg))
    return root / "shapes"


# trainer: (make its data (root -> path), the command and its positional arguments, the options of the first
# run, the options it needs again to resume (besides --out), an option to contradict and its other value)
TRAINERS = {
    "train-vqvae": (lambda root: SAMPLES / "images", ["train-vqvae", "DATA"], TINY_VQ, [], "--codebook-size", "32"),
    "train-ddpm": (lambda root: SAMPLES / "images", ["train-ddpm", "DATA"],
                   ["--image-size", "16", "--base-channels", "8", "--channel-mults", "1,2", "--res-blocks", "1",
                    "--attention", "8", "--batch-size", "4", "--sample-every", "0"], [], "--schedule", "linear"),
    "classify-video train": (make_video, ["classify-video", "train", "DATA"], ["--batch-size", "4", "--held-out",
                                                                               "0.34"], [], "--backbone", "r3d_18"),
    "audio-emotion train": (make_speech, ["audio-emotion", "train", "DATA"], ["--dim", "32", "--depth", "1",
                                                                              "--batch-size", "4"], [], "--dim", "64"),
    "train-compressor": (make_tokenizer, ["train-compressor", str(SAMPLES / "images")],
                         ["--width", "16", "--depth", "1", "--views", "16", "--batch-size", "4"],
                         ["--checkpoint", "DATA"], "--ratio", "16"),
    "train-unified": (make_shapes, ["train-unified", "DATA/train"],
                      ["--tokenizer", "DATA/vq.safetensors", "--dim", "32", "--heads", "2", "--experts", "4",
                       "--batch-size", "4", "--sample-every", "0"], [], "--fusion", "parallel"),
    "train-moe": (lambda root: root, ["train-moe"], ["--experts", "8", "--top-k", "2", "--batch-size", "32"], [],
                  "--experts", "16"),
}


@pytest.mark.slow
@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_resume_adopts_the_run_and_refuses_contradictions(trainer, tmp_path):
    make_data, command, options, needed, option, other = TRAINERS[trainer]
    data = str(make_data(tmp_path))
    command, options, needed = ([a.replace("DATA", data) for a in args] for args in (command, options, needed))
    run = ["--out", str(tmp_path / "run"), "--device", "cpu"]
    first = run_cli(*command, *options, *needed, *run, "--steps", "2", "--json", "-q")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.splitlines()[-1])["step"] == 2

    # the run's options are adopted: they are not given again, nor is the same value refused
    same = options[options.index(option) + 1:options.index(option) + 2] if option in options else []
    resumed = run_cli(*command, *needed, *run, "--steps", "3", "--resume", "--json", "-q",
                      *([option, *same] if same else []))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["step"] == 3

    changed = run_cli(*command, *needed, *run, "--steps", "4", "--resume", option, other)
    assert_one_line_error(changed, 2, option)
    assert "--resume cannot change it" in changed.stderr
