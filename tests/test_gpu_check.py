"""bench/gpu_check.py runs unchanged on CPU at tiny sizes (what CI smoke-tests) and says what it skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path):
    result = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu",
                           "--only", "train-moe,sample,moe bench,attention bench", "--json", str(result)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(result.read_text())
    status = {c["name"]: c["status"] for c in record["checks"]}
    assert status == {"train-moe fp16": "skipped", "train-moe fp32": "ok", "train-moe bf16": "ok",
                      "sample ddpm": "skipped", "sample ddim": "skipped", "sample dpm++": "skipped",
                      "moe bench": "ok", "attention bench": "ok"}
    assert record["tiny"] and record["failed"] == []
    assert "skipped: train-moe fp16 (fp16 (GradScaler) needs CUDA" in " ".join(proc.stderr.split())


def test_gpu_check_refuses_an_unknown_check(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--only",
                           "train-everything", "--json", str(tmp_path / "x.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown checks: train-everything" in proc.stderr
