"""Run directories, and the one rule every trainer follows for them.

- A run goes to `--out`, or else to the first free `runs/<task>/train`, `train2`, `train3`, ... (a new
  run never clobbers an old one); `--resume` without `--out` continues the newest of them.
- A trainer's options are a `TrainOptions` dataclass, recorded in the checkpoint. `--resume` adopts the
  recorded options, and refuses any option given explicitly on the command line that contradicts its
  record (exit 2, one line naming the option), except the ones a run may change (`CHANGEABLE`: more
  steps, another evaluation interval, how the engine runs) and paths (a data folder may move; its
  classes are checked).
- Every run writes `args.yaml`: the options of the command that started it (`record_command`), so
  `--config RUN/args.yaml --out RUN2` repeats it; a resume updates the options it was given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from collections.abc import Collection, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from dsfuse.checkpoint import MODEL_FILE, CheckpointMeta, check_kind, check_weights_fit, read_metadata
from dsfuse.choices import Precision, TrainLogger
from dsfuse.errors import UsageError
from dsfuse.io import remove_stale_temporaries, write_text

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
ARGS_FILE = "args.yaml"
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
    # how the engine runs (engine.TrainConfig.of passes them on)
    precision: Precision | None = None  # None: bf16 on CUDA where supported, else fp32
    accumulate: int = 1  # micro-batches of batch_size per optimizer step
    workers: int = 0  # DataLoader worker processes
    grad_checkpoint: bool = False
    compile: bool = False
    logger: TrainLogger = "none"

    # a resumed run may change these: they do not change what is computed
    CHANGEABLE: ClassVar[frozenset[str]] = frozenset({"steps", "eval_every", "workers", "grad_checkpoint",
                                                      "compile", "logger"})

    def __post_init__(self) -> None:
        if self.accumulate < 1:
            raise UsageError(f"must be at least 1, got {self.accumulate}", "--accumulate")
        if self.workers < 0:
            raise UsageError(f"must be 0 or more, got {self.workers}", "--workers")

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
        if name not in current or name in options.CHANGEABLE or _is_path(hints.get(name)):
            continue
        if name in explicit and current[name] != saved:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"the run was started with {flag} {_shown(saved)}; --resume cannot change it", flag)
        adopted[name] = tuple(saved) if isinstance(getattr(options, name), tuple) else saved
    return dataclasses.replace(options, **adopted), meta


def _is_path(hint: Any) -> bool:
    """A path option (`Path`, `Path | None`): a data folder may move between a run and its resume."""
    return hint is Path or Path in typing.get_args(hint)


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
    remove_stale_temporaries(run_dir, [STATE_FILE, MODEL_FILE, METRICS_FILE, ARGS_FILE])  # a run killed mid-save
    write_run_args(run_dir, resume)
    return run_dir


# --------------------------------------------------------------------------- args.yaml

@dataclasses.dataclass(frozen=True)
class CommandArgs:
    """The options a trainer command runs with (option name -> value), and those the user gave."""

    command: str
    values: Mapping[str, Any]
    explicit: frozenset[str] = frozenset()


_command_args: ContextVar[CommandArgs | None] = ContextVar("command_args", default=None)


def record_command(args: CommandArgs | None) -> None:
    """Set what `prepare_run_dir` writes as the run's args.yaml (the running trainer command's options)."""
    _command_args.set(args)


def read_run_args(path: str | os.PathLike) -> dict[str, Any]:
    """An args.yaml (or any config file) as a mapping; a file that is not one is a UsageError naming it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        raise UsageError(f"not valid YAML: {getattr(e, 'problem', None) or type(e).__name__}", where) from None
    except UnicodeDecodeError:
        raise UsageError("not valid YAML: not UTF-8 text", path) from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UsageError("expected a mapping of option names to values", path)
    return data


def write_run_args(run_dir: Path, resume: bool) -> None:
    """Write RUN/args.yaml from the recorded command; a resume keeps the run's and updates the options given."""
    args = _command_args.get()
    if args is None:
        return
    values = {k: _yaml_value(v) for k, v in args.values.items()}  # null: the option's default
    path = run_dir / ARGS_FILE
    if resume and path.exists():
        try:
            saved = read_run_args(path)
        except UsageError:
            saved = {}
        values = {**saved, **{k: v for k, v in values.items() if k in args.explicit}}
    header = (f"# {args.command}: the options of this run. Repeat it with\n"
              f"#   {args.command} --config {path} --out NEW_RUN\n")
    write_text(path, header + yaml.safe_dump(values, sort_keys=False))


def _yaml_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_yaml_value(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
