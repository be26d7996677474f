"""The performance targets, judged from a results table (one GPU model at a time).

Each ``Target`` names a metric, a threshold, the competitors it judges and the cells it needs
(rk4; MLP batch 2048; conv batch 64 on 32x32 images; steps as ``steps``):

- speed, ``rampde-bf16`` over ``torchdiffeq-tf32``: >= 1.5x at MLP width 2048 and conv 128
  channels (64 steps), >= 1.0x at MLP width 1024 (64 steps);
- speed, ``rampde-fp16`` over ``torchdiffeq-fp32``: >= 2x at MLP width 2048 and conv 128 channels
  (64 steps), never slower at MLP width 256 (every step count measured);
- memory, ``rampde-fp16`` and ``rampde-bf16`` (the default storage): allocator peak <= 0.5x
  ``torchdiffeq-fp32``'s in every cell, <= 0.15x in every cell of 64 steps or more (the fast
  variants keep every step's 16-bit activations by design, about half of backprop's memory:
  they are judged on speed and accuracy);
- accuracy: parameter-gradient error against fp64 <= 1% (fp16) and <= 3% (bf16) in every cell, for
  every ``rampde-*`` competitor of that precision; no row with status ``nonfinite`` for any of them;
- efficiency: at MLP width 2048 (64 steps), achieved TFLOP/s (the ``tflops`` column) >= 40% of
  the GPU's dense fp16 tensor-core peak (``measure.dense_fp16_peak_tflops``).

``evaluate_targets`` gives one row per (GPU, target, competitor, cell); a cell that was not
measured is a row that says so (``met`` NaN), never left out. The speed and efficiency targets
also get a "best variant" row per cell: the fastest ``rampde-*`` competitor of the same precision
(``rampde-bf16-fast`` is one); only the named competitor's rows decide the target, and its note
says when only a variant meets it. Ratios come from ``results.claims`` and the latest row of each
cell (``results.latest_cells``): nothing here re-derives what the results module already computes.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .measure import dense_fp16_peak_tflops
from .results import (
    BASELINE_FP32,
    BASELINE_TF32,
    CELL_KEYS,
    OURS_PREFIX,
    claims,
    latest_cells,
    normalise,
)

log = logging.getLogger(__name__)

NAN = math.nan
TARGET_COLUMNS = ["gpu", "target", "description", "competitor", "role", "cell", "measured", "threshold",
                  "comparison", "met", "note"]
SUMMARY_COLUMNS = ["gpu", "target", "description", "status", "worst", "worst_competitor", "worst_cell",
                   "comparison", "threshold", "cells", "met_cells", "missed_cells", "unmeasured_cells", "note"]
NAMED, BEST = "named", "best variant"
MET, MISSED, NOT_MEASURED = "met", "missed", "not measured"
MET_WHERE_MEASURED = "met where measured"  # a target's status: no cell missed, some met, some not measured
# The rampde competitors the every-cell targets expect on every GPU (the perf suite runs them);
# any other rampde-* competitor present in the results is judged too.
EXPECTED_RAMPDE = ("rampde-fp16", "rampde-bf16", "rampde-fp16-fast", "rampde-bf16-fast")
CellKey = tuple  # (workload, method, width, batch, steps); steps None: none measured


@dataclass(frozen=True)
class Cell:
    """A cell a target names; ``steps=None`` stands for every step count measured there."""

    workload: str
    width: int
    batch: int
    steps: int | None
    method: str = "rk4"


def mlp(width: int, steps: int | None = 64) -> Cell:
    """The MLP cell of the issue: batch 2048."""
    return Cell("mlp", width, 2048, steps)


def conv(width: int, steps: int | None = 64) -> Cell:
    """The conv cell of the issue: batch 64 on 32x32 images."""
    return Cell("conv", width, 64, steps)


@dataclass(frozen=True)
class Target:
    """One target: ``metric comparison threshold`` for its competitors in its cells.

    ``competitors`` empty: every rampde-* competitor (of ``precision`` when given). ``cells``
    empty: every cell measured on the GPU (with at least ``min_steps`` steps). ``best_variant``:
    also report the best rampde-* competitor of the named one's precision in each cell.
    """

    id: str
    description: str
    metric: str  # speedup | memory | grad_err | finite | efficiency
    comparison: str  # ">=" | "<="
    threshold: float
    competitors: tuple[str, ...] = ()
    precision: str = ""
    baseline: str = ""
    cells: tuple[Cell, ...] = ()
    min_steps: int = 0
    best_variant: bool = False


TARGETS: tuple[Target, ...] = (
    Target("speed-bf16-vs-tf32", "rampde-bf16 >= 1.5x faster than torchdiffeq-tf32 at MLP 2048 and conv 128 "
           "(64 steps)", "speedup", ">=", 1.5, ("rampde-bf16",), baseline=BASELINE_TF32,
           cells=(mlp(2048), conv(128)), best_variant=True),
    Target("speed-bf16-vs-tf32-w1024", "rampde-bf16 at least as fast as torchdiffeq-tf32 at MLP 1024 (64 steps)",
           "speedup", ">=", 1.0, ("rampde-bf16",), baseline=BASELINE_TF32, cells=(mlp(1024),), best_variant=True),
    Target("speed-fp16-vs-fp32", "rampde-fp16 >= 2x faster than torchdiffeq-fp32 at MLP 2048 and conv 128 "
           "(64 steps)", "speedup", ">=", 2.0, ("rampde-fp16",), baseline=BASELINE_FP32,
           cells=(mlp(2048), conv(128)), best_variant=True),
    Target("speed-fp16-vs-fp32-w256", "rampde-fp16 never slower than torchdiffeq-fp32 at MLP 256 (every step "
           "count)", "speedup", ">=", 1.0, ("rampde-fp16",), baseline=BASELINE_FP32, cells=(mlp(256, None),),
           best_variant=True),
    Target("memory-half", "rampde-fp16/bf16 peak memory <= 0.5x torchdiffeq-fp32's in every cell", "memory", "<=",
           0.5, ("rampde-fp16", "rampde-bf16"), baseline=BASELINE_FP32),
    Target("memory-64-steps", "rampde-fp16/bf16 peak memory <= 0.15x torchdiffeq-fp32's at 64 steps or more",
           "memory", "<=", 0.15, ("rampde-fp16", "rampde-bf16"), baseline=BASELINE_FP32, min_steps=64),
    Target("accuracy-fp16", "rampde fp16 parameter-gradient error against fp64 <= 1% in every cell", "grad_err",
           "<=", 0.01, precision="fp16"),
    Target("accuracy-bf16", "rampde bf16 parameter-gradient error against fp64 <= 3% in every cell", "grad_err",
           "<=", 0.03, precision="bf16"),
    Target("finite", "no rampde-* run returned inf or NaN (rows with status nonfinite)", "finite", "<=", 0.0),
    Target("efficiency", "rampde at MLP 2048 (64 steps) reaches >= 40% of the GPU's dense fp16 tensor-core peak",
           "efficiency", ">=", 0.4, ("rampde-fp16", "rampde-bf16"), cells=(mlp(2048),), best_variant=True),
)


def get_target(target_id: str) -> Target:
    """The target named ``target_id``; ``KeyError`` listing the known ones."""
    for target in TARGETS:
        if target.id == target_id:
            return target
    raise KeyError(f"unknown target {target_id!r}; known: {', '.join(t.id for t in TARGETS)}")


# ----------------------------------------------------------------------------- text


def cell_text(key: CellKey) -> str:
    """``mlp w=2048 b=2048 N=64`` (the method named when it is not rk4; ``N=any`` when no step
    count was measured)."""
    workload, method, width, batch, steps = key
    extra = f" {method}" if method and method != "rk4" else ""
    return f"{workload}{extra} w={width} b={batch} N={'any' if steps is None else steps}"


def format_value(target_id: str, value: float) -> str:
    """A measured figure or threshold in the target's unit: 1.62x, 0.213%, 43.1%, 2 (rows)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    metric = get_target(target_id).metric
    if metric in ("speedup", "memory"):
        return f"{value:.3g}x"
    if metric in ("grad_err", "efficiency"):
        return f"{100 * value:.3g}%"
    return f"{value:g}"


