"""What every command shares: its options, one-line errors and exit codes, output and inputs.

A command is a plain function decorated with `@command`, taking the shared options as `Annotated`
aliases (`device: DeviceOpt = "auto"`). Errors become `error: <what> (<where>)` on stderr.
A trainer is decorated with `@trainer` instead: the engine's options and `--config` join its own.
"""

from __future__ import annotations

import functools
import glob
import inspect
import sys
import traceback
import types
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer

from dsfuse.choices import Precision, TrainLogger
from dsfuse.errors import DsfuseError, InputError, UsageError
from dsfuse.report import emit_json, error_line, observed_progress, print_table

DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: the same seed repeats a run on the same device.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (JSON Lines for per-file results).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")]
CheckpointOpt = Annotated[Path, typer.Option("--checkpoint", "-c", help="A model.safetensors file or a run directory.")]
ContrastiveOpt = Annotated[float, typer.Option("--contrastive", min=0.0, help="Weight of a CLIP-style alignment loss "
                          "(symmetric InfoNCE, learned temperature) between the two fused modalities; the held-out "
                          "report adds cross-modal retrieval recall@1/5 (0: off; needs --fusion).")]
RunOutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default: the next free "
                                                "runs/<task>/train, train2, ...; with --resume the newest).")]

F = TypeVar("F", bound=Callable[..., Any])
_debug = ContextVar("debug", default=False)  # --debug of the running command: per-file errors show tracebacks too


def command(fn: F) -> F:
    """Turn errors into one line on stderr and the contract's exit code (a traceback only with --debug).

    A file that cannot be written or read where the command needs it (an output under a file, a
    read-only folder, an unreadable checkpoint) is a usage error: exit 2, `error: <why> (<path>)`.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        _debug.set(debug)
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except DsfuseError as e:
            if debug:
                traceback.print_exc()
            error_line(e)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:
            if debug:
                traceback.print_exc()
            error_line(os_error_text(e))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            error_line("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # an unexpected failure is still one line unless --debug
            if debug:
                traceback.print_exc()
            detail = str(e).splitlines()[0] if str(e) else ""
            error_line(f"{type(e).__name__}: {detail} (run again with --debug for the traceback)")
            raise typer.Exit(1) from None

    # eval_str: resolve string annotations in fn's module, or Typer (reading the wrapper) loses their help texts
    wrapper.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def choice_metavar(choice: object) -> str:
    """A choice's values as an option's metavar, spaced so a narrow `--help` wraps between values, not inside one."""
    from dsfuse.choices import values

    return "{" + ", ".join(values(choice)) + "}"


def os_error_text(e: OSError) -> str:
    """`Permission denied (runs/x/model.safetensors)`: the reason and the path, without Python's decoration."""
    reason = e.strerror or type(e).__name__
    return f"{reason} ({e.filename})" if e.filename else reason


def given_options() -> set[str]:
    """The parameters of the running command given on its command line (not left at their defaults):
    what `--resume` checks against the run's recorded options."""
    from typer._click.globals import get_current_context
    from typer._click.core import ParameterSource

    ctx = get_current_context(silent=True)
    if ctx is None:
        return set()
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.DEFAULT_MAP)  # or --config
    return {name for name in ctx.params if ctx.get_parameter_source(name) in given}


def expand_inputs(inputs: Iterable[str | Path], suffixes: Iterable[str] | None = None) -> list[Path]:
    """Files, folders (searched recursively for `suffixes`), globs, and `-` (paths from stdin), in order.

    A path that does not exist is kept, so the command reports it as a per-file failure.
    """
    exts = {s.lower() for s in suffixes} if suffixes else None
    out: list[Path] = []
    for item in inputs:
        item = str(item)
        if item == "-":
            out += expand_inputs([line.strip() for line in sys.stdin if line.strip()], suffixes)
        elif Path(item).is_dir():
            out += sorted(p for p in Path(item).rglob("*")
                          if p.is_file() and (exts is None or p.suffix.lower() in exts))
        elif any(ch in item for ch in "*?[") and not Path(item).exists():
            out += sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        else:
            out.append(Path(item))
    if not out:
        raise UsageError("no input files found", " ".join(map(str, inputs)) or "INPUTS")
    return out


