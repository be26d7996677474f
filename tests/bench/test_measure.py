"""rampde.bench.measure on the CPU: timing statistics, the measured call, precision flags, gradient
error, TFLOP/s, the NVML sampler without NVML and with a fake device, and the environment."""

from __future__ import annotations

import itertools
import logging
import math
import socket
import sys
import time
import types

import pytest
import torch

from rampde.bench import measure
from rampde.bench.competitors import RunOutput

CPU = torch.device("cpu")
ENV_COLUMNS = ["gpu", "device", "compute_capability", "driver", "cuda", "torch", "torchdiffeq", "rampde", "tf32",
               "cudnn_tf32", "cudnn_benchmark", "commit"]


@pytest.fixture
def fresh_nvml(monkeypatch):
    """Forget any NVML initialisation and every 'said once' message of earlier tests."""
    monkeypatch.setattr(measure, "_nvml_module", measure._UNSET)
    monkeypatch.setattr(measure, "_nvml_warned", False)
    monkeypatch.setattr(measure, "_said", set())


# ----------------------------------------------------------------------------- time


def test_timing_statistics_are_exact():
    t = measure.Timing.from_samples([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (t.median_ms, t.q25_ms, t.q75_ms, t.min_ms, t.max_ms, t.repeats) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert t.columns() == {"time_ms_median": 3.0, "time_ms_q25": 2.0, "time_ms_q75": 4.0, "time_ms_min": 1.0,
                           "time_ms_max": 5.0}
    single = measure.Timing.from_samples([7.0])
    assert (single.median_ms, single.q25_ms, single.q75_ms) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError, match="no timing samples"):
        measure.Timing.from_samples([])


def test_time_runs_warms_up_then_times_each_repeat():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.002)

    timing = measure.time_runs(work, CPU, repeats=5, warmup=2)
    assert len(calls) == 7 and timing.repeats == 5
    assert 2.0 <= timing.min_ms <= timing.median_ms <= timing.max_ms
    for repeats, warmup in ((0, 1), (1, -1)):
        with pytest.raises(ValueError, match="repeats >= 1 and warmup >= 0"):
            measure.time_runs(work, CPU, repeats=repeats, warmup=warmup)


def test_measure_calls_on_the_cpu_keeps_the_last_output(fresh_nvml, caplog):
    counter = itertools.count()
    field = torch.nn.Linear(2, 2)

    def run():
        field(torch.zeros(2))
        return next(counter)

    with caplog.at_level(logging.WARNING, logger="rampde.bench.measure"):
        m = measure.measure_calls(run, CPU, repeats=3, warmup=2, watch=field)
        measure.measure_calls(run, CPU, repeats=1, warmup=0)
    assert m.output == 4, "two warm-up calls, three timed ones: the output of the fifth call"
    assert m.timing.repeats == 3 and m.timeline == []
    assert math.isnan(m.peak_mem_bytes) and all(math.isnan(v) for v in m.nvml.values())
    assert set(m.flags) == {"tf32", "cudnn_tf32", "cudnn_benchmark"}
    columns = m.columns()
    assert {"time_ms_median", "peak_mem_bytes", "energy_j", "tf32"} <= set(columns)
    said = [r for r in caplog.records if "no CUDA device" in r.getMessage()]
    assert len(said) == 1, "the absence of a GPU is said once"


def test_peak_memory_is_nan_off_cuda():
    assert math.isnan(measure.peak_memory_bytes(lambda: None, CPU))


# ----------------------------------------------------------------------------- precision flags


def test_flags_seen_are_those_inside_the_competitor_run():
    field = torch.nn.Linear(2, 2)
    before = torch.backends.cuda.matmul.allow_tf32

    def tf32_run():  # like torchdiffeq-tf32: TF32 on for its own run only
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            field(torch.zeros(2))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before

    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with measure.flags_seen(field) as flags:
            tf32_run()
            tf32_run()
        assert flags["tf32"] is True and torch.backends.cuda.matmul.allow_tf32 is False
        assert len(field._forward_pre_hooks) == 0, "the hook removes itself after the first call"
        with measure.flags_seen(field) as flags:
            pass  # never called: the flags at entry
        assert flags["tf32"] is False and len(field._forward_pre_hooks) == 0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ----------------------------------------------------------------------------- gradient error and TFLOP/s


def test_relative_error_of_concatenated_gradients():
    f64 = torch.float64
    out = RunOutput(torch.tensor(1.0), torch.tensor([3.0, 4.0]),
                    (torch.tensor([1.0, 2.0]), torch.tensor([[2.0]])))
    ref = RunOutput(torch.tensor(1.0, dtype=f64), torch.tensor([3.0, 4.5], dtype=f64),
                    (torch.tensor([1.0, 2.0], dtype=f64), torch.tensor([[2.5]], dtype=f64)))
    p_err, y_err = measure.gradient_errors(out, ref)
    assert p_err == pytest.approx(0.5 / math.sqrt(1 + 4 + 2.5**2), rel=1e-12)
    assert y_err == pytest.approx(0.5 / math.sqrt(9 + 4.5**2), rel=1e-12)
    assert measure.relative_error((torch.zeros(3),), (torch.zeros(3),)) == 0.0
    assert measure.relative_error((torch.ones(4),), (torch.zeros(4),)) == 2.0, "absolute against zero"
    with pytest.raises(ValueError, match="tensors against"):
        measure.relative_error((torch.ones(1),), ())
    with pytest.raises(ValueError, match="entries against"):
        measure.relative_error((torch.ones(2),), (torch.ones(3),))


