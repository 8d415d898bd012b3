from __future__ import annotations

import pytest
import torch

from dsfuse.device import amp_dtype, available_devices, seed_everything, select_device
from dsfuse.errors import UsageError


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("dsfuse.device._mps_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    monkeypatch.setattr("dsfuse.device._mps_available", lambda: True)
    assert select_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert select_device("auto") == torch.device("cuda", 0)


def test_explicit_unavailable_device_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("dsfuse.device._mps_available", lambda: False)
    for spec in ("cuda", "cuda:1", "mps"):
        with pytest.raises(UsageError) as err:
            select_device(spec)
        assert err.value.exit_code == 2 and err.value.where == "--device"


def test_missing_gpu_index_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UsageError, match="cuda:3 does not exist"):
        select_device("cuda:3")


def test_garbage_device_name():
    with pytest.raises(UsageError):
        select_device("gpu-please")


def test_cpu_always_available_and_no_amp_on_cpu():
    assert "cpu" in available_devices()
    assert select_device("CPU") == torch.device("cpu")
    assert amp_dtype(torch.device("cpu")) is None


def test_seed_repeats():
    seed_everything(7)
    a = torch.randn(4)
    seed_everything(7)
    assert torch.equal(a, torch.randn(4))


def test_work_larger_than_memory_is_refused_in_one_line():
    import torch

    from dsfuse.device import available_memory, check_memory

    cpu = torch.device("cpu")
    check_memory(1 << 20, cpu, "routing", "--tokens")
    with pytest.raises(UsageError, match=r"routing needs about .* GiB free \(--tokens\)"):
        check_memory(available_memory(cpu) * 2, cpu, "routing", "--tokens")
