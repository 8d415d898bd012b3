"""audio-emotion + transcript: held-out accuracy of `train --fusion X` against audio alone (the reference,
`train` without --fusion), same synthetic split, same steps, same width, measured in this run.

The synthetic set's sentences are the same for every emotion, so its transcripts carry no label: the
question is whether fusing them costs accuracy, and whether gated fusion learns to turn the text down
(its mean held-out text gate, from 0.5 at the start). Seconds are wall time on a possibly shared machine.

    python bench/audio_text_fusion.py                           # 6 voices x 6 sentences, 150 steps
    python bench/audio_text_fusion.py --steps 300 --strategies gated,mid,late
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

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent


def dsfuse(*args: object) -> dict:
    """Run `python -m dsfuse ARGS --json -q` from this checkout; its JSON result."""
    proc = subprocess.run([sys.executable, "-m", "dsfuse", *map(str, args), "--json", "-q"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        sys.exit(f"dsfuse {' '.join(map(str, args))} failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voices", type=int, default=6)
    parser.add_argument("--sentences", type=int, default=6)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--strategies", default="gated,late")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic"
        dsfuse("audio-emotion", "synthetic", data, "--voices", args.voices, "--sentences", args.sentences,
               "--heldout-voices", 2, "--heldout-sentences", 2, "--transcripts", "--seed", args.seed)
        common = [data / "train", "--heldout", data / "heldout", "--steps", args.steps, "--dim", args.dim,
                  "--depth", 1, "--batch-size", 16, "--seed", args.seed, "--device", "cpu"]
        rows = []
        for fusion in ["none", *args.strategies.split(",")]:
            started = time.perf_counter()
            report = dsfuse("audio-emotion", "train", *common, "--out", Path(tmp) / fusion, "--fusion", fusion)
            rows.append((fusion, report, time.perf_counter() - started))

    reference = rows[0][1]["accuracy"]
    table = Table(title=f"audio-emotion held-out accuracy, audio alone vs audio + transcript "
                        f"({args.steps} steps, {rows[0][1]['heldout_clips']} held-out clips of unseen voices "
                        "and sentences)")
    for column in ("fusion", "held-out accuracy", "vs audio alone", "macro F1", "text gate", "wall s"):
        table.add_column(column, justify="left" if column == "fusion" else "right")
    for fusion, report, seconds in rows:
        gate = report.get("gate_text")
        table.add_row("none (reference)" if fusion == "none" else fusion, f"{report['accuracy']:.1%}",
                      f"{report['accuracy'] / reference:.2f}x" if reference else "-", f"{report['macro_f1']:.3f}",
                      "-" if gate is None else f"{gate:.2f}", f"{seconds:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
