"""The ablation of rampde's options: the time, memory and gradient error of a forward+backward
per cell, with rampde's options changed one at a time.

``python -m rampde.bench.profiling ablate [options]`` (the command line is in
``rampde.bench.profiling``):

- ``ablate``: one row per (cell, variant) in ``<out>/ablation.csv`` (columns in
  ``ABLATION_COLUMNS``), rewritten atomically after each row; the environment in
  ``<out>/ablation-environment.json``. Variants (``ablation_variants``): the baseline
  ``torchdiffeq-fp32`` from the registry, then rampde in bf16 and fp16 with its default options
  and with one option changed at a time (``storage="activations"``, ``state_dtype="low"``,
  ``cast_weights="per-use"``, ``cuda_graph=True``, ``fuse=True``), and the fast storage fused;
  for the conv workload every variant again with the conv weights and ``y0`` in
  ``torch.channels_last``. Order (``ablation_plan``): every cell's plain variants, then every
  cell's CUDA-graph ones, then every cell's compiled (``fuse``) ones. The timed forward+backward is the
  registry's (see ``competitors.rampde_run``: ``y0`` a leaf, TF32 off, autocast around the solve and the loss of
  ``y(T)``, the backward, a ``DynamicScaler`` kept across the runs in fp16); time and memory come
  from ``measure.measure_calls``, gradient errors against the fp64 run of the same scheme
  (``sweep.ReferenceCache``, computed once per cell). Out of memory is a row (``status="oom"``);
  an option this rampde refuses (a ``ValueError`` naming it) is a row with ``status="unsupported"``.
  Each run starts a fresh table: rerun to measure again.

The cells (``PerfCell``, ``default_cells``) and the JSON writer are shared with
``rampde.bench.kernel_profile``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch

from . import measure
from . import competitors
from .competitors import METHOD, RunOutput, get_competitor
from .results import atomic_write, write_csv_atomic
from .sweep import (Cell, ReferenceCache, _message, _now, accuracy_columns, failure_columns, free_memory, is_oom,
                    raise_if_device_lost)
from .workloads import WORKLOADS, Workload, build_workload

log = logging.getLogger(__name__)

__all__ = [
    "PerfCell", "Variant", "ablation_variants", "ablation_plan", "run_ablation", "measure_variant", "rampde_run",
    "variant_names", "default_cells", "ABLATION_COLUMNS",
]

BASELINE = "torchdiffeq-fp32"
REFERENCE_COMPETITOR = "rampde-fp32"  # its scheme (rk4-discrete) names the fp64 reference
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}
# One option changed at a time from rampde's defaults: (readable suffix, odeint options).
OPTION_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("", {}),
    ("storage=activations", {"storage": "activations"}),
    ("state_dtype=low", {"state_dtype": "low"}),
    ("cast_weights=per-use", {"cast_weights": "per-use"}),
    ("cuda_graph", {"cuda_graph": True}),
    ("fuse", {"fuse": True}),
    ("storage=activations fuse", {"storage": "activations", "fuse": True}),
)
CHANNELS_LAST = "channels_last"
ABLATION_FILE = "ablation.csv"
ABLATION_ENV_FILE = "ablation-environment.json"

ABLATION_COLUMNS: dict[str, str] = {
    "gpu": "GPU model name, or 'cpu'",
    "device": "cuda or cpu",
    "workload": "mlp, conv or cnf",
    "width": "MLP width / conv channels / CNF hidden width",
    "batch": "batch size",
    "steps": "rk4 steps N",
    "precision": "fp32, bf16 or fp16",
    "variant": "readable name: competitor or rampde-<precision>, the option changed, channels_last",
    "options": "JSON of the odeint options passed ({} = rampde's defaults; empty for the baseline)",
    "channels_last": "conv weights and y0 in torch.channels_last",
    "repeats": "timed repeats",
    "warmup": "untimed runs before the timed ones",
    "time_ms_median": "ms per forward+backward, median of the repeats",
    "time_ms_q25": "ms, first quartile",
    "time_ms_q75": "ms, third quartile",
    "peak_mem_bytes": "bytes, CUDA allocator peak above resident inputs and model (NaN on the CPU)",
    "tflops": "TFLOP/s of useful work (measure.solve_flops) at the median time",
    "speedup_vs_fp32": "torchdiffeq-fp32's median time (default layout) / this one",
    "speedup_vs_default": "rampde-<precision> with default options and layout: its median time / this one",
    "grad_err_params": "relative L2 error of the parameter gradients against the fp64 same-scheme run",
    "grad_err_y0": "relative L2 error of the y0 gradient against the fp64 same-scheme run",
    "scaler_retries": "fp16 adjoint solves redone with a smaller scale, last run (NaN otherwise)",
    "status": "ok, oom, error, unsupported (an option this rampde refuses) or nonfinite",
    "message": "error text or a note; empty when ok",
    "commit": "git commit of this project",
    "timestamp": "UTC time the row was measured, ISO 8601",
}


# ----------------------------------------------------------------------------- cells and variants


@dataclass(frozen=True)
class PerfCell:
    """A workload size: (workload, width, batch, steps)."""

    workload: str
    width: int
    batch: int
    steps: int

    @property
    def label(self) -> str:
        return f"{self.workload} w{self.width} b{self.batch} N{self.steps}"

    @property
    def slug(self) -> str:
        """``mlp-w2048-b2048-s64``: the cell's part of a file name."""
        return f"{self.workload}-w{self.width}-b{self.batch}-s{self.steps}"