def needs(row: dict) -> str:
    """A row's threshold with its comparison: ``>= 1.5x``."""
    return f"{row['comparison']} {format_value(row['target'], row['threshold'])}"


def verdict(met: Any) -> str:
    """``met``, ``missed`` or ``not measured`` for a row's ``met``."""
    return MET if met is True else MISSED if met is False else NOT_MEASURED


def _precision_of(name: str) -> str:
    found = re.search(r"(fp16|bf16|fp32|tf32|fp64)", name)
    return found.group(1) if found else ""


# ----------------------------------------------------------------------------- one GPU's results


def _key(row: dict) -> CellKey:
    """A row's cell without its GPU: ``results.CELL_KEYS[1:]``, text and integers."""
    workload, method, width, batch, steps = (row[k] for k in CELL_KEYS[1:])
    return str(workload), str(method), int(width), int(batch), int(steps)


class _GpuResults:
    """The results of one GPU model, indexed by competitor and cell."""

    def __init__(self, gpu: str, rows: pd.DataFrame, latest: pd.DataFrame, per_cell: pd.DataFrame) -> None:
        self.gpu = gpu
        grid = ["width", "batch", "steps"]
        self.all_rows = [r for r in rows.to_dict("records") if not any(pd.isna(r[c]) for c in grid)]
        latest_rows = [r for r in latest.to_dict("records") if not any(pd.isna(r[c]) for c in grid)]
        self.latest = {(r["competitor"], _key(r)): r for r in latest_rows}
        self.claims = {(r["competitor"], _key(r)): r for r in per_cell.to_dict("records")}
        self.cells = sorted({_key(r) for r in latest_rows})
        self.precision = {r["competitor"]: r["precision"] or _precision_of(r["competitor"]) for r in latest_rows}
        present = sorted({r["competitor"] for r in latest_rows if r["competitor"].startswith(OURS_PREFIX)})
        self.rampde = list(EXPECTED_RAMPDE) + [c for c in present if c not in EXPECTED_RAMPDE]

    def row(self, competitor: str, key: CellKey) -> dict | None:
        return self.latest.get((competitor, key))

    def precision_of(self, competitor: str) -> str:
        return self.precision.get(competitor) or _precision_of(competitor)

    def ours(self, precision: str = "") -> list[str]:
        """The rampde competitors judged here (of ``precision`` when given)."""
        return [c for c in self.rampde if not precision or self.precision_of(c) == precision]

    def steps_at(self, cell: Cell) -> list[int]:
        """The step counts measured in ``cell``'s workload, method, width and batch."""
        base = (cell.workload, cell.method, cell.width, cell.batch)
        return sorted({k[4] for k in self.cells if k[:4] == base})


