"""The results table: its schema, atomic reading and writing, and the claims computed from it.

One row per measured cell (GPU, competitor, workload, width, batch, steps). The columns, their
units and meaning are in ``COLUMNS`` (and docs/bench-interfaces.md).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

COLUMNS: dict[str, str] = {
    "cell_id": "identity of the cell: gpu|competitor|workload|method|width|batch|steps|repeats",
    "gpu": "GPU model name, or 'cpu'",
    "device": "cuda or cpu",
    "competitor": "registry name",
    "precision": "fp32, tf32, fp16 or bf16",
    "workload": "mlp, conv or cnf",
    "method": "Runge-Kutta method (rk4)",
    "width": "MLP width / conv channels / CNF hidden width",
    "batch": "batch size",
    "steps": "time steps N",
    "repeats": "timed repeats",
    "status": "ok, oom, error or nonfinite",
    "message": "error text; empty when ok",
    "time_ms_median": "ms per forward+backward, median of the repeats",
    "time_ms_q25": "ms, first quartile",
    "time_ms_q75": "ms, third quartile",
    "time_ms_min": "ms, fastest repeat",
    "time_ms_max": "ms, slowest repeat",
    "peak_mem_bytes": "bytes, CUDA allocator peak above resident inputs and model (NaN on the CPU)",
    "nvml_mem_peak_bytes": "bytes, NVML device memory used, peak (includes the CUDA context)",
    "gpu_util_mean_pct": "%, NVML utilisation, mean over the timed runs",
    "power_mean_w": "W, NVML power, mean over the timed runs",
    "energy_j": "J per forward+backward, NVML total-energy counter",
    "loss": "loss of the measured run",
    "grad_err_params": "relative L2 error of the parameter gradients against the fp64 same-scheme run",
    "grad_err_y0": "relative L2 error of the y0 gradient against the fp64 same-scheme run",
    "tflops": "TFLOP/s: 3 s N evaluations' matmul/conv FLOPs per forward+backward / median time",
    "scaler_retries": "fp16 backward retries in the measured runs (rampde)",
    "tf32": "TF32 matmuls on during the run",
    "cudnn_tf32": "TF32 convolutions on during the run",
    "cudnn_benchmark": "cuDNN autotuner on",
    "torch": "torch version",
    "cuda": "CUDA version of the torch build",
    "driver": "NVIDIA driver version",
    "compute_capability": "e.g. 9.0",
    "torchdiffeq": "torchdiffeq version",
    "rampde": "rampde version",
    "commit": "git commit of this project",
    "timestamp": "UTC time the cell finished, ISO 8601",
}

RESULTS_FILE = "results.csv"
TIMELINES_FILE = "timelines.csv"
TIMELINE_COLUMNS = ["cell_id", "t_s", "mem_used_bytes", "gpu_util_pct", "power_w"]
CELL_KEYS = ["gpu", "workload", "method", "width", "batch", "steps"]
BASELINES = {"speedup_vs_fp32": "torchdiffeq-fp32", "speedup_vs_tf32": "torchdiffeq-tf32"}
NAIVE = {"fp16": "autocast-fp16", "bf16": "autocast-bf16"}
NOCACHE = {"fp16": "autocast-nocache-fp16", "bf16": "autocast-nocache-bf16"}


def write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            df.to_csv(handle, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def empty_results() -> pd.DataFrame:
    return pd.DataFrame(columns=list(COLUMNS))


def read_results(path: Path) -> pd.DataFrame:
    """Read a results CSV; ``FileNotFoundError`` naming it, ``ValueError`` for a foreign file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}")
    df = pd.read_csv(path, keep_default_na=True)
    missing = [c for c in ("cell_id", "competitor", "workload", "status") if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a rampde results table: missing columns {missing}")
    for column in COLUMNS:
        if column not in df.columns:
            df[column] = pd.NA
    df["message"] = df["message"].astype(object).where(df["message"].notna(), "").astype(str)
    return df[list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]]


def claims(df: pd.DataFrame) -> pd.DataFrame:
    """The paper's claims per cell, for every ``rampde-*`` competitor that ran fine.

    Columns: the cell, ``competitor``, ``speedup_vs_fp32`` and ``speedup_vs_tf32`` (baseline
    time / ours), ``mem_ratio_vs_fp32`` (our allocator peak / torchdiffeq-fp32's),
    ``grad_err`` (ours), ``naive_grad_err`` and ``nocache_grad_err`` (torchdiffeq inside autocast
    of the same precision, with and without the weight cache). Missing baselines give NaN.
    """
    ok = df[df["status"] == "ok"]
    ours = ok[ok["competitor"].astype(str).str.startswith("rampde-")]
    columns = [*CELL_KEYS, "competitor", "precision", "speedup_vs_fp32", "speedup_vs_tf32",
               "mem_ratio_vs_fp32", "grad_err", "naive_grad_err", "nocache_grad_err"]
    if ours.empty:
        return pd.DataFrame(columns=columns)
    by_name = {name: group.set_index(CELL_KEYS) for name, group in ok.groupby("competitor")}

    def lookup(name: str | None, key: tuple, column: str) -> float:
        table = by_name.get(name) if name else None
        if table is None or key not in table.index:
            return float("nan")
        value = table.loc[key, column]
        return float(value.iloc[0] if isinstance(value, pd.Series) else value)

    rows = []
    for _, row in ours.iterrows():
        key = tuple(row[k] for k in CELL_KEYS)
        time_ms = float(row["time_ms_median"])
        mem = float(row["peak_mem_bytes"]) if pd.notna(row["peak_mem_bytes"]) else float("nan")
        precision = str(row["precision"])
        rows.append({
            **{k: row[k] for k in CELL_KEYS},
            "competitor": row["competitor"],
            "precision": precision,
            "speedup_vs_fp32": lookup(BASELINES["speedup_vs_fp32"], key, "time_ms_median") / time_ms,
            "speedup_vs_tf32": lookup(BASELINES["speedup_vs_tf32"], key, "time_ms_median") / time_ms,
            "mem_ratio_vs_fp32": mem / lookup("torchdiffeq-fp32", key, "peak_mem_bytes"),
            "grad_err": float(row["grad_err_params"]),
            "naive_grad_err": lookup(NAIVE.get(precision), key, "grad_err_params"),
            "nocache_grad_err": lookup(NOCACHE.get(precision), key, "grad_err_params"),
        })
    return pd.DataFrame(rows, columns=columns)


def claims_summary(cell_claims: pd.DataFrame) -> pd.DataFrame:
    """Per GPU and rampde competitor: best and worst speedups, worst memory ratio and error."""
    if cell_claims.empty:
        return pd.DataFrame()
    grouped = cell_claims.groupby(["gpu", "competitor"])
    return pd.DataFrame({
        "cells": grouped.size(),
        "speedup_vs_fp32_max": grouped["speedup_vs_fp32"].max(),
        "speedup_vs_fp32_min": grouped["speedup_vs_fp32"].min(),
        "speedup_vs_tf32_max": grouped["speedup_vs_tf32"].max(),
        "mem_ratio_vs_fp32_max": grouped["mem_ratio_vs_fp32"].max(),
        "grad_err_max": grouped["grad_err"].max(),
        "naive_grad_err_max": grouped["naive_grad_err"].max(),
    }).reset_index()
