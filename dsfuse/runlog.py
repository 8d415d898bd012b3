"""Live curves beside `metrics.jsonl` (which stays the record): TensorBoard's own writer, on rank 0.

The engine sends every logged record (loss, learning rate, evaluation numbers) as scalars, and after
each evaluation the PNGs the trainer wrote into the run (reconstruction grids, samples, confusion
matrices) as image summaries, tagged by their path without step numbers (`samples_000500.png` ->
`samples`). A resumed run purges the events logged after its checkpoint, as metrics.jsonl does.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dsfuse import choices
from dsfuse.errors import UsageError

EVENTS_DIR = "tensorboard"


class RunLog:
    """Where one run's curves and pictures go (one folder of TensorBoard event files)."""

    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.writer = SummaryWriter(str(run_dir / EVENTS_DIR), purge_step=start_step)
        self.seen: dict[Path, int] = {p: p.stat().st_mtime_ns for p in self._pictures()}  # older runs' PNGs

    def scalars(self, step: int, record: Mapping[str, Any], prefix: str = "") -> None:
        """Every number of `record` (nested mappings as `eval/accuracy`), at `step`."""
        for name, value in record.items():
            if isinstance(value, Mapping):
                self.scalars(step, value, f"{prefix}{name}/")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}{name}", value, step)
        self.writer.flush()

    def images(self, step: int) -> None:
        """The PNGs written into the run since the last call, at `step` (one per tag)."""
        tagged: dict[str, Path] = {}
        for path in self._pictures():
            stamp = path.stat().st_mtime_ns
            if self.seen.get(path) != stamp:
                self.seen[path] = stamp
                tagged.setdefault(picture_tag(path.relative_to(self.run_dir)), path)
        for tag, path in sorted(tagged.items()):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def _pictures(self) -> list[Path]:
        return sorted(p for p in self.run_dir.rglob("*.png") if EVENTS_DIR not in p.relative_to(self.run_dir).parts)


def picture_tag(relative: Path) -> str:
    """`reconstructions/step_000500.png` -> `reconstructions/step`: one tag per picture over the steps."""
    return re.sub(r"[_-]?\d+$", "", relative.with_suffix("").as_posix()) or relative.stem


def open_run_log(kind: choices.TrainLogger, run_dir: Path | None, start_step: int = 0) -> RunLog | None:
    """The run's log of kind `kind` (None for "none"); without `run_dir` only checks it can be made."""
    choices.check(kind, choices.TrainLogger, "logger")
    if kind == "none":
        return None
    if importlib.util.find_spec("tensorboard") is None:  # torch's writer needs the package
        raise UsageError("--logger tensorboard needs the tensorboard package: pip install 'dsfuse[tensorboard]'",
                         "--logger")
    return RunLog(run_dir, start_step) if run_dir is not None else None
