"""classify-video: PyAV clip decoding (VFR, seeking, rotation, odd sizes, audio), the models, the command."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from conftest import REPO, assert_one_line_error, json_lines, run_cli
from dsfuse.data.video import (VideoFolder, _FrameCursor, clip_starts, output_size, probe_video, read_all_frames,
                               read_audio_track, read_clips, read_frames, stratified_split)
from dsfuse.errors import InputError, UsageError
from dsfuse.models.video import BACKBONES, VideoClassifier, VideoConfig, kinetics_url

SAMPLES = REPO / "samples" / "video"
# One thread per process: on a shared 2-core machine OpenMP threads fighting each other make 3D convs ~10x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def write_numbered_video(path: Path, times: list[float], size: tuple[int, int] = (16, 32), gop: int = 12,
                         rotation: int = 0, pix_fmt: str = "yuv420p") -> Path:
    """Flat frames whose grey level is 8 * (frame index % 32), shown at `times` (seconds, any spacing)."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width = size
        stream.pix_fmt = pix_fmt
        stream.codec_context.time_base = Fraction(1, 1000)  # millisecond timestamps: any spacing
        stream.options = {"g": str(gop), "bf": "0"}
        if rotation:
            stream.set_display_rotation(rotation)
        for index, t in enumerate(times):
            rgb = np.full((*size, 3), 8 * (index % 32), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def frame_index(frames: torch.Tensor) -> list[int]:
    """Recover each flat frame's index (mod 32) from its grey level."""
    return [round(float(f.float().mean()) / 8) for f in frames]


def bad_files(folder: Path) -> dict[str, Path]:
    """One of each kind of file that is not a usable video."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text.mp4").write_text("this is not a video\n")
    (folder / "empty.mp4").write_bytes(b"")
    data = (SAMPLES / "left.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 3])
    sf.write(folder / "speech.wav", np.zeros(8000, dtype=np.float32), 16000)
    with av.open(str(folder / "no_frames.mp4"), "w") as container:  # a valid mp4 with zero frames
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()  # writes the header although no frame follows
    return {"text": folder / "text.mp4", "empty": folder / "empty.mp4", "corrupt": folder / "truncated.mp4",
            "audio-only": folder / "speech.wav", "zero-length": folder / "no_frames.mp4"}


# --------------------------------------------------------------------------- decoding

def test_clip_starts_and_output_size():
    assert clip_starts(10.0, 2.0, 3) == [0.0, 4.0, 8.0]
    assert clip_starts(1.0, 2.0, 2) == [0.0, 0.0]  # shorter than a clip: every clip from the start
    assert clip_starts(10.0, 2.0, 1) == [4.0]
    assert output_size(64, 48, 24) == (24, 32)  # short side
    assert output_size(64, 48, (10, 20)) == (10, 20)
    assert output_size(64, 48, None) == (48, 64)


def test_read_clips_samples_shape_and_short_video_repeats_last_frame():
    clips = read_clips(SAMPLES / "left.mp4", frames=8, fps=8.0, clips=3, size=32)
    assert clips.shape == (3, 8, 32, 32, 3) and clips.dtype == torch.uint8
    long = read_clips(SAMPLES / "left.mp4", frames=40, fps=12.0, clips=1)  # 3.3 s asked of a 2 s video
    assert long.shape == (1, 40, 64, 64, 3)
    assert torch.equal(long[0, -1], long[0, -10])


def test_variable_frame_rate_picks_frames_by_timestamp(tmp_path):
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.uniform(0.02, 0.2, size=30)).round(3)  # irregular spacing
    path = write_numbered_video(tmp_path / "vfr.mp4", list(times))
    shown = times - times[0]  # asked times count from the first frame
    wanted = np.linspace(0, shown[-1], 17)
    expected = [int(np.searchsorted(shown, t + 1e-6, side="right") - 1) % 32 for t in wanted]
    assert frame_index(read_frames(path, wanted)) == expected
    stamps, frames = read_all_frames(path)
    assert np.allclose(stamps, shown, atol=2e-3) and frame_index(frames) == [i % 32 for i in range(30)]


def test_long_video_is_read_by_seeking(tmp_path):
    times = list(np.arange(600) / 10)  # 60 s at 10 fps, a keyframe every 12 frames
    path = write_numbered_video(tmp_path / "long.mp4", times)
    with av.open(str(path)) as container:
        cursor = _FrameCursor(container, container.streams.video[0], path)
        for t in (1.0, 1.1, 30.0, 30.1, 55.0):
            frame = cursor.frame_at(t)
            assert round(frame.time * 10) == round(t * 10)
        assert cursor.seeks == 2  # 30 s and 55 s were jumped to, not decoded through
    clips = read_clips(path, frames=4, fps=10.0, clips=3)
    starts = clip_starts(probe_video(path).duration, 0.4, 3)
    assert [frame_index(c)[0] for c in clips] == [int(s * 10 + 1e-6) % 32 for s in starts]


def test_rotation_metadata_is_applied(tmp_path):
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        stream.set_display_rotation(90)  # counter-clockwise
        rgb = np.zeros((16, 32, 3), dtype=np.uint8)
        rgb[:, :8] = 255  # a white band on the stored frame's left edge
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    info = probe_video(path)
    assert (info.width, info.height, info.rotation) == (16, 32, 90)
    shown = read_frames(path, [0.0])[0, :, :, 0].float()
    assert shown.shape == (32, 16)
    assert shown[-8:].mean() > 200 and shown[:-8].mean() < 50  # turned left: the band is at the bottom


def test_odd_sizes_decode(tmp_path):
    path = write_numbered_video(tmp_path / "odd.mp4", [0.0, 0.1, 0.2], size=(21, 33), pix_fmt="yuv444p")
    assert read_frames(path, [0.0, 0.15]).shape == (2, 21, 33, 3)
    assert read_frames(path, [0.0], size=11).shape == (1, 11, 17, 3)


def test_audio_track_mono_resampled_and_missing():
    audio = read_audio_track(SAMPLES / "left.mp4", sample_rate=8000)
    assert audio.ndim == 1 and audio.dtype == torch.float32
    assert abs(len(audio) - 16000) < 600  # 2 s, give or take the AAC frame padding
    spectrum = torch.fft.rfft(audio).abs()
    assert abs(float(spectrum.argmax()) * 8000 / len(audio) - 330.0) < 5  # left.mp4's tone
    part = read_audio_track(SAMPLES / "left.mp4", sample_rate=8000, start=0.5, duration=1.0)
    assert len(part) == 8000
    with pytest.raises(InputError, match="no audio track"):
        read_audio_track(SAMPLES / "no_audio.mp4")


def test_bad_files_are_one_input_error_each(tmp_path):
    expected = {"text": "not a readable video", "empty": "empty file", "corrupt": "not a readable video",
                "audio-only": "audio-only", "zero-length": "no video stream or frames"}
    for kind, path in bad_files(tmp_path).items():
        with pytest.raises(InputError) as caught:
            read_clips(path, frames=4, fps=4.0)
        assert expected[kind] in str(caught.value) and str(path) in str(caught.value), (kind, caught.value)


def test_video_folder_labels_split_and_random_clips(tmp_path):
    from dsfuse.data.motion import write_motion_dataset

    write_motion_dataset(tmp_path / "data", per_class=3, frames=12, size=32)
    (tmp_path / "data" / "left" / "broken.mp4").write_text("nope")
    folder = VideoFolder(tmp_path / "data", frames=4, fps=6.0, size=16)
    assert folder.classes == ["down", "left", "right", "up"] and len(folder) == 12
    assert [p.name for p in folder.skipped] == ["broken.mp4"]
    train, held = stratified_split(folder.labels, 0.34, seed=0)
    assert len(held) == 4 and sorted(folder.labels[i] for i in held) == [0, 1, 2, 3]
    clip, label = folder.subset(train, train=True)[0]
    assert clip.shape == (4, 16, 16, 3) and label == folder.labels[train[0]]
    with pytest.raises(UsageError, match="one folder per class"):
        VideoFolder(tmp_path / "data" / "left", frames=4, fps=6.0, size=16)


# --------------------------------------------------------------------------- models

def test_small3d_features_and_logits():
    model = VideoClassifier(VideoConfig(num_classes=5)).eval()
    frames = torch.randint(0, 256, (2, 8, 40, 48, 3), dtype=torch.uint8)
    x = model.preprocess(frames)
    assert x.shape == (2, 3, 8, 32, 32)
    assert model.features(x).shape == (2, model.feature_dim)
    assert model(x).shape == (2, 5)


@pytest.mark.parametrize("backbone", [b for b in BACKBONES if b != "small3d"])
def test_torchvision_backbones_build_with_their_preprocessing(backbone):
    config = VideoConfig.for_backbone(backbone, 3)
    assert (config.frames, config.crop) == (BACKBONES[backbone].frames, BACKBONES[backbone].crop)
    model = VideoClassifier(config)
    assert model.head.in_features == model.feature_dim
    if backbone == "r3d_18":  # the cheapest to run: check the features' size for real
        with torch.no_grad():
            assert model.eval().features(torch.zeros(1, 3, 4, 32, 32)).shape == (1, 512)


def test_kinetics_weights_load_into_encoder_and_head(tmp_path):
    from torchvision.models import video as tv

    from dsfuse.tasks.video import load_kinetics

    model = VideoClassifier(VideoConfig.for_backbone("mc3_18", 400))
    reference = tv.mc3_18(weights=None)  # stands in for the real file: same names and shapes
    path = tmp_path / "mc3_18.pth"
    torch.save(reference.state_dict(), path)
    load_kinetics(model, path)
    assert torch.equal(model.head.weight, reference.fc.weight)
    assert torch.equal(model.encoder.layer1[0].conv1[0].weight, reference.layer1[0].conv1[0].weight)
    torch.save({"conv.weight": torch.ones(1)}, path)
    with pytest.raises(UsageError, match="do not match mc3_18"):
        load_kinetics(model, path)


# --------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("video")
    proc = run_cli("classify-video", "make-dataset", root / "data", "--per-class", "20", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["videos"] == 80
    proc = run_cli("classify-video", "train", root / "data", "--out", root / "run", "--steps", "120",
                   "--batch-size", "16", "--held-out", "0.2", "--device", "cpu", "--json", "-q", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    return root / "run"


@pytest.mark.slow
def test_train_reaches_accuracy_and_writes_outputs(trained_run):
    from dsfuse.checkpoint import read_metadata

    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["eval"]["accuracy"] for r in records if "eval" in r][-1]
    assert accuracy >= 0.75, accuracy
    for name in ("model.safetensors", "confusion.png", "curves.png", "train_state.pt"):
        assert (trained_run / name).stat().st_size > 0, name
    meta = read_metadata(trained_run)
    assert meta.kind == "video" and list(meta.classes) == ["down", "left", "right", "up"]


@pytest.mark.slow
def test_predict_json_per_video_and_table(trained_run):
    proc = run_cli("classify-video", "predict", SAMPLES, "--checkpoint", trained_run, "--top-k", "2",
                   "--json", "-q", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    records = {Path(r["file"]).stem: r for r in json_lines(proc.stdout)}
    assert set(records) == {"left", "right", "up", "down", "no_audio"}
    for record in records.values():
        assert len(record["top"]) == 2 and record["top"][0]["score"] >= record["top"][1]["score"]
    right = sum(records[d]["top"][0]["label"] == d for d in ("left", "right", "up", "down"))
    assert right >= 3, records
    table = run_cli("classify-video", "predict", SAMPLES / "up.mp4", "-c", trained_run, "-q", env=ONE_THREAD)
    assert table.returncode == 0 and "up.mp4" in table.stderr and table.stdout == ""


@pytest.mark.slow
def test_predict_reports_each_bad_file_and_goes_on(trained_run, tmp_path):
    bad = bad_files(tmp_path)
    proc = run_cli("classify-video", "predict", *bad.values(), SAMPLES / "left.mp4", "-c", trained_run,
                   "--json", "-q", env=ONE_THREAD)
    assert_one_line_error(proc, 1)
    assert [Path(r["file"]).name for r in json_lines(proc.stdout)] == ["left.mp4"]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad) and all(any(str(p) in e for e in errors) for p in bad.values()), errors
    assert "Traceback" not in proc.stderr


def test_predict_pretrained_offline_names_the_file_and_the_folder(tmp_path):
    proc = run_cli("classify-video", "predict", SAMPLES / "up.mp4", "--backbone", "r3d_18", "--pretrained",
                   env={"TORCH_HOME": str(tmp_path / "torch"), "DSFUSE_OFFLINE": "1"})
    assert_one_line_error(proc, 2, "r3d_18-b3b3357e.pth")
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in proc.stderr


def test_predict_pretrained_refuses_a_corrupt_cached_file(tmp_path):
    from torchvision.models import video as tv

    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(kinetics_url("mc3_18")).name
    cached.parent.mkdir(parents=True)
    torch.save(tv.mc3_18(weights=None).state_dict(), cached)  # the real name, but not the real file's hash
    proc = run_cli("classify-video", "predict", SAMPLES / "up.mp4", "--backbone", "mc3_18", "--pretrained",
                   env={"TORCH_HOME": str(tmp_path / "torch")})
    assert_one_line_error(proc, 2, "delete it")
    assert cached.is_file()  # refused, not deleted behind the user's back


@pytest.mark.slow
def test_predict_pretrained_with_an_explicit_weights_file(tmp_path):
    from torchvision.models import video as tv

    path = tmp_path / "mc3_18.pth"
    torch.save(tv.mc3_18(weights=None).state_dict(), path)  # random weights: the labels are Kinetics' names
    proc = run_cli("classify-video", "predict", SAMPLES / "up.mp4", "--backbone", "mc3_18", "--pretrained",
                   "--weights", path, "--clips", "1", "--top-k", "3", "--json", "-q",
                   env={**ONE_THREAD, "DSFUSE_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    [record] = json_lines(proc.stdout)
    categories = tv.MC3_18_Weights.KINETICS400_V1.meta["categories"]
    assert len(record["top"]) == 3 and all(t["label"] in categories for t in record["top"])


def test_pretrained_classifier_has_kinetics_categories(tmp_path):
    from torchvision.models import video as tv

    from dsfuse.tasks.video import load_classifier

    path = tmp_path / "mc3_18.pth"
    torch.save(tv.mc3_18(weights=None).state_dict(), path)
    model, labels = load_classifier(None, "mc3_18", torch.device("cpu"), weights=path)
    assert labels == tv.MC3_18_Weights.KINETICS400_V1.meta["categories"] and model.head.out_features == 400
    with pytest.raises(UsageError, match="--backbone"):
        load_classifier(None, None, torch.device("cpu"))


def test_backbone_tables_cover_exactly_the_declared_choices():
    from dsfuse import choices
    from dsfuse.models.video import TORCHVISION_WEIGHTS

    assert tuple(BACKBONES) == choices.values(choices.Backbone)
    assert tuple(TORCHVISION_WEIGHTS) == choices.values(choices.PretrainedBackbone)
    with pytest.raises(ValueError, match="backbone must be one of small3d"):
        VideoConfig.for_backbone("resnet9000", 3)


def test_a_checkpoint_without_class_names_is_refused(tmp_path):
    from dsfuse.checkpoint import CheckpointMeta, save_checkpoint

    model = VideoClassifier(VideoConfig(num_classes=3))
    save_checkpoint(tmp_path / "nameless.safetensors", model, CheckpointMeta.of("video", model.config))
    proc = run_cli("classify-video", "predict", SAMPLES / "up.mp4", "-c", tmp_path / "nameless.safetensors", "-q",
                   env=ONE_THREAD)
    assert_one_line_error(proc, 2, "no class names")


@pytest.mark.slow
@pytest.mark.parametrize("args, code, message", [
    (["predict", "SAMPLES", "--top-k", "0", "-c", "RUN"], 2, "top-k"),
    (["predict", "SAMPLES", "--clips", "0", "-c", "RUN"], 2, "clips"),
    (["predict", "SAMPLES"], 2, "--checkpoint or --pretrained"),
    (["predict", "SAMPLES", "-c", "TOY"], 2, "expected video"),
    (["predict", "MISSING", "-c", "RUN"], 1, "file not found"),
    (["predict", "EMPTY", "-c", "RUN"], 2, "no input files"),
    (["train", "EMPTY", "--out", "OUT"], 2, "no readable videos"),
    (["train", "SAMPLES", "--out", "OUT"], 2, "one folder per class"),
    (["train", "DATA", "--out", "OUT", "--held-out", "1.5"], 2, "held-out"),
    (["train", "DATA", "--out", "OUT", "--backbone", "resnet9000"], 2, "'resnet9000' is not one of"),
    (["make-dataset", "DATA"], 2, "not empty"),
    (["make-dataset", "OUT", "--per-class", "0"], 2, "--per-class"),
])
def test_bad_input_is_one_line(trained_run, tmp_path, args, code, message):
    from dsfuse.checkpoint import CheckpointMeta, save_checkpoint
    from toy_model import ToyConfig, ToyRegressor

    save_checkpoint(tmp_path / "toy.safetensors", ToyRegressor(ToyConfig()), CheckpointMeta.of("toy", ToyConfig()))
    (tmp_path / "empty").mkdir()
    places = {"SAMPLES": SAMPLES, "RUN": trained_run, "TOY": tmp_path / "toy.safetensors", "EMPTY": tmp_path / "empty",
              "MISSING": tmp_path / "missing.mp4", "OUT": tmp_path / "out", "DATA": trained_run.parent / "data"}
    proc = run_cli("classify-video", *[str(places.get(a, a)) for a in args], "-q", env=ONE_THREAD)
    assert_one_line_error(proc, code, message)
