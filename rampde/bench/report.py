"""The HTML dashboard: speed, memory and accuracy per GPU model, in one self-contained page.

``build_dashboard`` reads one or more ``results.csv`` files (the schema of
``docs/bench-interfaces.md``; optional columns may be missing), the ``timelines.csv`` beside each
of them, optionally an asv 0.6 results folder (one sub-folder per machine, named after the GPU
model) and optional training-curve CSVs, and writes one HTML file with plotly.js inlined once, so
that the page reads offline. Each GPU model gets its own tab: the paper's claims on top
(``compute_claims``) and the performance targets (``rampde.bench.targets``), then time, memory, the accuracy-speed trade-off, NVML timelines, training
curves, the asv history and the environment of each run.

Training files are ``rampde-bench train``'s ``training.csv`` (one row per task, competitor, seed
and epoch); their figures and parity table come from ``rampde.bench.training``, drawn here with
the dashboard's colours.
"""

from __future__ import annotations

import datetime as _dt
import html
import itertools
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline
from plotly.subplots import make_subplots

from .results import atomic_write

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Claims of the paper and their thresholds
# --------------------------------------------------------------------------------------------

BASELINE_FP32 = "torchdiffeq-fp32"
BASELINE_TF32 = "torchdiffeq-tf32"
NAIVE_RECIPE = {"fp16": "autocast-fp16", "bf16": "autocast-bf16"}
SPEEDUP_MIN = 1.8  # "about 2x faster" than torchdiffeq-fp32
MEMORY_RATIO_MAX = 0.55  # "about half the memory" of torchdiffeq-fp32
GRAD_ERR_MAX = {"fp16": 0.01, "bf16": 0.03}  # "accuracy kept": relative error bound
OURS_PREFIX = "rampde-"

CLAIM_TEXT = {
    "speedup": ("about 2× faster", f"speedup ≥ {SPEEDUP_MIN} in the best cell"),
    "speedup_tf32": ("speed against TF32", "reported, no claim"),
    "memory": ("about half the memory", f"memory ratio ≤ {MEMORY_RATIO_MAX} in the best cell"),
    "accuracy": (
        "accuracy kept",
        "gradient error ≤ the naive recipe's and ≤ {limit:g}% in every cell",
    ),
}

# --------------------------------------------------------------------------------------------
# Colours: fixed per competitor, in a stable order, across every plot
# --------------------------------------------------------------------------------------------

PALETTE: dict[str, str] = {
    "torchdiffeq-fp32": "#1f77b4",
    "torchdiffeq-tf32": "#6baed6",
    "torchdiffeq-adjoint": "#08306b",
    "autocast-fp16": "#d62728",
    "autocast-bf16": "#ff7f0e",
    "autocast-nocache-fp16": "#e377c2",
    "autocast-nocache-bf16": "#bcbd22",
    "checkpoint-step": "#8c564b",
    "checkpoint-revolve": "#c49c94",
    "reversible": "#9467bd",
    "rampde-fp32": "#74c476",
    "rampde-fp16": "#2ca02c",
    "rampde-bf16": "#00441b",
    "rampde-fp16-fast": "#17becf",
    "rampde-bf16-fast": "#006d77",
    "rampde-fp16-graph": "#98df8a",
    "rampde-bf16-graph": "#3f8f3f",
}
_EXTRA_COLOURS = ("#7f7f7f", "#393b79", "#ad494a", "#8c6d31", "#843c39", "#7b4173", "#5254a3")

# --------------------------------------------------------------------------------------------
# The results schema as the dashboard reads it
# --------------------------------------------------------------------------------------------

REQUIRED_COLUMNS = ("competitor", "workload", "width", "batch", "steps")
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


# ============================================================================================
# Small helpers
# ============================================================================================


def competitor_order(names: Iterable[str]) -> list[str]:
    """Known competitors in the palette's order, then the others sorted by name."""
    present = set(names)
    known = [n for n in PALETTE if n in present]
    return known + sorted(present - set(PALETTE))


def competitor_colours(names: Iterable[str]) -> dict[str, str]:
    """One colour per competitor: the palette's for known names, spare ones for the rest."""
    order = competitor_order(names)
    unknown = [n for n in order if n not in PALETTE]
    colours = {n: PALETTE[n] for n in order if n in PALETTE}
    for i, name in enumerate(unknown):
        colours[name] = _EXTRA_COLOURS[i % len(_EXTRA_COLOURS)]
    return colours


def slug(text: str) -> str:
    """Lower-case, alphanumerics joined by '-': how GPU names and asv machines are matched."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def precision_of(name: str) -> str:
    """The precision in a competitor's name (``rampde-bf16-fast`` -> ``bf16``), or ''."""
    found = re.search(r"(fp16|bf16|fp32|tf32|fp64)", name)
    return found.group(1) if found else ""


