"""rampde.bench.nvml on the CPU: the NVML sampler without NVML, off CUDA, and with a fake device."""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
import types

import pytest
import torch

from rampde.bench import notices, nvml

CPU = torch.device("cpu")


@pytest.fixture
def fresh_nvml(monkeypatch):
    """Forget any NVML initialisation and every 'said once' message of earlier tests."""
    monkeypatch.setattr(nvml, "_nvml_module", nvml._UNSET)
    monkeypatch.setattr(nvml, "_nvml_warned", False)
    monkeypatch.setattr(notices, "_said", set())


def test_nvml_absent(monkeypatch, fresh_nvml, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with caplog.at_level(logging.WARNING, logger="rampde.bench.nvml"):
        assert nvml._nvml() is None
        assert nvml._nvml() is None
        with nvml.NvmlSampler("cuda", period_s=0.001) as sampler:
            time.sleep(0.005)
    assert not sampler.active and sampler.timeline == []
    assert all(math.isnan(v) for v in sampler.summary(calls=3).values())
    said = [r for r in caplog.records if "NVML unavailable" in r.getMessage()]
    assert len(said) == 1 and "nvidia-ml-py is not installed" in said[0].getMessage()
    assert said[0].name == "rampde.bench.nvml"


def test_nvml_sampler_off_cuda_records_nothing(fresh_nvml):
    with nvml.NvmlSampler(CPU) as sampler:
        pass
    assert sampler.timeline == [] and math.isnan(sampler.summary()["energy_j"])


@pytest.fixture
def fake_gpu(monkeypatch, fresh_nvml):
    """pynvml's functions answering for one fake device with canned, increasing values."""
    pynvml = pytest.importorskip("pynvml")
    memory = itertools.count(start=1 * 2**30, step=2**20)  # +1 MiB per sample
    energy = iter([5_000_000, 5_900_000])  # mJ at entry and exit: 900 J
    calls = {"init": 0, "memory": 0}

    def init():
        calls["init"] += 1

    def memory_info(handle):
        assert handle == "fake-handle"
        calls["memory"] += 1
        return types.SimpleNamespace(used=next(memory), total=80 * 2**30)

    def instant_power(handle, field_ids):
        assert field_ids == [pynvml.NVML_FI_DEV_POWER_INSTANT]
        return [types.SimpleNamespace(nvmlReturn=pynvml.NVML_SUCCESS, valueType=pynvml.NVML_VALUE_TYPE_UNSIGNED_INT,
                                      value=types.SimpleNamespace(uiVal=420_000))]  # mW

    def by_uuid(uuid):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    for name, fn in {
        "nvmlInit": init,
        "nvmlDeviceGetHandleByUUID": by_uuid,
        "nvmlDeviceGetHandleByIndex": lambda index: "fake-handle",
        "nvmlDeviceGetMemoryInfo": memory_info,
        "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(gpu=80, memory=40),
        "nvmlDeviceGetPowerUsage": lambda h: 350_000,  # mW, a 1-second average on Ampere and newer
        "nvmlDeviceGetFieldValues": instant_power,
        "nvmlDeviceGetTotalEnergyConsumption": lambda h: next(energy),
        "nvmlSystemGetDriverVersion": lambda: "570.86.15",
    }.items():
        monkeypatch.setattr(pynvml, name, fn)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return calls


def test_nvml_sampler_with_a_fake_device(fake_gpu):
    with nvml.NvmlSampler("cuda", period_s=0.005) as sampler:
        time.sleep(0.06)
    assert sampler.active and fake_gpu["init"] == 1
    timeline = sampler.timeline
    assert len(timeline) >= 3, "one sample at entry, some on the way, one at exit"
    assert len(timeline) == fake_gpu["memory"]
    assert [s["t_s"] for s in timeline] == sorted(s["t_s"] for s in timeline)
    assert timeline[0]["t_s"] >= 0 and timeline[-1]["t_s"] >= 0.05
    assert timeline[0] | {"t_s": 0} == {"t_s": 0, "mem_used_bytes": float(2**30), "gpu_util_pct": 80.0,
                                        "power_w": 420.0}, "the instantaneous power field, not the 1-s average"
    summary = sampler.summary(calls=3)
    assert summary["nvml_mem_peak_bytes"] == 2**30 + (len(timeline) - 1) * 2**20
    assert summary["gpu_util_mean_pct"] == 80.0
    assert summary["energy_j"] == pytest.approx(300.0), "900 J over 3 calls"
    assert 0.06 <= sampler.window_s < 10.0
    assert summary["power_mean_w"] == pytest.approx(900.0 / sampler.window_s), "the energy over the window"
    nvml._nvml()
    assert fake_gpu["init"] == 1, "NVML is initialised once per process"


def test_nvml_without_an_energy_counter(fake_gpu, monkeypatch):
    import pynvml

    def not_supported(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", not_supported)
    with nvml.NvmlSampler("cuda", period_s=0.005) as sampler:
        time.sleep(0.01)
    summary = sampler.summary()
    assert math.isnan(summary["energy_j"]) and summary["power_mean_w"] == 420.0, "the mean of the samples"


def test_nvml_without_instantaneous_power(fake_gpu, monkeypatch, caplog):
    """An older driver: the field is not supported, so the power reading (a 1-s average) is used
    and that is said once."""
    import pynvml

    def not_supported(handle, field_ids):
        return [types.SimpleNamespace(nvmlReturn=pynvml.NVML_ERROR_NOT_SUPPORTED, valueType=0,
                                      value=types.SimpleNamespace(dVal=0.0))]

    monkeypatch.setattr(pynvml, "nvmlDeviceGetFieldValues", not_supported)
    with caplog.at_level(logging.INFO, logger="rampde.bench.measure"):
        for _ in range(2):
            with nvml.NvmlSampler("cuda", period_s=0.005) as sampler:
                time.sleep(0.01)
            assert {row["power_w"] for row in sampler.timeline} == {350.0}
    said = [r for r in caplog.records if "instantaneous power" in r.getMessage()]
    assert len(said) == 1 and "1-second average" in said[0].getMessage()

