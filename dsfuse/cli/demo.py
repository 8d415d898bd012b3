"""`dsfuse demo`: run every command at tiny sizes on the bundled samples and tabulate what each made.

Each command module may define `demo_steps(samples, out) -> list[DemoStep]`; the steps run in the
order of `COMMAND_MODULES`, each as a real `dsfuse` subprocess with `--json`.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from dsfuse.cli.common import DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, command
from dsfuse.errors import UsageError
from dsfuse.io import claim_output_folder
from dsfuse.report import console, emit_json, print_table


@dataclass
class DemoStep:
    name: str
    args: list[str]  # after `dsfuse`; the demo appends --json, --device and -q
    summarize: Callable[[list[dict[str, Any]]], str] = lambda records: f"{len(records)} result(s)"
    outputs: list[Path] = field(default_factory=list)  # files or folders the step writes


def _run_step(step: DemoStep, device: str) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dsfuse", *step.args, "--json", "--device", device, "-q"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip().startswith("{")]
    files = sorted(str(p) for out in step.outputs
                   for p in ([out] if out.is_file() else out.rglob("*") if out.is_dir() else []) if p.is_file())
    ok = proc.returncode == 0
    try:
        summary = step.summarize(records) if ok else (proc.stderr.strip().splitlines() or ["failed"])[-1]
    except Exception as e:  # a summary that cannot be made is reported, not fatal
        summary = f"(no summary: {type(e).__name__})"
    return {"step": step.name, "ok": ok, "exit_code": proc.returncode, "seconds": round(seconds, 2),
            "files": len(files), "summary": summary, "outputs": files}


def collect_steps(samples: Path, out: Path) -> list[DemoStep]:
    from dsfuse.cli import COMMAND_MODULES

    steps: list[DemoStep] = []
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "demo_steps"):
            steps += module.demo_steps(samples, out)
    return steps


@command
def demo(
    out: Annotated[Path, typer.Option("--out", help="A fresh folder for everything the demo makes.")] = Path("demo-out"),
    samples: Annotated[Path | None, typer.Option("--samples", help="Samples folder (default: the bundled one).")] = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run every dsfuse command at tiny sizes on the bundled samples and show what each produced.

    Example: dsfuse demo --out demo-out
    """
    from dsfuse.data import samples_dir
    from dsfuse.device import select_device

    select_device(device)
    samples = samples or samples_dir()
    if not samples.is_dir():
        raise UsageError("samples folder not found", samples)
    claim_output_folder(out, force)

    results = []
    for step in collect_steps(samples, out):
        if not quiet:
            console.print(f"[bold]demo[/bold] {step.name}: dsfuse {' '.join(step.args)}")
        results.append(_run_step(step, device))
        if not quiet and not results[-1]["ok"]:
            console.print(f"  [red]failed[/red]: {results[-1]['summary']}")
    if json:
        emit_json({"out": str(out), "steps": results})
    else:
        print_table(f"dsfuse demo -> {out}", ["step", "ok", "s", "files", "key numbers"],
                    [(r["step"], "yes" if r["ok"] else "NO", r["seconds"], r["files"], r["summary"])
                     for r in results])
    if not all(r["ok"] for r in results):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