def cell_label(row: pd.Series | dict) -> str:
    """A cell in words: ``mlp w=256 b=256 N=64`` (the method is named when it is not rk4)."""
    method = str(row.get("method", "") or "")
    extra = f" {method}" if method and method != "rk4" else ""
    return (
        f"{row['workload']}{extra} w={int(row['width'])} b={int(row['batch'])} "
        f"N={int(row['steps'])}"
    )


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: object, digits: int = 4) -> str:
    """A number with ``digits`` significant figures, '—' for a missing one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}"


def _mem_unit(max_bytes: float) -> tuple[float, str]:
    """The divisor and name of the memory unit that suits ``max_bytes``."""
    return (2.0**30, "GiB") if max_bytes >= 2.0**31 else (2.0**20, "MiB")


def _fmt_bytes(value: float) -> str:
    if not _finite(value):
        return "not measured"
    div, unit = _mem_unit(value)
    return f"{value / div:.4g} {unit} ({int(value):,} B)"


def _wide(values: Iterable[float], ratio: float) -> bool:
    """Whether positive values span at least ``ratio`` (a log axis helps)."""
    pos = [v for v in values if _finite(v) and v > 0]
    return bool(pos) and max(pos) / min(pos) >= ratio


def _esc(value: object) -> str:
    return html.escape(str(value))


# ============================================================================================
# Reading
# ============================================================================================


def _empty_results() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in REQUIRED_COLUMNS + ("gpu",)})


def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV as a DataFrame (text columns kept as text: CUDA "12.10" is not 12.1); an empty file
    gives an empty frame; a missing one raises."""
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return pd.read_csv(path, dtype={c: str for c in STRING_COLUMNS})
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _normalise_results(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Add missing optional columns, coerce types, fill defaults; drop rows without a grid."""
    notices: list[str] = []
    df = df.copy()
    for col in NUMERIC_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else float("nan")
    for col in STRING_COLUMNS:
        df[col] = df[col].astype("object").where(df[col].notna(), "") if col in df else ""
        df[col] = df[col].map(lambda v: "" if v is None else str(v))
    for col in GRID_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    bad = df[list(GRID_COLUMNS)].isna().any(axis=1)
    if bad.any():
        notices.append(f"{int(bad.sum())} result rows without width/batch/steps were left out.")
        df = df[~bad]
    for col in GRID_COLUMNS:
        df[col] = df[col].astype("int64")
    df["competitor"] = df["competitor"].astype(str)
    df["workload"] = df["workload"].astype(str)
    df["gpu"] = df["gpu"].replace("", UNKNOWN_GPU)
    df["status"] = df["status"].str.strip().str.lower().replace("", "ok")
    no_precision = df["precision"] == ""
    df.loc[no_precision, "precision"] = df.loc[no_precision, "competitor"].map(precision_of)
    return df.reset_index(drop=True), notices


def load_results(paths: Sequence[Path]) -> tuple[pd.DataFrame, list[str]]:
    """All results tables as one frame, with notices about files that gave nothing usable.

    Raises FileNotFoundError naming a missing file.
    """
    frames: list[pd.DataFrame] = []
    notices: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"results file not found: {path}")
        frame = _read_csv(path)
        if frame.empty:
            notices.append(f"{path} holds no result rows.")
            continue
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            notices.append(f"{path} lacks the column(s) {', '.join(missing)}; it was left out.")
            continue
        frame["source"] = str(path)
        frames.append(frame)
    if not frames:
        return _empty_results(), notices
    df, more = _normalise_results(pd.concat(frames, ignore_index=True))
    return df, notices + more


def load_timelines(results_paths: Sequence[Path], results: pd.DataFrame) -> pd.DataFrame:
    """The ``timelines.csv`` beside each results file, joined to its cells' GPU and competitor."""
    frames = []
    for path in map(Path, results_paths):
        tl_path = path.parent / "timelines.csv"
        if not tl_path.is_file():
            continue
        tl = _read_csv(tl_path)
        if tl.empty or "cell_id" not in tl or "t_s" not in tl:
            log.warning("timelines file %s is empty or lacks cell_id/t_s; skipped", tl_path)
            continue
        for col in TIMELINE_COLUMNS[1:]:
            tl[col] = pd.to_numeric(tl[col], errors="coerce") if col in tl else float("nan")
        tl["cell_id"] = tl["cell_id"].astype(str)
        tl["source"] = str(path)
        frames.append(tl[list(TIMELINE_COLUMNS) + ["source"]])
    if not frames or results.empty:
        return pd.DataFrame(columns=list(TIMELINE_COLUMNS) + ["source", "gpu", "competitor"])
    tl = pd.concat(frames, ignore_index=True)
    cells = results[results["cell_id"] != ""][
        ["source", "cell_id", "gpu", "competitor", *CELL_COLUMNS]
    ].drop_duplicates(["source", "cell_id"])
    return tl.merge(cells, on=["source", "cell_id"], how="inner")


def _strip_param(value: object) -> str:
    """An asv parameter as written in its results (a repr) back to plain text."""
    text = str(value)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _asv_unit(name: str, benchmarks: dict) -> str:
    unit = (benchmarks.get(name) or {}).get("unit")
    if unit:
        return str(unit)
    leaf = name.rsplit(".", 1)[-1]
    if leaf.startswith("time_"):
        return "seconds"
    if leaf.startswith(("peakmem_", "mem_")):
        return "bytes"
    return ""


def _looks_like_competitor(value: str) -> bool:
    return value in PALETTE or bool(
        re.match(r"(rampde|torchdiffeq|autocast|checkpoint|reversible)\b", value)
    )


def _asv_file_rows(path: Path, machine: str, benchmarks: dict) -> list[dict]:
    """The rows of one asv 0.6 result file: one per benchmark and parameter combination."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("version", 2) != 2:
        log.warning("asv result %s has api version %s, expected 2", path, data.get("version"))
    columns = data.get("result_columns") or ["result", "params"]
    commit = str(data.get("commit_hash", ""))
    date = data.get("date")
    rows = []
    for name, values in (data.get("results") or {}).items():
        record = dict(zip(columns, values))
        result = record.get("result")
        if result is None:
            continue
        result = result if isinstance(result, list) else [result]
        params = record.get("params") or []
        combos = list(itertools.product(*params)) if params else [()]
        names = (benchmarks.get(name) or {}).get("param_names") or []
        for combo, value in zip(combos, result):
            if not _finite(value):
                continue
            plain = [_strip_param(p) for p in combo]
            label = ", ".join(
                f"{n}={p}" if i < len(names) else p
                for i, (n, p) in enumerate(itertools.zip_longest(names, plain))
                if p is not None
            )
            competitor = next((p for p in plain if _looks_like_competitor(p)), "")
            rows.append({
                "machine": machine, "commit": commit, "date": date, "benchmark": name,
                "params": label, "competitor": competitor, "value": float(value),
                "unit": _asv_unit(name, benchmarks),
            })  # fmt: skip
    return rows


def load_asv(results_dir: Path) -> pd.DataFrame:
    """An asv 0.6 results folder as one row per (machine, commit, benchmark, parameters)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"asv results folder not found: {results_dir}")
    bench_file = results_dir / "benchmarks.json"
    benchmarks = json.loads(bench_file.read_text(encoding="utf-8")) if bench_file.is_file() else {}
    rows: list[dict] = []
    for machine_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        machine_file = machine_dir / "machine.json"
        if not machine_file.is_file():
            continue
        machine = json.loads(machine_file.read_text(encoding="utf-8")).get("machine")
        machine = str(machine or machine_dir.name)
        for path in sorted(machine_dir.glob("*.json")):
            if path.name == "machine.json":
                continue
            try:
                rows.extend(_asv_file_rows(path, machine, benchmarks))
            except (ValueError, KeyError, TypeError) as err:
                log.warning("unreadable asv result %s: %s", path, err)
    columns = ["machine", "commit", "date", "benchmark", "params", "competitor", "value", "unit"]
    df = pd.DataFrame(rows, columns=columns)
    df["date"] = pd.to_datetime(pd.to_numeric(df["date"], errors="coerce"), unit="ms", utc=True)
    return df


TRAINING_REQUIRED = ("task", "competitor", "epoch", "test_metric")
TRAINING_NUMERIC = ("epoch", "train_loss", "test_metric", "wall_s", "peak_mem_bytes",
                    "skipped_steps", "scaler_retries", "seed")  # fmt: skip


def load_training(paths: Sequence[Path]) -> tuple[pd.DataFrame, list[str]]:
    """The per-epoch rows of ``training.csv`` files, with notices about unusable ones."""
    frames, notices = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"training file not found: {path}")
        df = _read_csv(path)
        missing = [c for c in TRAINING_REQUIRED if c not in df.columns]
        if df.empty or missing:
            what = "holds no rows" if df.empty else f"lacks the column(s) {', '.join(missing)}"
            notices.append(f"Training file {path} {what}; it was left out.")
            continue
        for col in TRAINING_NUMERIC:
            df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else 0.0
        for col, default in (("gpu", UNKNOWN_GPU), ("metric_name", ""), ("precision", "")):
            df[col] = df[col].fillna(default).astype(str) if col in df else default
        df["competitor"] = df["competitor"].astype(str)
        frames.append(df.dropna(subset=["epoch"]))
    if not frames:
        return pd.DataFrame(columns=[*TRAINING_REQUIRED, "gpu"]), notices
    return pd.concat(frames, ignore_index=True), notices


# ============================================================================================
# Cells and claims
# ============================================================================================


