"""Every per-file command fed a folder of hostile files: truncated, empty, of the wrong type, NaN, bombs,
odd names. Each bad file is one error line, the good ones get their results, the exit code is 1, and
nothing is written outside the output."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, json_lines, run_cli
from dsfuse.checkpoint import CheckpointMeta, save_checkpoint

SAMPLES = REPO / "samples"
ODD_NAMES = ["-starts with a dash", "spaced and ünïcode", "semi;colon $(echo no)"]


def png_bomb(path: Path, side: int = 30_000) -> None:
    """A few hundred bytes of PNG that claim side x side pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
                     + chunk(b"IEND", b""))


def npy_bomb(path: Path) -> None:
    """A .npy whose header promises 10^10 floats and holds none."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000, 100), }"
    header += " " * (63 - len(header) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())


def common_bad(folder: Path, suffix: str, good: Path) -> list[str]:
    """Truncated, empty and not-the-type files of `suffix`; their names."""
    data = good.read_bytes()
    (folder / f"truncated{suffix}").write_bytes(data[: len(data) // 3])
    (folder / f"empty{suffix}").write_bytes(b"")
    (folder / f"text{suffix}").write_text("this is not media at all\n")
    return [f"truncated{suffix}", f"empty{suffix}", f"text{suffix}"]


def with_odd_names(folder: Path, good: Path) -> list[str]:
    """`good` in the folder under its own name and each odd one; their names."""
    if good.parent != folder:
        shutil.copy(good, folder / good.name)
    for name in ODD_NAMES:
        shutil.copy(good, folder / f"{name}{good.suffix}")
    return [good.name] + [f"{name}{good.suffix}" for name in ODD_NAMES]


def images(folder: Path) -> tuple[list[str], list[str]]:
    good = next((SAMPLES / "images" / "photos").glob("*.jpg"))
    bad = common_bad(folder, ".png", good)
    png_bomb(folder / "bomb.png")
    return with_odd_names(folder, good), [*bad, "bomb.png"]


def audio(folder: Path) -> tuple[list[str], list[str]]:
    bad = common_bad(folder, ".wav", SAMPLES / "speech" / "angry_01.wav")
    bad.remove("truncated.wav")  # PCM cut short is still audio: its first third is labelled, as players play it
    sf.write(folder / "nan.wav", np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    sf.write(folder / "inf.flac.wav", np.full(16000, np.inf, dtype=np.float32), 16000, subtype="FLOAT")
    good = with_odd_names(folder, SAMPLES / "speech" / "angry_01.wav")
    return [*good, "truncated.wav"], [*bad, "nan.wav", "inf.flac.wav"]


def videos(folder: Path) -> tuple[list[str], list[str]]:
    bad = common_bad(folder, ".mp4", SAMPLES / "video" / "left.mp4")
    return with_odd_names(folder, SAMPLES / "video" / "left.mp4"), bad


def tensors(folder: Path) -> tuple[list[str], list[str]]:
    good = folder / "features.npy"
    np.save(good, np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32))
    bad = common_bad(folder, ".npy", good)
    np.save(folder / "nan.npy", np.full((64, 32), np.nan, dtype=np.float32))
    npy_bomb(folder / "bomb.npy")
    return with_odd_names(folder, good), [*bad, "nan.npy", "bomb.npy"]


def tokenizer_run(root: Path) -> Path:
    from dsfuse.models.vqvae import VQVAE, VQVAEConfig

    cfg = VQVAEConfig(image_size=32, downsample=8, codebook_size=64, base_channels=8, latent_channels=4)
    return save_checkpoint(root / "vq.safetensors", VQVAE(cfg).eval(), CheckpointMeta.of("vqvae", cfg))


def video_run(root: Path) -> Path:
    from dsfuse.models.video import VideoClassifier, VideoConfig

    cfg = VideoConfig(num_classes=4)
    return save_checkpoint(root / "video.safetensors", VideoClassifier(cfg).eval(),
                           CheckpointMeta.of("video", cfg, classes=("down", "left", "right", "up")))


def speech_run(root: Path) -> Path:
    from dsfuse.models.audio import AudioEmotionClassifier, AudioEmotionConfig

    cfg = AudioEmotionConfig(num_classes=2, dim=32, depth=1, n_heads=1)
    return save_checkpoint(root / "speech.safetensors", AudioEmotionClassifier(cfg).eval(),
                           CheckpointMeta.of("audio", cfg, classes=("angry", "calm")))


# command: (the folder's files, the model, the command line with IN, MODEL and OUT)
COMMANDS = {
    "tokenize-image": (images, tokenizer_run, ["tokenize-image", "IN", "-c", "MODEL", "--out", "OUT/tokens.jsonl"]),
    "classify-video predict": (videos, video_run, ["classify-video", "predict", "IN", "-c", "MODEL", "--clips", "1"]),
    "audio-emotion predict": (audio, speech_run, ["audio-emotion", "predict", "IN", "-c", "MODEL"]),
    "compress-tokens": (tensors, tokenizer_run, ["compress-tokens", "IN", "-c", "MODEL", "--method", "pool",
                                                 "--ratio", "4", "--out", "OUT"]),
}


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_folder_of_hostile_files(command, tmp_path):
    make_files, make_model, argv = COMMANDS[command]
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    good, bad = make_files(folder)
    model = make_model(tmp_path)
    before = snapshot(tmp_path)
    places = {"IN": str(folder), "MODEL": str(model), "OUT": str(out)}
    proc = run_cli(*[places.get(a, a.replace("OUT", str(out))) for a in argv], "--json", "--device", "cpu",
                   timeout=300, env={"OMP_NUM_THREADS": "1"})

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad), errors
    for name in bad:
        assert sum(f"{folder / name})" in line for line in errors) == 1, (name, errors)
    done = {Path(r["file"]).name for r in json_lines(proc.stdout) if "file" in r}
    assert done == set(good), (done, good)
    after = snapshot(tmp_path)
    written = {p for p in after if not p.startswith("out" + os.sep)} - set(before)
    assert not written and all(after[p] == size for p, size in before.items()), written