# ----------------------------------------------------------------------------- judging one row

Judged = tuple[float, Any, str]  # measured, met (True/False/NaN), note


def _compare(target: Target, value: float) -> Any:
    if value is None or math.isnan(value):
        return NAN
    return bool(value >= target.threshold) if target.comparison == ">=" else bool(value <= target.threshold)


def _against_baseline(target: Target, view: _GpuResults, competitor: str, key: CellKey) -> Judged:
    """Speed or memory of ``competitor`` against the target's baseline, from ``results.claims``."""
    where = cell_text(key)
    ours, base = view.row(competitor, key), view.row(target.baseline, key)
    if ours is None:
        return NAN, NAN, f"not measured: {competitor} missing at {where}"
    if base is None:
        return NAN, NAN, f"not measured: {target.baseline} missing at {where}"
    if ours["status"] == "oom" and base["status"] == "ok":
        return NAN, False, f"oom: {competitor} ran out of memory where {target.baseline} ran"
    failed = [f"{name} {row['status']}" for name, row in ((competitor, ours), (target.baseline, base))
              if row["status"] != "ok"]
    if failed:
        return NAN, NAN, "not measured: " + ", ".join(failed)
    column = "mem_ratio_vs_fp32" if target.metric == "memory" else (
        "speedup_vs_tf32" if target.baseline == BASELINE_TF32 else "speedup_vs_fp32")
    claim = view.claims.get((competitor, key))
    value = float(claim[column]) if claim is not None else NAN
    if math.isnan(value):
        what = "peak memory" if target.metric == "memory" else "time"
        where_run = "on the CPU" if view.gpu == "cpu" else f"at {where}"
        return NAN, NAN, f"not measured: no {what} {where_run}"
    return value, _compare(target, value), ""


