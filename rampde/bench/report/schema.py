"""The results schema as the dashboard reads it: required, grid, numeric, text and environment
columns, and the timeline columns."""

from __future__ import annotations

REQUIRED_COLUMNS = ("competitor", "workload", "width", "batch", "steps", "status")
GRID_COLUMNS = ("width", "batch", "steps")
CELL_COLUMNS = ("workload", "method", "width", "batch", "steps")
NUMERIC_COLUMNS = (
    "time_ms_median", "time_ms_q25", "time_ms_q75", "time_ms_min", "time_ms_max",
    "peak_mem_bytes", "nvml_mem_peak_bytes", "gpu_util_mean_pct", "power_mean_w", "energy_j",
    "loss", "grad_err_params", "grad_err_y0", "tflops", "repeats",
)  # fmt: skip
STRING_COLUMNS = (
    "gpu", "device", "precision", "method", "status", "message", "torch", "cuda", "driver",
    "compute_capability", "torchdiffeq", "rampde", "commit", "timestamp", "cell_id",
    "tf32", "cudnn_tf32", "cudnn_benchmark",
)  # fmt: skip
ENV_COLUMNS = (
    "gpu", "device", "compute_capability", "driver", "cuda", "torch", "torchdiffeq", "rampde",
    "tf32", "cudnn_tf32", "cudnn_benchmark", "commit",
)  # fmt: skip
TIMELINE_COLUMNS = ("cell_id", "t_s", "mem_used_bytes", "gpu_util_pct", "power_w")
UNKNOWN_GPU = "unknown GPU"