# Default sizes per device type: {workload: (widths, batch, steps)}; `default_cells` takes mlp, conv.
# On CUDA the decisive cell (MLP 2048) first, so that a run cut short by its time limit has it.
DEFAULT_SIZES: dict[str, dict[str, tuple[tuple[int, ...], int, int]]] = {
    "cuda": {"mlp": ((2048, 256, 1024), 2048, 64), "conv": ((128,), 64, 64), "cnf": ((64,), 1024, 64)},
    "cpu": {"mlp": ((16,), 16, 4), "conv": ((8,), 8, 4), "cnf": ((16,), 16, 4)},
}
DEFAULT_WORKLOADS = ("mlp", "conv")


def default_cells(device_type: str, workloads: Sequence[str] = DEFAULT_WORKLOADS, *,
                  widths: Sequence[int] = (), batches: Sequence[int] = (),
                  steps: Sequence[int] = ()) -> list[PerfCell]:
    """The ablation's cells: each workload's default widths, batch and steps for the device type,
    each replaced by what is given. The workloads take turns (each one's first cell, then each
    one's second, ...), so that a run stopped early has measured every workload's headline cell."""
    sizes = DEFAULT_SIZES["cuda" if device_type == "cuda" else "cpu"]
    per_workload = []
    for name in dict.fromkeys(workloads):
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
        w_default, b_default, n_default = sizes[name]
        per_workload.append([PerfCell(name, w, b, n) for w in (widths or w_default) for b in (batches or [b_default])
                             for n in (steps or [n_default])])
    turns = itertools.zip_longest(*per_workload)
    return list(dict.fromkeys(cell for turn in turns for cell in turn if cell is not None))


@dataclass(frozen=True, eq=False)
class Variant:
    """One way to run a cell: a registry competitor as is, or rampde with some odeint options."""

    name: str
    precision: str
    options: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False
    competitor: str | None = None  # a registry competitor (the baseline); None: rampde_run

    @property
    def compiled(self) -> bool:
        """Runs ``torch.compile``d kernels (``fuse``): its first run in a process compiles."""
        return bool(self.options.get("fuse"))

    @property
    def captured(self) -> bool:
        """Captures CUDA graphs (``cuda_graph``): a capture that fails on the device can leave the
        process's allocator unusable for what follows."""
        return bool(self.options.get("cuda_graph"))

    def options_json(self) -> str:
        return "" if self.competitor else json.dumps(self.options, sort_keys=True)

    def runner(self) -> Callable[[Workload, int], RunOutput]:
        """A fresh forward+backward function (an fp16 one keeps its own scaler across its runs)."""
        if self.competitor is not None:
            return get_competitor(self.competitor).run
        return rampde_run(self.precision, self.options)


def ablation_variants(workload: str) -> list[Variant]:
    """The baseline, then rampde bf16 and fp16 with the default options and one option changed at a
    time (option by option, both precisions each, the compiled ``fuse`` ones last); for conv, all
    of them again in ``channels_last``. Defaults come before what is compared with them."""
    variants = []
    for channels_last in (False, True) if workload == "conv" else (False,):
        suffix = f" {CHANNELS_LAST}" if channels_last else ""
        variants.append(Variant(BASELINE + suffix, "fp32", channels_last=channels_last, competitor=BASELINE))
        for change, options in OPTION_VARIANTS:
            for precision in PRECISIONS:
                name = " ".join(part for part in (f"rampde-{precision}", change) if part) + suffix
                variants.append(Variant(name, precision, dict(options), channels_last))
    return variants


