"""Self-supervised speech encoders for `audio-emotion --encoder`, at random initialisation (pretrained
weights cannot be fetched here, so this measures speed and memory, never accuracy):

1. Throughput of each bundle's architecture on this machine: seconds of audio encoded per second.
2. One training epoch over cached features against one that recomputes the encoder (the reference,
   same clips, same head, same run); target: the cached epoch at least 20x faster.
3. Peak memory (RSS) of `audio-emotion predict --segment 2` with an SSL encoder on a 10-minute
   recording against a 1-minute one (the reference, same run); target: within 10%.

The weights sit under their real file names in a temporary torch hub cache, so the resolver runs as in use.

    python bench/ssl_encoders.py                       # all four bundles, 10 s of audio, 1 vs 10 minutes
    python bench/ssl_encoders.py --long-minutes 3      # a shorter memory run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's dsfuse, installed or not

from dsfuse.data.audio import SAMPLE_RATE  # noqa: E402
from dsfuse.data.emotion_speech import collate_padded, find_labelled_clips  # noqa: E402
from dsfuse.models.audio import AudioEmotionClassifier, AudioEmotionConfig  # noqa: E402
from dsfuse.models.speech_ssl import (SSL_BUNDLES, SslFeatures, architecture, build_ssl_model,  # noqa: E402
                                      layer_count, weights_url)
from dsfuse.tasks import speech_emotion as task  # noqa: E402
from dsfuse.tasks.speech_features import FeatureCache, open_encoder  # noqa: E402

console = Console(stderr=True)


def tone(seconds: float, freq: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))
    return (wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def throughput(encoder: str, seconds: float) -> float:
    """Seconds of audio per second through the whole encoder (every layer's hidden states)."""
    params = architecture(encoder)
    features = SslFeatures(build_ssl_model(encoder, params), layer_count(params))
    features(torch.from_numpy(tone(1.0, 200.0)))  # warm-up
    wave = torch.from_numpy(tone(seconds, 200.0))
    started = time.perf_counter()
    features(wave)
    return seconds / (time.perf_counter() - started)


def write_clips(root: Path, per_class: int, seconds: float) -> Path:
    for label, freq in (("low", 180.0), ("high", 420.0)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            sf.write(root / label / f"v{k % 3}_{k}.wav", tone(seconds, freq * (1 + 0.05 * (k % 3)), k), SAMPLE_RATE)
    return root


def head_epoch(model: AudioEmotionClassifier, features: list[torch.Tensor], labels: torch.Tensor,
               batch: int = 8) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for start in range(0, len(features), batch):
        items = [(f, labels[i]) for i, f in enumerate(features[start:start + batch], start)]
        loss, _ = task.classification_loss(model, collate_padded(items), moe=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def cached_epoch_speedup(encoder_name: str, data: Path, run: Path) -> tuple[float, float]:
    """(seconds of an epoch recomputing the encoder, seconds of one over cached features)."""
    encoder = open_encoder(encoder_name, n_mels=64, quiet=True)
    clips = find_labelled_clips(data)
    labels = torch.tensor([int(c.label == "high") for c in clips])
    cache = FeatureCache(run / "features", encoder, 0)
    task.load_examples(clips, encoder.featurize, None, True, "fill the cache", cache)
    config = AudioEmotionConfig(num_classes=2, dim=96, depth=2, n_heads=3, encoder=encoder_name, ssl=encoder.params)
    torch.manual_seed(0)
    model = AudioEmotionClassifier(config)

    started = time.perf_counter()
    recomputed = task.load_examples(clips, encoder.featurize, None, True, "recompute")  # no cache: the encoder runs
    head_epoch(model, recomputed.features, labels)
    recompute_s = time.perf_counter() - started

    started = time.perf_counter()
    cached = task.load_examples(clips, encoder.featurize, None, True, "cached", cache)
    head_epoch(model, cached.features, labels)
    return recompute_s, time.perf_counter() - started


def peak_rss_mib(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(peak resident memory in MiB, seconds) of one `dsfuse` command in a fresh process."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dsfuse", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"dsfuse {' '.join(args)} failed: {process.stderr.read().decode()[-400:]}")
    return usage.ru_maxrss / 1024, seconds


def write_recording(path: Path, minutes: float) -> Path:
    with sf.SoundFile(path, "w", SAMPLE_RATE, 1) as f:  # minute by minute: the bench stays small too
        for minute in range(int(np.ceil(minutes))):
            f.write(tone(min(60.0, minutes * 60 - minute * 60), 180.0 + 40 * (minute % 5), minute))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", default=",".join(SSL_BUNDLES), help="comma-separated bundle names")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per throughput measurement")
    parser.add_argument("--cache-encoder", default="wav2vec2-base", help="the encoder of the epoch and memory runs")
    parser.add_argument("--long-minutes", type=float, default=10.0, help="the long recording of the memory run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dsfuse-bench-ssl-"))
    os.environ["TORCH_HOME"], os.environ["DSFUSE_OFFLINE"] = str(root / "torch"), "1"
    results: dict = {"threads": torch.get_num_threads()}

    rates = {}
    for name in args.encoders.split(","):
        rates[name] = throughput(name, args.seconds)
        console.print(f"{name}: {rates[name]:.2f} s of audio per s")
    results["throughput"] = rates

    name = args.cache_encoder
    cached = root / "torch" / "hub" / "checkpoints" / Path(weights_url(name)).name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_ssl_model(name, architecture(name)).state_dict(), cached)
    data = write_clips(root / "data", per_class=8, seconds=3.0)
    recompute_s, cached_s = cached_epoch_speedup(name, data, root / "epoch")
    results["epoch"] = {"clips": 16, "recompute_s": recompute_s, "cached_s": cached_s,
                        "speedup": recompute_s / cached_s}

    options = task.SpeechEmotionOptions(data=data, steps=2, batch_size=8, lr=1e-3, dim=64, depth=1, encoder=name)
    task.train(options, root / "run", resume=False, force=False, explicit=set(), device=torch.device("cpu"),
               quiet=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    memory = {}
    for minutes in (1.0, args.long_minutes):
        recording = write_recording(root / f"talk-{minutes:g}min.wav", minutes)
        memory[minutes] = peak_rss_mib(["audio-emotion", "predict", str(recording), "-c", str(root / "run"),
                                        "--segment", "2", "--json", "-q", "--device", "cpu"], env)
        console.print(f"{minutes:g} min: peak {memory[minutes][0]:.0f} MiB in {memory[minutes][1]:.0f} s")
    (short_mib, short_s), (long_mib, long_s) = memory[1.0], memory[args.long_minutes]
    results["segment_memory"] = {"short_min": 1.0, "long_min": args.long_minutes, "short_mib": short_mib,
                                 "long_mib": long_mib, "ratio": long_mib / short_mib, "short_s": short_s,
                                 "long_s": long_s}

    table = Table(title=f"SSL speech encoders at random init ({results['threads']} threads)", title_justify="left")
    for column in ("measure", "value", "reference (same run)", "ratio", "target"):
        table.add_column(column)
    for encoder, rate in rates.items():
        table.add_row(f"{encoder} throughput", f"{rate:.2f} s audio/s", "real time: 1.00", f"{rate:.2f}x", "")
    epoch = results["epoch"]
    table.add_row(f"cached epoch ({name}, 16 x 3 s clips)", f"{cached_s:.3f} s", f"recompute: {recompute_s:.2f} s",
                  f"{epoch['speedup']:.0f}x faster", ">= 20x")
    table.add_row(f"--segment peak RSS, {args.long_minutes:g} min ({name})", f"{long_mib:.0f} MiB",
                  f"1 min: {short_mib:.0f} MiB", f"{long_mib / short_mib:.3f}", "<= 1.10")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
