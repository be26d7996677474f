"""How one cell is measured: time, allocator peak, NVML samples, gradient error, environment.

- Time: the whole forward+backward, after warm-up runs; CUDA events on the GPU (the device is
  synchronised before each repeat and after it, so a repeat is one call's latency),
  ``time.perf_counter`` on the CPU; median, quartiles and extremes of the repeats.
- Memory: ``torch.cuda.reset_peak_memory_stats``, then ``max_memory_allocated`` minus what was
  allocated before the timed runs (inputs and model resident). Each repeat's output is dropped
  before the next repeat starts, so the peak is that of one forward+backward.
- NVML (``import pynvml``, from nvidia-ml-py): a background thread samples device memory used,
  utilisation and power every ~15 ms during the timed runs (the timeline of the dashboard); energy
  per forward+backward comes from the device's total-energy counter where it has one. NVML counts
  the CUDA context and other processes too, so it is never the source of a memory ratio.
- Gradient error: relative L2 error of the concatenated parameter gradients and of the ``y0``
  gradient against the fp64 run of the same scheme.
- TFLOP/s: "useful work" ``3 * s * N * flops_per_eval`` per forward+backward (s stages, N steps:
  ``s N`` evaluations forward, about twice their FLOPs for the vector-Jacobian products), the same
  count for every competitor whatever it recomputes, divided by the median time.
- Peak: ``dense_fp16_peak_tflops`` gives the dense fp16/bf16 tensor-core peak of a GPU model from
  ``PEAK_FP16_TFLOPS`` (datasheet figures), so that TFLOP/s read as a fraction of the hardware.

Without a GPU or without NVML the affected columns are NaN; that is logged once per process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)

NAN = math.nan
NVML_PERIOD_S = 0.015
# Stages per step of the explicit methods the solver offers (the sweep uses rk4).
STAGES = {"euler": 1, "midpoint": 2, "heun2": 2, "heun": 2, "rk2": 2, "heun3": 3, "rk4": 4, "rk4_classic": 4}


# ----------------------------------------------------------------------------- saying things once

_said: set[str] = set()


def _say_once(key: str, message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` the first time ``key`` comes up in this process."""
    if key not in _said:
        _said.add(key)
        log.log(level, message)


def _say_no_gpu_once(device: torch.device) -> None:
    if device.type != "cuda":
        _say_once("no-gpu", f"measuring on {device.type}, no CUDA device: peak memory, NVML and energy "
                            "columns are left empty (NaN)")


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