def rampde_run(precision: str, options: Mapping[str, Any]) -> Callable[[Workload, int], RunOutput]:
    """The registry's rampde forward+backward (``competitors.rampde_run``) in ``precision`` with
    any odeint ``options``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return competitors.rampde_run(PRECISIONS[precision], dict(options))


# JSON files: the environment here, the profile summary in rampde.bench.kernel_profile.


def _jsonable(value: Any) -> Any:
    """NaN and infinities as null, so that the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(Path(path), lambda handle: json.dump(_jsonable(obj), handle, indent=2, default=str))


# ----------------------------------------------------------------------------- ablation


def _unsupported(exc: BaseException, variant: Variant) -> bool:
    """A ValueError naming one of the variant's options: this rampde does not take it."""
    return isinstance(exc, ValueError) and any(key in str(exc) for key in variant.options)


def measure_variant(variant: Variant, get_workload: Callable[[], Workload], cell: PerfCell, *,
                    device: torch.device, repeats: int, warmup: int,
                    reference: Callable[[Workload], RunOutput | str], env: Mapping[str, Any]) -> dict[str, Any]:
    """One ablation row. Raises nothing but BaseExceptions (Ctrl-C): failures are the status; the
    caller frees a failed row's memory (once this frame, which holds the workload, is gone).

    ``get_workload()`` gives the cell's workload in the variant's layout (built inside, so that a
    workload that does not fit is an oom row too); ``reference(workload)`` the fp64 same-scheme
    output, or the reason there is none.
    """
    row: dict[str, Any] = {c: math.nan for c in ABLATION_COLUMNS}
    row.update(gpu=env["gpu"], device=env["device"], workload=cell.workload, width=cell.width, batch=cell.batch,
               steps=cell.steps, precision=variant.precision, variant=variant.name, options=variant.options_json(),
               channels_last=variant.channels_last, repeats=repeats, warmup=warmup, status="ok", message="",
               commit=env.get("commit", ""))
    try:
        workload = get_workload()
        run = variant.runner()
        result = measure.measure_calls(lambda: run(workload, cell.steps), device, repeats=repeats, warmup=warmup,
                                       watch=workload.field)
        out: RunOutput = result.output
        timing = result.timing
        row.update(time_ms_median=timing.median_ms, time_ms_q25=timing.q25_ms, time_ms_q75=timing.q75_ms,
                   peak_mem_bytes=result.peak_mem_bytes)
        flops = measure.solve_flops(workload.flops_per_eval(), cell.steps, measure.STAGES[METHOD])
        row["tflops"] = measure.achieved_tflops(flops, timing.median_ms)
        row["scaler_retries"] = float(out.extra.get("scaler_retries", math.nan))
        del result
        row.update(accuracy_columns(out, lambda: reference(workload)))
        del out
    except Exception as exc:
        if not is_oom(exc) and _unsupported(exc, variant):
            row.update(status="unsupported", message=_message(exc))
            log.info("unsupported: %s %s (%s)", cell.label, variant.name, row["message"])
        else:
            row.update(failure_columns(exc))
            if row["status"] == "oom":
                log.info("out of memory: %s %s", cell.label, variant.name)
            else:
                log.exception("%s %s failed", cell.label, variant.name)
    row["timestamp"] = _now()
    return row


def _add_speedups(row: dict[str, Any], medians: dict[str, float]) -> None:
    """Speedups against the cell's baseline and the same precision's default (default layout)."""
    mine = row["time_ms_median"]
    for column, key in (("speedup_vs_fp32", BASELINE), ("speedup_vs_default", f"rampde-{row['precision']}")):
        base = medians.get(key, math.nan)
        row[column] = base / mine if row["status"] == "ok" and math.isfinite(base) and mine > 0 else math.nan


AblationProgress = Callable[[int, int, PerfCell, Variant, "dict[str, Any] | None"], None]


def _variants_for(cell: PerfCell, names: Sequence[str] | None) -> list[Variant]:
    variants = ablation_variants(cell.workload)
    return [v for v in variants if v.name in names] if names else variants


