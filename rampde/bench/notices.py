"""Messages said once per process: the absence of a GPU (the measured call, the NVML sampler) and
what NVML cannot read here. Logged under ``rampde.bench.measure``: they say how a measurement is
taken, whichever module notices."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("rampde.bench.measure")

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
