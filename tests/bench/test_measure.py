"""rampde.bench.measure on the CPU: timing statistics, the measured call, precision flags, gradient
error, TFLOP/s, and the names it re-exports from nvml, gpu_peaks and environment."""

from __future__ import annotations

import itertools
import logging
import math
import time

import pytest
import torch

from rampde.bench import environment, gpu_peaks, measure, notices, nvml
from rampde.bench.competitors import RunOutput

CPU = torch.device("cpu")


@pytest.fixture
def fresh_notices(monkeypatch):
    """Forget every 'said once' message of earlier tests."""
    monkeypatch.setattr(notices, "_said", set())


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


def test_measure_calls_on_the_cpu_keeps_the_last_output(fresh_notices, caplog):
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
    assert said[0].name == "rampde.bench.measure"


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



# ----------------------------------------------------------------------------- re-exported names


def test_the_split_modules_names_are_importable_from_measure():
    """The NVML sampler, the peak table and the environment left measure; their names did not."""
    moved = {nvml: ["NVML_PERIOD_S", "NvmlSampler"],
             gpu_peaks: ["PEAK_FP16_TFLOPS", "PeakThroughput", "peak_throughput", "dense_fp16_peak_tflops"],
             environment: ["current_flags", "resolve_device", "gpu_name", "gpu_slug", "git_commit", "project_commit",
                           "environment"]}
    for module, names in moved.items():
        for name in names:
            assert getattr(measure, name) is getattr(module, name), name
            assert name in measure.__all__, name
    assert all(hasattr(measure, name) for name in measure.__all__)