def collapse_cells(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (gpu, competitor, cell): the median of its ok rows, else its last row."""
    keys = ["gpu", "competitor", *CELL_COLUMNS]
    if df.empty:
        return df.copy()
    ok = df[df["status"] == "ok"]
    numeric = [c for c in NUMERIC_COLUMNS if c in df.columns]
    others = [c for c in df.columns if c not in numeric and c not in keys]
    agg = {**{c: "median" for c in numeric}, **{c: "last" for c in others}}
    ok_cells = ok.groupby(keys, sort=False, dropna=False).agg(agg).reset_index()
    failed = df[df["status"] != "ok"].drop_duplicates(keys, keep="last")
    ok_index = pd.MultiIndex.from_frame(ok_cells[keys]) if len(ok_cells) else None
    if ok_index is not None and len(failed):
        failed = failed[~pd.MultiIndex.from_frame(failed[keys]).isin(ok_index)]
    out = pd.concat([ok_cells, failed], ignore_index=True)
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


def _paired(gpu_cells: pd.DataFrame, ours: str, other: str, metric: str) -> pd.DataFrame:
    """Cells where both ran ok with a finite ``metric``: columns ``ours``, ``other``, ``cell``.

    For the naive recipe a non-finite run counts as an infinite gradient error.
    """
    mine = gpu_cells[(gpu_cells["competitor"] == ours) & (gpu_cells["status"] == "ok")]
    theirs = gpu_cells[gpu_cells["competitor"] == other].copy()
    if metric == "grad_err_params":
        theirs.loc[theirs["status"] == "nonfinite", metric] = math.inf
        theirs = theirs[theirs["status"].isin(["ok", "nonfinite"])]
    else:
        theirs = theirs[theirs["status"] == "ok"]
    keys = list(CELL_COLUMNS)
    both = mine[keys + [metric]].merge(
        theirs[keys + [metric]], on=keys, suffixes=("_ours", "_other")
    )
    both = both.rename(columns={f"{metric}_ours": "ours", f"{metric}_other": "other"})
    both = both[both["ours"].notna() & both["other"].notna()]
    both = both.sort_values(keys, kind="stable").reset_index(drop=True)
    both["cell"] = [cell_label(r) for r in both[keys].to_dict("records")]
    return both


def _claim_row(
    gpu: str, ours: str, claim: str, against: str, pairs: pd.DataFrame, limit: float = math.nan
) -> dict:
    """One claim of one competitor on one GPU, judged over the paired cells.

    ``limit`` is the gradient-error bound of the accuracy claim (a fraction).
    """
    text, rule = CLAIM_TEXT[claim]
    rule = rule.format(limit=100 * limit)
    row = {
        "gpu": gpu, "competitor": ours, "claim": claim, "claim_text": text, "against": against,
        "rule": rule, "n_cells": len(pairs), "n_meeting": 0, "best": math.nan,
        "best_cell": "", "best_against": math.nan, "worst": math.nan, "worst_cell": "",
        "worst_against": math.nan, "held": None, "note": "", "baseline_oom": 0,
    }  # fmt: skip
    if pairs.empty:
        return row
    if claim in ("speedup", "speedup_tf32"):
        value = pairs["other"] / pairs["ours"]
        best_i, worst_i = value.idxmax(), value.idxmin()
        meets = value >= SPEEDUP_MIN
    elif claim == "memory":
        value = pairs["ours"] / pairs["other"]
        best_i, worst_i = value.idxmin(), value.idxmax()
        meets = value <= MEMORY_RATIO_MAX
    else:
        value = pairs["ours"]
        best_i, worst_i = value.idxmin(), value.idxmax()
        meets = (value <= pairs["other"]) & (value <= limit)
    row.update(
        n_meeting=int(meets.sum()),
        best=float(value[best_i]), best_cell=pairs.at[best_i, "cell"],
        worst=float(value[worst_i]), worst_cell=pairs.at[worst_i, "cell"],
    )  # fmt: skip
    if claim == "accuracy":
        row.update(best_against=float(pairs.at[best_i, "other"]))
        row.update(worst_against=float(pairs.at[worst_i, "other"]))
        row["held"] = bool(meets.all())
    elif claim != "speedup_tf32":
        row["held"] = bool(meets.any())  # "up to": the best cell meets the threshold
    return row


def _no_cells_note(gpu_cells: pd.DataFrame, ours: str, against: str, metric: str) -> str:
    """Why a claim could not be judged."""
    if metric == "peak_mem_bytes" and gpu_cells["peak_mem_bytes"].isna().all():
        where = "on the CPU" if gpu_cells["gpu"].iloc[0] == "cpu" else "in these results"
        return f"peak memory was not measured {where}"
    runs = gpu_cells[(gpu_cells["competitor"] == against) & (gpu_cells["status"] == "ok")]
    if runs.empty:
        return f"{against} has no successful cell on this GPU"
    if gpu_cells[(gpu_cells["competitor"] == ours) & (gpu_cells["status"] == "ok")].empty:
        return f"{ours} has no successful cell on this GPU"
    return f"no cell where both {ours} and {against} ran with a {metric}"


def _baseline_oom_cells(gpu_cells: pd.DataFrame, ours: str, against: str) -> int:
    """How many cells ``ours`` ran in while ``against`` ran out of memory there."""
    keys = list(CELL_COLUMNS)
    mine = gpu_cells[(gpu_cells["competitor"] == ours) & (gpu_cells["status"] == "ok")][keys]
    oom = gpu_cells[(gpu_cells["competitor"] == against) & (gpu_cells["status"] == "oom")][keys]
    return len(mine.merge(oom, on=keys))


def compute_claims(df: pd.DataFrame) -> pd.DataFrame:
    """The paper's claims per GPU model and ``rampde-*`` competitor, judged on the results.

    Speedup = baseline time / our time in the same cell (same workload, method, width, batch,
    steps); memory ratio = our peak / torchdiffeq-fp32's; accuracy compares ``grad_err_params``
    with the naive autocast recipe of the same precision. ``held`` is True/False, or None when no
    cell allows a verdict (``note`` says why) or when the row is reported without a claim.
    The best and the worst cell are named with their value; ``baseline_oom`` counts the cells
    where ours ran and the baseline ran out of memory (they have no ratio).
    """
    rows: list[dict] = []
    if df.empty:
        return pd.DataFrame(rows, columns=list(_claim_row("", "", "speedup", "", pd.DataFrame())))
    cells = collapse_cells(df)
    for gpu in sorted(cells["gpu"].unique()):
        gpu_cells = cells[cells["gpu"] == gpu]
        names = competitor_order(gpu_cells["competitor"])
        for ours in [c for c in names if c.startswith(OURS_PREFIX)]:
            precision = (gpu_cells.loc[gpu_cells["competitor"] == ours, "precision"].iloc[0]
                         or precision_of(ours))  # fmt: skip
            plan = [
                ("speedup", BASELINE_FP32, "time_ms_median"),
                ("speedup_tf32", BASELINE_TF32, "time_ms_median"),
                ("memory", BASELINE_FP32, "peak_mem_bytes"),
            ]
            if precision in NAIVE_RECIPE:
                plan.append(("accuracy", NAIVE_RECIPE[precision], "grad_err_params"))
            limit = GRAD_ERR_MAX.get(precision, math.nan)
            for claim, against, metric in plan:
                pairs = _paired(gpu_cells, ours, against, metric)
                row = _claim_row(gpu, ours, claim, against, pairs, limit)
                notes = [_no_cells_note(gpu_cells, ours, against, metric)] if pairs.empty else []
                row["baseline_oom"] = _baseline_oom_cells(gpu_cells, ours, against)
                if row["baseline_oom"] and claim != "accuracy":
                    n = row["baseline_oom"]
                    notes.append(f"also ran in {n} cell{'s' if n > 1 else ''} where "
                                 f"{against} ran out of memory")  # fmt: skip
                row["note"] = "; ".join(notes)
                rows.append(row)
    return pd.DataFrame(rows)


# ============================================================================================
# Figures
# ============================================================================================


def _hover(row: dict) -> str:
    """The exact figures of one cell, for the hover box."""
    lines = [f"<b>{_esc(row['competitor'])}</b>", _esc(cell_label(row))]
    if row.get("status", "ok") != "ok":
        lines.append(f"status <b>{_esc(row['status'])}</b> {_esc(row.get('message', ''))[:120]}")
    if _finite(row.get("time_ms_median")):
        lines.append(
            f"time {row['time_ms_median']:.6g} ms (q25 {_fmt(row.get('time_ms_q25'), 6)}, "
            f"q75 {_fmt(row.get('time_ms_q75'), 6)})"
        )
    if _finite(row.get("peak_mem_bytes")):
        lines.append(f"peak memory {_fmt_bytes(row['peak_mem_bytes'])}")
    if _finite(row.get("grad_err_params")):
        lines.append(
            f"grad error params {100 * row['grad_err_params']:.4g}%"
            f", y0 {_fmt(100 * row['grad_err_y0'] if _finite(row.get('grad_err_y0')) else None)}%"
        )
    if _finite(row.get("tflops")):
        lines.append(f"{row['tflops']:.4g} TFLOP/s")
    return "<br>".join(lines)


def _base_layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(
        template="plotly_white",
        title=dict(text=title, x=0.0, xanchor="left", font=dict(size=15)),
        height=height,
        margin=dict(l=70, r=20, t=80, b=60),
        hovermode="closest",
        legend=dict(title=dict(text="competitor"), tracegroupgap=2),
    )
    return fig


def _main_method(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of the most common method only (a panel compares one scheme)."""
    if rows.empty or rows["method"].nunique() <= 1:
        return rows
    return rows[rows["method"] == rows["method"].value_counts().idxmax()]


def pick_slice(rows: pd.DataFrame, vary: str) -> dict[str, int] | None:
    """The other grid axes' values with the most distinct ``vary`` values (ties: largest)."""
    fixed = [c for c in GRID_COLUMNS if c != vary]
    if rows.empty:
        return None
    counts = rows.groupby(fixed)[vary].nunique()
    best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
    return dict(zip(fixed, (int(v) for v in best)))


def _workloads(cells: pd.DataFrame) -> list[str]:
    order = {"mlp": 0, "conv": 1, "cnf": 2}
    return sorted(cells["workload"].unique(), key=lambda w: (order.get(w, 9), w))


def _legend_once(seen: set[str], name: str) -> bool:
    first = name not in seen
    seen.add(name)
    return first


def line_figure(
    cells: pd.DataFrame, vary: str, metric: str, colours: dict[str, str], *, title: str,
    ytitle: str, scale: float = 1.0,
) -> go.Figure | None:  # fmt: skip
    """``metric`` against ``vary`` per workload, one line per competitor; OOM cells marked ×."""
    panels = []
    for workload in _workloads(cells):
        rows = _main_method(cells[cells["workload"] == workload])
        chosen = pick_slice(rows[(rows["status"] == "ok") & rows[metric].notna()], vary)
        if chosen is not None:  # the slice's failed cells come along, to be marked
            mask = (rows[list(chosen)] == pd.Series(chosen)).all(axis=1)
            panels.append((workload, chosen, rows[mask]))
    if not panels:
        return None
    names = [
        f"{w}: " + ", ".join(f"{k}={v}" for k, v in chosen.items()) for w, chosen, _ in panels
    ]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=names, horizontal_spacing=0.07)
    seen: set[str] = set()
    for col, (_, _, rows) in enumerate(panels, start=1):
        ok = rows[(rows["status"] == "ok") & rows[metric].notna()]
        ylog = _wide(ok[metric], 10)
        top = float(ok[metric].max()) / scale * (1.4 if ylog else 1.08)  # OOM marks go here
        for comp in competitor_order(rows["competitor"]):
            mine = rows[rows["competitor"] == comp].sort_values(vary)
            good = mine[(mine["status"] == "ok") & mine[metric].notna()]
            failed = mine[mine["status"] == "oom"]
            show = _legend_once(seen, comp)
            recs = good.to_dict("records")
            fig.add_trace(go.Scatter(
                x=good[vary], y=good[metric] / scale, mode="lines+markers", name=comp,
                legendgroup=comp, showlegend=show, line=dict(color=colours[comp],
                width=3 if comp.startswith(OURS_PREFIX) else 1.8),
                text=[_hover(r) for r in recs], hovertemplate="%{text}<extra></extra>",
            ), row=1, col=col)  # fmt: skip
            if not failed.empty:
                fig.add_trace(go.Scatter(
                    x=failed[vary], y=[top] * len(failed), mode="markers+text", name=comp,
                    legendgroup=comp, showlegend=False, text=["OOM"] * len(failed),
                    textposition="top center", textfont=dict(color=colours[comp], size=10),
                    marker=dict(symbol="x", size=11, color=colours[comp]),
                    hovertext=[_hover(r) for r in failed.to_dict("records")],
                    hovertemplate="%{hovertext}<extra></extra>",
                ), row=1, col=col)  # fmt: skip
        fig.update_xaxes(
            title_text=vary if vary != "steps" else "steps N", row=1, col=col,
            type="log" if _wide(rows[vary], 4) else "linear",
        )  # fmt: skip
        fig.update_yaxes(
            title_text=ytitle if col == 1 else None, row=1, col=col,
            type="log" if ylog else "linear",
        )  # fmt: skip
    return _base_layout(fig, title, 440)


