"""Output every layer above the models shares: logs, warnings and tables on stderr, JSON on stdout.

stdout carries only `--json` results, so pipelines stay clean; everything for a person goes to stderr.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(stderr=True, highlight=False)

# Who else follows long work besides the progress bar (the MCP server's progress notifications):
# called with (done, total, unit, numbers) after each training step or input file; returning True
# stops the work the way Ctrl-C does.
ProgressObserver = Callable[[int, int, str, Mapping[str, float]], bool]
PROGRESS_OBSERVER: ContextVar[ProgressObserver | None] = ContextVar("dsfuse_progress_observer", default=None)


def observed_progress(done: int, total: int, unit: str, numbers: Mapping[str, float] | None = None) -> bool:
    """Tell the observer (if any) how far the work is; True when it asks the work to stop."""
    observer = PROGRESS_OBSERVER.get()
    return observer is not None and observer(done, total, unit, numbers or {})


def error_line(message: object) -> None:
    console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


def warn(message: str, quiet: bool = False) -> None:
    if not quiet:
        console.print(f"warning: {message}", markup=False, soft_wrap=True)


def emit_json(obj: Any) -> None:
    """One JSON object on one line of stdout; NaN and infinities (not JSON) become null."""
    sys.stdout.write(json.dumps(_finite(obj), default=_json_default, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # tensors and numpy values
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def print_table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(format_value(v) for v in row))
    console.print(table)


def format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
