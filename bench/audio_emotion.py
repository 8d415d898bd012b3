"""audio-emotion benchmark: held-out accuracy on the synthetic set, and flat memory for `predict --segment`.

1. Accuracy: `dsfuse audio-emotion synthetic` (held-out voices AND sentences), then `train` with and
   without `--speaker-norm`; compared with a reference measured on the same split in this run: logistic
   regression (scikit-learn) on each clip's mean and standard deviation of log-mel features, with and
   without the same speaker normalisation. CPU seconds are the trainer's own (user + system), wall
   seconds include waiting for a shared machine.
2. Memory: `predict --segment 2` with the speaker-normalised model (a streamed baseline pass, then the
   timeline) on 48 kHz stereo files of growing length (peak RSS of the process),
   against a reference that decodes the whole file first and then classifies the same segments.

    python bench/audio_emotion.py                      # full: 20 voices x 16 sentences, 1/3/10-minute files
    python bench/audio_emotion.py --quick              # a smaller set and shorter files
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO))

from dsfuse.data.audio import SAMPLE_RATE, LogMel, load_audio, trim_silence  # noqa: E402
from dsfuse.data.emotion_speech import SpeakerBaselines, find_labelled_clips  # noqa: E402

console = Console(stderr=False, width=150)

# The non-streaming reference: decode everything, then classify the same segments as --segment does.
WHOLE_FILE_REFERENCE = """
import sys, torch
from dsfuse.tasks.speech_emotion import classify, load_model
from dsfuse.data.audio import LogMel, MelConfig, load_audio
model, meta = load_model(sys.argv[1], torch.device("cpu"))
classes = meta.class_names(sys.argv[1])
mel = LogMel(MelConfig(n_mels=model.config.n_mels))
wave = load_audio(sys.argv[2])
labels = [classes[int(classify(model, [mel(block)], torch.device("cpu")).probs[0].argmax())]
          for block in wave.split(int(2.0 * 16000))]
print(len(labels))
"""


def run_measured(args: list[str]) -> tuple[subprocess.CompletedProcess, float, float, float]:
    """Run a child; return (result, wall s, CPU s, peak RSS MiB) of that child alone (os.wait4)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # files, not pipes: nothing blocks, and os.wait4 (not communicate) reaps the child to get its rusage
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(args, proc.returncode, out.read(), err.read())
    wall = time.perf_counter() - started
    if result.returncode != 0:
        console.print(f"[red]failed[/red]: {' '.join(map(str, args[2:5]))} ...: {result.stderr.strip()[-300:]}")
    return result, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def dsfuse(*args: str) -> list[str]:
    return [sys.executable, "-m", "dsfuse", *map(str, args)]


def pooled_features(folder: Path, mel: LogMel, speaker_norm: bool) -> tuple[np.ndarray, list[str]]:
    clips = find_labelled_clips(folder)
    features = [mel(trim_silence(load_audio(clip.path))) for clip in clips]
    if speaker_norm:
        baselines = SpeakerBaselines.of([c.speaker for c in clips], features)
        features = [baselines.normalize(c.speaker, f) for c, f in zip(clips, features)]
    rows = [torch.cat([f.mean(0), f.std(0)]).numpy() for f in features]
    return np.stack(rows), [c.label for c in clips]