def ablation_plan(cells: Sequence[PerfCell], names: Sequence[str] | None = None) -> list[tuple[PerfCell, Variant]]:
    """The (cell, variant) pairs in the order they are measured: every cell's plain variants
    first, then every cell's CUDA-graph ones, then every cell's compiled ones. A compile takes many
    seconds per precision and shape, so a run stopped at its time limit has measured every cell's
    defaults and plain options before any of that time is spent; and a graph capture that failed
    on the device, which can leave the process unable to allocate as before, spoils no plain row."""
    pairs = [(cell, v) for cell in cells for v in _variants_for(cell, names)]
    return sorted(pairs, key=lambda pair: (pair[1].compiled, pair[1].captured))  # stable: cell order kept


def variant_names(workloads: Iterable[str]) -> list[str]:
    """Every variant name of these workloads, in order."""
    return list(dict.fromkeys(v.name for w in workloads for v in ablation_variants(w)))


class _CellWorkloads:
    """The cell's workload in each layout, built on first use."""

    def __init__(self, cell: PerfCell, device: torch.device, seed: int) -> None:
        self.cell, self.device, self.seed = cell, device, seed
        self._built: dict[bool, Workload] = {}

    def get(self, channels_last: bool) -> Workload:
        if channels_last not in self._built:
            self._built[channels_last] = build_workload(self.cell.workload, width=self.cell.width,
                                                        batch=self.cell.batch, device=self.device,
                                                        seed=self.seed, channels_last=channels_last)
        return self._built[channels_last]


def run_ablation(cells: Sequence[PerfCell], out_dir: Path, *, device: str | torch.device = "auto", repeats: int = 5,
                 warmup: int = 1, seed: int = 0, variants: Sequence[str] | None = None,
                 progress: AblationProgress | None = None) -> pd.DataFrame:
    """Measure every (cell, variant); ``out_dir/ablation.csv`` is rewritten after each row.

    ``variants`` keeps only the variants of these names (``variant_names``). ``progress(done,
    total, cell, variant, row)`` is called before each row (``row`` None) and after it.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = measure.resolve_device(device)
    out_dir = Path(out_dir)
    env = measure.environment(device)
    _write_json(out_dir / ABLATION_ENV_FILE, env)
    plan = ablation_plan(cells, variants)
    log.info("ablation: %d rows on %s (%s), %d repeats after %d warm-up runs -> %s", len(plan), env["gpu"], device,
             repeats, warmup, out_dir / ABLATION_FILE)
    rows: list[dict[str, Any]] = []
    reference_competitor = get_competitor(REFERENCE_COMPETITOR)

    def ref_cell_of(cell: PerfCell) -> Cell:
        return Cell(REFERENCE_COMPETITOR, cell.workload, cell.width, cell.batch, cell.steps, METHOD)

    # Each cell's fp64 reference is kept (on the host) until its last row, compiled pass included.
    references = ReferenceCache([ref_cell_of(cell) for cell, _ in plan])
    medians: dict[PerfCell, dict[str, float]] = {}
    current: PerfCell | None = None
    for index, (cell, variant) in enumerate(plan):
        if cell != current:  # a new cell: drop the last one's workloads first
            current, workloads = cell, None
            free_memory()
            workloads = _CellWorkloads(cell, device, seed)
        ref_cell = ref_cell_of(cell)
        if progress:
            progress(index, len(plan), cell, variant, None)
        row = measure_variant(
            variant, lambda w=workloads, v=variant: w.get(v.channels_last), cell, device=device, repeats=repeats,
            warmup=warmup, env=env,
            reference=lambda w, c=ref_cell: references.get(reference_competitor, w, c))
        references.done(ref_cell)
        cell_medians = medians.setdefault(cell, {})
        if row["status"] == "ok" and not variant.channels_last and not variant.options:
            cell_medians[variant.competitor or variant.name] = row["time_ms_median"]
        _add_speedups(row, cell_medians)
        rows.append(row)
        write_csv_atomic(pd.DataFrame(rows, columns=list(ABLATION_COLUMNS)), out_dir / ABLATION_FILE)
        log.info("[%d/%d] %s %s: %s%s", index + 1, len(plan), cell.label, variant.name, row["status"],
                 f", {row['time_ms_median']:.3g} ms" if row["status"] == "ok" else f" ({row['message']})")
        if progress:
            progress(index + 1, len(plan), cell, variant, row)
        if row["status"] == "error":
            raise_if_device_lost(device, f"{cell.label} {variant.name}",
                                 f"the {len(plan) - index - 1} row(s) after it were not run; the rows so far are in "
                                 f"{out_dir / ABLATION_FILE}")
        if row["status"] != "ok":
            free_memory()
    return pd.DataFrame(rows, columns=list(ABLATION_COLUMNS))
