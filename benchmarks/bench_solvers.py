"""asv suite: forward+backward of every competitor, as time, allocator peak and gradient error.

Thin classes over ``rampde.bench``: the registry says who runs, the workloads what, ``measure``
how. On a GPU the sizes are the paper's; without one they shrink to CPU sizes (set
``RAMPDE_ASV_SIZES=gpu`` or ``cpu`` to choose), so that ``asv check`` and a smoke run work anywhere.
``RAMPDE_ASV_COMPETITORS`` (comma-separated) narrows the competitors.

CUDA needs asv's ``spawn`` launch method (asv.conf.json): a forked process cannot use CUDA.
``time_*`` synchronises inside the timed function, so asv's wall clock sees the kernels, not only
their launch; ``track_time_ms`` reports CUDA-event time instead, for comparison.
"""

from __future__ import annotations

import os

import torch

from rampde.bench import measure
from rampde.bench.competitors import get_competitor, list_competitors, reference_run
from rampde.bench.workloads import build_workload

_ON_GPU = os.environ.get("RAMPDE_ASV_SIZES", "gpu" if torch.cuda.is_available() else "cpu") == "gpu"
DEVICE = torch.device("cuda" if _ON_GPU and torch.cuda.is_available() else "cpu")
_chosen = os.environ.get("RAMPDE_ASV_COMPETITORS")
COMPETITORS = _chosen.split(",") if _chosen else [c.name for c in list_competitors()]
OURS = [name for name in COMPETITORS if name.startswith("rampde-")]
MLP_WIDTHS = [256, 1024, 2048] if _ON_GPU else [16, 32]
MLP_BATCH = 2048 if _ON_GPU else 16
CONV_CHANNELS = [64, 128] if _ON_GPU else [8]
CONV_BATCH = 64 if _ON_GPU else 8
STEPS = [16, 64] if _ON_GPU else [4]


class _Cell:
    """Builds the workload in ``setup`` (outside the timed part) and runs one competitor on it."""

    workload = "mlp"
    batch = MLP_BATCH
    timeout = 900

    def setup(self, competitor: str, width: int, steps: int) -> None:
        self.competitor = get_competitor(competitor)
        self.steps = steps
        self.work = build_workload(self.workload, width=width, batch=self.batch, device=DEVICE)
        self.competitor.run(self.work, steps)  # warm-up: caches, cuBLAS handles, autotuning
        measure.synchronize(DEVICE)

    def _once(self) -> None:
        self.competitor.run(self.work, self.steps)
        measure.synchronize(DEVICE)

    def time_forward_backward(self, competitor: str, width: int, steps: int) -> None:
        self._once()

    def track_time_ms(self, competitor: str, width: int, steps: int) -> float:
        return measure.time_runs(self._once, DEVICE, repeats=5, warmup=1).median_ms

    track_time_ms.unit = "ms"

    def track_peak_alloc_bytes(self, competitor: str, width: int, steps: int) -> float:
        """CUDA allocator peak above the resident model and inputs (asv's peakmem_ is host RSS)."""
        return measure.peak_memory_bytes(self._once, DEVICE)

    track_peak_alloc_bytes.unit = "bytes"

    def track_grad_error(self, competitor: str, width: int, steps: int) -> float:
        out = self.competitor.run(self.work, steps)
        return measure.gradient_errors(out, reference_run(self.competitor, self.work, steps))[0]

    track_grad_error.unit = "relative"


class MLPForwardBackward(_Cell):
    params = (COMPETITORS, MLP_WIDTHS, STEPS)
    param_names = ["competitor", "width", "steps"]


class ConvForwardBackward(_Cell):
    params = (COMPETITORS, CONV_CHANNELS, STEPS[-1:])
    param_names = ["competitor", "channels", "steps"]
    workload = "conv"
    batch = CONV_BATCH


class MLPClaims:
    """The paper's claims for each rampde competitor on the MLP workload, as ratios asv can track."""

    params = (OURS, MLP_WIDTHS, STEPS[-1:])
    param_names = ["competitor", "width", "steps"]
    timeout = 1800

    def setup(self, competitor: str, width: int, steps: int) -> None:
        self.work = build_workload("mlp", width=width, batch=MLP_BATCH, device=DEVICE)
        self.steps = steps
        self.figures = {}
        for name in (competitor, "torchdiffeq-fp32", "torchdiffeq-tf32"):
            run = get_competitor(name).run

            def once(run=run) -> None:
                run(self.work, steps)

            once()
            self.figures[name] = (measure.time_runs(once, DEVICE, repeats=5, warmup=1).median_ms,
                                  measure.peak_memory_bytes(once, DEVICE))
        self.ours = competitor

    def track_speedup_vs_fp32(self, competitor: str, width: int, steps: int) -> float:
        return self.figures["torchdiffeq-fp32"][0] / self.figures[competitor][0]

    track_speedup_vs_fp32.unit = "x"

    def track_speedup_vs_tf32(self, competitor: str, width: int, steps: int) -> float:
        return self.figures["torchdiffeq-tf32"][0] / self.figures[competitor][0]

    track_speedup_vs_tf32.unit = "x"

    def track_memory_ratio_vs_fp32(self, competitor: str, width: int, steps: int) -> float:
        return self.figures[competitor][1] / self.figures["torchdiffeq-fp32"][1]

    track_memory_ratio_vs_fp32.unit = "ratio"
