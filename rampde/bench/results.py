"""The results table: its schema, atomic reading and writing, and the claims computed from it.

One row per measured cell (GPU, competitor, workload, method, width, batch, steps, repeat
settings). ``COLUMNS`` names every column with its unit (the same table as
docs/bench-interfaces.md). Files: ``<out>/results.csv`` and ``<out>/timelines.csv``, always
replaced whole through a temporary file in the same folder and ``os.replace``, so a crash or
Ctrl-C leaves the previous version, never a half-written file.

Claims (per GPU model, per cell, for every ``rampde-*`` competitor that ran): speedup = the
baseline's median time / ours (``torchdiffeq-fp32`` and ``torchdiffeq-tf32``), memory ratio =
our allocator peak / ``torchdiffeq-fp32``'s, and our parameter-gradient error beside that of the
naive autocast recipe of the same precision (``autocast-<p>``) and of its one-line fix
(``autocast-nocache-<p>``).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import pandas as pd

log = logging.getLogger(__name__)

COLUMNS: dict[str, str] = {
    "gpu": "GPU model name, or 'cpu'",
    "device": "cuda or cpu",
    "competitor": "registry name (rampde.bench.competitors)",
    "precision": "fp32, tf32, fp16 or bf16",
    "workload": "mlp, conv or cnf",
    "method": "Runge-Kutta method (rk4: torchdiffeq's 3/8 rule)",
    "width": "MLP width / conv channels / CNF hidden width",
    "batch": "batch size",
    "steps": "time steps N",
    "repeats": "timed repeats",
    "warmup": "untimed runs before the timed ones",
    "status": "ok, oom, error or nonfinite",
    "message": "error text (or a note, e.g. a failed fp64 reference); empty when ok",
    "time_ms_median": "ms per forward+backward, median of the repeats",
    "time_ms_q25": "ms, first quartile of the repeats",
    "time_ms_q75": "ms, third quartile of the repeats",
    "time_ms_min": "ms, fastest repeat",
    "time_ms_max": "ms, slowest repeat",
    "peak_mem_bytes": "bytes, CUDA allocator peak above resident inputs and model (NaN on the CPU)",
    "nvml_mem_peak_bytes": "bytes, NVML device memory used, peak (includes the CUDA context; NaN without NVML)",
    "gpu_util_mean_pct": "%, NVML utilisation, mean over the timed runs",
    "power_mean_w": "W, NVML power draw, mean over the timed runs: the total-energy counter's difference over "
                    "the time between its readings, else the mean of the power samples",
    "energy_j": "J per forward+backward, NVML total-energy counter (NaN where the GPU has none)",
    "loss": "loss of the last timed run",
    "grad_err_params": "relative L2 error of the concatenated parameter gradients against the fp64 same-scheme run",
    "grad_err_y0": "relative L2 error of the y0 gradient against the fp64 same-scheme run",
    "tflops": "TFLOP/s, 3*s*N*flops_per_eval per forward+backward / median time (useful work)",
    "scaler_retries": "fp16 adjoint solves redone with a smaller scale, last run (rampde fp16; NaN otherwise)",
    "tf32": "TF32 matmuls on while the vector field ran",
    "cudnn_tf32": "TF32 convolutions on while the vector field ran",
    "cudnn_benchmark": "cuDNN autotuner on",
    "torch": "torch version",
    "cuda": "CUDA version of the torch build ('' for a CPU build)",
    "driver": "NVIDIA driver version ('' without NVML)",
    "compute_capability": "e.g. 9.0 ('' on the CPU)",
    "torchdiffeq": "torchdiffeq version",
    "rampde": "rampde version",
    "commit": "git commit of this project ('' outside a checkout)",
    "timestamp": "UTC time the cell finished, ISO 8601",
    "cell_id": "identity of the cell: gpu|competitor|workload|method|width|batch|steps|repeats|warmup",
}

INT_COLUMNS = ("width", "batch", "steps", "repeats", "warmup")
BOOL_COLUMNS = ("tf32", "cudnn_tf32", "cudnn_benchmark")
STRING_COLUMNS = ("gpu", "device", "competitor", "precision", "workload", "method", "status", "message",
                  "torch", "cuda", "driver", "compute_capability", "torchdiffeq", "rampde", "commit",
                  "timestamp", "cell_id")
FLOAT_COLUMNS = tuple(c for c in COLUMNS if c not in INT_COLUMNS + BOOL_COLUMNS + STRING_COLUMNS)
STATUSES = ("ok", "oom", "error", "nonfinite")

RESULTS_FILE = "results.csv"
TIMELINES_FILE = "timelines.csv"
TIMELINE_COLUMNS = ["cell_id", "t_s", "mem_used_bytes", "gpu_util_pct", "power_w"]

CELL_KEYS = ["gpu", "workload", "method", "width", "batch", "steps"]
OURS_PREFIX = "rampde-"
BASELINE_FP32 = "torchdiffeq-fp32"
BASELINE_TF32 = "torchdiffeq-tf32"
NAIVE = {"fp16": "autocast-fp16", "bf16": "autocast-bf16"}
NOCACHE = {"fp16": "autocast-nocache-fp16", "bf16": "autocast-nocache-bf16"}
CLAIM_COLUMNS = [*CELL_KEYS, "competitor", "precision", "time_ms", "speedup_vs_fp32", "speedup_vs_tf32",
                 "mem_ratio_vs_fp32", "grad_err", "grad_err_y0", "naive_grad_err", "nocache_grad_err", "note"]


# ----------------------------------------------------------------------------- files


def atomic_write(path: Path, write: Callable[[TextIO], None], *, binary: bool = False) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it over ``path``.

    On any exception (Ctrl-C included) the temporary file is removed and ``path`` is untouched.
    The handle is text (UTF-8) or, with ``binary``, bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        opened = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="", encoding="utf-8")
        with opened as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` as CSV to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda handle: df.to_csv(handle, index=False))


def empty_results() -> pd.DataFrame:
    """A results table with every column and no row."""
    return normalise(pd.DataFrame(columns=list(COLUMNS)))


def _to_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}.get(text, pd.NA)


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Every schema column present and typed: text as text (CUDA "12.10" stays "12.10"), numbers as
    floats, grid sizes as integers, flags as booleans; schema columns first, extra columns kept."""
    df = df.copy()
    for column in COLUMNS:
        if column not in df.columns:
            df[column] = pd.NA
    for column in STRING_COLUMNS:
        df[column] = df[column].map(lambda v: "" if pd.isna(v) else str(v)).astype(object)
    for column in FLOAT_COLUMNS:
        df[column] = pd.to_numeric(df[column], errors="coerce").astype("float64")
    for column in INT_COLUMNS:
        values = pd.to_numeric(df[column], errors="coerce")
        df[column] = values.astype("int64") if values.notna().all() else values.astype("Int64")
    for column in BOOL_COLUMNS:
        df[column] = df[column].map(_to_bool).astype("boolean")
    return df[list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]]


