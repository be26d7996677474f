"""NVML samples during the timed runs of one measured cell.

NVML (``import pynvml``, from nvidia-ml-py): a background thread samples device memory used,
utilisation and power every ~15 ms during the timed runs (the timeline of the dashboard); energy
per forward+backward and the mean power come from the device's total-energy counter where it has
one. Power samples are NVML's instantaneous power field where the driver has it: on Ampere and
newer GPUs the plain power reading is a 1-second average, longer than most timed runs. NVML counts
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
# nvmlFieldValue_t.valueType -> the member of its value union that holds it
_FIELD_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")

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
    difference of the total-energy counter (mJ) between entry and exit, where the GPU has one, and
    the mean power is that energy over ``window_s``, the time between the two readings; without the
    counter, the mean of the power samples. Without CUDA or NVML it records nothing and every
    summary value is NaN.
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
        self._instant_power = True  # until the driver says it has no instantaneous power field
        self.window_s = NAN

    @property
    def active(self) -> bool:
        """True when samples are taken (a CUDA device and NVML)."""
        return self._handle is not None

    def __enter__(self) -> "NvmlSampler":
        self.timeline = []
        self.window_s = NAN
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
        self._energy_t0 = time.perf_counter()
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
            self.window_s = time.perf_counter() - self._energy_t0

    def _energy(self) -> float:
        """The total-energy counter in J; NaN where the GPU has none."""
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3  # mJ -> J
        except Exception:
            _say_once("nvml-energy", "this GPU reports no total energy through NVML: energy_j is NaN",
                      logging.INFO)
            return NAN

    def _power_w(self) -> float:
        """Power in W: NVML's instantaneous power field, else its power reading (which on Ampere
        and newer GPUs is a 1-second average; said once)."""
        nvml, handle = self._nvml, self._handle
        field_id = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", None)
        if self._instant_power and field_id is not None:
            try:
                value = nvml.nvmlDeviceGetFieldValues(handle, [field_id])[0]
                if value.nvmlReturn == 0:  # NVML_SUCCESS
                    return float(getattr(value.value, _FIELD_VALUE_MEMBERS[value.valueType])) / 1e3  # mW
            except Exception:  # an older driver or pynvml
                pass
            self._instant_power = False
            _say_once("nvml-power-instant", "NVML has no instantaneous power here: power_w is the driver's power "
                      "reading, a 1-second average on Ampere and newer GPUs", logging.INFO)
        return nvml.nvmlDeviceGetPowerUsage(handle) / 1e3  # mW -> W

    def _sample(self) -> None:
        nvml, handle = self._nvml, self._handle
        row = {"t_s": time.perf_counter() - self._t0, "mem_used_bytes": NAN, "gpu_util_pct": NAN, "power_w": NAN}
        for key, query in (("mem_used_bytes", lambda: float(nvml.nvmlDeviceGetMemoryInfo(handle).used)),
                           ("gpu_util_pct", lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
                           ("power_w", self._power_w)):
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
        energy = self._energy_end - self._energy_start
        def values(key: str) -> list[float]:
            return [r[key] for r in self.timeline if not math.isnan(r[key])]

        mem, util, power = values("mem_used_bytes"), values("gpu_util_pct"), values("power_w")
        return {
            "nvml_mem_peak_bytes": max(mem) if mem else NAN,
            "gpu_util_mean_pct": statistics.fmean(util) if util else NAN,
            "power_mean_w": energy / self.window_s if math.isfinite(energy) and self.window_s > 0
            else statistics.fmean(power) if power else NAN,
            "energy_j": energy / max(calls, 1),
        }
