"""How one cell is measured: time, allocator peak, NVML samples, gradient error, environment.

- Time: the whole forward+backward, after warm-up runs; CUDA events on the GPU (the device is
  synchronised before each repeat and after it, so a repeat is one call's latency),
  ``time.perf_counter`` on the CPU; median, quartiles and extremes of the repeats.
- Memory: ``torch.cuda.reset_peak_memory_stats``, then ``max_memory_allocated`` minus what was
  allocated before the timed runs (inputs and model resident). Each repeat's output is dropped
  before the next repeat starts, so the peak is that of one forward+backward.
- NVML: device memory used, utilisation, power and energy sampled during the timed runs
  (``rampde.bench.nvml``).
- Gradient error: relative L2 error of the concatenated parameter gradients and of the ``y0``
  gradient against the fp64 run of the same scheme.
- TFLOP/s: "useful work" ``3 * s * N * flops_per_eval`` per forward+backward (s stages, N steps:
  ``s N`` evaluations forward, about twice their FLOPs for the vector-Jacobian products), the same
  count for every competitor whatever it recomputes, divided by the median time.
- Peak: the GPUs' dense fp16/bf16 tensor-core peak (``rampde.bench.gpu_peaks``).
- Environment: device, GPU model, versions, flags and commit (``rampde.bench.environment``).

The public names of ``nvml``, ``gpu_peaks`` and ``environment`` are importable from here too.
Without a GPU or without NVML the affected columns are NaN; that is logged once per process.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .environment import current_flags, environment, git_commit, gpu_name, gpu_slug, project_commit, resolve_device
from .gpu_peaks import PEAK_FP16_TFLOPS, PeakThroughput, dense_fp16_peak_tflops, peak_throughput
from .notices import _say_no_gpu_once
from .nvml import NVML_PERIOD_S, NvmlSampler

__all__ = [
    "NAN", "STAGES", "Timing", "synchronize", "time_runs", "peak_memory_bytes", "current_flags", "flags_seen",
    "relative_error", "gradient_errors", "all_finite", "solve_flops", "achieved_tflops", "Measurement",
    "measure_calls",
    # re-exported from nvml, gpu_peaks and environment
    "NVML_PERIOD_S", "NvmlSampler", "PEAK_FP16_TFLOPS", "PeakThroughput", "peak_throughput",
    "dense_fp16_peak_tflops", "resolve_device", "gpu_name", "gpu_slug", "git_commit", "project_commit",
    "environment",
]

NAN = math.nan
# Stages per step of the explicit methods the solver offers (the sweep uses rk4).
STAGES = {"euler": 1, "midpoint": 2, "heun2": 2, "heun": 2, "rk2": 2, "heun3": 3, "rk4": 4, "rk4_classic": 4}


# ----------------------------------------------------------------------------- time and memory


@dataclass(frozen=True)
class Timing:
    """Milliseconds per forward+backward over ``repeats`` runs."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @staticmethod
    def from_samples(samples_ms: list[float]) -> "Timing":
        """Median, quartiles (inclusive method) and extremes of the samples."""
        if not samples_ms:
            raise ValueError("no timing samples")
        ordered = sorted(samples_ms)
        if len(ordered) >= 2:
            q25, _, q75 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q25 = q75 = ordered[0]
        return Timing(statistics.median(ordered), q25, q75, ordered[0], ordered[-1], len(ordered))

    def columns(self) -> dict[str, float]:
        """The ``time_ms_*`` columns of a result row."""
        return {"time_ms_median": self.median_ms, "time_ms_q25": self.q25_ms, "time_ms_q75": self.q75_ms,
                "time_ms_min": self.min_ms, "time_ms_max": self.max_ms}


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_fault(device: torch.device | str) -> str:
    """Why the device can no longer run work ('' when it can): after an illegal memory access or
    a device-side assert the CUDA context is lost for the rest of the process, and every later
    call fails with the same error."""
    try:
        synchronize(device)
    except Exception as exc:  # torch.AcceleratorError / RuntimeError: a sticky CUDA error
        return " ".join(str(exc).split())[:200] or type(exc).__name__
    return ""


def _check_counts(repeats: int, warmup: int) -> None:
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")


def _timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """One call of ``fn`` and its time in ms: CUDA events on the GPU, perf_counter elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)  # nothing queued before: the events time this call only
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end)
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def time_runs(fn: Callable[[], Any], device: torch.device | str, *, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time ``fn`` (one forward+backward) ``repeats`` times after ``warmup`` untimed calls."""
    device = torch.device(device)
    _check_counts(repeats, warmup)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _, ms = _timed_call(fn, device)
        samples.append(ms)
    return Timing.from_samples(samples)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Allocator peak of one call above what was allocated before it; NaN off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        _say_no_gpu_once(device)
        return NAN
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - before)