def _grad_err(target: Target, view: _GpuResults, competitor: str, key: CellKey) -> Judged:
    row = view.row(competitor, key)
    if row is None:
        return NAN, NAN, f"not measured: {competitor} missing at {cell_text(key)}"
    if row["status"] == "nonfinite":
        return math.inf, False, "nonfinite: inf or NaN returned"
    if row["status"] != "ok":
        return NAN, NAN, f"not measured: {competitor} {row['status']}"
    value = float(row["grad_err_params"])
    if math.isnan(value):
        return NAN, NAN, "not measured: no gradient error" + (f" ({row['message'][:80]})" if row["message"] else "")
    return value, _compare(target, value), ""


def _efficiency(target: Target, view: _GpuResults, competitor: str, key: CellKey) -> Judged:
    row = view.row(competitor, key)
    if row is None:
        return NAN, NAN, f"not measured: {competitor} missing at {cell_text(key)}"
    if row["status"] != "ok":
        return NAN, NAN, f"not measured: {competitor} {row['status']}"
    tflops = float(row["tflops"])
    if math.isnan(tflops):
        return NAN, NAN, "not measured: no tflops"
    peak = dense_fp16_peak_tflops(view.gpu)
    if math.isnan(peak):
        return NAN, NAN, f"not measured: {tflops:.4g} TFLOP/s, dense fp16 peak of {view.gpu!r} unknown"
    value = tflops / peak
    return value, _compare(target, value), f"{tflops:.4g} of {peak:g} TFLOP/s"


def _finite(target: Target, view: _GpuResults, competitor: str) -> Judged:
    mine = [r for r in view.all_rows if r["competitor"] == competitor]
    if not mine:
        return NAN, NAN, f"not measured: no {competitor} row"
    bad = [cell_text(_key(r)) for r in mine if r["status"] == "nonfinite"]
    note = f"nonfinite at {', '.join(bad[:3])}" + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") if bad else ""
    return float(len(bad)), _compare(target, float(len(bad))), note


def _judge(target: Target, view: _GpuResults, competitor: str, key: CellKey) -> Judged:
    if key[4] is None:
        return NAN, NAN, f"not measured: no cell of {cell_text(key).rsplit(' N=', 1)[0]}"
    if target.metric in ("speedup", "memory"):
        return _against_baseline(target, view, competitor, key)
    if target.metric == "grad_err":
        return _grad_err(target, view, competitor, key)
    if target.metric == "efficiency":
        return _efficiency(target, view, competitor, key)
    raise ValueError(f"target {target.id}: unknown metric {target.metric!r}")


# ----------------------------------------------------------------------------- one target


def _target_cells(target: Target, view: _GpuResults) -> list[CellKey]:
    """The cells a target judges on this GPU; a cell with ``steps=None`` when none is measured."""
    if not target.cells:
        return [k for k in view.cells if k[4] >= target.min_steps]
    keys: list[CellKey] = []
    for cell in target.cells:
        base = (cell.workload, cell.method, cell.width, cell.batch)
        steps = [cell.steps] if cell.steps is not None else view.steps_at(cell) or [None]
        keys += [(*base, s) for s in steps]
    return keys


def _better(target: Target, a: float, b: float) -> bool:
    return a > b if target.comparison == ">=" else a < b


