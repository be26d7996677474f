"""The grid runner: every cell measured once, written at once, resumable, out-of-memory-proof.

A cell is (competitor, workload, width, batch, steps, method) on one GPU model with its repeat
settings (repeats, warm-up runs); together they make its ``cell_id``. Each finished cell is stored
in ``results.csv`` (its NVML samples in ``timelines.csv``) through an atomic rename, so a crash or
Ctrl-C never leaves a half-written file, and a rerun skips the cells already there (``error``
cells too, unless ``retry_errors``).

- Out of memory (``torch.OutOfMemoryError``, or a RuntimeError saying "out of memory") is a row
  with ``status="oom"``; memory is freed (gc, ``torch.cuda.empty_cache``) and the sweep goes on.
- Any other exception is a row with ``status="error"`` and its message (the traceback is logged).
- A loss or gradient that is not finite gives ``status="nonfinite"`` (times are kept).
- The fp64 reference of a scheme is computed once per (workload cell, steps, scheme), on the
  sweep's device (so on the GPU for CUDA sweeps), kept on the host until no remaining cell needs
  it. A reference that fails leaves the gradient errors NaN and says so in ``message``.

The library logs; ``progress(done, total, cell, row)`` lets a caller draw a bar (the CLI does).
"""

from __future__ import annotations

import datetime as _dt
import gc
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
import torch

from ..step_graphs import release_graph_pools
from . import measure
from .competitors import Competitor, RunOutput, get_competitor, reference_run
from .results import COLUMNS, ResultsStore
from .workloads import Workload, build_workload

log = logging.getLogger(__name__)

METHOD = "rk4"  # every competitor runs rk4 (docs/bench-interfaces.md)
MESSAGE_CHARS = 500


@dataclass(frozen=True)
class Cell:
    """One point of the grid (the GPU and repeat settings complete its identity)."""

    competitor: str
    workload: str
    width: int
    batch: int
    steps: int
    method: str = METHOD

    def cell_id(self, gpu: str, repeats: int, warmup: int = 1) -> str:
        """``gpu|competitor|workload|method|w<width>|b<batch>|s<steps>|r<repeats>|wu<warmup>``."""
        return "|".join((measure.gpu_slug(gpu), self.competitor, self.workload, self.method, f"w{self.width}",
                         f"b{self.batch}", f"s{self.steps}", f"r{repeats}", f"wu{warmup}"))

    @property
    def label(self) -> str:
        return f"{self.competitor} {self.workload} w{self.width} b{self.batch} N{self.steps}"


ProgressFn = Callable[[int, int, Cell, "dict[str, Any] | None"], None]


def make_grid(competitors: Iterable[str], workloads: Mapping[str, Mapping[str, Iterable[int]]],
              steps: Iterable[int]) -> list[Cell]:
    """Cells for every competitor x workload (its widths and batches) x step count.

    ``workloads`` maps a workload name to ``{"widths": [...], "batches": [...]}``. Unknown
    competitors raise ``KeyError`` (listing the known ones). Ordered by size (width x batch x
    steps), competitors together in each cell, so that a stopped sweep has compared everyone on
    the smaller cells.
    """
    competitors = list(dict.fromkeys(competitors))
    for name in competitors:
        get_competitor(name)
    cells = [Cell(c, name, width, batch, n)
             for name, sizes in workloads.items()
             for width in sizes["widths"] for batch in sizes["batches"]
             for n in steps for c in competitors]
    return sorted(cells, key=lambda c: (c.width * c.batch * c.steps, c.workload, c.width, c.batch, c.steps))


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of torch (CUDA or CPU allocator)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class DeviceLost(RuntimeError):
    """The device's context broke during a cell (which is stored as an error): the process must
    end, and a rerun resumes after that cell in a fresh one."""


def raise_if_device_lost(device: torch.device | str, failed: str, rest: str) -> None:
    """``DeviceLost`` when ``failed`` (a label; its row already stored as an error) left ``device``
    unable to run more work; ``rest`` says what becomes of the work after it."""
    fault = measure.device_fault(device)
    if fault:
        raise DeviceLost(f"{device} is unusable after {failed} failed ({fault}); that row is stored as an error, "
                         f"and {rest}")


