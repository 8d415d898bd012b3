"""audio-emotion: audio decoding and features, labels and splits, the model, and the real commands."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from dsfuse.data.audio import (SAMPLE_RATE, LogMel, MelConfig, SpecAugment, load_audio, stream_audio,
                               trim_silence)
from dsfuse.data.emotion_speech import (LogMelClips, SpeakerBaselines, collate_padded, find_labelled_clips,
                                        speaker_of, split_clips)
from dsfuse.data.synthetic_speech import synthetic_split
from dsfuse.errors import InputError, UsageError
from dsfuse.models.audio import AudioConfig, AudioEmotionClassifier, AudioEmotionConfig
from tests.conftest import assert_one_line_error, json_lines, run_cli


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    wave = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def write_compressed(path: Path, samples: np.ndarray, rate: int, codec: str, container: str) -> Path:
    """Encode mono float samples with PyAV (mp3 / AAC-in-m4a), as a user's phone or browser would."""
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        planar = samples.reshape(1, -1)
        for begin in range(0, planar.shape[1], 1152):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, begin:begin + 1152]), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, begin, Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


# --------------------------------------------------------------------------- decoding and features

@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg"])
def test_soundfile_formats_load_as_mono_16k(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    sf.write(path, tone(1.0, 44100, channels=2), 44100)
    wave = load_audio(path)
    assert wave.ndim == 1 and abs(wave.numel() - SAMPLE_RATE) <= 1
    assert 0.25 < float(wave.abs().max()) < 0.35


@pytest.mark.parametrize("suffix, codec, container", [(".mp3", "mp3", "mp3"), (".m4a", "aac", "mp4")])
def test_compressed_formats_load_with_pyav(tmp_path, suffix, codec, container):
    path = write_compressed(tmp_path / f"a{suffix}", tone(2.0, 44100)[:, 0], 44100, codec, container)
    wave = load_audio(path)
    assert abs(wave.numel() / SAMPLE_RATE - 2.0) < 0.1  # encoders add a few ms of priming
    spectrum = torch.fft.rfft(wave[4000:12000]).abs()
    assert abs(int(spectrum.argmax()) * SAMPLE_RATE / 8000 - 440) < 10  # still a 440 Hz tone after resampling


def test_eight_channel_96k_is_mixed_and_resampled(tmp_path):
    path = tmp_path / "surround.wav"
    sf.write(path, tone(0.5, 96000, channels=8), 96000, subtype="PCM_24")
    wave = load_audio(path)
    assert wave.numel() == SAMPLE_RATE // 2


def test_bad_files_are_input_errors(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("this is not audio at all\n")
    with pytest.raises(InputError, match="0 bytes"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(InputError, match="not a readable audio file"):
        load_audio(tmp_path / "text.wav")


def test_streaming_yields_the_same_samples_in_blocks(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, tone(5.3, 22050), 22050)
    blocks = list(stream_audio(path, 2.0))
    assert [round(b.numel() / SAMPLE_RATE, 2) for b in blocks] == [2.0, 2.0, 1.3]
    whole = load_audio(path)
    assert abs(sum(b.numel() for b in blocks) - whole.numel()) <= 3


def test_trim_silence_cuts_leading_and_trailing_quiet():
    speech = torch.from_numpy(tone(1.0, SAMPLE_RATE)[:, 0])
    padded = torch.cat([torch.zeros(8000), speech, torch.zeros(16000)])
    trimmed = trim_silence(padded)
    assert abs(trimmed.numel() - speech.numel()) <= 400  # within one 25 ms frame
    assert trim_silence(torch.zeros(16000)).numel() == 16000  # silence is left for the caller to judge


def test_log_mel_pads_a_one_millisecond_clip():
    mel = LogMel(MelConfig(n_mels=80))
    assert mel(torch.randn(16) * 0.1).shape == (3, 80)  # 400-sample window, padded, centred frames
    assert mel(torch.randn(SAMPLE_RATE)).shape == (101, 80)  # 10 ms hop


def test_spec_augment_masks_but_keeps_shape():
    torch.manual_seed(0)
    features = torch.randn(200, 64)
    augmented = SpecAugment(freq_mask=10, time_mask=30)(features)
    assert augmented.shape == features.shape and not torch.equal(augmented, features)


# --------------------------------------------------------------------------- labels and splits

def _touch_wavs(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / name, tone(0.1, SAMPLE_RATE), SAMPLE_RATE)


def test_ravdess_and_crema_d_names(tmp_path):
    _touch_wavs(tmp_path / "r", ["Actor_12/03-01-05-01-02-01-12.wav", "Actor_01/03-01-01-01-01-01-01.wav"])
    _touch_wavs(tmp_path / "c", ["1001_DFA_ANG_XX.wav", "1002_IEO_SAD_HI.wav"])
    ravdess = find_labelled_clips(tmp_path / "r", "ravdess")
    assert [(c.label, c.speaker) for c in ravdess] == [("neutral", "actor01"), ("angry", "actor12")]
    crema = find_labelled_clips(tmp_path / "c", "crema-d")
    assert [(c.label, c.speaker) for c in crema] == [("angry", "1001"), ("sad", "1002")]
    with pytest.raises(UsageError, match="RAVDESS"):
        find_labelled_clips(tmp_path / "c", "ravdess")


def test_folder_labels_and_speaker_split_keep_speakers_apart(tmp_path):
    names = [f"{e}/spk{s}_s{k}.wav" for e in ("happy", "sad") for s in range(5) for k in range(2)]
    _touch_wavs(tmp_path, names)
    clips = find_labelled_clips(tmp_path, "folders")
    assert {c.label for c in clips} == {"happy", "sad"} and len({c.speaker for c in clips}) == 5
    train, heldout = split_clips(clips, "speaker", 0.2, seed=3)
    assert {c.speaker for c in train}.isdisjoint({c.speaker for c in heldout})
    assert len(train) + len(heldout) == len(clips) and len(heldout) == 4  # one speaker of five


def test_speakers_from_file_names_of_each_scheme():
    assert speaker_of(Path("sad/en+m1_s03.wav")) == "en+m1"
    assert speaker_of(Path("1001_DFA_ANG_XX.wav"), "crema-d") == "1001"
    assert speaker_of(Path("03-01-05-01-02-01-12.wav"), "ravdess") == "actor12"
    assert speaker_of(Path("talk.mp3"), "ravdess") == "talk"  # off-convention: its own speaker


def test_speaker_baselines_remove_each_voices_offset():
    torch.manual_seed(0)
    clips = [torch.randn(n, 8) for n in (30, 50, 40)]
    offset = torch.linspace(-3, 3, 8)  # a second voice: the same clips, louder in some bands
    speakers = ["a"] * 3 + ["b"] * 3
    baselines = SpeakerBaselines.of(speakers, clips + [c + offset for c in clips])
    assert baselines.frames("a") == 120 and baselines.frames("nobody") == 0
    for clip in clips:
        torch.testing.assert_close(baselines.normalize("b", clip + offset), baselines.normalize("a", clip))
    frames = torch.cat([baselines.normalize("a", c) for c in clips])
    torch.testing.assert_close(frames.mean(0), torch.zeros(8), atol=1e-6, rtol=0)
    with pytest.raises(KeyError):
        baselines.normalize("nobody", clips[0])


def test_synthetic_split_shares_no_voice_or_sentence():
    plan = synthetic_split(20, 16, 3, 4)
    (train_voices, train_sentences), (held_voices, held_sentences) = plan["train"], plan["heldout"]
    assert len(held_voices) == 3 and set(train_voices).isdisjoint(held_voices)
    assert len(held_sentences) == 4 and set(train_sentences).isdisjoint(held_sentences)
    with pytest.raises(UsageError):
        synthetic_split(21, 16, 3, 4)


# --------------------------------------------------------------------------- model

def tiny_model(**overrides) -> AudioEmotionClassifier:
    torch.manual_seed(0)
    return AudioEmotionClassifier(AudioEmotionConfig(n_mels=64, num_classes=3, dim=32, depth=1, n_heads=2,
                                                     conv_channels=8, dropout=0.0, **overrides)).eval()


def test_encoder_shapes_and_subsampled_mask():
    model = tiny_model()
    features, mask = torch.randn(2, 37, 64), torch.ones(2, 37, dtype=torch.bool)
    mask[1, 20:] = False
    sequence, out_mask = model.encoder(features, mask)
    assert sequence.shape == (2, 10, 32) and out_mask.sum(1).tolist() == [10, 5]
    assert model(features, mask).shape == (2, 3)


def test_padding_does_not_change_a_clips_logits():
    model = tiny_model()
    short, long = torch.randn(23, 64), torch.randn(61, 64)
    batch = collate_padded([(short, torch.tensor(0)), (long, torch.tensor(1))])
    with torch.no_grad():
        alone = model(short[None])
        batched = model(batch["features"], batch["mask"])
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-4)


def test_a_checkpoint_of_the_audio_config_alone_loads_as_the_unfused_model(tmp_path):
    """Checkpoints written before fusion joined the "audio" kind hold the encoder's config alone."""
    from dataclasses import asdict

    from dsfuse.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint

    model = tiny_model()
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {"encoder", "pool", "head"}
    old_config = {k: v for k, v in asdict(model.config).items() if k in AudioConfig.__dataclass_fields__}
    save_checkpoint(tmp_path / "m.safetensors", model, CheckpointMeta("audio", old_config, ("a", "b", "c")))
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors", kind="audio")
    assert loaded.config.fusion == "none" and loaded.config.text is None
    features = torch.randn(2, 40, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(features), model(features))


def test_moe_feed_forward_trains_with_its_aux_loss():
    from dsfuse.nn.moe import moe_aux_loss

    model = tiny_model(ffn="moe", n_experts=4, top_k=2).train()
    logits = model(torch.randn(3, 40, 64))
    loss = logits.logsumexp(-1).mean() + moe_aux_loss(model)
    loss.backward()
    assert float(moe_aux_loss(model).detach()) > 0
    assert model.encoder.blocks[0].ffn.experts is not None and all(
        p.grad is not None for p in model.encoder.blocks[0].ffn.router.parameters())


def test_dataset_crops_training_clips():
    data = LogMelClips([torch.randn(500, 64), torch.randn(50, 64)], [0, 1], crop_frames=200, augment=True)
    assert data[0][0].shape == (200, 64) and data[1][0].shape == (50, 64) and int(data[1][1]) == 1


# --------------------------------------------------------------------------- the commands (end to end)

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny synthetic set and a model trained on it, shared by the end-to-end tests."""
    root = tmp_path_factory.mktemp("audio-emotion")
    data, run = root / "synthetic", root / "run"
    made = run_cli("audio-emotion", "synthetic", data, "--voices", "4", "--sentences", "4", "--heldout-voices",
                   "1", "--heldout-sentences", "1", "--json", "-q")
    assert made.returncode == 0, made.stderr
    trained = run_cli("audio-emotion", "train", data / "train", "--heldout", data / "heldout", "--out", run,
                      "--steps", "80", "--dim", "32", "--depth", "1", "--batch-size", "12", "--json", "-q",
                      "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    return {"data": data, "run": run, "synthetic": json.loads(made.stdout), "train": json.loads(trained.stdout)}


@pytest.fixture(scope="module")
def speaker_normed(trained, tmp_path_factory):
    """A model trained with --speaker-norm on the same tiny set."""
    run = tmp_path_factory.mktemp("audio-emotion-norm") / "run"
    proc = run_cli("audio-emotion", "train", trained["data"] / "train", "--heldout", trained["data"] / "heldout",
                   "--out", run, "--speaker-norm", "--steps", "80", "--dim", "32", "--depth", "1", "--batch-size",
                   "12", "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "speaker baseline" not in proc.stderr  # 4 held-out clips of one voice, one per emotion: enough
    return {"run": run, "train": json.loads(proc.stdout)}


@pytest.mark.slow
def test_synthetic_set_layout(trained):
    summary, data = trained["synthetic"], trained["data"]
    assert summary["splits"]["train"]["clips"] == 4 * 3 * 3 and summary["splits"]["heldout"]["clips"] == 4
    assert sorted(p.name for p in (data / "train").iterdir()) == ["angry", "happy", "neutral", "sad"]
    info = sf.info(next((data / "heldout" / "sad").glob("*.wav")))
    assert info.samplerate == SAMPLE_RATE and info.channels == 1


@pytest.mark.slow
def test_train_reports_heldout_metrics_and_writes_the_run(trained):
    report, run = trained["train"], trained["run"]
    assert report["classes"] == ["angry", "happy", "neutral", "sad"] and report["heldout_clips"] == 4
    assert report["accuracy"] >= 0.5  # chance is 0.25; the prosodies are far apart
    assert set(report["f1"]) == set(report["classes"]) and np.asarray(report["confusion"]).sum() == 4
    for name in ("model.safetensors", "train_state.pt", "metrics.jsonl", "confusion.png", "curves.png"):
        assert (run / name).stat().st_size > 0, name


@pytest.mark.slow
def test_predict_labels_files_with_probabilities(trained):
    files = sorted((trained["data"] / "heldout").rglob("*.wav"))
    proc = run_cli("audio-emotion", "predict", *files, "--checkpoint", trained["run"], "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    records = json_lines(proc.stdout)
    assert [r["file"] for r in records] == [str(f) for f in files]
    for r in records:
        assert r["label"] in trained["train"]["classes"] and abs(sum(r["probabilities"].values()) - 1) < 1e-3
    # the trainer's own held-out accuracy, recomputed from predict's labels
    right = sum(Path(r["file"]).parent.name == r["label"] for r in records)
    assert right / len(records) == pytest.approx(trained["train"]["accuracy"])


@pytest.mark.slow
def test_speaker_normed_predict_matches_training(trained, speaker_normed):
    assert speaker_normed["train"]["speaker_norm"] and not trained["train"]["speaker_norm"]
    files = sorted((trained["data"] / "heldout").rglob("*.wav"))
    proc = run_cli("audio-emotion", "predict", *files, "--checkpoint", speaker_normed["run"], "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    records = json_lines(proc.stdout)
    # the streamed per-speaker baselines of predict are the trainer's: the same accuracy and probabilities
    right = sum(Path(r["file"]).parent.name == r["label"] for r in records)
    assert right / len(records) == pytest.approx(speaker_normed["train"]["accuracy"])
    alone = run_cli("audio-emotion", "predict", files[0], "--checkpoint", speaker_normed["run"], "--speaker-by",
                    "file", "--json")
    assert alone.returncode == 0 and "speaker baseline from under" in alone.stderr
    assert json_lines(alone.stdout)[0]["probabilities"] != records[0]["probabilities"]


@pytest.mark.slow
def test_speaker_normed_timeline_and_option_errors(trained, speaker_normed, tmp_path):
    long = torch.cat([load_audio(p) for p in sorted((trained["data"] / "train").rglob("*.wav"))[:8]])
    sf.write(tmp_path / "long.flac", long.numpy(), SAMPLE_RATE)
    proc = run_cli("audio-emotion", "predict", tmp_path / "long.flac", "--checkpoint", speaker_normed["run"],
                   "--segment", "2", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    assert all(r["label"] in speaker_normed["train"]["classes"] for r in json_lines(proc.stdout))
    wav = next((trained["data"] / "heldout").rglob("*.wav"))
    ignored = run_cli("audio-emotion", "predict", wav, "--checkpoint", trained["run"], "--speaker-by", "all")
    assert ignored.returncode == 0 and "--speaker-by is ignored" in ignored.stderr
    assert_one_line_error(run_cli("audio-emotion", "predict", wav, "--checkpoint", speaker_normed["run"],
                                  "--speaker-by", "voice"), 2, "--speaker-by")


@pytest.mark.slow
def test_predict_segment_streams_a_timeline(trained, tmp_path):
    clips = [load_audio(p) for p in sorted((trained["data"] / "train").rglob("*.wav"))[:6]]
    long = torch.cat(clips + [torch.zeros(3 * SAMPLE_RATE)])  # ends in 3 s of silence
    sf.write(tmp_path / "long.flac", long.numpy(), SAMPLE_RATE)
    proc = run_cli("audio-emotion", "predict", tmp_path / "long.flac", "--checkpoint", trained["run"],
                   "--segment", "1.5", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    timeline = json_lines(proc.stdout)
    assert len(timeline) == int(np.ceil(long.numel() / SAMPLE_RATE / 1.5))
    assert timeline[0]["start"] == 0 and timeline[-1]["end"] == pytest.approx(long.numel() / SAMPLE_RATE, abs=1e-3)
    assert all(a["end"] == b["start"] for a, b in zip(timeline, timeline[1:]))
    assert timeline[-1]["label"] is None and timeline[-1]["silent"]
    assert all(r["label"] in trained["train"]["classes"] for r in timeline[:4])


@pytest.mark.slow
def test_predict_bad_inputs_fail_per_file(trained, tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.mp3").write_text("not audio\n")
    sf.write(tmp_path / "silent.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    sf.write(tmp_path / "blip.wav", tone(0.001, SAMPLE_RATE), SAMPLE_RATE)  # 1 ms: padded, still classified
    sf.write(tmp_path / "surround.wav", tone(1.0, 96000, channels=8), 96000, subtype="PCM_24")
    files = [tmp_path / n for n in ("empty.wav", "notes.mp3", "silent.wav", "blip.wav", "surround.wav", "gone.wav")]
    proc = run_cli("audio-emotion", "predict", *files, "--checkpoint", trained["run"], "--json", "-q")
    assert_one_line_error(proc, 1, "gone.wav")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4 and "0 bytes" in errors[0] and "not a readable audio" in errors[1]
    assert "silent" in errors[2] and "not found" in errors[3]
    assert [Path(r["file"]).name for r in json_lines(proc.stdout)] == ["blip.wav", "surround.wav"]


@pytest.mark.slow
@pytest.mark.parametrize("args, contains", [
    (["--segment", "0"], "--segment"),
    (["--checkpoint", "missing-run"], "checkpoint not found"),
])
def test_predict_usage_errors(trained, args, contains):
    wav = next((trained["data"] / "heldout").rglob("*.wav"))
    base = ["--checkpoint", trained["run"]] if "--checkpoint" not in args else []
    assert_one_line_error(run_cli("audio-emotion", "predict", wav, *base, *args), 2, contains)


def test_predict_refuses_a_checkpoint_of_another_kind(tmp_path):
    from dsfuse.checkpoint import CheckpointMeta, save_checkpoint
    from toy_model import ToyConfig, ToyRegressor

    save_checkpoint(tmp_path / "toy.safetensors", ToyRegressor(ToyConfig()), CheckpointMeta.of("toy", ToyConfig()))
    sf.write(tmp_path / "a.wav", tone(0.5, SAMPLE_RATE), SAMPLE_RATE)
    proc = run_cli("audio-emotion", "predict", tmp_path / "a.wav", "--checkpoint", tmp_path / "toy.safetensors")
    assert_one_line_error(proc, 2, "expected audio")


@pytest.mark.parametrize("args, contains", [
    (["EMPTY", "--out", "RUN"], "no audio files"),
    (["FLAT", "--out", "RUN"], "one folder per class"),
    (["FLAT", "--out", "RUN", "--labels", "ravdess"], "RAVDESS"),
    (["FLAT", "--out", "RUN", "--labels", "timit"], "--labels"),
    (["ONECLASS", "--out", "RUN", "--split-by", "speaker"], "at least 2 speakers"),
    (["ONECLASS", "--out", "RUN", "--n-mels", "128"], "--n-mels"),
    (["ONECLASS", "--out", "RUN", "--ffn", "mlp"], "--ffn"),
    (["ONECLASS", "--out", "RUN", "--steps", "0"], "steps"),
])
def test_train_usage_errors(tmp_path, args, contains):
    (tmp_path / "EMPTY").mkdir()
    _touch_wavs(tmp_path / "FLAT", ["a_1.wav", "b_2.wav"])
    _touch_wavs(tmp_path / "ONECLASS", ["happy/a_1.wav", "happy/a_2.wav"])
    args = [str(tmp_path / a) if a.isupper() else a for a in args]
    assert_one_line_error(run_cli("audio-emotion", "train", *args), 2, contains)


def test_synthetic_usage_errors(tmp_path):
    assert_one_line_error(run_cli("audio-emotion", "synthetic", tmp_path / "s", "--voices", "99"), 2, "--voices")
    assert_one_line_error(run_cli("audio-emotion", "synthetic", tmp_path / "s", "--emotions", "happy,bored"), 2,
                          "--emotions")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    assert_one_line_error(run_cli("audio-emotion", "synthetic", tmp_path / "full"), 2, "--force")


@pytest.mark.slow
def test_speakers_that_are_really_labels_are_refused_and_a_pattern_finds_them(trained, tmp_path):
    """EMOTION_VOICE_SENTENCE.wav: the name's first field is the label, so by default the 'speakers' are the
    emotions and speaker normalisation would erase the very signal; --speaker-pattern says where they are."""
    data = tmp_path / "renamed"
    for clip in (trained["data"] / "train").rglob("*.wav"):
        target = data / clip.parent.name / f"{clip.parent.name}_{clip.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, target)
    args = ["audio-emotion", "train", data, "--speaker-norm", "--steps", "2", "--dim", "32", "--depth", "1",
            "--batch-size", "4", "-q", "--device", "cpu"]
    refused = run_cli(*args, "--out", tmp_path / "r1")
    assert_one_line_error(refused, 2, "--speaker-pattern")
    assert "single label" in refused.stderr and not (tmp_path / "r1").exists()
    found = run_cli(*args, "--out", tmp_path / "r2", "--speaker-pattern", r"_(?P<speaker>[^_/]+)_[^/]*$", "--json")
    assert found.returncode == 0, found.stderr
    assert_one_line_error(run_cli(*args, "--out", tmp_path / "r3", "--speaker-pattern", "[^_]+"), 2,
                          "(?P<speaker>")


@pytest.mark.slow
def test_a_clip_too_short_to_judge_is_labelled_with_a_warning(trained, tmp_path):
    blip = tmp_path / "blip.wav"
    rng = np.random.default_rng(0)
    sf.write(blip, (0.5 * rng.standard_normal(16)).astype(np.float32), SAMPLE_RATE)  # 1 ms
    proc = run_cli("audio-emotion", "predict", blip, "--checkpoint", trained["run"], "--json")
    assert proc.returncode == 0, proc.stderr
    assert "too short to judge" in proc.stderr and json_lines(proc.stdout)[0]["label"]