def _best_variant(target: Target, view: _GpuResults, named: str, key: CellKey) -> tuple[str, Judged]:
    """The best measured rampde competitor of ``named``'s precision in the cell."""
    variants = view.ours(view.precision_of(named))
    best: tuple[str, Judged] | None = None
    for competitor in variants:
        judged = _judge(target, view, competitor, key)
        if not math.isnan(judged[0]) and (best is None or _better(target, judged[0], best[1][0])):
            best = (competitor, judged)
    if best is None:
        return named, (NAN, NAN, f"not measured: none of {', '.join(variants)} measured here")
    competitor, (value, met, note) = best
    return competitor, (value, met, "; ".join(n for n in (f"best of {', '.join(variants)}", note) if n))


def _row(view: _GpuResults, target: Target, competitor: str, role: str, cell: str, judged: Judged) -> dict:
    measured, met, note = judged
    return {"gpu": view.gpu, "target": target.id, "description": target.description, "competitor": competitor,
            "role": role, "cell": cell, "measured": measured, "threshold": target.threshold,
            "comparison": target.comparison, "met": met, "note": note}


def _evaluate(target: Target, view: _GpuResults) -> list[dict]:
    competitors = list(target.competitors) or view.ours(target.precision)
    if target.metric == "finite":
        return [_row(view, target, c, NAMED, "every cell", _finite(target, view, c)) for c in competitors]
    keys = _target_cells(target, view)
    if not keys:
        where = f"with at least {target.min_steps} steps " if target.min_steps else ""
        judged = (NAN, NAN, f"not measured: no cell {where}in these results")
        label = f"every cell with N >= {target.min_steps}" if target.min_steps else "every cell"
        return [_row(view, target, c, NAMED, label, judged) for c in competitors]
    rows = []
    for key in keys:
        for competitor in competitors:
            named = _row(view, target, competitor, NAMED, cell_text(key), _judge(target, view, competitor, key))
            rows.append(named)
            if not target.best_variant:
                continue
            best, judged = _best_variant(target, view, competitor, key)
            rows.append(_row(view, target, best, BEST, cell_text(key), judged))
            if named["met"] is not True and judged[1] is True and best != competitor:
                only = f"met only by {best} ({format_value(target.id, judged[0])})"
                named["note"] = "; ".join(n for n in (named["note"], only) if n)
    return rows


# ----------------------------------------------------------------------------- public


def evaluate_targets(df: pd.DataFrame) -> pd.DataFrame:
    """Every target of ``TARGETS`` on every GPU model of a results table (``results.COLUMNS``).

    One row per (gpu, target, competitor, cell) with ``TARGET_COLUMNS``: ``measured`` (speedup,
    memory ratio, gradient error, nonfinite-row count or fraction of peak), ``threshold`` and
    ``comparison``, ``met`` (True, False, or NaN when not measured) and a ``note`` saying why a
    cell was not measured (missing, oom, error, nonfinite, no peak) or that only a faster variant
    meets the target. ``role`` is "named" for the rows that decide the target and "best variant"
    for the extra rows of the speed and efficiency targets. A table without rows gives every
    target as not measured (gpu '').
    """
    table = normalise(df)
    latest = latest_cells(table)
    per_cell = claims(table)
    gpus = sorted(set(latest["gpu"])) or [""]
    rows: list[dict] = []
    for gpu in gpus:
        view = _GpuResults(gpu, table[table["gpu"] == gpu], latest[latest["gpu"] == gpu],
                           per_cell[per_cell["gpu"] == gpu])
        for target in TARGETS:
            rows += _evaluate(target, view)
    out = pd.DataFrame(rows, columns=TARGET_COLUMNS)
    out["met"] = out["met"].astype(object)
    log.info("%d target rows on %d GPU model(s)", len(out), len(gpus))
    return out


def _worst(target: Target, rows: pd.DataFrame) -> dict | None:
    """The row that fares worst: a miss before a pass; the figure furthest from passing
    (a miss without a figure, e.g. an OOM, counts as the worst)."""
    if rows.empty:
        return None
    sign = -1.0 if target.comparison == ">=" else 1.0

    def badness(row: dict) -> float:
        value = row["measured"]
        return math.inf if math.isnan(value) else sign * value

    return max(rows.to_dict("records"), key=badness)