def current_flags() -> dict[str, bool]:
    """TF32 for matmuls and convolutions, and the cuDNN autotuner, as set right now."""
    return {"tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


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


# ----------------------------------------------------------------------------- peak throughput


@dataclass(frozen=True)
class PeakThroughput:
    """Dense fp16/bf16 tensor-core peak of one GPU model, and where the figure comes from."""

    model: str
    pattern: str  # regular expression searched in the upper-cased device name
    tflops: float
    source: str


# Dense (no 2:4 sparsity) fp16/bf16 tensor-core TFLOP/s with fp32 accumulation, which is what
# cuBLAS and cuDNN use for torch's fp16 and bf16 matmuls and convolutions. NVIDIA's datasheets
# print the sparse figure ("* with sparsity"); the dense one is half of it. Most specific pattern
# first: "H100 NVL" and "H100 PCIe" before the SXM part ("NVIDIA H100 80GB HBM3"), "L40S" before
# "L4" (word boundaries keep "L40" from matching "L4"). Figures are rounded as NVIDIA quotes them
# (989.4 = 528 tensor cores x 1024 FLOP/clock x 1.83 GHz). The H100 SXM5 and PCIe sparse figures
# were checked against a copy of NVIDIA's H100 table; the others are from the datasheets named.
PEAK_FP16_TFLOPS: tuple[PeakThroughput, ...] = (
    PeakThroughput("H100 NVL", r"\bH100\b.*\bNVL\b", 835.0,
                   "NVIDIA H100 datasheet: FP16/BF16 tensor 1,671 TFLOPS with sparsity, halved"),
    PeakThroughput("H100 PCIe", r"\bH100\b.*\bPCIE\b", 756.0,
                   "NVIDIA H100 datasheet: FP16/BF16 tensor 1,513 TFLOPS with sparsity, halved"),
    PeakThroughput("H100 SXM5", r"\bH100\b", 989.4,
                   "NVIDIA H100 datasheet: FP16/BF16 tensor 1,979 TFLOPS with sparsity, halved; "
                   "torch names it 'NVIDIA H100 80GB HBM3'"),
    PeakThroughput("H200 NVL", r"\bH200\b.*\bNVL\b", 835.0,
                   "NVIDIA H200 datasheet: FP16/BF16 tensor 1,671 TFLOPS with sparsity, halved"),
    PeakThroughput("H200 / GH200", r"H200\b", 989.4,
                   "NVIDIA H200 datasheet (SXM): FP16/BF16 tensor 1,979 TFLOPS with sparsity, halved; "
                   "the same Hopper tensor cores and clocks as the H100 SXM5"),
    PeakThroughput("A100", r"\bA100\b", 312.0,
                   "NVIDIA A100 datasheet: FP16/BF16 tensor 312 TFLOPS dense (624 with sparsity), "
                   "SXM4 and PCIe alike"),
    PeakThroughput("L40S", r"\bL40S\b", 362.0,
                   "NVIDIA L40S datasheet: FP16/BF16 tensor 733 TFLOPS with sparsity, halved (362.05)"),
    PeakThroughput("L4", r"\bL4\b", 121.0,
                   "NVIDIA L4 datasheet: FP16/BF16 tensor 242 TFLOPS with sparsity, halved"),
    PeakThroughput("RTX 4090", r"\bRTX 4090\b", 165.2,
                   "NVIDIA Ada (AD102) whitepaper: GeForce RTX 4090 FP16 tensor with FP32 accumulate "
                   "165.2 TFLOPS dense; with FP16 accumulate it is 330.3, but torch accumulates in fp32"),
    PeakThroughput("V100S", r"\bV100S\b", 130.0, "NVIDIA V100S datasheet: 130 TFLOPS tensor performance"),
    PeakThroughput("V100 PCIe", r"\bV100\b.*\bPCIE\b", 112.0,
                   "NVIDIA V100 datasheet: PCIe 112 TFLOPS tensor performance"),
    PeakThroughput("V100 SXM2", r"\bV100\b", 125.0,
                   "NVIDIA V100 datasheet: SXM2 125 TFLOPS tensor performance (Volta has no bf16)"),
)


def peak_throughput(gpu_name: str) -> PeakThroughput | None:
    """The entry of ``PEAK_FP16_TFLOPS`` whose pattern the device name matches first, or None."""
    name = str(gpu_name).upper()
    for entry in PEAK_FP16_TFLOPS:
        if re.search(entry.pattern, name):
            return entry
    return None


def dense_fp16_peak_tflops(gpu_name: str) -> float:
    """Dense fp16/bf16 tensor-core peak in TFLOP/s of a GPU model named as ``gpu_name`` gives it
    (``NVIDIA H100 80GB HBM3``, ``NVIDIA H100 PCIe``, ``NVIDIA H200``, ...); NaN when unknown
    (the CPU, a GPU missing from ``PEAK_FP16_TFLOPS``)."""
    entry = peak_throughput(gpu_name)
    return entry.tflops if entry is not None else NAN


# ----------------------------------------------------------------------------- NVML

_nvml_warned = False  # NVML's absence is said once per process
_UNSET = object()
_nvml_module: Any = _UNSET  # the initialised pynvml module, None when unavailable


def _warn_once(message: str) -> None:
    global _nvml_warned
    if not _nvml_warned:
        log.warning(message)
        _nvml_warned = True


def _nvml() -> Any:
    """The pynvml module, initialised once; None (said once) when absent or without a driver."""
    global _nvml_module
    if _nvml_module is not _UNSET:
        return _nvml_module
    try:
        import pynvml
    except ImportError:
        _warn_once("NVML unavailable (nvidia-ml-py is not installed): NVML columns and timelines are empty")
        _nvml_module = None
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError: no driver, no GPU
        _warn_once(f"NVML unavailable ({exc}): NVML columns and timelines are empty")
        _nvml_module = None
        return None
    _nvml_module = pynvml
    return pynvml


def _nvml_handle(nvml: Any, device: torch.device) -> Any:
    """NVML's handle of a CUDA device: by UUID (right under CUDA_VISIBLE_DEVICES), else by index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    except Exception:  # older torch, a MIG slice, a fake NVML: NVML's numbering
        return nvml.nvmlDeviceGetHandleByIndex(index)


@dataclass
class NvmlSampler:
    """Samples device memory, utilisation and power in a background thread while active.

    ``with NvmlSampler(device) as s: ...`` then ``s.timeline`` (dicts with ``t_s`` since entry,
    ``mem_used_bytes``, ``gpu_util_pct``, ``power_w``) and ``s.summary(calls)``. One sample at
    entry, one every ``period_s`` and one at exit. NVML's utilisation is itself an average over its
    own window (1/6 s to 1 s depending on the GPU), so short runs read it coarsely. Energy is the
    difference of the total-energy counter (mJ) between entry and exit, where the GPU has one.
    Without CUDA or NVML it records nothing and every summary value is NaN.
    """

    device: torch.device | str = "cuda"
    period_s: float = NVML_PERIOD_S
    timeline: list[dict[str, float]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self._nvml: Any = None
        self._handle: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._energy_start = NAN
        self._energy_end = NAN

    @property
    def active(self) -> bool:
        """True when samples are taken (a CUDA device and NVML)."""
        return self._handle is not None

    def __enter__(self) -> "NvmlSampler":
        self.timeline = []
        self._stop.clear()
        if self.device.type != "cuda":
            _say_no_gpu_once(self.device)
            return self
        self._nvml = _nvml()
        if self._nvml is None:
            return self
        try:
            self._handle = _nvml_handle(self._nvml, self.device)
        except Exception as exc:
            _say_once("nvml-handle", f"NVML has no handle for {self.device} ({exc}): no NVML columns")
            return self
        self._t0 = time.perf_counter()
        self._energy_start = self._energy()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.active:
            self._sample()
            self._energy_end = self._energy()

    def _energy(self) -> float:
        """The total-energy counter in J; NaN where the GPU has none."""
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3  # mJ -> J
        except Exception:
            _say_once("nvml-energy", "this GPU reports no total energy through NVML: energy_j is NaN",
                      logging.INFO)
            return NAN

    def _sample(self) -> None:
        nvml, handle = self._nvml, self._handle
        row = {"t_s": time.perf_counter() - self._t0, "mem_used_bytes": NAN, "gpu_util_pct": NAN, "power_w": NAN}
        for key, query in (("mem_used_bytes", lambda: float(nvml.nvmlDeviceGetMemoryInfo(handle).used)),
                           ("gpu_util_pct", lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
                           ("power_w", lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1e3)):  # mW -> W
            try:
                row[key] = query()
            except Exception as exc:  # a query this device does not support
                _say_once(f"nvml-{key}", f"NVML cannot read {key} here ({exc}); left NaN", logging.INFO)
        self.timeline.append(row)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def summary(self, calls: int = 1) -> dict[str, float]:
        """Peak memory used, mean utilisation and power, and energy per call (``calls`` runs)."""
        def values(key: str) -> list[float]:
            return [r[key] for r in self.timeline if not math.isnan(r[key])]

        mem, util, power = values("mem_used_bytes"), values("gpu_util_pct"), values("power_w")
        return {
            "nvml_mem_peak_bytes": max(mem) if mem else NAN,
            "gpu_util_mean_pct": statistics.fmean(util) if util else NAN,
            "power_mean_w": statistics.fmean(power) if power else NAN,
            "energy_j": (self._energy_end - self._energy_start) / max(calls, 1),
        }


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


# ----------------------------------------------------------------------------- environment


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` is the GPU when torch sees one, else the CPU; ``ValueError`` for a bad name or an
    absent CUDA device."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name!r} is not a torch device ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA was asked for but torch sees no GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{device} asked for, torch sees {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"{device.type!r}: only cpu and cuda devices are measured")
    return device


def gpu_name(device: torch.device | str) -> str:
    """The GPU model (``NVIDIA H100 80GB HBM3``), or ``cpu``."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def gpu_slug(name: str) -> str:
    """A folder and asv machine name for a GPU model: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return "-".join("".join(ch if ch.isalnum() else " " for ch in name.lower()).split()) or "unknown"


def git_commit(path: Path | None = None) -> str:
    """This project's commit (``git rev-parse HEAD``), or '' outside a git checkout or without git."""
    root = path or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def project_commit() -> str:
    """The commit results are labelled with: ``RAMPDE_COMMIT`` when set (a copy of the tree without
    ``.git``, or a campaign's label), else ``git_commit()``."""
    return os.environ.get("RAMPDE_COMMIT") or git_commit()


def environment(device: torch.device | str) -> dict[str, Any]:
    """What every result row carries about where it was measured (no host name).

    ``tf32``/``cudnn_tf32``/``cudnn_benchmark`` are the flags at this moment; the sweep replaces
    them per cell with the flags the vector field saw (``flags_seen``). ``RAMPDE_COMMIT``
    overrides the git commit (a copy of the tree without ``.git``).
    """
    import rampde

    device = torch.device(device)
    try:
        import torchdiffeq

        tde = str(getattr(torchdiffeq, "__version__", ""))
    except ImportError:
        tde = ""
    env: dict[str, Any] = {
        "gpu": gpu_name(device),
        "device": device.type,
        "compute_capability": "",
        "driver": "",
        "cuda": torch.version.cuda or "",
        "torch": torch.__version__,
        "torchdiffeq": tde,
        "rampde": rampde.__version__,
        **current_flags(),
        "commit": project_commit(),
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env["compute_capability"] = f"{major}.{minor}"
        nvml = _nvml()
        if nvml is not None:
            try:
                driver = nvml.nvmlSystemGetDriverVersion()
                env["driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
            except Exception as exc:
                log.debug("NVML gave no driver version: %s", exc)
    return env
