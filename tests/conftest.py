"""Shared test helpers: run the real `dsfuse` command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None, input: str | None = None, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m dsfuse ARGS` from this checkout, capturing text output."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsfuse", *map(str, args)], cwd=cwd, input=input,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, contains: str = "") -> str:
    """The contract: exit `code`, stderr ends with one `error: ...` line, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors, proc.stderr
    assert contains.lower() in errors[-1].lower(), errors[-1]
    return errors[-1]
