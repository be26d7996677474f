"""How one cell is measured: time, allocator peak, NVML samples, gradient error, environment.

- Time: the whole forward+backward, after warm-up runs; CUDA events on the GPU (synchronised after
  each repeat), ``time.perf_counter`` on the CPU; median, quartiles and extremes of the repeats.
- Memory: ``max_memory_allocated`` above what was allocated before the call (inputs and model
  resident), after ``reset_peak_memory_stats``. NVML counts the CUDA context and other processes
  too: its figures feed the timelines, never a memory ratio.
- Gradient error: relative L2 error of the parameter and ``y0`` gradients against the fp64 run of
  the same scheme.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

NAN = math.nan


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
        if not samples_ms:
            raise ValueError("no timing samples")
        ordered = sorted(samples_ms)
        if len(ordered) >= 2:
            q25, _, q75 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q25 = q75 = ordered[0]
        return Timing(statistics.median(ordered), q25, q75, ordered[0], ordered[-1], len(ordered))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], Any], device: torch.device, *, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time ``fn`` (one forward+backward) ``repeats`` times after ``warmup`` untimed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing.from_samples(samples)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> float:
    """Allocator peak of one call above what was allocated before it; NaN off CUDA."""
    if device.type != "cuda":
        return NAN
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - before)


def relative_error(values: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> float:
    """``|a - b| / |b|`` over the concatenation of the tensors, in fp64."""
    a = torch.cat([v.detach().reshape(-1).double().cpu() for v in values])
    b = torch.cat([r.detach().reshape(-1).double().cpu() for r in reference])
    norm = float(b.norm())
    return float((a - b).norm()) / norm if norm > 0 else float((a - b).norm())


def gradient_errors(out: Any, reference: Any) -> tuple[float, float]:
    """(parameter-gradient error, y0-gradient error) of a RunOutput against its fp64 reference."""
    return relative_error(out.grad_params, reference.grad_params), relative_error((out.grad_y0,), (reference.grad_y0,))


def all_finite(out: Any) -> bool:
    return bool(all(torch.isfinite(g).all() for g in (out.loss, out.grad_y0, *out.grad_params)))


def solve_flops(flops_per_eval: int, steps: int, stages: int = 4) -> float:
    """Useful FLOPs of a solve and its adjoint: s N evaluations forward, twice that for the vjps.

    The same count for every competitor (recomputation is not useful work), so TFLOP/s compare.
    """
    return 3.0 * stages * steps * flops_per_eval


# ----------------------------------------------------------------------------- NVML

_nvml_warned = False


def _warn_once(message: str) -> None:
    global _nvml_warned
    if not _nvml_warned:
        log.warning(message)
        _nvml_warned = True


def _nvml():
    """The pynvml module, initialised; None (said once) when absent or without a driver."""
    try:
        import pynvml
    except ImportError:
        _warn_once("NVML unavailable (nvidia-ml-py not installed): no NVML columns or timelines")
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError on machines without a driver
        _warn_once(f"NVML unavailable ({exc}): no NVML columns or timelines")
        return None
    return pynvml


class NvmlSampler:
    """Samples device memory, utilisation and power in a background thread while active.

    ``with NvmlSampler(device) as s: ...`` then ``s.timeline`` (dicts with ``t_s``,
    ``mem_used_bytes``, ``gpu_util_pct``, ``power_w``) and ``s.summary()``. Energy comes from the
    device's total-energy counter where it has one. Without NVML or CUDA it records nothing.
    """

    def __init__(self, device: torch.device | str = "cuda", period_s: float = 0.01) -> None:
        self.device = torch.device(device)
        self.period_s = period_s
        self.timeline: list[dict[str, float]] = []
        self._nvml = None
        self._handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy_start = NAN
        self._energy_end = NAN

    def __enter__(self) -> "NvmlSampler":
        if self.device.type == "cuda":
            self._nvml = _nvml()
        if self._nvml is not None:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            self._energy_start = self._energy()
            self._t0 = time.perf_counter()
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
            self._energy_end = self._energy()

    def _energy(self) -> float:
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3  # mJ -> J
        except Exception:
            return NAN

    def _sample(self) -> None:
        nvml, handle = self._nvml, self._handle
        row = {"t_s": time.perf_counter() - self._t0, "mem_used_bytes": NAN, "gpu_util_pct": NAN, "power_w": NAN}
        try:
            row["mem_used_bytes"] = float(nvml.nvmlDeviceGetMemoryInfo(handle).used)
            row["gpu_util_pct"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            row["power_w"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1e3  # mW -> W
        except Exception as exc:  # a query the device does not support
            log.debug("NVML sample incomplete: %s", exc)
        self.timeline.append(row)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def summary(self, calls: int = 1) -> dict[str, float]:
        """Peak memory used, mean utilisation and power, and energy per call (``calls`` runs)."""
        if not self.timeline:
            return {"nvml_mem_peak_bytes": NAN, "gpu_util_mean_pct": NAN, "power_mean_w": NAN, "energy_j": NAN}

        def values(key: str) -> list[float]:
            return [r[key] for r in self.timeline if not math.isnan(r[key])]

        mem, util, power = values("mem_used_bytes"), values("gpu_util_pct"), values("power_w")
        energy = (self._energy_end - self._energy_start) / max(calls, 1)
        return {
            "nvml_mem_peak_bytes": max(mem) if mem else NAN,
            "gpu_util_mean_pct": statistics.fmean(util) if util else NAN,
            "power_mean_w": statistics.fmean(power) if power else NAN,
            "energy_j": energy,
        }


# ----------------------------------------------------------------------------- environment


def gpu_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def gpu_slug(name: str) -> str:
    """A folder and asv machine name for a GPU model: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return "-".join("".join(ch if ch.isalnum() else " " for ch in name.lower()).split()) or "unknown"


def git_commit(path: Path | None = None) -> str:
    """This project's commit, or '' outside a git checkout."""
    root = path or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def environment(device: torch.device | str) -> dict[str, Any]:
    """What every result row carries about where it was measured."""
    import rampde

    device = torch.device(device)
    try:
        import torchdiffeq

        tde = getattr(torchdiffeq, "__version__", "")
    except ImportError:
        tde = ""
    env: dict[str, Any] = {
        "gpu": gpu_name(device),
        "device": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "driver": "",
        "compute_capability": "",
        "torchdiffeq": tde,
        "rampde": rampde.__version__,
        "commit": os.environ.get("RAMPDE_COMMIT") or git_commit(),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env["compute_capability"] = f"{major}.{minor}"
        nvml = _nvml()
        if nvml is not None:
            try:
                driver = nvml.nvmlSystemGetDriverVersion()
                env["driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
            except Exception:
                pass
    return env
