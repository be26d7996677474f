"""NVML samples during the timed runs of one measured cell.

NVML (``import pynvml``, from nvidia-ml-py): a background thread samples device memory used,
utilisation and power every ~15 ms during the timed runs (the timeline of the dashboard); energy
per forward+backward comes from the device's total-energy counter where it has one. NVML counts
the CUDA context and other processes too, so it is never the source of a memory ratio.

Without a GPU or without NVML the NVML columns are NaN; that is logged once per process.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .notices import _say_no_gpu_once, _say_once

log = logging.getLogger(__name__)

NAN = math.nan
NVML_PERIOD_S = 0.015

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
