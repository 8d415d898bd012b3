"""Output every layer above the models shares: logs, warnings and tables on stderr, JSON on stdout.

stdout carries only `--json` results, so pipelines stay clean; everything for a person goes to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(stderr=True, highlight=False)


def error_line(message: object) -> None:
    console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


def warn(message: str, quiet: bool = False) -> None:
    if not quiet:
        console.print(f"warning: {message}", markup=False, soft_wrap=True)


def emit_json(obj: Any) -> None:
    """One JSON object on one line of stdout."""
    sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    sys.stdout.flush()


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