def for_each_input(paths: list[Path], process: Callable[[Path], dict[str, Any]], *, as_json: bool,
                   quiet: bool = False, desc: str = "files") -> Iterator[tuple[Path, dict[str, Any]]]:
    """Run `process` per file; failures are reported as one line each and the rest go on.

    Yields (path, result) for successes; raises typer.Exit(1) at the end if any file failed.
    With --json each result is also printed as one JSON line `{"file": ..., **result}`.
    """
    from tqdm import tqdm

    failed = 0
    bar = tqdm(paths, desc=desc, disable=quiet or len(paths) < 2, leave=False, file=sys.stderr)
    for index, path in enumerate(bar):
        try:
            if not path.exists():
                raise InputError("file not found", path)
            result = process(path)
        except UsageError:
            raise
        except Exception as e:  # a decoder's own exception is still this file's failure only
            failed += 1
            bar.clear()  # the error starts a line of its own, not the progress bar's
            if _debug.get():
                traceback.print_exc()
            error_line(file_error_text(e, path))
            continue
        if as_json:
            emit_json({"file": str(path), **result})
        yield path, result
        if observed_progress(index + 1, len(paths), "file"):  # stopped like Ctrl-C: what is done stays done
            raise KeyboardInterrupt
    if failed:
        raise typer.Exit(1)


def file_error_text(e: Exception, path: Path) -> str:
    """One file's failure as `<what> (<file>)`."""
    if isinstance(e, DsfuseError):
        return str(e) if e.where is not None else f"{e} ({path})"
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{detail} ({path})"


def tabulate_each_input(paths: list[Path], process: Callable[[Path], dict[str, Any]],
                        to_rows: Callable[[Path, dict[str, Any]], Iterable[Any]], show: Callable[[list[Any]], None],
                        *, as_json: bool, quiet: bool = False, desc: str = "files") -> None:
    """`for_each_input`, gathering table rows from the successes: `show(rows)` prints them (not under
    --json) even when some inputs failed, before the exit 1 that follows."""
    rows: list[Any] = []
    try:
        for path, result in for_each_input(paths, process, as_json=as_json, quiet=quiet, desc=desc):
            rows.extend(to_rows(path, result))
    finally:
        if rows and not as_json:
            show(rows)


def stream_timelines(paths: list[Path], timeline: Callable[[Path], Iterable[dict[str, Any]]],
                     describe: Callable[[dict[str, Any]], str], *, as_json: bool) -> None:
    """Each file's timeline, each segment {start, end, ...} printed as soon as it is known (a JSON line
    `{"file", **segment}` with --json, else `file start-end <describe(segment)>`); a failing file is one
    error line and the rest go on."""
    from dsfuse.report import console

    def stream_file(path: Path) -> dict[str, Any]:
        segments = 0
        for record in timeline(path):
            segments += 1
            if as_json:
                emit_json({"file": str(path), **record})
            else:
                console.print(f"{path}  {record['start']:8.2f}-{record['end']:8.2f}  {describe(record)}", markup=False)
        return {"segments": segments}

    for _ in for_each_input(paths, stream_file, as_json=False, quiet=True):
        pass


def report_training(result: Any, summary: dict[str, Any], as_json: bool) -> None:
    """Print a trainer's outcome (JSON or a table); an interrupted run says how to resume and exits 130."""
    record = {"run_dir": str(result.run_dir), "step": result.step, "interrupted": result.interrupted,
              "seconds": round(result.seconds, 2), **summary}
    if as_json:
        emit_json(record)
    else:
        print_table(f"run {result.run_dir}", ["what", "value"], [(k, v) for k, v in record.items()])
    if result.interrupted:
        error_line(f"interrupted at step {result.step}; saved — continue with --resume ({result.run_dir})")
        raise typer.Exit(130)


# --------------------------------------------------------------------------- trainers

# The engine's options, which every trainer takes (runs.TrainOptions holds them; engine.TrainConfig.of passes
# them on): declared once here, added to each trainer's own by @trainer.
ENGINE_OPTIONS: dict[str, tuple[Any, Any]] = {
    "precision": (Annotated[Precision | None, typer.Option(
        "--precision", help="Mixed precision of the training steps (default: bf16 on CUDA where supported, "
                            "else fp32; fp16 needs CUDA).")], None),
    "accumulate": (Annotated[int, typer.Option(
        "--accumulate", min=1, help="Micro-batches of --batch-size summed per optimizer step.")], 1),
    "workers": (Annotated[int, typer.Option(
        "--workers", min=0, help="DataLoader worker processes decoding the data (--resume stays exact).")], 0),
    "grad_checkpoint": (Annotated[bool, typer.Option(
        "--grad-checkpoint", help="Recompute the transformer/UNet blocks' activations in the backward pass: "
                                  "less memory, more time.")], False),
    "compile": (Annotated[bool, typer.Option("--compile", help="torch.compile the model for training.")], False),
    "logger": (Annotated[TrainLogger, typer.Option(
        "--logger", help="Live curves and images beside metrics.jsonl: tensorboard writes RUN/tensorboard.")],
        "none"),
}
EngineOpt = dict[str, Any]  # a trainer's `*, engine: EngineOpt` parameter: what @trainer passes
NOT_IN_CONFIG = frozenset({"config", "resume", "force", "json", "quiet", "debug"})  # how, not what, to run