# ----------------------------------------------------------------------------- precision flags
# (``current_flags`` is in ``rampde.bench.environment``.)


@contextlib.contextmanager
def flags_seen(module: torch.nn.Module | None) -> Iterator[dict[str, bool]]:
    """The flags in force when ``module`` is first called inside the block (a competitor may set
    TF32 for its own run only); the flags at entry when it is never called through ``__call__``.

    The hook removes itself after the first call, so timed runs pay nothing for it.
    """
    seen: dict[str, bool] = {}
    handle = None
    if module is not None:
        def record(_module: torch.nn.Module, _args: Any) -> None:
            if not seen:
                seen.update(current_flags())
            handle.remove()

        handle = module.register_forward_pre_hook(record)
    at_entry = current_flags()
    try:
        yield seen
    finally:
        if handle is not None:
            handle.remove()
        if not seen:
            seen.update(at_entry)


# ----------------------------------------------------------------------------- gradient error


def relative_error(values: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> float:
    """``|a - b| / |b|`` over the concatenation of the tensors, in fp64 on the CPU
    (``|a - b|`` when the reference is zero)."""
    if len(values) != len(reference):
        raise ValueError(f"{len(values)} tensors against {len(reference)} in the reference")
    a = torch.cat([v.detach().reshape(-1).to("cpu", torch.float64) for v in values])
    b = torch.cat([r.detach().reshape(-1).to("cpu", torch.float64) for r in reference])
    if a.shape != b.shape:
        raise ValueError(f"{a.numel()} gradient entries against {b.numel()} in the reference")
    norm = float(b.norm())
    diff = float((a - b).norm())
    return diff / norm if norm > 0 else diff


def gradient_errors(out: Any, reference: Any) -> tuple[float, float]:
    """(parameter-gradient error, y0-gradient error) of a RunOutput against its fp64 reference."""
    return (relative_error(tuple(out.grad_params), tuple(reference.grad_params)),
            relative_error((out.grad_y0,), (reference.grad_y0,)))


def all_finite(out: Any) -> bool:
    """Loss and every gradient finite."""
    return bool(all(torch.isfinite(g).all() for g in (out.loss, out.grad_y0, *out.grad_params)))


def solve_flops(flops_per_eval: int, steps: int, stages: int = 4) -> float:
    """Useful FLOPs of a solve and its adjoint: s N evaluations forward, twice that for the vjps.

    The same count for every competitor (recomputation is not useful work), so TFLOP/s compare.
    """
    return 3.0 * stages * steps * flops_per_eval


def achieved_tflops(flops: float, time_ms: float) -> float:
    """TFLOP/s of ``flops`` done in ``time_ms``; NaN without a positive time."""
    return flops / (time_ms * 1e-3) / 1e12 if time_ms > 0 and math.isfinite(time_ms) else NAN


# ----------------------------------------------------------------------------- one measured call


@dataclass
class Measurement:
    """What ``measure_calls`` found: the last run's output and every measured column."""

    output: Any
    timing: Timing
    peak_mem_bytes: float
    nvml: dict[str, float]
    timeline: list[dict[str, float]]
    flags: dict[str, bool]

    def columns(self) -> dict[str, Any]:
        """Time, memory, NVML and precision-flag columns of a result row."""
        return {**self.timing.columns(), "peak_mem_bytes": self.peak_mem_bytes, **self.nvml, **self.flags}


def measure_calls(fn: Callable[[], Any], device: torch.device | str, *, repeats: int = 5, warmup: int = 1,
                  watch: torch.nn.Module | None = None, period_s: float = NVML_PERIOD_S) -> Measurement:
    """Measure one forward+backward ``fn``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    During the timed calls: the allocator peak above what was resident before them (CUDA), the
    NVML sampler, and the precision flags seen by ``watch`` (the vector field). Each call's output
    is dropped before the next call; the last one is returned for the gradient check.
    """
    device = torch.device(device)
    _check_counts(repeats, warmup)
    _say_no_gpu_once(device)
    with flags_seen(watch) as flags:
        for _ in range(warmup):
            fn()
        before = NAN
        if device.type == "cuda":
            synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        samples: list[float] = []
        out = None
        with NvmlSampler(device, period_s) as sampler:
            for _ in range(repeats):
                out = None  # free the previous run's gradients before the next run
                out, ms = _timed_call(fn, device)
                samples.append(ms)
    peak = float(torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else NAN
    return Measurement(out, Timing.from_samples(samples), peak, sampler.summary(calls=repeats),
                       list(sampler.timeline), dict(flags))