def free_memory() -> None:
    """Collect garbage and hand the CUDA allocator's cached blocks back, the shared memory pools
    of CUDA-graph steps included."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        release_graph_pools()
        torch.cuda.empty_cache()


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:MESSAGE_CHARS]


def _on_host(out: RunOutput) -> RunOutput:
    return RunOutput(out.loss.detach().cpu(), out.grad_y0.detach().cpu(),
                     tuple(g.detach().cpu() for g in out.grad_params), dict(out.extra))


class ReferenceCache:
    """fp64 runs of each scheme, once per (scheme, workload, width, batch, steps), kept on the host
    and dropped when no remaining cell needs them."""

    def __init__(self, cells: Iterable[Cell]) -> None:
        self._needed = Counter(self._key_of(c) for c in cells)
        self._cache: dict[tuple, RunOutput | str] = {}

    @staticmethod
    def _key_of(cell: Cell) -> tuple:
        try:
            scheme = get_competitor(cell.competitor).scheme
        except KeyError:
            scheme = "?"
        return scheme, cell.workload, cell.width, cell.batch, cell.steps, cell.method

    def get(self, competitor: Competitor, workload: Workload, cell: Cell) -> RunOutput | str:
        """The reference output, or the reason there is none."""
        key = self._key_of(cell)
        if key not in self._cache:
            try:
                self._cache[key] = _on_host(reference_run(competitor, workload, cell.steps))
            except Exception as exc:  # an fp64 reference that does not fit: no error columns
                reason = "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {_message(exc)}"
                log.warning("fp64 reference of %s failed (%s); its gradient errors stay empty", key, reason)
                self._cache[key] = reason
            free_memory()
        return self._cache[key]

    def done(self, cell: Cell) -> None:
        """``cell`` is finished: drop its reference once no other cell needs it."""
        key = self._key_of(cell)
        self._needed[key] -= 1
        if self._needed[key] <= 0:
            self._cache.pop(key, None)


class _Workloads:
    """The workload of the current cell, rebuilt only when the cell's workload changes."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device, self.seed = device, seed
        self._key: tuple | None = None
        self._workload: Workload | None = None

    def get(self, cell: Cell) -> Workload:
        key = (cell.workload, cell.width, cell.batch)
        if key != self._key:
            self._key, self._workload = None, None
            free_memory()
            self._workload = build_workload(cell.workload, width=cell.width, batch=cell.batch,
                                            device=self.device, seed=self.seed)
            self._key = key
        assert self._workload is not None
        return self._workload


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def accuracy_columns(out: RunOutput, reference: Callable[[], RunOutput | str]) -> dict[str, Any]:
    """Status, message and gradient errors of a finished run; ``reference()`` (the fp64 output of
    the same scheme, or why there is none) is asked for only when the run is finite."""
    if not measure.all_finite(out):
        return {"status": "nonfinite", "message": "loss or gradients not finite"}
    ref = reference()
    if isinstance(ref, str):
        return {"message": f"no gradient error: the fp64 reference failed ({ref})"}
    grad_err_params, grad_err_y0 = measure.gradient_errors(out, ref)
    return {"grad_err_params": grad_err_params, "grad_err_y0": grad_err_y0}


def failure_columns(exc: BaseException) -> dict[str, Any]:
    """Status and message of a run that raised: ``oom`` for out of memory, else ``error``."""
    if is_oom(exc):
        return {"status": "oom", "message": _message(exc)}
    return {"status": "error", "message": f"{type(exc).__name__}: {_message(exc)}"}