def largest_cell(rows: pd.DataFrame, metric: str) -> dict | None:
    """The cell with the most work (width·batch·steps) where some competitor measured ``metric``."""
    ok = rows[(rows["status"] == "ok") & rows[metric].notna()]
    if ok.empty:
        return None
    size = ok["width"] * ok["batch"] * ok["steps"]
    best = ok.loc[size.sort_values(kind="stable").index[-1]]
    return {c: best[c] for c in CELL_COLUMNS}


def _at_cell(rows: pd.DataFrame, cell: dict) -> pd.DataFrame:
    return rows[(rows[list(CELL_COLUMNS)] == pd.Series(cell)).all(axis=1)]


def memory_bars(cells: pd.DataFrame, colours: dict[str, str]) -> go.Figure | None:
    """Peak memory per competitor at each workload's largest measured cell; failures hatched."""
    panels = []
    for workload in _workloads(cells):
        rows = cells[cells["workload"] == workload]
        cell = largest_cell(rows, "peak_mem_bytes")
        if cell is not None:
            panels.append((cell, _at_cell(rows, cell)))
    if not panels:
        return None
    top = max(float(r["peak_mem_bytes"].max()) for _, r in panels)
    div, unit = _mem_unit(top)
    order = competitor_order(pd.concat([r["competitor"] for _, r in panels]))
    fig = make_subplots(
        rows=1, cols=len(panels), shared_yaxes=True, horizontal_spacing=0.04,
        subplot_titles=[cell_label(c) for c, _ in panels],
    )  # fmt: skip
    seen: set[str] = set()
    for col, (_, rows) in enumerate(panels, start=1):
        high = float(rows["peak_mem_bytes"].max()) / div
        for comp in [c for c in order if c in set(rows["competitor"])]:
            rec = rows[rows["competitor"] == comp].iloc[0].to_dict()
            ok = rec["status"] == "ok" and _finite(rec["peak_mem_bytes"])
            value = rec["peak_mem_bytes"] / div if ok else high
            label = f"{value:.3g} {unit}" if ok else rec["status"].upper()
            fig.add_trace(go.Bar(
                x=[value], y=[comp], orientation="h", name=comp, legendgroup=comp,
                showlegend=_legend_once(seen, comp), text=[label], textposition="auto",
                marker=dict(
                    color=colours[comp] if ok else "rgba(255,255,255,0.6)",
                    line=dict(color=colours[comp], width=1.5),
                    pattern=dict(shape="" if ok else "x", fgcolor=colours[comp], size=8),
                ),
                hovertext=[_hover(rec) + ("" if ok else "<br><i>bar drawn at the panel's "
                                                        "maximum: no measurement</i>")],
                hovertemplate="%{hovertext}<extra></extra>",
            ), row=1, col=col)  # fmt: skip
        fig.update_xaxes(title_text=f"peak memory ({unit})", row=1, col=col)
    fig.update_yaxes(categoryorder="array", categoryarray=order[::-1])
    height = max(320, 26 * len(order) + 160)
    title = "Peak allocator memory at the largest cell of each workload (hatched: no measurement)"
    return _base_layout(fig, title, height)