CSV_ERRORS = (pd.errors.ParserError, UnicodeDecodeError)  # what pandas raises for a file that is no CSV


def csv_error(exc: BaseException) -> str:
    """The first line of a CSV_ERRORS error, for a message naming the file."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_results(path: Path) -> pd.DataFrame:
    """Read a results CSV, typed (``normalise``); ``FileNotFoundError`` naming it, ``ValueError``
    for a file that is not a results table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    try:
        df = pd.read_csv(path, dtype={c: str for c in STRING_COLUMNS}, keep_default_na=False,
                         na_values={c: ["", "nan", "NaN"] for c in FLOAT_COLUMNS + INT_COLUMNS})
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is not a rampde results table: it is empty") from None
    except CSV_ERRORS as exc:
        raise ValueError(f"{path} is not a rampde results table: not a CSV file ({csv_error(exc)})") from None
    missing = [c for c in ("cell_id", "competitor", "workload", "status") if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a rampde results table: missing columns {missing}")
    return normalise(df)


def read_timelines(path: Path) -> pd.DataFrame:
    """A ``timelines.csv`` (empty with its columns when the file is missing)."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame({c: pd.Series(dtype="object" if c == "cell_id" else "float64")
                             for c in TIMELINE_COLUMNS})
    df = pd.read_csv(path, dtype={"cell_id": str})
    missing = [c for c in TIMELINE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a timelines table: missing columns {missing}")
    return df[TIMELINE_COLUMNS]


class ResultsStore:
    """The results and timelines of one output folder, kept in memory and rewritten atomically
    after each cell (timelines first: a row in results.csv means the cell is complete)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.results_path = self.folder / RESULTS_FILE
        self.timelines_path = self.folder / TIMELINES_FILE
        self.table = read_results(self.results_path) if self.results_path.exists() else empty_results()
        self.timelines = read_timelines(self.timelines_path)

    def status(self) -> dict[str, str]:
        """``cell_id -> status`` of the cells already in the folder."""
        return dict(zip(self.table["cell_id"], self.table["status"]))

    def add(self, row: dict[str, Any], timeline: Iterable[dict[str, float]] = ()) -> None:
        """Store one finished cell (replacing an earlier row of the same ``cell_id``)."""
        cell_id = row["cell_id"]
        samples = [{"cell_id": cell_id, **{k: s.get(k, math.nan) for k in TIMELINE_COLUMNS[1:]}}
                   for s in timeline]
        stale = self.timelines["cell_id"] == cell_id
        if samples or stale.any():
            kept = self.timelines[~stale]
            new = pd.DataFrame(samples, columns=TIMELINE_COLUMNS)
            self.timelines = pd.concat([kept, new], ignore_index=True) if len(kept) else new
            write_csv_atomic(self.timelines, self.timelines_path)
        kept = self.table[self.table["cell_id"] != cell_id]
        new = normalise(pd.DataFrame([row]))
        self.table = normalise(pd.concat([kept, new], ignore_index=True) if len(kept) else new)
        write_csv_atomic(self.table, self.results_path)


# ----------------------------------------------------------------------------- claims


def latest_cells(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (gpu, competitor, cell): its newest ok row, else its newest row.

    Newest by ``timestamp`` where rows have one (a row without one counts as older), then by order
    in the table. A rerun after a change supersedes the older measurement instead of being
    averaged with it; a failed rerun does not hide an earlier success. The claims, the targets and
    the dashboard all read cells through this one rule, so they quote the same figures.
    """
    if df.empty:
        return df.copy()
    stamp = df["timestamp"].fillna("").astype(str) if "timestamp" in df.columns else pd.Series("", df.index)
    ranked = df.assign(_ok=(df["status"] == "ok").astype(int), _stamp=stamp.to_numpy())
    ranked = ranked.sort_values(["_ok", "_stamp"], kind="stable")
    newest = ranked.drop_duplicates([*CELL_KEYS, "competitor"], keep="last")
    order = ["gpu", "competitor", *CELL_KEYS[1:]]
    return newest.drop(columns=["_ok", "_stamp"]).sort_values(order, kind="stable").reset_index(drop=True)


def _by_cell(cells: pd.DataFrame, competitor: str | None) -> dict[tuple, pd.Series]:
    if competitor is None:
        return {}
    rows = cells[cells["competitor"] == competitor]
    return {tuple(r[k] for k in CELL_KEYS): r for _, r in rows.iterrows()}


def _ratio(numerator: float, denominator: float) -> float:
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (numerator, denominator))
    return numerator / denominator if ok and denominator > 0 else math.nan


def _value(row: pd.Series | None, column: str) -> float:
    """A baseline's figure in one cell: NaN when it did not run fine there; for the gradient error
    of a run whose gradients were not finite, infinity (its gradients are ruined)."""
    if row is None:
        return math.nan
    if row["status"] == "nonfinite" and column.startswith("grad_err"):
        return math.inf
    return float(row[column]) if row["status"] == "ok" and pd.notna(row[column]) else math.nan


def claims(df: pd.DataFrame) -> pd.DataFrame:
    """The paper's claims per cell: one row per (gpu, rampde competitor, workload, method, width,
    batch, steps) where the rampde competitor ran fine (status ok).

    Columns: the cell, ``competitor``, ``precision``, ``time_ms`` (our median),
    ``speedup_vs_fp32`` / ``speedup_vs_tf32`` (baseline median time / ours), ``mem_ratio_vs_fp32``
    (our allocator peak / torchdiffeq-fp32's), ``grad_err`` and ``grad_err_y0`` (ours),
    ``naive_grad_err`` (``autocast-<precision>``) and ``nocache_grad_err``
    (``autocast-nocache-<precision>``; infinite where that run's gradients were not finite), and
    ``note`` naming the baselines that did not run fine in the cell. A missing baseline gives NaN.
    """
    if df.empty:
        return pd.DataFrame(columns=CLAIM_COLUMNS)
    cells = latest_cells(normalise(df))
    ours = cells[cells["competitor"].str.startswith(OURS_PREFIX) & (cells["status"] == "ok")]
    fp32, tf32 = _by_cell(cells, BASELINE_FP32), _by_cell(cells, BASELINE_TF32)
    rows = []
    for _, row in ours.iterrows():
        key = tuple(row[k] for k in CELL_KEYS)
        precision = row["precision"]
        naive = _by_cell(cells, NAIVE.get(precision)).get(key)
        nocache = _by_cell(cells, NOCACHE.get(precision)).get(key)
        base32, base_tf32 = fp32.get(key), tf32.get(key)
        time_ms = float(row["time_ms_median"])
        note = [f"{b['competitor']} {b['status']}" for b in (base32, base_tf32, naive, nocache)
                if b is not None and b["status"] != "ok"]
        rows.append({
            **{k: row[k] for k in CELL_KEYS},
            "competitor": row["competitor"],
            "precision": precision,
            "time_ms": time_ms,
            "speedup_vs_fp32": _ratio(_value(base32, "time_ms_median"), time_ms),
            "speedup_vs_tf32": _ratio(_value(base_tf32, "time_ms_median"), time_ms),
            "mem_ratio_vs_fp32": _ratio(float(row["peak_mem_bytes"]), _value(base32, "peak_mem_bytes")),
            "grad_err": float(row["grad_err_params"]),
            "grad_err_y0": float(row["grad_err_y0"]),
            "naive_grad_err": _value(naive, "grad_err_params"),
            "nocache_grad_err": _value(nocache, "grad_err_params"),
            "note": "; ".join(note),
        })
    out = pd.DataFrame(rows, columns=CLAIM_COLUMNS)
    return out.sort_values(["gpu", "competitor", "workload", "width", "batch", "steps"],
                           kind="stable").reset_index(drop=True)


def _geomean(values: pd.Series) -> float:
    finite = values[values.map(lambda v: math.isfinite(v) and v > 0)]
    return math.exp(finite.map(math.log).mean()) if len(finite) else math.nan


def claims_summary(cell_claims: pd.DataFrame) -> pd.DataFrame:
    """Per GPU and rampde competitor, over the cells of ``claims``: the number of cells; speedups
    (geometric mean, min, max); memory ratio (geometric mean, min, max); the largest gradient
    error of ours, of the naive recipe and of the nocache fix; in how many cells ours is more
    accurate than the naive recipe (``beats_naive``) out of those where both have an error
    (``vs_naive``). NaN where no cell has the figure."""
    columns = ["gpu", "competitor", "cells",
               "speedup_vs_fp32_geomean", "speedup_vs_fp32_min", "speedup_vs_fp32_max",
               "speedup_vs_tf32_geomean", "speedup_vs_tf32_min", "speedup_vs_tf32_max",
               "mem_ratio_vs_fp32_geomean", "mem_ratio_vs_fp32_min", "mem_ratio_vs_fp32_max",
               "grad_err_max", "naive_grad_err_max", "nocache_grad_err_max", "beats_naive", "vs_naive"]
    rows = []
    for (gpu, competitor), group in cell_claims.groupby(["gpu", "competitor"], sort=True):
        row: dict[str, Any] = {"gpu": gpu, "competitor": competitor, "cells": len(group)}
        for metric in ("speedup_vs_fp32", "speedup_vs_tf32", "mem_ratio_vs_fp32"):
            row[f"{metric}_geomean"] = _geomean(group[metric])
            row[f"{metric}_min"] = group[metric].min()
            row[f"{metric}_max"] = group[metric].max()
        for metric in ("grad_err", "naive_grad_err", "nocache_grad_err"):
            row[f"{metric}_max"] = group[metric].max()
        both = group[group["grad_err"].notna() & group["naive_grad_err"].notna()]
        row["beats_naive"] = int((both["grad_err"] < both["naive_grad_err"]).sum())
        row["vs_naive"] = len(both)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)
