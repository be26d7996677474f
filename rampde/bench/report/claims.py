"""The paper's claims and their thresholds, judged per GPU model on the results' cells."""

from __future__ import annotations

import math

import pandas as pd

from .schema import CELL_COLUMNS, NUMERIC_COLUMNS
from .style import cell_label, competitor_order, precision_of

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