def measure_cell(cell: Cell, workloads: _Workloads, references: ReferenceCache, *, device: torch.device,
                 repeats: int, warmup: int, env: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Measure one cell: its result row and NVML timeline. Raises nothing but KeyboardInterrupt
    (and other BaseExceptions): failures become the row's status and message; freeing the memory
    a failed cell held is the caller's (``run_sweep``)."""
    row: dict[str, Any] = {c: math.nan for c in COLUMNS}
    row.update(env)
    row.update(competitor=cell.competitor, workload=cell.workload, method=cell.method, width=cell.width,
               batch=cell.batch, steps=cell.steps, repeats=repeats, warmup=warmup, status="ok", message="",
               cell_id=cell.cell_id(env["gpu"], repeats, warmup), precision="")
    timeline: list[dict[str, float]] = []
    try:
        competitor = get_competitor(cell.competitor)
        row["precision"] = competitor.precision
        workload = workloads.get(cell)
        result = measure.measure_calls(lambda: competitor.run(workload, cell.steps), device, repeats=repeats,
                                       warmup=warmup, watch=workload.field)
        out: RunOutput = result.output
        row.update(result.columns())
        timeline = result.timeline
        row["loss"] = float(out.loss)
        row["scaler_retries"] = float(out.extra.get("scaler_retries", math.nan))
        flops = measure.solve_flops(workload.flops_per_eval(), cell.steps, measure.STAGES[cell.method])
        row["tflops"] = measure.achieved_tflops(flops, result.timing.median_ms)
        del result
        row.update(accuracy_columns(out, lambda: references.get(competitor, workload, cell)))
        del out
    except Exception as exc:
        row.update(failure_columns(exc))
        if row["status"] == "oom":
            log.info("out of memory: %s", cell.label)
        else:
            log.exception("cell %s failed", cell.label)
    row["timestamp"] = _now()
    return row, timeline


def run_sweep(cells: list[Cell], out_dir: Path, *, device: str | torch.device = "auto", repeats: int = 5,
              warmup: int = 1, seed: int = 0, retry_errors: bool = False,
              progress: ProgressFn | None = None) -> pd.DataFrame:
    """Measure every cell not already in ``out_dir/results.csv``; returns the whole table.

    ``progress(done, total, cell, row)`` is called before each cell to measure (``row`` None) and
    after it (with its row, already on disk); ``total`` counts the cells left to measure.
    ``retry_errors`` measures again the cells stored with ``status="error"``. ``DeviceLost`` when a
    failed cell left the device unusable (a lost CUDA context fails every later call): that cell is
    stored, the rest are left for a rerun in a fresh process.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = measure.resolve_device(device)
    store = ResultsStore(Path(out_dir))
    env = measure.environment(device)
    stored = store.status()

    def needed(cell: Cell) -> bool:
        status = stored.get(cell.cell_id(env["gpu"], repeats, warmup))
        return status is None or (retry_errors and status == "error")

    todo = [c for c in dict.fromkeys(cells) if needed(c)]
    if len(todo) < len(cells):
        log.info("resuming: %d of %d cells already in %s", len(cells) - len(todo), len(cells), store.results_path)
    log.info("measuring %d cells on %s (%s), %d repeats after %d warm-up runs", len(todo), env["gpu"], device,
             repeats, warmup)
    workloads = _Workloads(device, seed)
    references = ReferenceCache(todo)
    for index, cell in enumerate(todo):
        if progress:
            progress(index, len(todo), cell, None)
        row, timeline = measure_cell(cell, workloads, references, device=device, repeats=repeats, warmup=warmup,
                                     env=env)
        references.done(cell)
        store.add(row, timeline)
        log.info("[%d/%d] %s: %s%s", index + 1, len(todo), cell.label, row["status"],
                 f", {row['time_ms_median']:.3g} ms" if row["status"] == "ok" else f" ({row['message']})")
        if progress:
            progress(index + 1, len(todo), cell, row)
        if row["status"] != "ok":
            if row["status"] == "error":
                raise_if_device_lost(device, cell.label, f"the {len(todo) - index - 1} cell(s) after it are left for "
                                                         "a rerun, which resumes in a fresh process")
            free_memory()  # measure_cell has returned: the traceback's frames (and tensors) are gone
    return store.table
