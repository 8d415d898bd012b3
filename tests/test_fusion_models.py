"""Generated audio-visual pairs, the fusion models, and classify-video with --fusion end to end."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import REPO, assert_one_line_error, json_lines, run_cli
from dsfuse.checkpoint import MODEL_KINDS, CheckpointMeta, load_checkpoint, read_metadata, save_checkpoint
from dsfuse.data.av_synth import HIGH_HZ, LOW_HZ, SAMPLE_RATE, AudioVisualSet, audio_visual_pair
from dsfuse.models.av_fusion import AVFusionClassifier, AVFusionConfig


def _moves_right(clip: np.ndarray) -> bool:
    """Where the saturated shape is, first frame against last."""
    saturation = clip.max(-1).astype(float) - clip.min(-1)
    xs = np.arange(clip.shape[2])
    centre = [(s * xs).sum() / s.sum() for s in saturation]
    return centre[-1] > centre[0]


def _pitch_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)[spectrum.argmax()])


def test_xor_labels_follow_motion_and_pitch():
    rng = np.random.default_rng(0)
    for _ in range(12):
        clip, audio, label = audio_visual_pair("xor", rng)
        pitch = _pitch_hz(audio)
        high = HIGH_HZ[0] - 20 <= pitch <= HIGH_HZ[1] + 20
        assert high or LOW_HZ[0] - 20 <= pitch <= LOW_HZ[1] + 20
        assert label == int(_moves_right(clip) != high)


def test_noisy_audio_labels_follow_motion_alone_and_the_audio_is_noise():
    rng = np.random.default_rng(1)
    for _ in range(8):
        clip, audio, label = audio_visual_pair("noisy-audio", rng)
        assert label == int(_moves_right(clip))
        spectrum = np.abs(np.fft.rfft(audio))
        assert spectrum.max() < 10 * np.median(spectrum)  # flat: no tone in it
    with pytest.raises(ValueError, match="task must be one of"):
        audio_visual_pair("sum", rng)


def test_set_pads_audio_of_different_lengths_with_a_mask():
    data = AudioVisualSet("xor", 16, seed=0)
    lengths = data.audio_mask.sum(1)
    assert lengths.min() < lengths.max() <= data.audio.shape[1]
    assert (data.audio[~data.audio_mask] == 0).all()
    item = data[3]
    assert item["video"].shape == (3, 8, 16, 16) and -1 <= item["video"].min() and item["video"].max() <= 1


def test_av_fusion_model_round_trips_through_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(MODEL_KINDS, "av-fusion", "dsfuse.models.av_fusion:AVFusionClassifier")  # a test's own kind
    data = AudioVisualSet("xor", 4, seed=0)
    model = AVFusionClassifier(AVFusionConfig(fusion="bottleneck", dim=32)).eval()
    logits = model(data.video, data.audio, data.audio_mask)
    assert logits.shape == (4, 2)
    save_checkpoint(tmp_path / "m.safetensors", model, CheckpointMeta.of("av-fusion", model.config))
    loaded, meta = load_checkpoint(tmp_path / "m.safetensors", kind="av-fusion")
    assert meta.config["fusion"] == "bottleneck"
    torch.testing.assert_close(loaded(data.video, data.audio, data.audio_mask), logits)


def test_audio_visual_video_model_takes_frames_and_soundtrack(tmp_path):
    from dsfuse.models.av_video import AudioVisualVideoClassifier, AVVideoConfig

    model = AudioVisualVideoClassifier(AVVideoConfig(fusion="gated", num_classes=3)).eval()
    frames = torch.randint(0, 256, (2, 8, 40, 40, 3), dtype=torch.uint8)
    mel, mask = torch.randn(2, 30, 64), torch.arange(30)[None] < torch.tensor([[30], [12]])
    logits = model(model.preprocess(frames), mel, mask)
    assert logits.shape == (2, 3)
    save_checkpoint(tmp_path / "av.safetensors", model, CheckpointMeta.of("av-video", model.config))
    loaded, _ = load_checkpoint(tmp_path / "av.safetensors", kind="av-video")  # nested configs rebuild
    torch.testing.assert_close(loaded(loaded.preprocess(frames), mel, mask), logits)


# --------------------------------------------------------------------------- classify-video --fusion

@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    data, run = root / "data", root / "run"
    made = run_cli("classify-video", "make-dataset", data, "--per-class", "3", "--frames", "8", "--size", "32",
                   "--audio", "-q")
    assert made.returncode == 0, made.stderr
    trained = run_cli("classify-video", "train", data, "--out", run, "--fusion", "gated", "--steps", "4",
                      "--batch-size", "4", "--held-out", "0.34", "--json", "-q")
    assert trained.returncode == 0, trained.stderr
    return data, run, json_lines(trained.stdout)[0]


@pytest.mark.slow
def test_fused_training_writes_a_fused_checkpoint(fused_run):
    _, run, summary = fused_run
    assert summary["fusion"] == "gated" and summary["classes"] == ["down", "left", "right", "up"]
    assert 0 <= summary["accuracy"] <= 1 and summary["held_out_videos"] == 4
    meta = read_metadata(run)
    assert meta.kind == "av-video" and meta.config["fusion"] == "gated"
    assert (run / "confusion.png").stat().st_size > 0 and (run / "curves.png").exists()


@pytest.mark.slow
def test_fused_predict_reports_a_video_without_audio_and_goes_on(fused_run, tmp_path):
    data, run, _ = fused_run
    silent = tmp_path / "silent.mp4"
    shutil.copy(REPO / "samples" / "video" / "no_audio.mp4", silent)
    proc = run_cli("classify-video", "predict", data / "left", silent, "--checkpoint", run, "--top-k", "2",
                   "--clips", "1", "--json", "-q")
    assert_one_line_error(proc, 1, "no audio track")
    assert str(silent) in proc.stderr
    records = json_lines(proc.stdout)
    assert len(records) == 3 and all(r["fusion"] == "gated" and len(r["top"]) == 2 for r in records)


@pytest.mark.slow
def test_fused_training_needs_videos_with_sound(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            shutil.copy(REPO / "samples" / "video" / "no_audio.mp4", tmp_path / name / f"{i}.mp4")
    proc = run_cli("classify-video", "train", tmp_path, "--out", tmp_path / "run", "--fusion", "mid", "-q")
    assert_one_line_error(proc, 2, "no video with an audio track")


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--fusion", "sum"], "unknown fusion 'sum'"),
    (["--compare-fusion", "--resume"], "cannot --resume"),
])
def test_bad_fusion_options_are_one_line_usage_errors(fused_run, tmp_path, args, message):
    data, _, _ = fused_run
    proc = run_cli("classify-video", "train", data, "--out", tmp_path / "run", *args, "-q")
    assert_one_line_error(proc, 2, message)