def accuracy_figure(cells: pd.DataFrame, colours: dict[str, str]) -> go.Figure | None:
    """Gradient error against time, one point per competitor, per workload's fullest cell."""
    panels = []
    for workload in _workloads(cells):
        rows = cells[(cells["workload"] == workload) & (cells["status"] == "ok")]
        rows = rows[rows["grad_err_params"].notna() & rows["time_ms_median"].notna()]
        if rows.empty:
            continue
        size = rows["width"] * rows["batch"] * rows["steps"]
        counts = rows.assign(size=size).groupby(list(CELL_COLUMNS)).agg(
            n=("competitor", "size"), size=("size", "first")
        )  # fmt: skip
        best = max(counts.itertuples(), key=lambda r: (r.n, r.size)).Index
        panels.append((dict(zip(CELL_COLUMNS, best)), rows))
    if not panels:
        return None
    fig = make_subplots(
        rows=1, cols=len(panels), horizontal_spacing=0.07,
        subplot_titles=[cell_label(c) for c, _ in panels],
    )  # fmt: skip
    seen: set[str] = set()
    for col, (cell, rows) in enumerate(panels, start=1):
        at = _at_cell(rows, cell)
        for comp in competitor_order(at["competitor"]):
            rec = at[at["competitor"] == comp].iloc[0].to_dict()
            fig.add_trace(go.Scatter(
                x=[rec["time_ms_median"]], y=[100 * rec["grad_err_params"]], mode="markers",
                name=comp, legendgroup=comp, showlegend=_legend_once(seen, comp),
                marker=dict(color=colours[comp], size=13, line=dict(color="white", width=1),
                            symbol="star" if comp.startswith(OURS_PREFIX) else "circle"),
                hovertext=[_hover(rec)], hovertemplate="%{hovertext}<extra></extra>",
            ), row=1, col=col)  # fmt: skip
        axis = "" if col == 1 else str(col)
        for bound, name in ((100 * GRAD_ERR_MAX["fp16"], "fp16 bound"),
                            (100 * GRAD_ERR_MAX["bf16"], "bf16 bound")):  # fmt: skip
            fig.add_hline(y=bound, line=dict(color="#999", dash="dot", width=1), row=1, col=col)
            fig.add_annotation(
                x=1, xref=f"x{axis} domain", y=math.log10(bound), yref=f"y{axis}",
                text=f"{bound:g}% {name}", showarrow=False, xanchor="right", yanchor="bottom",
                font=dict(size=10, color="#666"),
            )  # fmt: skip
        fig.update_xaxes(title_text="time per forward+backward (ms)", type="log", row=1, col=col)
        fig.update_yaxes(title_text="parameter-gradient error (%)" if col == 1 else None,
                         type="log", tickformat="~g", row=1, col=col)  # fmt: skip
    title = "Accuracy against speed: lower left is better (stars: rampde)"
    return _base_layout(fig, title, 440)


def timeline_figure(timelines: pd.DataFrame, colours: dict[str, str]) -> go.Figure | None:
    """NVML device memory, utilisation and power over the largest cell of each competitor."""
    if timelines.empty:
        return None
    chosen = []
    for comp in competitor_order(timelines["competitor"]):
        mine = timelines[timelines["competitor"] == comp]
        cells = mine.drop_duplicates(["source", "cell_id"])
        size = cells["width"] * cells["batch"] * cells["steps"]
        best = cells.loc[size.sort_values(kind="stable").index[-1]]
        same = (mine["source"] == best["source"]) & (mine["cell_id"] == best["cell_id"])
        chosen.append((comp, best, mine[same].sort_values("t_s")))
    has_power = timelines["power_w"].notna().any()
    div, unit = _mem_unit(float(timelines["mem_used_bytes"].max() or 0))
    titles = ["device memory used (NVML)", "GPU utilisation (NVML)"]
    if has_power:
        titles.append("board power (NVML)")
    fig = make_subplots(rows=len(titles), cols=1, shared_xaxes=True, subplot_titles=titles,
                        vertical_spacing=0.08)  # fmt: skip
    series = [("mem_used_bytes", div, f"memory ({unit})"), ("gpu_util_pct", 1.0, "utilisation (%)")]
    if has_power:
        series.append(("power_w", 1.0, "power (W)"))
    for comp, best, tl in chosen:
        label = f"{comp}: {cell_label(best)}"
        for row, (col, scale, ytitle) in enumerate(series, start=1):
            fig.add_trace(go.Scatter(
                x=tl["t_s"], y=tl[col] / scale, mode="lines", name=comp, legendgroup=comp,
                showlegend=row == 1, line=dict(color=colours[comp]),
                hovertemplate=f"<b>{_esc(label)}</b><br>t %{{x:.4g}} s<br>{ytitle} %{{y:.5g}}"
                              "<extra></extra>",
            ), row=row, col=1)  # fmt: skip
            fig.update_yaxes(title_text=ytitle, row=row, col=1)
    fig.update_xaxes(title_text="time since the cell started (s)", row=len(titles), col=1)
    title = "NVML timelines of the largest cell of each competitor (includes the CUDA context)"
    return _base_layout(fig, title, 260 * len(titles) + 80)


def _asv_scale(unit: str) -> tuple[float, str]:
    if unit == "seconds":
        return 1e-3, "ms"
    if unit == "bytes":
        return 2.0**20, "MiB"
    return 1.0, unit or "value"


def asv_figure(asv: pd.DataFrame, colours: dict[str, str]) -> go.Figure | None:
    """Each asv benchmark per commit (in commit-date order), one line per parameter set."""
    if asv.empty:
        return None
    commits = asv.groupby("commit")["date"].min().sort_values(kind="stable")
    order = [c[:8] for c in commits.index]
    benches = sorted(asv["benchmark"].unique())
    fig = make_subplots(rows=len(benches), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=benches)  # fmt: skip
    seen: set[str] = set()
    spare = itertools.cycle(_EXTRA_COLOURS)
    dashes = ("solid", "dash", "dot", "dashdot", "longdash")
    for row, bench in enumerate(benches, start=1):
        rows = asv[asv["benchmark"] == bench]
        scale, unit = _asv_scale(rows["unit"].iloc[0])
        per_competitor: dict[str, int] = {}
        for params, series in rows.groupby("params", sort=True):
            series = series.assign(rank=series["commit"].map(commits.rank(method="first")))
            series = series.sort_values("rank")
            comp = series["competitor"].iloc[0]
            colour = colours.get(comp) or next(spare)
            group = comp or f"{bench}:{params}"
            nth = per_competitor[comp] = per_competitor.get(comp, -1) + 1
            fig.add_trace(go.Scatter(
                x=series["commit"].str[:8], y=series["value"] / scale, mode="lines+markers",
                name=comp or params or bench.rsplit(".", 1)[-1], legendgroup=group,
                showlegend=_legend_once(seen, group),
                line=dict(color=colour, dash=dashes[nth % len(dashes)] if comp else "solid"),
                customdata=list(zip(series["commit"], series["date"].astype(str))),
                hovertemplate=(f"<b>{_esc(bench)}</b><br>{_esc(params)}<br>"
                               "commit %{customdata[0]}<br>date %{customdata[1]}<br>"
                               f"%{{y:.6g}} {unit}<extra></extra>"),
            ), row=row, col=1)  # fmt: skip
        fig.update_yaxes(title_text=unit, row=row, col=1)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=order)
    fig.update_xaxes(title_text="commit (oldest to newest)", row=len(benches), col=1)
    fig = _base_layout(fig, "asv history per commit (dashes: other parameters of the same "
                            "competitor; hover for them)", 240 * len(benches) + 140)  # fmt: skip
    fig.update_layout(legend_title_text="series")
    return fig


