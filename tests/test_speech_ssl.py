"""audio-emotion --encoder: torchaudio's self-supervised speech encoders at random initialisation, placed in a
temporary torch hub cache under their real file names, so the weights resolver's path runs for real.

The fast tests shrink the bundles' architectures (recorded in the checkpoint, so the real `predict`
command rebuilds them); the slow one trains and predicts through the command with a base architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open

from dsfuse.checkpoint import read_metadata
from dsfuse.data.audio import SAMPLE_RATE
from dsfuse.errors import UsageError
from dsfuse.models.speech_ssl import SslFeatures, SslFront, architecture, build_ssl_model, weights_url
from dsfuse.weights import sha256_of
from tests.conftest import assert_one_line_error, json_lines, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def tiny(encoder: str) -> dict:
    """The bundle's architecture, shrunk: same kinds of layers and the same 20 ms frames, a fraction of the width."""
    return {**architecture(encoder), "extractor_conv_layer_config": [(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2,
            "encoder_embed_dim": 32, "encoder_num_heads": 2, "encoder_ff_interm_features": 64,
            "encoder_num_layers": 3, "encoder_pos_conv_kernel": 16, "encoder_pos_conv_groups": 4}


def cache_random_weights(torch_home: Path, encoder: str, params: dict, seed: int = 0) -> Path:
    """Random weights of `params` under the bundle's real file name in torch hub's cache."""
    torch.manual_seed(seed)
    path = torch_home / "hub" / "checkpoints" / Path(weights_url(encoder)).name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_ssl_model(encoder, params).state_dict(), path)
    return path


def tone(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def write_tones(root: Path, per_class: int, seconds: float = 0.6, transcripts: bool = False) -> Path:
    """root/{low,high}/vN_K.wav: two 'emotions' a pitch apart, voices v0.. (the speaker is the name's start)."""
    for label, base in (("low", 180.0), ("high", 420.0)):
        (root / label).mkdir(parents=True)
        for k in range(per_class):
            path = root / label / f"v{k % 3}_{k}.wav"
            sf.write(path, tone(seconds, base * (1 + 0.05 * (k % 3))), SAMPLE_RATE)
            if transcripts:
                path.with_suffix(".txt").write_text(f"a {label} sentence")
    return root


# --------------------------------------------------------------------------- the model parts

@pytest.mark.parametrize("encoder", ["wav2vec2-base", "wavlm-base"])
def test_fine_tuned_top_layers_reproduce_the_encoder_and_ignore_padding(encoder):
    torch.manual_seed(0)
    params = tiny(encoder)
    network = build_ssl_model(encoder, params).eval()
    wave = torch.from_numpy(tone(0.5, 300.0))
    with torch.no_grad():
        reference, _ = network.extract_features(wave[None])
        cached = SslFeatures(network, keep=2)(wave)  # layers 1-2 frozen and cached, layer 3 fine-tuned
        front = SslFront(encoder, params, unfreeze=1, dim=16).eval()
        front.load_top(network)
        mask = torch.ones(1, len(cached), dtype=torch.bool)
        states = front.hidden_states(cached[None], mask)
        padded = torch.cat([cached[None], torch.zeros(1, 7, *cached.shape[1:])], 1)
        states_padded = front.hidden_states(padded, torch.arange(len(cached) + 7)[None] < len(cached))
    assert cached.shape == (len(reference[0][0]), 2, 32)
    for layer in range(3):
        torch.testing.assert_close(states[0, :, layer], reference[layer][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(states_padded[:, :len(cached)], states, atol=1e-4, rtol=1e-4)


def test_long_audio_goes_through_the_encoder_in_windows(monkeypatch):
    import dsfuse.models.speech_ssl as ssl

    network = build_ssl_model("hubert-base", tiny("hubert-base")).eval()
    monkeypatch.setattr(ssl, "WINDOW_SECONDS", 0.5)
    features = SslFeatures(network, keep=3)(torch.from_numpy(tone(1.7, 300.0)))
    assert features.shape[:2] == (24 + 24 + 24 + 9, 3)  # three 0.5 s windows of 24 frames, then 0.2 s


# --------------------------------------------------------------------------- training and prediction

def train_in_process(monkeypatch, root: Path, encoder: str, **options) -> tuple[Path, dict]:
    """Train with `encoder` shrunk (as the process sees it) and its random weights in root/torch's cache."""
    from dsfuse.tasks import speech_emotion as task
    from dsfuse.tasks import speech_features

    monkeypatch.setattr(speech_features, "architecture", tiny)
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("DSFUSE_OFFLINE", "1")
    cache_random_weights(root / "torch", encoder, tiny(encoder))
    data = write_tones(root / "data", 8, transcripts=options.get("fusion", "none") != "none")
    run = root / "run"
    defaults = dict(data=data, steps=6, batch_size=4, lr=3e-3, dim=32, depth=1, heldout_fraction=0.25,
                    encoder=encoder)
    result, summary = task.train(task.SpeechEmotionOptions(**{**defaults, **options}), run, resume=False,
                                 force=False, explicit=set(), device=torch.device("cpu"), quiet=True)
    return run, summary


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run, summary = train_in_process(monkeypatch, root, "wav2vec2-base")
    return root, run, summary


def test_a_frozen_encoder_trains_a_head_and_names_its_weights(frozen_run):
    root, run, summary = frozen_run
    assert summary["encoder"] == "wav2vec2-base" and 0 <= summary["accuracy"] <= 1
    weights = summary["layer_weights"]
    assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-3 and (run / "layer_weights.png").stat().st_size
    meta = read_metadata(run)
    cached = root / "torch" / "hub" / "checkpoints" / "wav2vec2_fairseq_base_ls960.pth"
    assert meta.setup["encoder_sha256"] == sha256_of(cached) and meta.config["encoder"] == "wav2vec2-base"
    with safe_open(run / "model.safetensors", "pt") as f:  # the head only: the encoder is named, not copied
        assert not [k for k in f.keys() if "feature_extractor" in k or "transformer" in k]
    assert len(list((run / "features").glob("*.pt"))) == summary["train_clips"] + summary["heldout_clips"]


def test_cached_features_are_read_back_without_the_encoder(frozen_run):
    from dsfuse.data.emotion_speech import find_labelled_clips
    from dsfuse.tasks.speech_emotion import load_examples
    from dsfuse.tasks.speech_features import Encoder, FeatureCache

    root, run, _ = frozen_run
    meta = read_metadata(run)
    encoder = Encoder("wav2vec2-base", featurize=None, frame_rate=50.0, sha256=meta.setup["encoder_sha256"])

    def no_encoder(wave):
        raise AssertionError("the encoder ran again")

    clips = find_labelled_clips(root / "data")
    examples = load_examples(clips, no_encoder, None, True, "cached", FeatureCache(run / "features", encoder, 0))
    assert len(examples.clips) == len(clips) and examples.features[0].dtype == torch.float16


def test_predict_and_timeline_rebuild_the_encoder_from_the_cache(frozen_run):
    root, run, _ = frozen_run
    env = {"TORCH_HOME": str(root / "torch"), "DSFUSE_OFFLINE": "1", **ONE_THREAD}
    clip = root / "data" / "high" / "v0_0.wav"
    proc = run_cli("audio-emotion", "predict", clip, "-c", run, "--json", "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    [record] = json_lines(proc.stdout)
    assert record["label"] in ("low", "high") and set(record["probabilities"]) == {"low", "high"}
    proc = run_cli("audio-emotion", "predict", clip, "-c", run, "--segment", "0.25", "--json", "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    segments = json_lines(proc.stdout)
    assert [s["start"] for s in segments] == [0.0, 0.25, 0.5] and segments[-1]["end"] == 0.6


def test_the_encoders_weights_are_checked_at_predict(frozen_run, tmp_path):
    root, run, _ = frozen_run
    clip = root / "data" / "low" / "v0_0.wav"
    home = tmp_path / "torch"

    def predict(**env):
        return run_cli("audio-emotion", "predict", clip, "-c", run, "-q", env={"TORCH_HOME": str(home), **env})

    assert_one_line_error(predict(DSFUSE_OFFLINE="1"), 2, "put wav2vec2_fairseq_base_ls960.pth")
    path = cache_random_weights(home, "wav2vec2-base", tiny("wav2vec2-base"), seed=1)  # other weights, same file
    assert_one_line_error(predict(DSFUSE_OFFLINE="1"), 2, "trained on other wav2vec2-base weights")
    path.write_bytes(path.read_bytes()[:1000])
    error = assert_one_line_error(predict(HF_HUB_OFFLINE="1"), 2, "delete it")
    assert str(path) in error


def test_resume_refuses_another_encoder_and_an_unknown_one_is_listed(frozen_run):
    root, run, _ = frozen_run
    proc = run_cli("audio-emotion", "train", root / "data", "--out", run, "--resume", "--encoder", "hubert-base")
    assert_one_line_error(proc, 2, "--encoder")
    proc = run_cli("audio-emotion", "train", root / "data", "--encoder", "wav2vec3")
    assert proc.returncode == 2 and "wavlm-base-plus" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("audio-emotion", "train", root / "data", "--unfreeze", "2")
    assert_one_line_error(proc, 2, "--unfreeze")


def test_unfrozen_layers_speaker_norm_and_fusion_train_and_predict(monkeypatch, tmp_path):
    from dsfuse.tasks.speech_emotion import open_classifier

    run, summary = train_in_process(monkeypatch, tmp_path, "wavlm-base", unfreeze=1, speaker_norm=True,
                                    fusion="gated")
    assert summary["fusion"] == "gated" and len(summary["layer_weights"]) == 3
    with safe_open(run / "model.safetensors", "pt") as f:  # the fine-tuned top layer is the run's own
        assert any(k.startswith("encoder.front.top.0.") for k in f.keys())
    clips = sorted((tmp_path / "data").rglob("*.wav"))
    classifier = open_classifier(run, clips, segment=None, speaker_by="name", device=torch.device("cpu"), quiet=True)
    record = classifier.label_file(clips[0])
    assert record["label"] in ("low", "high") and record["fusion"] == "gated"
    with pytest.raises(UsageError, match="between 0 and 2|0 to 2"):
        train_in_process(monkeypatch, tmp_path / "again", "wavlm-base", unfreeze=3)


@pytest.mark.slow
def test_train_and_predict_through_the_command_with_a_base_architecture(tmp_path):
    cache_random_weights(tmp_path / "torch", "hubert-base", architecture("hubert-base"))
    data = write_tones(tmp_path / "data", 6, seconds=0.5)
    env = {"TORCH_HOME": str(tmp_path / "torch"), "DSFUSE_OFFLINE": "1"}
    proc = run_cli("audio-emotion", "train", data, "--out", tmp_path / "run", "--encoder", "hubert-base",
                   "--steps", "4", "--batch-size", "4", "--dim", "32", "--depth", "1", "--device", "cpu", "--json",
                   "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["layer_weights"]) == 12  # one per layer of the base architecture
    proc = run_cli("audio-emotion", "predict", data / "low", "-c", tmp_path / "run", "--json", "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(json_lines(proc.stdout)) == 6
