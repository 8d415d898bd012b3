"""`dsfuse info`: versions, devices, and whether the compiled ops of torchvision/torchaudio load."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import typer

from dsfuse import __version__
from dsfuse.cli.common import DebugOpt, DeviceOpt, JsonOpt, QuietOpt, command
from dsfuse.report import console, emit_json, print_table

PACKAGES = ["torch", "torchvision", "torchaudio", "av", "soundfile", "numpy", "safetensors", "typer"]


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _check(probe) -> dict:
    try:
        probe()
        return {"ok": True}
    except Exception as e:  # any failure to load is what this check reports
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def _torchvision_ops() -> None:
    import torch
    import torchvision.ops

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)


def _torchaudio_ops() -> None:
    import torch
    import torchaudio.functional as AF

    log_probs = torch.randn(1, 6, 4).log_softmax(-1)
    AF.forced_align(log_probs, torch.tensor([[1, 2]], dtype=torch.int32), blank=0)


def collect_info(device: str = "auto") -> dict:
    from dsfuse.device import available_devices, select_device

    chosen = select_device(device)
    import torch

    return {
        "dsfuse": __version__,
        "versions": {name: _package_version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda,
        "devices": available_devices(),
        "device": str(chosen),
        "ops": {"torchvision": _check(_torchvision_ops), "torchaudio": _check(_torchaudio_ops)},
    }


@command
def info(device: DeviceOpt = "auto", json: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False) -> None:
    """Show versions, devices and whether torchvision's and torchaudio's compiled ops load.

    Example: dsfuse info --json
    """
    result = collect_info(device)
    ops_ok = all(check["ok"] for check in result["ops"].values())
    if json:
        emit_json(result)
    else:
        rows = [("dsfuse", result["dsfuse"])] + [(k, v or "not installed") for k, v in result["versions"].items()]
        rows += [("devices", ", ".join(result["devices"])), ("device (chosen)", result["device"])]
        rows += [(f"{name} ops", "load" if c["ok"] else f"FAIL: {c['error']}") for name, c in result["ops"].items()]
        print_table("dsfuse info", ["what", "value"], rows)
    if not ops_ok:
        if not json:
            console.print("compiled ops do not load: reinstall torch, torchvision and torchaudio from PyPI "
                          "(see README: Install)")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("info")(info)


def demo_steps(samples, out):
    from dsfuse.cli.demo import DemoStep

    def summarize(records):
        r = records[0]
        loaded = [name for name, check in r["ops"].items() if check["ok"]]
        return f"torch {r['versions']['torch']} on {r['device']}; ops load: {', '.join(loaded) or 'none'}"

    return [DemoStep("info", ["info"], summarize)]
