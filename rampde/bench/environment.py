"""Where a result was measured: the device, the GPU model, versions, precision flags and commit.

- ``resolve_device``: ``auto`` (the GPU when torch sees one), ``cpu`` or ``cuda[:i]``, checked.
- ``gpu_name`` and ``gpu_slug``: the GPU model as torch names it, and its folder / asv machine name.
- ``git_commit`` and ``project_commit``: the commit results are labelled with (``RAMPDE_COMMIT``
  first).
- ``current_flags``: TF32 and the cuDNN autotuner as set right now.
- ``environment``: what every result row carries about where it was measured (no host name); the
  driver version comes from NVML where it is available.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from .nvml import _nvml

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- precision flags
# (``flags_seen`` is in ``rampde.bench.measure``; ``current_flags`` is here because ``environment``
# reports it and ``measure`` imports this module.)


def current_flags() -> dict[str, bool]:
    """TF32 for matmuls and convolutions, and the cuDNN autotuner, as set right now."""
    return {"tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


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