def reference_accuracy(data: Path, speaker_norm: bool) -> tuple[float, float] | None:
    """Held-out accuracy and macro F1 of logistic regression on pooled log-mel statistics."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import f1_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        console.print("note: scikit-learn is not installed; the logistic-regression reference is skipped")
        return None
    mel = LogMel()
    x_train, y_train = pooled_features(data / "train", mel, speaker_norm)
    x_test, y_test = pooled_features(data / "heldout", mel, speaker_norm)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)
    pred = model.predict(x_test)
    return float(np.mean(pred == np.array(y_test))), float(f1_score(y_test, pred, average="macro"))


def accuracy_bench(work: Path, quick: bool, steps: int) -> Path:
    """Train plain and speaker-normalised models and the references; return the speaker-normalised run."""
    import json

    data = work / "synthetic"
    voices, sentences, held_voices, held_sentences = (8, 8, 2, 2) if quick else (20, 16, 4, 4)
    made, wall, _, _ = run_measured(dsfuse("audio-emotion", "synthetic", data, "--voices", voices, "--sentences",
                                           sentences, "--heldout-voices", held_voices, "--heldout-sentences",
                                           held_sentences, "--json", "-q", "--force"))
    console.print(f"synthetic set: {made.stdout.strip()[:160]}... ({wall:.0f} s)")
    table = Table(title="held-out accuracy: clips of unseen voices and sentences", title_justify="left")
    for col in ("model", "accuracy", "macro F1", "train CPU s", "train wall s", "held-out / train clips"):
        table.add_column(col)
    for speaker_norm in (False, True):
        norm = ["--speaker-norm"] if speaker_norm else []
        how = ", speaker-normalised" if speaker_norm else ""
        run = work / ("run-speaker-norm" if speaker_norm else "run")
        trained, wall, cpu, _ = run_measured(dsfuse("audio-emotion", "train", data / "train", "--heldout",
                                                    data / "heldout", "--out", run, "--steps", steps, *norm,
                                                    "--json", "-q", "--device", "cpu", "--force"))
        if trained.returncode == 0:
            report = json.loads(trained.stdout)
            table.add_row(f"MLA transformer, {steps} steps (dsfuse){how}", f"{report['accuracy']:.1%}",
                          f"{report['macro_f1']:.3f}", f"{cpu:.0f}", f"{wall:.0f}",
                          f"{report['heldout_clips']} / {report['train_clips']}")
        t0, t1 = time.process_time(), time.perf_counter()
        reference = reference_accuracy(data, speaker_norm)
        if reference:
            table.add_row(f"reference: logistic regression on pooled log-mel{how}", f"{reference[0]:.1%}",
                          f"{reference[1]:.3f}", f"{time.process_time() - t0:.0f} (features + fit)",
                          f"{time.perf_counter() - t1:.0f}", "")
    console.print(table)
    return run


def long_file(path: Path, minutes: float, source: Path, rate: int = 48000) -> Path:
    """A long recording as a recorder makes it (48 kHz stereo FLAC): the synthetic clips one after
    another, repeated, with short pauses. Written a piece at a time."""
    from dsfuse.data.audio import resample

    clips = [load_audio(p).numpy() for p in sorted(source.rglob("*.wav"))[:40]]
    pause = np.zeros(SAMPLE_RATE // 2, np.float32)
    unit = resample(torch.from_numpy(np.concatenate([x for clip in clips for x in (clip, pause)])), SAMPLE_RATE,
                    rate).numpy()
    unit = np.stack([unit, unit], axis=1)
    total = int(minutes * 60 * rate)
    with sf.SoundFile(path, "w", rate, 2, format="FLAC", subtype="PCM_16") as f:
        for start in range(0, total, len(unit)):
            f.write(unit[: total - start])
    return path


def memory_bench(work: Path, run: Path, minutes: list[float]) -> None:
    table = Table(title="predict --segment 2.0: peak RSS (MiB) as the file grows", title_justify="left")
    for col in ("file", "segments", "streaming RSS", "streaming wall s", "reference RSS (decode whole file)"):
        table.add_column(col)
    for length in minutes:
        path = long_file(work / f"long_{length:g}min.flac", length, work / "synthetic" / "train")
        streamed, wall, _, rss = run_measured(dsfuse("audio-emotion", "predict", path, "--checkpoint", run,
                                                     "--segment", "2.0", "--json", "-q", "--device", "cpu"))
        _, _, _, ref_rss = run_measured([sys.executable, "-c", WHOLE_FILE_REFERENCE, str(run), str(path)])
        segments = len(streamed.stdout.splitlines()) if streamed.returncode == 0 else 0
        table.add_row(f"{length:g} min, 48 kHz stereo FLAC", str(segments), f"{rss:.0f}", f"{wall:.0f}", f"{ref_rss:.0f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller synthetic set and shorter files")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--work", type=Path, default=None, help="folder for the data and runs (default: temp)")
    args = parser.parse_args()
    minutes = [0.5, 1.5, 3.0] if args.quick else [1.0, 3.0, 10.0]
    with tempfile.TemporaryDirectory(prefix="bench-audio-") as tmp:
        work = args.work or Path(tmp)
        run = accuracy_bench(work, args.quick, args.steps)
        if (run / "model.safetensors").exists():
            memory_bench(work, run, minutes)


if __name__ == "__main__":
    main()
