"""`dsfuse demo` end to end: every registered step runs and reports what it made."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_demo_runs_every_step_and_reports_outputs(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", out, "--json", "-q", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    steps = {s["step"]: s for s in report["steps"]}
    assert "info" in steps and all(s["ok"] for s in steps.values()), steps
    for step in steps.values():
        for path in step["outputs"]:
            assert path.startswith(str(out)), f"{step['step']} wrote outside --out: {path}"