# ============================================================================================
# HTML
# ============================================================================================

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 margin:0;color:#222;background:#fafafa}
header{background:#14323f;color:#fff;padding:14px 28px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;color:#cfe0e6;font-size:13px}
main{max-width:1400px;margin:0 auto;padding:12px 28px 40px}
nav.tabs{display:flex;flex-wrap:wrap;gap:6px;margin:14px 0 4px}
nav.tabs button{font:inherit;padding:7px 16px;border:1px solid #9ab;border-radius:6px 6px 0 0;
 background:#eef3f5;cursor:pointer}
nav.tabs button[aria-selected=true]{background:#14323f;color:#fff;border-color:#14323f}
section.gpu{background:#fff;border:1px solid #dde;border-radius:0 8px 8px 8px;padding:8px 22px 22px}
h2{margin:12px 0 4px;font-size:20px} h3{margin:26px 0 6px;font-size:17px;
 border-bottom:1px solid #e3e7ea;padding-bottom:3px}
p.note,.fig-note{color:#555;font-size:13px;margin:4px 0}
.notice{background:#fff7d6;border:1px solid #e8cf6a;border-radius:6px;padding:8px 12px;margin:8px 0}
.empty{background:#f3f3f3;border:1px dashed #bbb;border-radius:6px;padding:10px 14px;color:#444}
#js-errors{background:#fde2e2;border:1px solid #d88;padding:8px 12px;border-radius:6px;margin:8px 0}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d8dde0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f3f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.held{background:#dff3e2;color:#145a24;font-weight:600}
td.not-held{background:#fbe0e0;color:#8a1c1c;font-weight:600}
td.no-verdict{color:#777} td.name,td.value,td.num{white-space:nowrap} td.claim{min-width:230px}
td small{font-weight:normal;color:#555}
td.held,td.not-held,td.no-verdict{min-width:210px;max-width:300px}
div.scroll{overflow-x:auto}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
details{margin:10px 0} summary{cursor:pointer;color:#14323f}
.figure{margin:6px 0 4px}
"""

_ERROR_CATCHER = """
(function(){
  var errors = [];
  function show(){
    var box = document.getElementById('js-errors');
    if (box && errors.length){ box.hidden = false;
      box.textContent = 'Script errors on this page: ' + errors.join(' | '); }
  }
  function record(msg){ errors.push(String(msg)); document.documentElement.setAttribute(
    'data-js-errors', String(errors.length)); show(); }
  window.addEventListener('error', function(e){ record(e.message || e); });
  window.addEventListener('unhandledrejection', function(e){ record(e.reason); });
  var original = console.error;
  console.error = function(){ record(Array.prototype.join.call(arguments, ' '));
    return original.apply(console, arguments); };
  document.addEventListener('DOMContentLoaded', show);
})();
"""

_TABS = """
(function(){
  var buttons = Array.prototype.slice.call(document.querySelectorAll('nav.tabs button'));
  var sections = Array.prototype.slice.call(document.querySelectorAll('section.gpu'));
  var config = {responsive: true, displaylogo: false};
  function nextFrame(){ return new Promise(function(ok){ setTimeout(ok, 0); }); }
  // Draw a section's figures one at a time, so the page paints (claims first) in between.
  function draw(section){
    var pending = Array.prototype.slice.call(section.querySelectorAll('script.figure-data'));
    return pending.reduce(function(chain, data){
      return chain.then(nextFrame).then(function(){
        var el = document.getElementById(data.dataset.for);
        if (!el || el.dataset.drawn) { return; }
        el.dataset.drawn = 'true';
        function failed(err){ console.error('figure ' + el.id + ' was not drawn: ' + err); }
        try {  // one broken figure must not keep the others from being drawn
          var fig = JSON.parse(data.textContent);
          return Plotly.newPlot(el, fig.data, fig.layout, config).catch(failed);
        } catch (err) { failed(err); }
      });
    }, Promise.resolve());
  }
  function show(id){
    if (!document.getElementById(id)) { id = sections.length ? sections[0].id : null; }
    sections.forEach(function(s){ s.hidden = s.id !== id; });
    buttons.forEach(function(b){
      b.setAttribute('aria-selected', String(b.dataset.target === id)); });
    var shown = document.getElementById(id);
    if (!shown || !window.Plotly) { return Promise.resolve(); }
    // Plots drawn while hidden, or before a window resize, take the visible width now.
    shown.querySelectorAll('.js-plotly-plot').forEach(function(el){
      var p = Plotly.Plots.resize(el); if (p && p.catch) { p.catch(function(){}); } });
    return draw(shown).then(function(){ shown.dataset.drawn = 'true'; });
  }
  buttons.forEach(function(b){ b.addEventListener('click', function(){
    history.replaceState(null, '', '#' + b.dataset.target); show(b.dataset.target); }); });
  show(location.hash.slice(1)).then(function(){
    document.documentElement.setAttribute('data-dashboard-ready', 'true'); });
})();
"""


@dataclass
class Section:
    """Everything shown for one GPU model."""

    gpu: str
    results: pd.DataFrame
    timelines: pd.DataFrame
    asv: pd.DataFrame
    training: pd.DataFrame
    notices: list[str] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return "gpu-" + slug(self.gpu)


class _Figures:
    """Figures as a div plus their JSON, drawn by the page's script when their tab shows."""

    def __init__(self) -> None:
        self.count = 0

    def html(self, fig: go.Figure | None, div_id: str, empty: str, note: str = "") -> str:
        if fig is None:
            return f'<p class="empty">{_esc(empty)}</p>'
        self.count += 1
        # "<" only occurs inside JSON strings, where \u003c means the same: no "</script>".
        data = pio.to_json(fig, validate=True).replace("<", "\\u003c")
        note_html = f'<p class="fig-note">{_esc(note)}</p>' if note else ""
        return (
            f'<div class="figure"><div id="{div_id}" class="plotly-graph-div" '
            f'style="height:{int(fig.layout.height)}px;width:100%"></div>'
            f'<script type="application/json" class="figure-data" data-for="{div_id}">{data}'
            f"</script></div>{note_html}"
        )


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (then they are trusted HTML)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(c if raw else f"<td>{_esc(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _claim_value(claim: str, value: float, against: float) -> str:
    if value is None or math.isnan(value):
        return "—"
    if claim == "accuracy":
        return f"{100 * value:.3g}% (naive {_fmt(100 * against, 3)}%)"
    return f"{value:.3g}×"


def claims_html(claims: pd.DataFrame, colours: dict[str, str]) -> str:
    """The claims table of one GPU: verdict, best and worst cell for each claim."""
    if claims.empty:
        return (
            '<p class="empty">No claims to judge: these results hold no <code>rampde-*</code> '
            "competitor.</p>"
        )
    rows = []
    records = claims.to_dict("records")
    group_size = claims.groupby("competitor", sort=False).size().to_dict()
    for i, r in enumerate(records):
        held = r["held"]
        verdict, css = (
            ("held", "held") if held is True else
            ("not held", "not-held") if held is False else
            ("reported" if r["claim"] == "speedup_tf32" and r["n_cells"] else "no verdict",
             "no-verdict")
        )  # fmt: skip
        note = f"<br><small>{_esc(r['note'])}</small>" if r["note"] else ""
        colour = colours.get(r["competitor"], "#777")
        swatch = f'<span class="swatch" style="background:{colour}"></span>'
        first = i == 0 or records[i - 1]["competitor"] != r["competitor"]
        best = _claim_value(r["claim"], r["best"], r["best_against"])
        worst = _claim_value(r["claim"], r["worst"], r["worst_against"])
        meeting = r["n_meeting"] if r["claim"] != "speedup_tf32" else "—"
        rows.append([
            f'<td class="name" rowspan="{group_size[r["competitor"]]}">{swatch}'
            f"{_esc(r['competitor'])}</td>" if first else "",
            f'<td class="claim">{_esc(r["claim_text"])}<br><small>{_esc(r["rule"])}</small></td>',
            f'<td class="name">{_esc(r["against"])}</td>',
            f'<td class="{css}">{verdict}{note}</td>',
            f'<td class="value"><b>{best}</b><br><small>{_esc(r["best_cell"])}</small></td>',
            f'<td class="value"><b>{worst}</b><br><small>{_esc(r["worst_cell"])}</small></td>',
            f'<td class="num">{meeting} / {r["n_cells"]}</td>',
        ])  # fmt: skip
    header = ["competitor", "claim", "against", "verdict", "best (its cell)", "worst (its cell)",
              "cells meeting"]  # fmt: skip
    return f'<div class="scroll">{_table(header, rows, raw=True)}</div>'


def _short_path(path: str) -> str:
    """``…/<folder>/<file>``: enough to tell the results files apart."""
    parts = Path(path).parts
    return str(Path(*parts[-2:])) if len(parts) > 2 else path


def _or_dash(value: object) -> str:
    return str(value) if str(value) else "—"


def env_html(results: pd.DataFrame) -> str:
    """The environments the results were measured in, with their competitors, rows and dates."""
    cols = [c for c in ENV_COLUMNS if c != "gpu"]
    rows = []
    for key, part in results.groupby(cols + ["source"], dropna=False, sort=True):
        env = dict(zip(cols, map(_or_dash, key)))
        stamps = sorted(t for t in part["timestamp"] if t)
        when = "—" if not stamps else stamps[0] if stamps[0] == stamps[-1] else (
            f"{stamps[0]} … {stamps[-1]}")  # fmt: skip
        rows.append([
            f"{env['device']} (compute capability {env['compute_capability']})",
            f"driver {env['driver']}, CUDA {env['cuda']}",
            f"torch {env['torch']}, torchdiffeq {env['torchdiffeq']}, rampde {env['rampde']}",
            f"TF32 matmul {env['tf32']}, cuDNN TF32 {env['cudnn_tf32']}, "
            f"cuDNN benchmark {env['cudnn_benchmark']}",
            env["commit"], _short_path(str(key[-1])),
            ", ".join(competitor_order(part["competitor"])), str(len(part)), when,
        ])  # fmt: skip
    header = ["device", "driver, CUDA", "versions", "TF32 and cuDNN", "commit", "results file",
              "competitors", "rows", "measured"]  # fmt: skip
    return f'<div class="scroll">{_table(header, rows)}</div>'


def _status_summary(results: pd.DataFrame) -> str:
    counts = results["status"].value_counts()
    parts = [f"{int(n)} {s}" for s, n in counts.items()]
    return f"{len(results)} cells: " + ", ".join(parts)


def _failures_html(results: pd.DataFrame) -> str:
    bad = results[results["status"] != "ok"]
    if bad.empty:
        return ""
    rows = [[r["competitor"], cell_label(r), r["status"], r["message"][:200]]
            for r in bad.to_dict("records")]  # fmt: skip
    table = _table(["competitor", "cell", "status", "message"], rows)
    what = "1 cell did" if len(bad) == 1 else f"{len(bad)} cells did"
    return f"<details><summary>{what} not run to completion</summary>{table}</details>"


def training_html(training: pd.DataFrame, colours: dict[str, str], figures: _Figures,
                  anchor: str) -> str:  # fmt: skip
    """The training runs of one GPU: ``rampde.bench.training``'s figures and parity table."""
    try:
        from rampde.bench.training import parity_table, training_figures
    except ImportError as err:
        log.warning("training curves left out: %s", err)
        return f'<p class="empty">Training curves need rampde.bench.training ({_esc(err)}).</p>'
    try:
        drawn = training_figures(training, colors=colours)
        table = parity_table(training)
    except (KeyError, ValueError, TypeError) as err:
        log.warning("training curves could not be drawn: %s", err)
        return f'<p class="empty">The training results could not be drawn: {_esc(err)}.</p>'
    parts = [_parity_html(table)]
    for i, (title, fig) in enumerate(drawn):
        _base_layout(fig, title, 400)
        parts.append(figures.html(fig, f"{anchor}-training-{i}", ""))
    return "\n".join(parts)


def _parity_html(table: pd.DataFrame) -> str:
    """The final test metric of each training run against torchdiffeq-fp32's."""
    rows = [[
        r["task"], r["competitor"], f"{r['metric_name']} {_fmt(r['final_metric'])}",
        _fmt(r["delta_vs_fp32"]), _fmt(r["wall_s"]),
        f"{r['peak_mem_bytes'] / 2**20:.4g}" if _finite(r["peak_mem_bytes"]) else "—",
        _fmt(r["skipped_steps"]), _fmt(r["scaler_retries"]), _fmt(r["epochs"]), _fmt(r["seeds"]),
    ] for r in table.to_dict("records")]  # fmt: skip
    header = ["task", "competitor", "final test metric", "Δ vs torchdiffeq-fp32", "wall (s)",
              "peak (MiB)", "skipped steps", "adjoint retries", "epochs", "seeds"]  # fmt: skip
    return f'<div class="scroll">{_table(header, rows)}</div>'


def targets_html(summary: pd.DataFrame) -> str:
    """Issue 8's targets on one GPU: one row per target (``targets.targets_summary``), marked met,
    missed or not measured, with the figure furthest from its threshold and that figure's cell."""
    from rampde.bench.targets import format_value

    if summary.empty:
        return '<p class="empty">No target could be judged: no results for this GPU.</p>'
    css = {"met": "held", "missed": "not-held", "not measured": "no-verdict"}
    rows = []
    for r in summary.to_dict("records"):
        worst = format_value(r["target"], r["worst"])
        where = f"<br><small>{_esc(r['worst_competitor'])}, {_esc(r['worst_cell'])}</small>" if (
            r["worst_competitor"]) else ""  # fmt: skip
        note = f"<br><small>{_esc(r['note'])}</small>" if r["note"] else ""
        rows.append([
            f'<td class="claim">{_esc(r["description"])}<br><small>{_esc(r["target"])}</small></td>',
            f'<td class="{css[r["status"]]}">{_esc(r["status"])}{note}</td>',
            f'<td class="value"><b>{_esc(worst)}</b>{where}</td>',
            f'<td class="num">{_esc(r["comparison"])} {_esc(format_value(r["target"], r["threshold"]))}</td>',
            f'<td class="num">{r["met_cells"]} / {r["missed_cells"]} / {r["unmeasured_cells"]}</td>',
        ])  # fmt: skip
    header = ["target", "verdict", "worst measured (its cell)", "needs", "met / missed / not measured"]
    return f'<div class="scroll targets">{_table(header, rows, raw=True)}</div>'


def section_html(section: Section, claims: pd.DataFrame, colours: dict[str, str],
                 figures: _Figures, targets: pd.DataFrame | None = None) -> str:  # fmt: skip
    """One GPU model's tab: claims, targets, time, memory, accuracy, timelines, training, asv, env.

    ``targets`` is this GPU's ``targets.targets_summary``; None leaves the targets table out.
    """
    res, sid = section.results, section.anchor
    cells = collapse_cells(res) if not res.empty else res
    parts = [f'<section class="gpu" id="{sid}"><h2>{_esc(section.gpu)}</h2>']
    if not res.empty:
        parts.append(f'<p class="note">{_esc(_status_summary(res))}</p>')
    parts += [f'<div class="notice">{_esc(n)}</div>' for n in section.notices]
    if not res.empty:
        where = "on the CPU" if section.gpu == "cpu" else "on this GPU"
        parts.append(f"<h3>Claims of the paper {where}</h3>")
        parts.append(claims_html(claims, colours))
        parts.append(
            '<p class="note">Speedup = time of the baseline / time of rampde in the same cell '
            "(workload, width, batch, steps); memory ratio = peak allocator memory of rampde / "
            "torchdiffeq-fp32's; accuracy = relative error of the parameter gradient against "
            "fp64. Best and worst are over the cells where both ran.</p>"
        )
        if targets is not None:
            parts.append("<h3>Performance targets</h3>")
            parts.append(targets_html(targets))
            parts.append(
                '<p class="note">Each target is judged on its named competitor (speed: rampde-bf16 '
                "against torchdiffeq-tf32, rampde-fp16 against torchdiffeq-fp32; memory: rampde-fp16 and "
                "rampde-bf16, the default storage; accuracy and finiteness: every rampde-* competitor) "
                "from the latest row of each cell; the worst "
                "figure is the one furthest from the threshold. <code>rampde-bench targets</code> "
                "prints every cell, and the fastest variant of each precision.</p>"
            )
        parts.append("<h3>Time</h3>")
        time_y = "time per forward+backward (ms)"
        parts.append(figures.html(
            line_figure(cells, "steps", "time_ms_median", colours, ytitle=time_y,
                        title="Time against the number of steps"),
            f"{sid}-time-steps", "No successful timing to plot against steps.",
        ))  # fmt: skip
        parts.append(figures.html(
            line_figure(cells, "width", "time_ms_median", colours, ytitle=time_y,
                        title="Time against width"),
            f"{sid}-time-width", "No successful timing to plot against width.",
        ))  # fmt: skip
        parts.append("<h3>Memory</h3>")
        if res["peak_mem_bytes"].isna().all():
            where = "on the CPU" if section.gpu == "cpu" else "in these results"
            parts.append(f'<p class="empty">Memory was not measured {where}: peak_mem_bytes '
                         "is empty for every cell.</p>")  # fmt: skip
        else:
            parts.append(figures.html(memory_bars(cells, colours), f"{sid}-mem-bars", ""))
            top = float(res["peak_mem_bytes"].max())
            div, unit = _mem_unit(top)
            parts.append(figures.html(
                line_figure(cells, "steps", "peak_mem_bytes", colours, scale=div,
                            ytitle=f"peak memory ({unit})",
                            title="Peak memory against the number of steps"),
                f"{sid}-mem-steps", "No memory measurement to plot against steps.",
            ))  # fmt: skip
        parts.append("<h3>Accuracy and speed</h3>")
        parts.append(figures.html(
            accuracy_figure(cells, colours), f"{sid}-accuracy",
            "No cell has both a timing and a gradient error.",
        ))  # fmt: skip
        parts.append("<h3>NVML timelines</h3>")
        parts.append(figures.html(
            timeline_figure(section.timelines, colours), f"{sid}-timelines",
            "No NVML timeline was recorded for this GPU (no timelines.csv, or no NVML).",
        ))  # fmt: skip
    if not section.training.empty:
        parts.append("<h3>Training</h3>")
        parts.append(training_html(section.training, colours, figures, sid))
    if section.asv is not None:
        parts.append("<h3>asv history</h3>")
        parts.append(figures.html(
            asv_figure(section.asv, colours), f"{sid}-asv",
            "The asv results hold no finite measurement for this GPU model.",
        ))  # fmt: skip
    if not res.empty:
        parts.append("<h3>Environment</h3>")
        parts.append(env_html(res))
        parts.append(_failures_html(res))
    parts.append("</section>")
    return "\n".join(parts)


def page_html(sections_html: Sequence[tuple[str, str, str]], notices: Sequence[str],
              sources: Sequence[str]) -> str:  # fmt: skip
    """The whole page: header, notices, GPU tabs, sections, plotly.js once."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tabs = "".join(
        f'<button type="button" data-target="{anchor}" aria-selected="false">{_esc(name)}</button>'
        for name, anchor, _ in sections_html
    )
    body_sections = "\n".join(body for _, _, body in sections_html)
    notice_html = "".join(f'<div class="notice">{_esc(n)}</div>' for n in notices)
    src = ", ".join(_esc(s) for s in sources) or "none"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rampde benchmark dashboard</title>
<style>{_CSS}</style>
<script>{_ERROR_CATCHER}</script>
<script>{plotly.offline.get_plotlyjs()}</script>
</head><body>
<header><h1>rampde benchmark dashboard</h1>
<p>Speed, memory and gradient accuracy of rampde against torchdiffeq and the other recipes,
per GPU model. Built {now} from: {src}</p></header>
<main>
<div id="js-errors" hidden></div>
{notice_html}
<nav class="tabs" aria-label="GPU model">{tabs}</nav>
{body_sections}
</main>
<script>{_TABS}</script>
</body></html>
"""


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and os.replace."""
    atomic_write(path, lambda handle: handle.write(text))


def _sections(results: pd.DataFrame, timelines: pd.DataFrame, asv: pd.DataFrame | None,
              training: pd.DataFrame) -> list[Section]:  # fmt: skip
    """One section per GPU model in the results, plus asv machines no results match."""
    names = {slug(g): g for g in sorted(results["gpu"].unique())} if not results.empty else {}
    for g in sorted(training["gpu"].unique()):
        names.setdefault(slug(g), g)
    if asv is not None:
        for m in sorted(asv["machine"].unique()):
            names.setdefault(slug(m), m)
    sections = []
    for key, gpu in sorted(names.items(), key=lambda kv: (kv[1] == "cpu", kv[1].lower())):
        res = results[results["gpu"].map(slug) == key] if not results.empty else results
        section = Section(
            gpu=gpu, results=res,
            timelines=timelines[timelines["gpu"].map(slug) == key] if len(timelines) else timelines,
            asv=None if asv is None else asv[asv["machine"].map(slug) == key],
            training=training[training["gpu"].map(slug) == key],
        )  # fmt: skip
        section.notices = _section_notices(section)
        sections.append(section)
    return sections


def _section_notices(section: Section) -> list[str]:
    """What is missing in one GPU's results, in words."""
    res = section.results
    if res.empty:
        return ["No sweep results for this GPU model; only the data below."]
    notes = []
    ok = res[res["status"] == "ok"]
    if ok.empty:
        notes.append("Partial results: no cell ran successfully on this GPU.")
    present = set(ok["competitor"])
    missing = [b for b in (BASELINE_FP32, BASELINE_TF32) if b not in present]
    if missing:
        them = "them" if len(missing) > 1 else "it"
        notes.append(f"Partial results: no successful cell of {' or '.join(missing)}, "
                     f"so the claims against {them} cannot be judged.")  # fmt: skip
    if not any(c.startswith(OURS_PREFIX) for c in present):
        notes.append("Partial results: no successful rampde-* cell on this GPU.")
    if ok["time_ms_median"].isna().all() and not ok.empty:
        notes.append("Partial results: no timing (time_ms_median) in these results.")
    if res["peak_mem_bytes"].isna().all():
        if section.gpu == "cpu":
            log.info("memory was not measured on the CPU")
        else:
            notes.append("Peak memory was not measured in these results.")
    return notes


def _targets_summary(df: pd.DataFrame) -> pd.DataFrame | None:
    """Issue 8's targets per GPU model (``targets.targets_summary``); None without results."""
    if df.empty:
        return None
    from rampde.bench.targets import evaluate_targets, targets_summary

    return targets_summary(evaluate_targets(df))


def build_dashboard(
    results: list[Path],
    out: Path,
    asv_results: Path | None = None,
    training: list[Path] | None = None,
) -> Path:
    """Write the dashboard of ``results`` (and asv history, training curves) to ``out``.

    One self-contained HTML file (plotly.js inlined once), written atomically; returns its path
    (``out/dashboard.html`` when ``out`` is an existing folder). Missing files raise
    FileNotFoundError; empty or partial results give a page that says what is missing.
    """
    out = Path(out)
    if out.is_dir():
        out = out / "dashboard.html"
    paths = [Path(p) for p in results]
    df, notices = load_results(paths)
    timelines = load_timelines(paths, df)
    asv = load_asv(Path(asv_results)) if asv_results is not None else None
    train, train_notices = load_training([Path(p) for p in training or []])
    notices += train_notices
    if df.empty:
        where = ", ".join(map(str, paths)) or "no results file given"
        notices.insert(0, f"No benchmark results to show ({where}): run 'rampde-bench run' first.")
    if asv is not None and asv.empty:
        notices.append(f"The asv results folder {asv_results} holds no measurement.")
    for notice in notices:
        log.warning("%s", notice)
    sections = _sections(df, timelines, asv, train)
    everyone = set(df["competitor"]) | set(train["competitor"])
    if asv is not None:
        everyone |= set(asv["competitor"]) - {""}
    colours = competitor_colours(everyone)
    claims = compute_claims(df)
    targets = _targets_summary(df)
    figures = _Figures()
    bodies = []
    for section in sections:
        for notice in section.notices:
            log.warning("%s: %s", section.gpu, notice)
        mine = claims[claims["gpu"].map(slug) == slug(section.gpu)] if len(claims) else claims
        goals = None if targets is None else targets[targets["gpu"].map(slug) == slug(section.gpu)]
        bodies.append((section.gpu, section.anchor, section_html(section, mine, colours, figures, goals)))
    if not sections:
        nothing = '<p class="empty">Nothing to show: no results, no asv history.</p>'
        body = f'<section class="gpu" id="gpu-none">{nothing}</section>'
        bodies.append(("no data", "gpu-none", body))
    sources = [str(p) for p in paths] + ([str(asv_results)] if asv_results else [])
    sources += [str(p) for p in training or []]
    _write_atomic(out, page_html(bodies, notices, sources))
    log.info("dashboard with %d figures written to %s", figures.count, out)
    return out
