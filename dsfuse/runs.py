"""Run directories, and the one rule every trainer follows for them.

- A run goes to `--out`, or else to the first free `runs/<task>/train`, `train2`, `train3`, ... (a new
  run never clobbers an old one); `--resume` without `--out` continues the newest of them.
- A trainer's options are a `TrainOptions` dataclass, recorded in the checkpoint. `--resume` adopts the
  recorded options, and refuses any option given explicitly on the command line that contradicts its
  record (exit 2, one line naming the option), except the ones a run may change (`CHANGEABLE`: more
  steps, another evaluation interval) and paths (a data folder may move; its classes are checked).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from dsfuse.checkpoint import MODEL_FILE, CheckpointMeta, check_kind, check_weights_fit, read_metadata
from dsfuse.errors import UsageError
from dsfuse.io import remove_stale_temporaries

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
RUNS_ROOT = Path("runs")
RUN_NAME = "train"

O = TypeVar("O", bound="TrainOptions")


@dataclasses.dataclass(kw_only=True)
class TrainOptions:
    """What every trainer takes; a task's options subclass this with its own."""

    steps: int
    batch_size: int
    lr: float
    eval_every: int = 0
    seed: int = 0

    CHANGEABLE: ClassVar[frozenset[str]] = frozenset({"steps", "eval_every"})

    def record(self) -> dict[str, Any]:
        """The options as JSON values, as the checkpoint keeps them."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def run_dir_for(out: str | os.PathLike | None, task: str, resume: bool) -> Path:
    """`--out` when given, else the task's default run directory."""
    return Path(out) if out is not None else default_run_dir(task, resume)


def default_run_dir(task: str, resume: bool, root: Path = RUNS_ROOT) -> Path:
    """`runs/<task>/train`, `train2`, ...: the first free one for a new run, the newest for `--resume`."""
    folder = root / task
    taken = sorted((int(m.group(1) or 1), p) for p in folder.glob(f"{RUN_NAME}*")
                   if (m := re.fullmatch(rf"{RUN_NAME}(\d*)", p.name)) and p.is_dir())
    if resume:
        if not taken:
            raise UsageError(f"nothing to resume: no run in {folder}; name it with --out", "--resume")
        return taken[-1][1]
    number = taken[-1][0] + 1 if taken else 1
    return folder / (RUN_NAME if number == 1 else f"{RUN_NAME}{number}")


def resume_options(options: O, run_dir: str | os.PathLike, kind: str | tuple[str, ...],
                   explicit: Collection[str]) -> tuple[O, CheckpointMeta]:
    """The options and checkpoint record of the run in `run_dir`, for `--resume` (see the module's rule)."""
    run_dir = Path(run_dir)
    if not (run_dir / STATE_FILE).exists():
        raise UsageError(f"nothing to resume: no {STATE_FILE}", run_dir)
    meta = read_metadata(run_dir / MODEL_FILE)
    check_kind(meta, kind, run_dir)
    check_weights_fit(meta, run_dir / MODEL_FILE)
    hints = typing.get_type_hints(type(options))
    current = options.record()
    adopted: dict[str, Any] = {}
    for name, saved in meta.options.items():
        if name not in current or name in options.CHANGEABLE or "Path" in str(hints.get(name)):
            continue
        if name in explicit and current[name] != saved:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"the run was started with {flag} {_shown(saved)}; --resume cannot change it", flag)
        adopted[name] = tuple(saved) if isinstance(getattr(options, name), tuple) else saved
    return dataclasses.replace(options, **adopted), meta


def _shown(value: Any) -> str:
    return "(not set)" if value is None else ",".join(map(str, value)) if isinstance(value, list) else str(value)


def prepare_run_dir(run_dir: str | os.PathLike, resume: bool, force: bool) -> Path:
    """Create RUN_DIR; refuse to start over an existing run unless `--force`, or to resume nothing."""
    run_dir = Path(run_dir)
    has_run = (run_dir / STATE_FILE).exists() or (run_dir / MODEL_FILE).exists()
    if resume:
        if not (run_dir / STATE_FILE).exists():
            raise UsageError(f"nothing to resume: no {STATE_FILE}", run_dir)
    elif has_run and not force:
        raise UsageError("run directory already holds a run; pass --resume to continue or --force to start over",
                         run_dir)
    elif has_run:
        for name in (STATE_FILE, MODEL_FILE, METRICS_FILE):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir, [STATE_FILE, MODEL_FILE, METRICS_FILE])  # from a run killed mid-save
    return run_dir
