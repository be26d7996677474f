"""The paper's claims and their thresholds, judged per GPU model on the results' cells."""

from __future__ import annotations

import math

import pandas as pd

from ..results import BASELINE_FP32, BASELINE_TF32, NAIVE, OURS_PREFIX, claims, latest_cells
from .schema import CELL_COLUMNS
from .style import cell_label, competitor_order, precision_of

# --------------------------------------------------------------------------------------------
# Claims of the paper and their thresholds
# --------------------------------------------------------------------------------------------

NAIVE_RECIPE = NAIVE  # the naive autocast recipe of each 16-bit precision
SPEEDUP_MIN = 1.8  # "about 2x faster" than torchdiffeq-fp32
MEMORY_RATIO_MAX = 0.55  # "about half the memory" of torchdiffeq-fp32
GRAD_ERR_MAX = {"fp16": 0.01, "bf16": 0.03}  # "accuracy kept": relative error bound

CLAIM_TEXT = {
    "speedup": ("about 2× faster", f"speedup ≥ {SPEEDUP_MIN} in the best cell"),
    "speedup_tf32": ("speed against TF32", "reported, no claim"),
    "memory": ("about half the memory", f"memory ratio ≤ {MEMORY_RATIO_MAX} in the best cell"),
    "accuracy": (
        "accuracy kept",
        "gradient error ≤ the naive recipe's and ≤ {limit:g}% in every cell",
    ),
}


# ============================================================================================
# Cells and claims
# ============================================================================================


# The claims judged on ``results.claims``' per-cell columns: (claim, baseline, value column,
# baseline's column or None, the results column behind it for the notes). ``compute_claims`` adds
# the accuracy claim of a 16-bit competitor against its naive recipe.
PLAN = (
    ("speedup", BASELINE_FP32, "speedup_vs_fp32", None, "time_ms_median"),
    ("speedup_tf32", BASELINE_TF32, "speedup_vs_tf32", None, "time_ms_median"),
    ("memory", BASELINE_FP32, "mem_ratio_vs_fp32", None, "peak_mem_bytes"),
)


def meets_claim(claim: str, value, other=math.nan, limit: float = math.nan):
    """Whether a cell's figure meets its claim's threshold: a speedup at least ``SPEEDUP_MIN``, a
    memory ratio at most ``MEMORY_RATIO_MAX``, a gradient error at most the naive recipe's
    (``other``) and at most ``limit``. Takes floats or Series alike."""
    if claim in ("speedup", "speedup_tf32"):
        return value >= SPEEDUP_MIN
    if claim == "memory":
        return value <= MEMORY_RATIO_MAX
    return (value <= other) & (value <= limit)


def _judged(per_cell: pd.DataFrame, value: str, other: str | None) -> pd.DataFrame:
    """The cells that allow a verdict: columns ``value``, ``other`` (the naive recipe's error, or
    NaN) and ``cell`` (its label); a non-finite naive run is already an infinite error there."""
    keep = per_cell[value].notna()
    if other is not None:
        keep &= per_cell[other].notna()
    rows = per_cell[keep].sort_values(list(CELL_COLUMNS), kind="stable").reset_index(drop=True)
    return pd.DataFrame({
        "value": rows[value].astype(float),
        "other": rows[other].astype(float) if other is not None else math.nan,
        "cell": [cell_label(r) for r in rows[list(CELL_COLUMNS)].to_dict("records")],
    })  # fmt: skip


def _claim_row(
    gpu: str, ours: str, claim: str, against: str, judged: pd.DataFrame, limit: float = math.nan
) -> dict:
    """One claim of one competitor on one GPU, judged over the cells of ``_judged``.

    ``limit`` is the gradient-error bound of the accuracy claim (a fraction).
    """
    text, rule = CLAIM_TEXT[claim]
    rule = rule.format(limit=100 * limit)
    row = {
        "gpu": gpu, "competitor": ours, "claim": claim, "claim_text": text, "against": against,
        "rule": rule, "n_cells": len(judged), "n_meeting": 0, "best": math.nan,
        "best_cell": "", "best_against": math.nan, "worst": math.nan, "worst_cell": "",
        "worst_against": math.nan, "held": None, "note": "", "baseline_oom": 0,
    }  # fmt: skip
    if judged.empty:
        return row
    value = judged["value"]
    faster = claim in ("speedup", "speedup_tf32")  # higher is better; memory and error: lower
    best_i, worst_i = (value.idxmax(), value.idxmin()) if faster else (value.idxmin(), value.idxmax())
    meets = meets_claim(claim, value, judged["other"], limit)
    row.update(
        n_meeting=int(meets.sum()),
        best=float(value[best_i]), best_cell=judged.at[best_i, "cell"],
        worst=float(value[worst_i]), worst_cell=judged.at[worst_i, "cell"],
    )  # fmt: skip
    if claim == "accuracy":
        row.update(best_against=float(judged.at[best_i, "other"]))
        row.update(worst_against=float(judged.at[worst_i, "other"]))
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


def compute_claims(df: pd.DataFrame, per_cell: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's claims per GPU model and ``rampde-*`` competitor, judged on the results.

    The figures are ``results.claims``' per cell (the newest ok row of each cell): speedup =
    baseline time / our time in the same cell (same workload, method, width, batch, steps); memory
    ratio = our peak / torchdiffeq-fp32's; accuracy compares ``grad_err_params`` with the naive
    autocast recipe of the same precision. ``held`` is True/False, or None when no cell allows a
    verdict (``note`` says why) or when the row is reported without a claim. The best and the
    worst cell are named with their value; ``baseline_oom`` counts the cells where ours ran and
    the baseline ran out of memory (they have no ratio). ``per_cell`` is ``results.claims(df)``
    when the caller has it already.
    """
    rows: list[dict] = []
    if df.empty:
        return pd.DataFrame(rows, columns=list(_claim_row("", "", "speedup", "", pd.DataFrame())))
    cells = latest_cells(df)
    per_cell = claims(df) if per_cell is None else per_cell
    for gpu in sorted(cells["gpu"].unique()):
        gpu_cells = cells[cells["gpu"] == gpu]
        names = competitor_order(gpu_cells["competitor"])
        for ours in [c for c in names if c.startswith(OURS_PREFIX)]:
            precision = (gpu_cells.loc[gpu_cells["competitor"] == ours, "precision"].iloc[0]
                         or precision_of(ours))  # fmt: skip
            plan = list(PLAN)
            if precision in NAIVE_RECIPE:
                plan.append(("accuracy", NAIVE_RECIPE[precision], "grad_err", "naive_grad_err", "grad_err_params"))
            limit = GRAD_ERR_MAX.get(precision, math.nan)
            mine = per_cell[(per_cell["gpu"] == gpu) & (per_cell["competitor"] == ours)]
            for claim, against, value, other, metric in plan:
                judged = _judged(mine, value, other)
                row = _claim_row(gpu, ours, claim, against, judged, limit)
                notes = [_no_cells_note(gpu_cells, ours, against, metric)] if judged.empty else []
                row["baseline_oom"] = _baseline_oom_cells(gpu_cells, ours, against)
                if row["baseline_oom"] and claim != "accuracy":
                    n = row["baseline_oom"]
                    notes.append(f"also ran in {n} cell{'s' if n > 1 else ''} where "
                                 f"{against} ran out of memory")  # fmt: skip
                row["note"] = "; ".join(notes)
                rows.append(row)
    return pd.DataFrame(rows)