def test_all_finite():
    ok = RunOutput(torch.tensor(1.0), torch.ones(2), (torch.ones(3),))
    assert measure.all_finite(ok)
    assert not measure.all_finite(RunOutput(torch.tensor(1.0), torch.ones(2), (torch.tensor([1.0, math.nan]),)))
    assert not measure.all_finite(RunOutput(torch.tensor(math.inf), torch.ones(2), ()))


def test_useful_flops_and_tflops():
    # rk4: 4 stages x 10 steps x 1e9 FLOPs forward, twice that backward: 1.2e11 FLOPs
    assert measure.solve_flops(10**9, steps=10, stages=4) == 1.2e11
    assert measure.achieved_tflops(1.2e11, time_ms=100.0) == pytest.approx(1.2)
    assert math.isnan(measure.achieved_tflops(1.0, 0.0)) and math.isnan(measure.achieved_tflops(1.0, math.nan))
    assert measure.STAGES["rk4"] == 4


# ----------------------------------------------------------------------------- NVML


def test_nvml_absent(monkeypatch, fresh_nvml, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with caplog.at_level(logging.WARNING, logger="rampde.bench.measure"):
        assert measure._nvml() is None
        assert measure._nvml() is None
        with measure.NvmlSampler("cuda", period_s=0.001) as sampler:
            time.sleep(0.005)
    assert not sampler.active and sampler.timeline == []
    assert all(math.isnan(v) for v in sampler.summary(calls=3).values())
    said = [r for r in caplog.records if "NVML unavailable" in r.getMessage()]
    assert len(said) == 1 and "nvidia-ml-py is not installed" in said[0].getMessage()


def test_nvml_sampler_off_cuda_records_nothing(fresh_nvml):
    with measure.NvmlSampler(CPU) as sampler:
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

    def by_uuid(uuid):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    for name, fn in {
        "nvmlInit": init,
        "nvmlDeviceGetHandleByUUID": by_uuid,
        "nvmlDeviceGetHandleByIndex": lambda index: "fake-handle",
        "nvmlDeviceGetMemoryInfo": memory_info,
        "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(gpu=80, memory=40),
        "nvmlDeviceGetPowerUsage": lambda h: 350_000,  # mW
        "nvmlDeviceGetTotalEnergyConsumption": lambda h: next(energy),
        "nvmlSystemGetDriverVersion": lambda: "570.86.15",
    }.items():
        monkeypatch.setattr(pynvml, name, fn)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return calls


def test_nvml_sampler_with_a_fake_device(fake_gpu):
    with measure.NvmlSampler("cuda", period_s=0.005) as sampler:
        time.sleep(0.06)
    assert sampler.active and fake_gpu["init"] == 1
    timeline = sampler.timeline
    assert len(timeline) >= 3, "one sample at entry, some on the way, one at exit"
    assert len(timeline) == fake_gpu["memory"]
    assert [s["t_s"] for s in timeline] == sorted(s["t_s"] for s in timeline)
    assert timeline[0]["t_s"] >= 0 and timeline[-1]["t_s"] >= 0.05
    assert timeline[0] | {"t_s": 0} == {"t_s": 0, "mem_used_bytes": float(2**30), "gpu_util_pct": 80.0,
                                        "power_w": 350.0}
    summary = sampler.summary(calls=3)
    assert summary["nvml_mem_peak_bytes"] == 2**30 + (len(timeline) - 1) * 2**20
    assert summary["gpu_util_mean_pct"] == 80.0 and summary["power_mean_w"] == 350.0
    assert summary["energy_j"] == pytest.approx(300.0), "900 J over 3 calls"
    measure._nvml()
    assert fake_gpu["init"] == 1, "NVML is initialised once per process"


def test_nvml_without_an_energy_counter(fake_gpu, monkeypatch):
    import pynvml

    def not_supported(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", not_supported)
    with measure.NvmlSampler("cuda", period_s=0.005) as sampler:
        time.sleep(0.01)
    summary = sampler.summary()
    assert math.isnan(summary["energy_j"]) and summary["power_mean_w"] == 350.0


# ----------------------------------------------------------------------------- environment


def test_environment_on_the_cpu():
    import rampde
    import torchdiffeq

    env = measure.environment(CPU)
    assert list(env) == ENV_COLUMNS
    assert env["gpu"] == "cpu" and env["device"] == "cpu"
    assert (env["compute_capability"], env["driver"]) == ("", "")
    assert env["torch"] == torch.__version__ and env["rampde"] == rampde.__version__
    assert env["torchdiffeq"] == torchdiffeq.__version__
    assert env["commit"] == "" or len(env["commit"]) == 40
    assert socket.gethostname() not in {str(v) for v in env.values()}, "no host name"


def test_commit_tolerates_no_git(tmp_path, monkeypatch):
    assert measure.git_commit(tmp_path) == "", "not a checkout"

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(measure.subprocess, "run", no_git)
    assert measure.git_commit() == ""
    monkeypatch.setenv("RAMPDE_COMMIT", "abc123")
    assert measure.environment(CPU)["commit"] == "abc123"


def test_resolve_device_and_gpu_slug():
    assert measure.resolve_device("cpu") == CPU
    assert measure.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="is not a torch device"):
        measure.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA was asked for"):
            measure.resolve_device("cuda")
    assert measure.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert measure.gpu_slug("cpu") == "cpu"
