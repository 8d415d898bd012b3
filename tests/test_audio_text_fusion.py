"""Audio + transcript fusion: the byte-level text encoder, the speech-emotion model under every fusion
strategy, and `audio-emotion train/predict --fusion` end to end on a tiny synthetic set with transcripts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsfuse import choices
from dsfuse.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from dsfuse.data.emotion_speech import LogMelClips
from dsfuse.data.transcripts import TranscribedClips, collate_transcribed, read_transcript, transcript_path
from dsfuse.errors import InputError
from dsfuse.models.audio import AudioEmotionClassifier, AudioEmotionConfig
from dsfuse.models.text import PAD_ID, TextConfig, encode_text
from tests.conftest import assert_one_line_error, json_lines, run_cli

STRATEGIES = [s for s in choices.values(choices.Fusion) if s != "none"]


def tiny_model(fusion: str = "gated") -> AudioEmotionClassifier:
    torch.manual_seed(0)
    return AudioEmotionClassifier(AudioEmotionConfig(
        n_mels=64, num_classes=3, dim=32, depth=1, n_heads=2, ffn_hidden=128, conv_channels=8, dropout=0.0,
        fusion=fusion, text=TextConfig(dim=32, depth=1, dropout=0.0), fusion_dim=32)).eval()


def batch_of(mels: list[torch.Tensor], texts: list[str]) -> dict[str, torch.Tensor]:
    items = [(m, torch.tensor(0), encode_text(t, 512)) for m, t in zip(mels, texts)]
    return collate_transcribed(items)


def test_text_is_utf8_bytes_cut_to_max_and_padded():
    assert encode_text("  héllo\n", 512).tolist() == list("héllo".encode())
    assert len(encode_text("x" * 900, 512)) == 512 and encode_text("", 8).tolist() == [32]
    batch = batch_of([torch.randn(30, 64), torch.randn(10, 64)], ["a longer sentence", "hi"])
    assert batch["text"].shape == (2, 17) and batch["text_mask"].sum(1).tolist() == [17, 2]
    assert (batch["text"][1, 2:] == PAD_ID).all() and batch["mask"].sum(1).tolist() == [30, 10]


@pytest.mark.parametrize("fusion", STRATEGIES)
def test_every_strategy_builds_runs_and_learns(fusion):
    model = tiny_model(fusion).train()
    batch = batch_of([torch.randn(40, 64), torch.randn(25, 64)], ["The train leaves at seven.", "Why?"])
    logits = model(batch["features"], batch["mask"], batch["text"], batch["text_mask"])
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    assert model.text.embed.weight.grad is not None and model.encoder.subsample.conv1.weight.grad is not None


@pytest.mark.parametrize("fusion", ["gated", "mid", "qformer"])
def test_padding_of_either_modality_does_not_change_a_clips_logits(fusion):
    model = tiny_model(fusion)
    mel, text = torch.randn(23, 64), "Please close the window."
    batch = batch_of([mel, torch.randn(61, 64)], [text, "A much longer transcript than the first one is."])
    alone = batch_of([mel], [text])
    with torch.no_grad():
        batched = model(batch["features"], batch["mask"], batch["text"], batch["text_mask"])
        single = model(alone["features"], alone["mask"], alone["text"], alone["text_mask"])
    torch.testing.assert_close(batched[0], single[0], atol=1e-5, rtol=1e-4)


def test_without_fusion_the_model_is_audio_alone():
    model = tiny_model("none")
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {"encoder", "pool", "head"}
    assert model.gate_weights() is None
    batch = batch_of([torch.randn(30, 64)], ["Ignored."])
    with torch.no_grad():
        torch.testing.assert_close(model(batch["features"], batch["mask"], batch["text"], batch["text_mask"]),
                                   model(batch["features"], batch["mask"]))
    with pytest.raises(ValueError, match="transcript"):
        tiny_model("late")(batch["features"], batch["mask"])


def test_the_transcript_changes_the_prediction():
    model = tiny_model("early")
    mel = torch.randn(1, 40, 64)
    a, b = batch_of([mel[0]], ["I am so happy today!"]), batch_of([mel[0]], ["Leave me alone."])
    with torch.no_grad():
        assert not torch.allclose(model(a["features"], a["mask"], a["text"], a["text_mask"]),
                                  model(b["features"], b["mask"], b["text"], b["text_mask"]))


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model("bottleneck")
    save_checkpoint(tmp_path / "m.safetensors", model,
                    CheckpointMeta.of("audio", model.config, classes=("a", "b", "c")))
    loaded, meta = load_checkpoint(tmp_path / "m.safetensors", kind="audio")
    assert loaded.config == model.config and list(meta.classes) == ["a", "b", "c"]
    batch = batch_of([torch.randn(33, 64)], ["Turn left at the bakery."])
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["features"], batch["mask"], batch["text"], batch["text_mask"]),
                                   model(batch["features"], batch["mask"], batch["text"], batch["text_mask"]))


def test_an_audio_text_checkpoint_of_old_is_refused_with_how_to_retrain(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, tmp_path / "old.safetensors", metadata={"kind": "audio-text", "config": "{}"})
    (tmp_path / "a.wav").write_bytes(b"")
    proc = run_cli("audio-emotion", "predict", tmp_path / "a.wav", "--checkpoint", tmp_path / "old.safetensors")
    assert "retrain it with audio-emotion train --fusion" in assert_one_line_error(proc, 2, "audio-text")


def test_fused_training_leaves_out_heldout_classes_training_never_saw(tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    from dsfuse.tasks.speech_emotion import SpeechEmotionOptions, load_training_data

    tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(8000) / 16000).astype(np.float32)
    for name in ("train/happy/a_1", "train/sad/a_2", "heldout/happy/b_1", "heldout/angry/b_2"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / f"{name}.wav", tone, 16000)
        (tmp_path / f"{name}.txt").write_text("Hello there.")
    options = SpeechEmotionOptions(data=tmp_path / "train", heldout=tmp_path / "heldout", fusion="gated", steps=1,
                                   batch_size=1, lr=1e-3)
    data = load_training_data(options, quiet=False)
    assert data.classes == ["happy", "sad"] and [c.label for c in data.heldout.clips] == ["happy"]
    assert len(data.heldout.text) == len(data.heldout.features) == 1
    assert "classes absent from training are left out: angry" in capsys.readouterr().err


def test_transcript_beside_the_audio(tmp_path):
    wav = tmp_path / "clip.wav"
    assert transcript_path(wav) == tmp_path / "clip.txt"
    with pytest.raises(InputError, match="no transcript clip.txt"):
        read_transcript(wav)
    (tmp_path / "clip.txt").write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        read_transcript(wav)
    (tmp_path / "clip.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(InputError, match="unreadable"):
        read_transcript(wav)
    (tmp_path / "clip.txt").write_text("Hello there.\n")
    assert read_transcript(wav) == "Hello there."


def test_dataset_pairs_crops_with_transcripts():
    clips = LogMelClips([torch.randn(300, 64), torch.randn(40, 64)], [0, 1], crop_frames=100)
    data = TranscribedClips(clips, [encode_text("one", 512), encode_text("two words", 512)])
    features, label, text = data[0]
    assert features.shape == (100, 64) and int(label) == 0 and bytes(text.tolist()) == b"one"
    with pytest.raises(ValueError):
        TranscribedClips(clips, [encode_text("one", 512)])


# --------------------------------------------------------------------------- the commands (end to end)

@pytest.mark.slow
def test_train_and_predict_with_transcripts_end_to_end(tmp_path):
    data, run = tmp_path / "synthetic", tmp_path / "run"
    made = run_cli("audio-emotion", "synthetic", data, "--voices", "3", "--sentences", "3", "--heldout-voices", "1",
                   "--heldout-sentences", "1", "--transcripts", "--json", "-q")
    assert made.returncode == 0, made.stderr
    wavs = sorted(data.rglob("*.wav"))
    assert len(wavs) == json.loads(made.stdout)["clips"] == 20
    assert all(transcript_path(w).read_text().strip().endswith((".", "?")) for w in wavs)

    # a training clip without its transcript: one warning, left out
    orphan = data / "train" / "sad" / "en+m1_s00.txt"
    orphan.unlink()
    trained = run_cli("audio-emotion", "train", data / "train", "--heldout", data / "heldout", "--out", run,
                      "--fusion", "gated", "--speaker-norm", "--steps", "6", "--dim", "32", "--depth", "1", "--batch-size", "8",
                      "--json", "--device", "cpu")  # not -q: it would silence the warning
    assert trained.returncode == 0, trained.stderr
    assert [line for line in trained.stderr.splitlines() if "en+m1_s00" in line][0].startswith("warning:")
    report = json.loads(trained.stdout)
    assert report["fusion"] == "gated" and report["speaker_norm"]
    assert report["train_clips"] == 15 and report["heldout_clips"] == 4
    assert 0 <= report["accuracy"] <= 1 and report["gate_audio"] + report["gate_text"] == pytest.approx(1, abs=1e-3)
    for name in ("model.safetensors", "train_state.pt", "metrics.jsonl", "confusion.png", "curves.png"):
        assert (run / name).stat().st_size > 0, name

    # predict: reads each file's transcript; a file without one fails alone (exit 1, one line)
    shutil.copy(data / "heldout" / "happy" / "en-gb-scotland+m2_s02.wav", tmp_path / "untranscribed.wav")
    heldout = sorted((data / "heldout").rglob("*.wav"))
    proc = run_cli("audio-emotion", "predict", *heldout, tmp_path / "untranscribed.wav", "--checkpoint", run,
                   "--json", "-q")
    assert_one_line_error(proc, 1, "no transcript untranscribed.txt")
    records = json_lines(proc.stdout)
    assert [r["file"] for r in records] == [str(f) for f in heldout]
    for r in records:
        assert r["label"] in report["classes"] and r["fusion"] == "gated"
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-3
    # the trainer's held-out accuracy, recomputed from predict's labels (with the same speaker baselines)
    right = sum(Path(r["file"]).parent.name == r["label"] for r in records)
    assert right / len(records) == pytest.approx(report["accuracy"])

    assert_one_line_error(run_cli("audio-emotion", "predict", heldout[0], "--checkpoint", run, "--segment", "1"),
                          2, "--segment")

    # --resume adopts the run's options (--fusion gated, --speaker-norm: not given again) and refuses others
    again = ["audio-emotion", "train", data / "train", "--heldout", data / "heldout", "--out", run, "--resume"]
    resumed = run_cli(*again, "--steps", "7", "--json", "-q", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    resumed_report = json.loads(resumed.stdout)
    assert resumed_report["step"] == 7 and resumed_report["fusion"] == "gated" and resumed_report["speaker_norm"]
    assert_one_line_error(run_cli(*again, "--steps", "8", "--fusion", "late"), 2, "--fusion")

    # no transcripts at all: one line, exit 2
    for txt in data.rglob("*.txt"):
        txt.unlink()
    proc = run_cli("audio-emotion", "train", data / "train", "--out", tmp_path / "run2", "--fusion", "mid",
                   "--steps", "2")
    assert_one_line_error(proc, 2, "no training clip has a transcript")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("fusion, contains", [("bogus", "--fusion"), ("early", "no audio files")])
def test_train_fusion_usage_errors(tmp_path, fusion, contains):
    (tmp_path / "empty").mkdir()
    proc = run_cli("audio-emotion", "train", tmp_path / "empty", "--out", tmp_path / "run", "--fusion", fusion)
    assert_one_line_error(proc, 2, contains)