def trainer(fn: F) -> F:
    """A trainer command: `fn` takes its own options and `engine` (the ENGINE_OPTIONS' values, for its
    task's TrainOptions); `--config FILE` sets any option by name (the command line wins), and the run
    writes every option it ran with to RUN/args.yaml."""
    own = inspect.signature(fn, eval_str=True)
    params = [p for p in own.parameters.values() if p.name != "engine"]
    hints = {p.name: p.annotation for p in params}
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
             for name, (annotation, default) in ENGINE_OPTIONS.items()]
    hints.update({p.name: p.annotation for p in added})
    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Path | None, typer.Option("--config", is_eager=True, callback=_config_loader(hints),
                                  help="A YAML file of options by name (such as a run's args.yaml); the "
                                       "command line wins.")])

    @functools.wraps(fn)
    def run(**kwargs: Any) -> Any:
        from typer._click.globals import get_current_context

        from dsfuse.device import select_device
        from dsfuse.engine import autocast_dtype
        from dsfuse.runs import CommandArgs, record_command

        kwargs.pop("config")
        engine = {name: kwargs.pop(name) for name in ENGINE_OPTIONS}
        autocast_dtype(engine["precision"], select_device(kwargs.get("device", "auto")))  # refuse before any work
        ctx = get_current_context()
        values = {p.name: ctx.params[p.name] for p in ctx.command.params  # in the order --help lists them
                  if p.name in ctx.params and p.name not in NOT_IN_CONFIG}
        record_command(CommandArgs(ctx.command_path, values, frozenset(given_options())))
        return fn(**kwargs, engine=engine)

    run.__signature__ = own.replace(parameters=params + added + [config])  # type: ignore[attr-defined]
    return command(run)  # type: ignore[return-value]


def _config_loader(hints: dict[str, Any]) -> Callable[[typer.Context, Path | None], Path | None]:
    """The --config callback: the file's options become the command's defaults (before any other is read)."""

    def load(ctx: typer.Context, value: Path | None) -> Path | None:
        if value is None or ctx.resilient_parsing:
            return value
        try:
            ctx.default_map = {**(ctx.default_map or {}), **config_options(value, hints)}
        except DsfuseError as e:
            error_line(e)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:
            error_line(os_error_text(e))
            raise typer.Exit(2) from None
        return value

    return load


def config_options(path: Path, hints: dict[str, Any]) -> dict[str, Any]:
    """The options a config file sets, by parameter name, each checked against its option's type."""
    from dsfuse.runs import read_run_args

    options: dict[str, Any] = {}
    for key, value in read_run_args(path).items():
        name = key.lstrip("-").replace("-", "_")
        if name in NOT_IN_CONFIG:
            raise UsageError(f"{key!r} is not set from a config file; give it on the command line", path)
        if name not in hints:
            raise UsageError(f"unknown option {key!r}", path)
        kind = _bare(hints[name])
        if not _fits(value, kind):
            raise UsageError(f"{key} must be {_describe(kind)}, got {value!r}", path)
        options[name] = value
    return options


def _bare(annotation: Any) -> Any:
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _alternatives(kind: Any) -> tuple[Any, ...] | None:
    return get_args(kind) if get_origin(kind) in (Union, types.UnionType) else None


def _fits(value: Any, kind: Any) -> bool:
    """Whether a YAML value is of an option's type (no coercion: `steps: "ten"` or `lr: true` is refused)."""
    if (alternatives := _alternatives(kind)) is not None:
        return any(_fits(value, k) for k in alternatives)
    if kind is type(None):
        return value is None
    if get_origin(kind) is Literal:
        return value in get_args(kind)
    if get_origin(kind) in (list, tuple):
        return isinstance(value, list) and all(_fits(v, get_args(kind)[0]) for v in value)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return kind in (str, Path) and isinstance(value, str)


def _describe(kind: Any) -> str:
    if (alternatives := _alternatives(kind)) is not None:
        return " or ".join(_describe(k) for k in alternatives)
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(map(str, get_args(kind)))
    if get_origin(kind) in (list, tuple):
        return f"a list of ({_describe(get_args(kind)[0])})"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "text",
             Path: "a path"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))
