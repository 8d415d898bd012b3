"""classify-video predict --segment: a label timeline over a video, streamed as JSON lines, and --render."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, assert_one_line_error, json_lines, run_cli
from dsfuse.checkpoint import CheckpointMeta, save_checkpoint
from dsfuse.data.media import write_video
from dsfuse.data.video import probe_video, read_all_frames
from dsfuse.models.video import VideoClassifier, VideoConfig

SAMPLES = REPO / "samples" / "video"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
CLASSES = ("down", "left", "right", "up")


def checkpoint(path: Path, fusion: str = "none") -> Path:
    """An untrained small 3D CNN with class names: the timeline's plumbing does not need a good model."""
    torch.manual_seed(0)
    config = VideoConfig.for_backbone("small3d", len(CLASSES), fusion=fusion)
    return save_checkpoint(path, VideoClassifier(config).eval(), CheckpointMeta.of("video", config, classes=CLASSES))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("timeline")
    frames = np.zeros((36, 48, 64, 3), np.uint8)  # 3 s at 12 fps, a bright square crossing the frame
    for t in range(len(frames)):
        frames[t, 16:32, t:t + 16] = 255
    return write_video(root / "long.mp4", frames, fps=12), checkpoint(root / "model.safetensors")


def test_segments_stream_as_json_lines_and_one_covers_a_short_video(setup, tmp_path):
    video, model = setup
    proc = run_cli("classify-video", "predict", video, "-c", model, "--segment", "1", "--clips", "1", "--top-k", "2",
                   "--json", "-q", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    records = json_lines(proc.stdout)
    assert [(r["start"], r["end"]) for r in records] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    assert all(r["file"] == str(video) and len(r["top"]) == 2 and r["top"][0]["label"] in CLASSES for r in records)
    proc = run_cli("classify-video", "predict", video, "-c", model, "--segment", "60", "--clips", "1", "--json", "-q",
                   env=ONE_THREAD)
    assert [(r["start"], r["end"]) for r in json_lines(proc.stdout)] == [(0.0, 3.0)]


def test_render_draws_the_label_on_every_frame_and_refuses_to_overwrite(setup, tmp_path):
    video, model = setup
    out = tmp_path / "labelled.mp4"
    args = ["classify-video", "predict", video, "-c", model, "--segment", "1.5", "--clips", "1", "-q", "--render", out]
    proc = run_cli(*args, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert "0.00-    1.50" in proc.stderr  # the timeline is still printed
    _, source = read_all_frames(video)
    _, rendered = read_all_frames(out)
    assert rendered.shape == source.shape and probe_video(out).fps == pytest.approx(12)
    band = rendered[:, :4, :8].float()  # the caption's dark band replaces the frame's top left corner
    assert band.mean() < 40 and (rendered[:, :12] != source[:, :12]).any()
    assert_one_line_error(run_cli(*args, env=ONE_THREAD), 2, "--force")
    assert run_cli(*args, "--force", env=ONE_THREAD).returncode == 0
    proc = run_cli("classify-video", "predict", video, video, "-c", model, "--segment", "1", "--render",
                   tmp_path / "two.mp4")
    assert_one_line_error(proc, 2, "one video")
    assert not (tmp_path / "two.mp4").exists()


def test_a_fused_model_hears_each_segments_own_sound(tmp_path):
    from dsfuse.tasks.video import load_predictor

    predictor = load_predictor(checkpoint(tmp_path / "fused.safetensors", "gated"), None, False, top_k=1, clips=1,
                               device="cpu")
    path = SAMPLES / "left.mp4"
    records = list(predictor.timeline(path, 0.5))
    assert len(records) >= 2 and records[-1]["end"] == pytest.approx(probe_video(path).duration, abs=1e-3)
    spans = [(r["start"], r["end"]) for r in records]
    first, second = (predictor.soundtrack(path, span) for span in spans[:2])
    assert first.shape == second.shape and not torch.equal(first, second)
