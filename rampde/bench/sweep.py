"""The grid runner: every cell measured once, written at once, resumable, out-of-memory-proof.

A cell is (competitor, workload, width, batch, steps) on one GPU with a number of repeats. Each
finished cell is appended to ``results.csv`` (and its NVML samples to ``timelines.csv``) with an
atomic rename, so a crash or Ctrl-C never leaves a half-written file, and a rerun skips the cells
already there. A cell that runs out of memory is a row with ``status="oom"``; any other failure
is a row with ``status="error"`` and its message; the sweep goes on.
"""

from __future__ import annotations

import datetime as _dt
import gc
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import torch

from . import measure
from .competitors import RunOutput, get_competitor, reference_run
from .results import (
    COLUMNS,
    RESULTS_FILE,
    TIMELINE_COLUMNS,
    TIMELINES_FILE,
    empty_results,
    read_results,
    write_csv_atomic,
)
from .workloads import build_workload

log = logging.getLogger(__name__)

METHOD = "rk4"
STAGES = 4


@dataclass(frozen=True)
class Cell:
    competitor: str
    workload: str
    width: int
    batch: int
    steps: int

    def cell_id(self, gpu: str, repeats: int) -> str:
        return "|".join(map(str, (gpu, self.competitor, self.workload, METHOD, self.width, self.batch,
                                  self.steps, repeats)))


def make_grid(competitors: Iterable[str], workloads: dict[str, dict[str, list[int]]],
              steps: Iterable[int]) -> list[Cell]:
    """Cells for every competitor x workload (its widths and batches) x step count.

    ``workloads`` maps a workload name to ``{"widths": [...], "batches": [...]}``. Ordered so that
    the small cells of every competitor come first: a stopped sweep has compared everyone.
    """
    cells = []
    for name, sizes in workloads.items():
        for width in sizes["widths"]:
            for batch in sizes["batches"]:
                for n in steps:
                    for competitor in competitors:
                        get_competitor(competitor)
                        cells.append(Cell(competitor, name, width, batch, n))
    return sorted(cells, key=lambda c: (c.width * c.batch * c.steps, c.workload))


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ReferenceCache:
    """fp64 runs of a scheme, computed once per (scheme, workload, width, batch, steps)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, RunOutput | BaseException] = {}

    def get(self, competitor, workload, cell: Cell) -> RunOutput | None:
        key = (competitor.scheme, cell.workload, cell.width, cell.batch, cell.steps)
        if key not in self._cache:
            try:
                self._cache[key] = reference_run(competitor, workload, cell.steps)
            except Exception as exc:  # an fp64 reference that does not fit: no error columns
                log.warning("fp64 reference for %s failed (%s); gradient errors left empty", key, exc)
                self._cache[key] = exc
                _free_memory()
        value = self._cache[key]
        return None if isinstance(value, BaseException) else value


def measure_cell(cell: Cell, device: torch.device, *, repeats: int, warmup: int, env: dict[str, Any],
                 references: ReferenceCache) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Measure one cell; returns its result row and NVML timeline. Never raises for OOM or errors."""
    competitor = get_competitor(cell.competitor)
    row: dict[str, Any] = {c: math.nan for c in COLUMNS}
    row.update(env)
    row.update(cell_id=cell.cell_id(env["gpu"], repeats), competitor=cell.competitor, precision=competitor.precision,
               workload=cell.workload, method=METHOD, width=cell.width, batch=cell.batch, steps=cell.steps,
               repeats=repeats, status="ok", message="", tf32=competitor.precision == "tf32",
               cudnn_tf32=competitor.precision == "tf32")
    timeline: list[dict[str, float]] = []
    try:
        workload = build_workload(cell.workload, width=cell.width, batch=cell.batch, device=device)
        first = competitor.run(workload, cell.steps)  # also the warm-up of compilation and caches
        row["loss"] = float(first.loss)
        row["scaler_retries"] = first.extra.get("scaler_retries", math.nan)
        if not measure.all_finite(first):
            row.update(status="nonfinite", message="loss or gradients not finite")
        reference = references.get(competitor, workload, cell)
        if reference is not None:
            row["grad_err_params"], row["grad_err_y0"] = measure.gradient_errors(first, reference)
        del first, reference

        def once() -> None:
            competitor.run(workload, cell.steps)

        row["peak_mem_bytes"] = measure.peak_memory_bytes(once, device)
        with measure.NvmlSampler(device) as sampler:
            timing = measure.time_runs(once, device, repeats=repeats, warmup=max(warmup - 1, 0))
        row.update(time_ms_median=timing.median_ms, time_ms_q25=timing.q25_ms, time_ms_q75=timing.q75_ms,
                   time_ms_min=timing.min_ms, time_ms_max=timing.max_ms)
        row.update(sampler.summary(calls=repeats + max(warmup - 1, 0)))
        flops = measure.solve_flops(workload.flops_per_eval(), cell.steps, STAGES)
        row["tflops"] = flops / (timing.median_ms * 1e-3) / 1e12
        timeline = [{"cell_id": row["cell_id"], **sample} for sample in sampler.timeline]
    except Exception as exc:
        if is_oom(exc):
            row.update(status="oom", message=str(exc).splitlines()[0][:300])
            log.info("out of memory: %s", row["cell_id"])
        else:
            row.update(status="error", message=f"{type(exc).__name__}: {exc}"[:500])
            log.exception("cell %s failed", row["cell_id"])
    finally:
        _free_memory()
    row["timestamp"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return row, timeline


ProgressFn = Callable[[int, int, Cell, dict | None], None]


def run_sweep(cells: list[Cell], out_dir: Path, *, device: str | torch.device = "cpu", repeats: int = 5,
              warmup: int = 2, progress: ProgressFn | None = None) -> pd.DataFrame:
    """Measure every cell not already in ``out_dir/results.csv``; returns the whole table.

    ``progress(done, total, cell, row)`` is called before each cell (``row`` None) and after it.
    """
    if repeats < 1 or warmup < 1:
        raise ValueError(f"need repeats >= 1 and warmup >= 1, got repeats={repeats}, warmup={warmup}")
    device = torch.device(device)
    out_dir = Path(out_dir)
    results_path, timelines_path = out_dir / RESULTS_FILE, out_dir / TIMELINES_FILE
    table = read_results(results_path) if results_path.exists() else empty_results()
    timelines = pd.read_csv(timelines_path) if timelines_path.exists() else pd.DataFrame(columns=TIMELINE_COLUMNS)
    env = measure.environment(device)
    done = set(table["cell_id"].astype(str))
    todo = [c for c in cells if c.cell_id(env["gpu"], repeats) not in done]
    if len(todo) < len(cells):
        log.info("resuming: %d of %d cells already in %s", len(cells) - len(todo), len(cells), results_path)
    references = ReferenceCache()
    for index, cell in enumerate(todo):
        if progress:
            progress(index, len(todo), cell, None)
        row, timeline = measure_cell(cell, device, repeats=repeats, warmup=warmup, env=env, references=references)
        table = pd.concat([table.dropna(axis=1, how="all"), pd.DataFrame([row])], ignore_index=True)
        table = table.reindex(columns=list(COLUMNS) + [c for c in table.columns if c not in COLUMNS])
        write_csv_atomic(table, results_path)
        if timeline:
            timelines = pd.concat([timelines, pd.DataFrame(timeline)], ignore_index=True)
            write_csv_atomic(timelines, timelines_path)
        if progress:
            progress(index + 1, len(todo), cell, row)
    return table