def _summary_row(target: Target, gpu: str, rows: pd.DataFrame) -> dict:
    named = rows[rows["role"] == NAMED]
    met = named["met"].map(lambda m: m is True)
    missed = named["met"].map(lambda m: m is False)
    unmeasured = ~(met | missed)
    status = (MISSED if missed.any() else MET if not unmeasured.any()
              else MET_WHERE_MEASURED if met.any() else NOT_MEASURED)
    pool = named[missed] if status == MISSED else named[met]
    worst = _worst(target, pool)
    notes: list[str] = []
    if status == MISSED:
        who = sorted(set(named.loc[missed, "competitor"]))
        notes.append(f"missed by {', '.join(who)} in {int(missed.sum())} of {len(named)} cells")
        notes += sorted({n.split("; ")[-1] for n in named.loc[missed, "note"] if "met only by" in n})
    if unmeasured.any():
        first = named.loc[unmeasured, "note"].iloc[0]
        example = first.removeprefix("not measured: ")
        notes.append(f"{int(unmeasured.sum())} of {len(named)} not measured (e.g. {example})"
                     if len(named) > 1 else first)
    return {"gpu": gpu, "target": target.id, "description": target.description, "status": status,
            "worst": worst["measured"] if worst else NAN,
            "worst_competitor": worst["competitor"] if worst else "", "worst_cell": worst["cell"] if worst else "",
            "comparison": target.comparison, "threshold": target.threshold, "cells": len(named),
            "met_cells": int(met.sum()), "missed_cells": int(missed.sum()),
            "unmeasured_cells": int(unmeasured.sum()), "note": "; ".join(notes)}


def targets_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (gpu, target) of an ``evaluate_targets`` table (``SUMMARY_COLUMNS``).

    ``status``: "missed" when a named row misses, else "met" when every one was measured and
    met, "met where measured" when some were not measured, "not measured" when none was. ``worst`` is the figure furthest from the threshold among the rows that
    decide the status (the misses, or the passes), with its competitor and cell; ``note`` names who
    missed, whether only a faster variant meets the target, and what was not measured.
    """
    rows = []
    for gpu in dict.fromkeys(table["gpu"]):
        mine = table[table["gpu"] == gpu]
        for target in TARGETS:
            rows.append(_summary_row(target, gpu, mine[mine["target"] == target.id]))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def summary_line(row: dict) -> str:
    """``speed-bf16-vs-tf32: missed (worst 1.21x, rampde-bf16 at conv w=128 b=64 N=64)``."""
    text = f"{row['target']}: {row['status']}"
    if row["worst_competitor"]:
        text += (f" (worst {format_value(row['target'], row['worst'])}, {row['worst_competitor']} at "
                 f"{row['worst_cell']}; needs {needs(row)})")
    return text


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    """A Markdown table's lines, each cell's ``|`` escaped and newlines flattened."""
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def format_markdown(table: pd.DataFrame, *, cells: bool = True) -> str:
    """The targets as Markdown (for the README or a pull request): the summary per GPU and target,
    then (``cells``) every row of ``table``."""
    summary = targets_summary(table)
    lines = ["### Performance targets", ""]
    lines += markdown_table(
        ["GPU", "target", "status", "worst", "competitor", "cell", "needs", "note"],
        [[r["gpu"] or "—", r["target"], r["status"], format_value(r["target"], r["worst"]), r["worst_competitor"],
          r["worst_cell"], needs(r), r["note"]] for r in summary.to_dict("records")])
    if cells:
        lines += ["", "#### Per cell", ""]
        lines += markdown_table(
            ["GPU", "target", "competitor", "role", "cell", "measured", "needs", "verdict", "note"],
            [[r["gpu"] or "—", r["target"], r["competitor"], r["role"], r["cell"],
              format_value(r["target"], r["measured"]), needs(r), verdict(r["met"]), r["note"]]
             for r in table.to_dict("records")])
    return "\n".join(lines) + "\n"
