"""Where the time of a forward+backward goes: an ablation of rampde's options, profiler tables,
and the GEMM probe.

Three entry points (``python -m rampde.bench.profiling ablate|profile|gemm [options]``):

- ``ablate``: one row per (cell, variant) in ``<out>/ablation.csv`` (columns in
  ``ABLATION_COLUMNS``), rewritten atomically after each row; the environment in
  ``<out>/ablation-environment.json``. Variants (``ablation_variants``): the baseline
  ``torchdiffeq-fp32`` from the registry, then rampde in bf16 and fp16 with its default options
  and with one option changed at a time (``storage="activations"``, ``state_dtype="low"``,
  ``cast_weights="per-use"``, ``cuda_graph=True``, ``fuse=True``), and the fast storage fused;
  for the conv workload every variant again with the conv weights and ``y0`` in
  ``torch.channels_last``. Order (``ablation_plan``): every cell's variants that need no
  compiling, then every cell's compiled (``fuse``) ones. The timed forward+backward is the
  registry's (see ``competitors.rampde_run``: ``y0`` a leaf, TF32 off, autocast around the solve and the loss of
  ``y(T)``, the backward, a ``DynamicScaler`` kept across the runs in fp16); time and memory come
  from ``measure.measure_calls``, gradient errors against the fp64 run of the same scheme
  (``sweep.ReferenceCache``, computed once per cell). Out of memory is a row (``status="oom"``);
  an option this rampde refuses (a ``ValueError`` naming it) is a row with ``status="unsupported"``.
  Each run starts a fresh table: rerun to measure again.
- ``profile``: ``torch.profiler`` (CPU activity, and CUDA on a GPU) over a few forward+backward
  calls of registry competitors after warm-up. Per competitor and cell,
  ``<out>/profile/<competitor>-<cell>.csv`` holds the top operators and kernels (``TOP_COLUMNS``,
  every figure per forward+backward); ``<out>/profile/summary.json`` the totals per category, the
  kernel launches, the host-device synchronisations and how busy the GPU was (``SUMMARY_KEYS``);
  ``<out>/profile/environment.json`` the environment; with ``--trace`` a chrome trace each.
- ``gemm``: a Linear's three GEMMs with inner dimension width and width + 1, per precision, into
  ``<out>/gemm.csv`` (``rampde.bench.gemm_probe``).

Categories are found by name (the patterns below): on CUDA each kernel, memcpy or memset by its
own name and the name of the aten op that launched it (the profiler links the two), summing device
time; on the CPU each aten op by its name, summing self CPU time (a kernel-free device).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch

from . import measure
from . import competitors
from .competitors import METHOD, RunOutput, get_competitor
from .results import atomic_write, write_csv_atomic
from .sweep import Cell, ReferenceCache, _message, _now, accuracy_columns, failure_columns, free_memory, is_oom
from .workloads import WORKLOADS, Workload, build_workload

log = logging.getLogger(__name__)

__all__ = [
    "PerfCell", "Variant", "ablation_variants", "ablation_plan", "run_ablation", "measure_variant", "rampde_run",
    "profile_competitor", "run_profiles", "categorise_kernel", "categorise_op", "default_cells",
    "ABLATION_COLUMNS", "TOP_COLUMNS", "SUMMARY_KEYS", "main",
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
PROFILE_DIR = "profile"
SUMMARY_FILE = "summary.json"
PROFILE_ENV_FILE = "environment.json"
MARK = "rampde.profile.forward_backward"  # record_function range around each profiled call

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

TOP_COLUMNS: dict[str, str] = {
    "name": "operator (aten::...), CUDA runtime call or kernel name",
    "kind": "op, runtime or kernel (device activity: kernels, memcpy, memset)",
    "category": "matmul, cast, elementwise, reduction, memcpy, sync, launch or other (by name)",
    "calls": "calls per forward+backward",
    "self_device_time_us": "us per forward+backward on the device, without children",
    "total_device_time_us": "us per forward+backward on the device, with children",
    "self_cpu_time_us": "us per forward+backward on the host, without children",
    "total_cpu_time_us": "us per forward+backward on the host, with children",
    "percentage": "self time (device on CUDA, CPU otherwise) in % of the total of the summary",
}

SUMMARY_KEYS: dict[str, str] = {
    "competitor": "registry name",
    "precision": "fp32, tf32, fp16 or bf16",
    "workload": "mlp, conv or cnf", "width": "width", "batch": "batch", "steps": "rk4 steps",
    "channels_last": "conv layout",
    "calls": "profiled forward+backward calls (after warmup untimed ones)",
    "warmup": "untimed calls before profiling",
    "status": "ok, oom or error", "message": "error text",
    "time_basis": "'cuda kernels' (device time) or 'cpu self time' (no device: aten ops' self time)",
    "wall_us_per_call": "host wall time of the profiled calls (to the last kernel's end on CUDA) / calls",
    "host_us_per_call": "time the host spent inside the calls (launching, or computing on the CPU) / calls",
    "device_time_us_per_call": "sum of the time basis per call: kernels + memcpy + memset, or ops' self CPU time",
    "matmul_time_us_per_call": "in matmul and conv kernels / ops (MATMUL_* patterns)",
    "cast_time_us_per_call": "in dtype casts (CAST_* patterns: aten::to / _to_copy / copy_ and copy kernels)",
    "elementwise_time_us_per_call": "in elementwise kernels / ops (ELEMENTWISE_* patterns)",
    "reduction_time_us_per_call": "in reductions (REDUCTION_* patterns)",
    "memcpy_time_us_per_call": "in memcpy and memset (CUDA only)",
    "other_time_us_per_call": "the rest",
    "matmul_fraction": "matmul time / device time",
    "kernels_per_call": "device kernels run per call (CUDA; null on the CPU)",
    "kernel_launches_per_call": "cudaLaunchKernel-like host calls per call (CUDA; null on the CPU)",
    "ops_per_call": "aten ops called per call",
    "host_syncs_per_call": "host-device synchronisations per call (SYNC_CALLS; CUDA; null on the CPU)",
    "host_syncs_by_name": "the same, per runtime call name",
    "gpu_busy_fraction": "union of device activity / wall time of the calls (CUDA; null on the CPU)",
    "csv": "the top-operator table, relative to the summary",
    "trace": "chrome trace file, relative to the summary (null without --trace)",
}

# ----------------------------------------------------------------------------- name patterns
# On CUDA a kernel is put in the first category whose rule it meets, in this order:
# memcpy (MEMCPY_KERNEL), matmul (MATMUL_KERNEL on the kernel's name: cuBLAS/cuBLASLt gemm and
# nvjet kernels, CUTLASS, sm80/sm90 xmma, cuDNN convolutions), cast (launched by a CAST_OPS op or
# named like CAST_KERNEL: a copy that changes the dtype; a same-dtype copy is a memcpy), elementwise
# (ELEMENTWISE_KERNEL), reduction (REDUCTION_KERNEL), other.
# On the CPU an aten op is matched on its name: MATMUL_OPS, CAST_OPS, ELEMENTWISE_OPS, REDUCTION_OPS.
MEMCPY_KERNEL = re.compile(r"^mem(cpy|set)", re.IGNORECASE)
MATMUL_KERNEL = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|cudnn|conv(?!ert)|implicit|wgrad|dgrad|fprop|winograd"
                           r"|sm\d{2,3}_", re.IGNORECASE)
CAST_KERNEL = re.compile(r"copy_kernel|direct_copy", re.IGNORECASE)
ELEMENTWISE_KERNEL = re.compile(r"elementwise|pointwise|foreach|multi_tensor_apply|triton_poi", re.IGNORECASE)
REDUCTION_KERNEL = re.compile(r"reduce|reduction|triton_red|softmax", re.IGNORECASE)

MATMUL_OPS = re.compile(r"^aten::(mm|addmm|bmm|baddbmm|addbmm|matmul|linear|mv|addmv|dot|_?conv\w*|\w*convolution\w*"
                        r"|_slow_conv\w*|thnn_conv\w*)$")
CAST_OPS = frozenset({"aten::to", "aten::_to_copy", "aten::copy_", "aten::_copy_from",
                      "aten::_copy_from_and_resize"})
ELEMENTWISE_OPS = re.compile(
    r"^aten::(add|sub|rsub|mul|div|neg|tanh|tanh_backward|sigmoid|sigmoid_backward|relu|threshold_backward"
    r"|gelu|gelu_backward|silu|silu_backward|pow|exp|exp2|log|sqrt|rsqrt|square|abs|sign|clamp|clamp_min"
    r"|clamp_max|where|addcmul|addcdiv|lerp|fill|zero|reciprocal|maximum|minimum|_foreach_\w+)_?$")
REDUCTION_OPS = re.compile(r"^aten::(sum|mean|norm|linalg_vector_norm|amax|amin|max|min|prod|var|std|all|any"
                           r"|_softmax|_log_softmax)$")
# Host calls that wait for the device (an .item(), a copy to the host, an explicit synchronise).
SYNC_CALLS = re.compile(r"^cu(da)?(Stream|Device|Event|Ctx)Synchronize|^cudaMemcpy(2D)?$|^cuMemcpy[DH]to[DH]")
LAUNCH_CALLS = re.compile(r"^cu(da)?(Launch\w*Kernel\w*|GraphLaunch)")


def categorise_kernel(kernel: str, op: str = "") -> str:
    """Category of a device activity named ``kernel``, launched by the aten op ``op`` (may be '')."""
    if MEMCPY_KERNEL.search(kernel):
        return "memcpy"
    if MATMUL_KERNEL.search(kernel):
        return "matmul"
    if op in CAST_OPS or CAST_KERNEL.search(kernel):
        return "cast"
    if ELEMENTWISE_KERNEL.search(kernel):
        return "elementwise"
    if REDUCTION_KERNEL.search(kernel):
        return "reduction"
    return "other"


def categorise_op(name: str) -> str:
    """Category of a host event: an aten op by name, a CUDA runtime call (sync, launch), or other."""
    if SYNC_CALLS.search(name):
        return "sync"
    if LAUNCH_CALLS.search(name):
        return "launch"
    if MATMUL_OPS.search(name):
        return "matmul"
    if name in CAST_OPS:
        return "cast"
    if ELEMENTWISE_OPS.search(name):
        return "elementwise"
    if REDUCTION_OPS.search(name):
        return "reduction"
    return "other"


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
PROFILE_SIZES: dict[str, PerfCell] = {"cuda": PerfCell("mlp", 2048, 2048, 64), "cpu": PerfCell("mlp", 16, 16, 4)}
PROFILE_COMPETITORS = ("torchdiffeq-fp32", "torchdiffeq-tf32", "rampde-fp16", "rampde-bf16")


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


# ----------------------------------------------------------------------------- ablation


def _unsupported(exc: BaseException, variant: Variant) -> bool:
    """A ValueError naming one of the variant's options: this rampde does not take it."""
    return isinstance(exc, ValueError) and any(key in str(exc) for key in variant.options)


def measure_variant(variant: Variant, get_workload: Callable[[], Workload], cell: PerfCell, *,
                    device: torch.device, repeats: int, warmup: int,
                    reference: Callable[[Workload], RunOutput | str], env: Mapping[str, Any]) -> dict[str, Any]:
    """One ablation row. Raises nothing but BaseExceptions (Ctrl-C): failures are the status.

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
    if row["status"] != "ok":
        free_memory()  # after the except block: the traceback's frames (and tensors) are gone
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
    """The (cell, variant) pairs in the order they are measured: every cell's variants that run
    without compiling first, then every cell's compiled ones. A compile takes many seconds per
    precision and shape, so a run stopped at its time limit has measured every cell's defaults
    and plain options before any of that time is spent."""
    pairs = [(cell, v) for cell in cells for v in _variants_for(cell, names)]
    return [p for p in pairs if not p[1].compiled] + [p for p in pairs if p[1].compiled]


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
    return pd.DataFrame(rows, columns=list(ABLATION_COLUMNS))


# ----------------------------------------------------------------------------- profile


def _kineto_events(prof: torch.profiler.profile) -> list[Any]:
    return [e for e in prof.events() if e.name != MARK]


def _is_device(event: Any) -> bool:
    return event.device_type != torch.autograd.DeviceType.CPU


def _is_annotation(event: Any) -> bool:
    """A record_function range (or its GPU shadow), not work."""
    return bool(getattr(event, "is_user_annotation", False)) or "annotation" in str(
        getattr(event, "activity_type", "") or "").lower()


def _union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end]`` intervals."""
    total, end_so_far = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end <= end_so_far:
            continue
        total += end - max(start, end_so_far)
        end_so_far = end
    return total


def _inside(t: float, ranges: Sequence[tuple[float, float]]) -> bool:
    return any(lo <= t <= hi for lo, hi in ranges)


def _top_table(prof: torch.profiler.profile, calls: int, on_device: bool, total_us_per_call: float,
               top: int) -> pd.DataFrame:
    """The ``top`` operators and kernels by self time (device time on CUDA), per forward+backward;
    ``percentage`` of ``total_us_per_call`` (the summary's device time)."""
    rows = []
    for avg in prof.key_averages():
        if avg.key == MARK:
            continue
        device_kind = avg.device_type != torch.autograd.DeviceType.CPU
        category = categorise_kernel(avg.key) if device_kind else categorise_op(avg.key)
        kind = "kernel" if device_kind else "runtime" if category in ("sync", "launch") or avg.key.startswith(
            "cuda") else "op"
        self_device = float(getattr(avg, "self_device_time_total", 0.0))
        self_cpu = float(avg.self_cpu_time_total)
        rows.append({"name": avg.key, "kind": kind, "category": category, "calls": avg.count / calls,
                     "self_device_time_us": self_device / calls,
                     "total_device_time_us": float(getattr(avg, "device_time_total", 0.0)) / calls,
                     "self_cpu_time_us": self_cpu / calls,
                     "total_cpu_time_us": float(avg.cpu_time_total) / calls,
                     "percentage": 100.0 * (self_device if on_device else self_cpu) / calls / total_us_per_call
                     if total_us_per_call > 0 else math.nan})
    table = pd.DataFrame(rows, columns=list(TOP_COLUMNS))
    key = "self_device_time_us" if on_device else "self_cpu_time_us"
    return table.sort_values([key, "total_cpu_time_us"], ascending=False, kind="stable").head(top).reset_index(
        drop=True)


def _summarise(prof: torch.profiler.profile, calls: int, on_device: bool,
               ranges: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Per-call totals by category, launches, syncs and GPU busy fraction from the profiler's events."""
    events = _kineto_events(prof)
    host = [e for e in events if not _is_device(e)]
    device = [e for e in events if _is_device(e) and not _is_annotation(e)]
    categories = dict.fromkeys(("matmul", "cast", "elementwise", "reduction", "memcpy", "other"), 0.0)
    ops = [e for e in host if e.name.startswith("aten::")]
    out: dict[str, Any] = {"ops_per_call": len(ops) / calls,
                           "host_us_per_call": sum(hi - lo for lo, hi in ranges) / calls}
    if on_device:
        # A device event's linked_correlation_id is the id of the aten op that launched it.
        launched_by = {e.id: e.name for e in host if not getattr(e, "linked_correlation_id", 0)}
        total = 0.0
        for e in device:
            duration = e.time_range.end - e.time_range.start
            total += duration
            op = launched_by.get(getattr(e, "linked_correlation_id", 0), "")
            categories[categorise_kernel(e.name, op)] += duration
        syncs: dict[str, int] = {}
        for e in host:
            if SYNC_CALLS.search(e.name) and _inside(e.time_range.start, ranges):
                syncs[e.name] = syncs.get(e.name, 0) + 1
        launches = sum(1 for e in host if LAUNCH_CALLS.search(e.name) and _inside(e.time_range.start, ranges))
        start = min(lo for lo, _ in ranges)
        end = max([hi for _, hi in ranges] + [e.time_range.end for e in device])
        busy = _union_us((max(e.time_range.start, start), e.time_range.end) for e in device if e.time_range.end > start)
        out.update(time_basis="cuda kernels", wall_us_per_call=(end - start) / calls,
                   kernels_per_call=sum(1 for e in device if not MEMCPY_KERNEL.search(e.name)) / calls,
                   kernel_launches_per_call=launches / calls, host_syncs_per_call=sum(syncs.values()) / calls,
                   host_syncs_by_name={k: v / calls for k, v in sorted(syncs.items())},
                   gpu_busy_fraction=busy / (end - start) if end > start else None)
    else:
        total = 0.0
        for e in host:
            if e.is_async:
                continue
            category = categorise_op(e.name)
            total += e.self_cpu_time_total
            categories[category if category in categories else "other"] += e.self_cpu_time_total
        out.update(time_basis="cpu self time",
                   wall_us_per_call=(max(hi for _, hi in ranges) - min(lo for lo, _ in ranges)) / calls,
                   kernels_per_call=None, kernel_launches_per_call=None, host_syncs_per_call=None,
                   host_syncs_by_name=None, gpu_busy_fraction=None)
    out["device_time_us_per_call"] = total / calls
    out.update({f"{name}_time_us_per_call": value / calls for name, value in categories.items()})
    out["matmul_fraction"] = categories["matmul"] / total if total > 0 else None
    return out


def profile_competitor(name: str, workload: Workload, steps: int, *, calls: int = 3, warmup: int = 2,
                       top: int = 40, trace: Path | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Profile ``calls`` forward+backward runs of competitor ``name`` after ``warmup`` untimed ones.

    Returns the top-operator table and the summary figures (``SUMMARY_KEYS``, per call).
    Exceptions (out of memory too) propagate.
    """
    if calls < 1 or warmup < 0:
        raise ValueError(f"need calls >= 1 and warmup >= 0, got calls={calls}, warmup={warmup}")
    run = get_competitor(name).run
    device = workload.device
    for _ in range(warmup):
        run(workload, steps)
    measure.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_device = device.type == "cuda"
    if on_device:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            with torch.profiler.record_function(MARK):
                out = run(workload, steps)
            del out
    ranges = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                    if e.name == MARK and not _is_device(e))
    summary = _summarise(prof, calls, on_device, ranges)
    table = _top_table(prof, calls, on_device, summary["device_time_us_per_call"], top)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    return table, summary


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


ProfileProgress = Callable[[int, int, str, PerfCell, "dict[str, Any] | None"], None]


def run_profiles(competitors: Sequence[str], cells: Sequence[PerfCell], out_dir: Path, *,
                 device: str | torch.device = "auto", calls: int = 3, warmup: int = 2, top: int = 40,
                 trace: bool = False, seed: int = 0, channels_last: bool = False,
                 progress: ProfileProgress | None = None) -> dict[str, Any]:
    """Profile each competitor on each cell into ``out_dir/profile/``; returns the summary (also
    written, atomically, after each profile): ``{"profiles": {"<competitor>-<cell>": {...}}, ...}``."""
    for name in competitors:
        get_competitor(name)  # KeyError naming the known ones
    device = measure.resolve_device(device)
    folder = Path(out_dir) / PROFILE_DIR
    env = measure.environment(device)
    _write_json(folder / PROFILE_ENV_FILE, env)
    summary: dict[str, Any] = {"gpu": env["gpu"], "device": env["device"], "commit": env.get("commit", ""),
                               "categories": _PATTERNS, "profiles": {}}
    plan = [(cell, name) for cell in cells for name in competitors]
    for index, (cell, name) in enumerate(plan):
        if progress:
            progress(index, len(plan), name, cell, None)
        stem = f"{name}-{cell.slug}" + ("-channels_last" if channels_last else "")
        entry: dict[str, Any] = {"competitor": name, "precision": get_competitor(name).precision,
                                 "workload": cell.workload, "width": cell.width, "batch": cell.batch,
                                 "steps": cell.steps, "channels_last": channels_last, "calls": calls,
                                 "warmup": warmup, "status": "ok", "message": ""}
        try:
            workload = build_workload(cell.workload, width=cell.width, batch=cell.batch, device=device, seed=seed,
                                      channels_last=channels_last)
            trace_path = folder / f"{stem}.trace.json" if trace else None
            table, figures = profile_competitor(name, workload, cell.steps, calls=calls, warmup=warmup, top=top,
                                                trace=trace_path)
            write_csv_atomic(table, folder / f"{stem}.csv")
            entry.update(figures, csv=f"{stem}.csv", trace=trace_path.name if trace_path else None)
            del workload
        except Exception as exc:
            if is_oom(exc):
                entry.update(status="oom", message=_message(exc))
            else:
                entry.update(status="error", message=f"{type(exc).__name__}: {_message(exc)}")
                log.exception("profiling %s on %s failed", name, cell.label)
        free_memory()
        summary["profiles"][stem] = entry
        _write_json(folder / SUMMARY_FILE, summary)
        if progress:
            progress(index + 1, len(plan), name, cell, entry)
    return summary


_PATTERNS = {
    "cuda": "kernels by name (and launching aten op): memcpy ^mem(cpy|set); matmul " + MATMUL_KERNEL.pattern
            + "; cast: launched by " + ", ".join(sorted(CAST_OPS)) + " or " + CAST_KERNEL.pattern
            + "; elementwise " + ELEMENTWISE_KERNEL.pattern + "; reduction " + REDUCTION_KERNEL.pattern,
    "cpu": "aten ops' self CPU time by name: matmul " + MATMUL_OPS.pattern + "; cast " + ", ".join(sorted(CAST_OPS))
           + "; elementwise " + ELEMENTWISE_OPS.pattern + "; reduction " + REDUCTION_OPS.pattern,
    "syncs": SYNC_CALLS.pattern,
    "launches": LAUNCH_CALLS.pattern,
}


# ----------------------------------------------------------------------------- command line

PROG = "python -m rampde.bench.profiling"


def _default_out(device: torch.device) -> Path:
    """``reports/<gpu-slug>/perf`` on a GPU, ``reports/quick/cpu/perf`` on the CPU (ignored by git)."""
    if device.type == "cuda":
        return Path("reports") / measure.gpu_slug(measure.gpu_name(device)) / "perf"
    return Path("reports") / "quick" / "cpu" / "perf"


def _cells(args: argparse.Namespace, device: torch.device, fallback: Sequence[str]) -> list[PerfCell]:
    from .cli import UsageError, _ints, _items

    names = _items(args.workload) or list(fallback)
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise UsageError(f"--workload: unknown {unknown}; known: {', '.join(WORKLOADS)}")
    return default_cells(device.type, names, widths=_ints("--widths", args.widths, multiple_of=8),
                         batches=_ints("--batch", args.batch, multiple_of=8), steps=_ints("--steps", args.steps))


def _counts(args: argparse.Namespace, repeats: int, warmup: int) -> tuple[int, int]:
    from .cli import _one_int

    got_warmup = _one_int("--warmup", args.warmup, 0)
    return _one_int("--repeats", args.repeats, 1) or repeats, warmup if got_warmup is None else got_warmup


def cmd_ablate(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from .cli import UsageError, _device, _items, _one_int

    device = _device(args.device)
    cells = _cells(args, device, DEFAULT_WORKLOADS)
    repeats, warmup = _counts(args, 5, 1)
    seed = _one_int("--seed", args.seed, 0) or 0
    names = _items(args.variants)
    known = variant_names(c.workload for c in cells)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"--variants: unknown {unknown}; known here: {', '.join(known)}")
    out = Path(args.out) if args.out else _default_out(device)
    err = args.console
    err.print(f"[bold]{PROG} ablate[/]: {len(cells)} cells on {measure.gpu_name(device)} ({device}), {repeats} "
              f"repeats after {warmup} warm-up runs -> {escape(str(out / ABLATION_FILE))}", highlight=False)

    def progress(done: int, total: int, cell: PerfCell, variant: Variant, row: dict | None) -> None:
        if row is None:
            return
        status = row["status"]
        what = (f"{row['time_ms_median']:.3g} ms, grad err {row['grad_err_params']:.2e}" if status == "ok"
                else f"[yellow]{status}[/] {escape(str(row['message'])[:160])}")
        err.print(f"  [{done}/{total}] {escape(cell.label)} {escape(variant.name)}: {what}", highlight=False)

    try:
        table = run_ablation(cells, out, device=device, repeats=repeats, warmup=warmup, seed=seed,
                             variants=names or None, progress=progress)
    except KeyboardInterrupt:
        err.print(f"interrupted: the finished rows are in {escape(str(out / ABLATION_FILE))}", highlight=False)
        return 130
    counts = table["status"].value_counts().to_dict()
    err.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" -> {escape(str(out / ABLATION_FILE))}",
              highlight=False)
    return 1 if counts.get("error") else 0


def cmd_profile(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from .cli import UsageError, _device, _items, _one_int

    device = _device(args.device)
    competitors = _items(args.competitors) or list(PROFILE_COMPETITORS)
    for name in competitors:
        try:
            get_competitor(name)
        except KeyError as exc:
            raise UsageError(f"--competitors: {exc.args[0]}") from None
    default = PROFILE_SIZES["cuda" if device.type == "cuda" else "cpu"]
    if not args.workload:  # the default cell; a workload named takes its ablation sizes
        args.workload, args.widths = [default.workload], args.widths or [str(default.width)]
    cells = _cells(args, device, [default.workload])
    if args.channels_last and any(c.workload != "conv" for c in cells):
        raise UsageError("--channels-last: applies to the conv workload only (give --workload conv)")
    calls, warmup = _counts(args, 3, 2)
    top = _one_int("--top", args.top, 1) or 40
    seed = _one_int("--seed", args.seed, 0) or 0
    out = Path(args.out) if args.out else _default_out(device)
    err = args.console
    err.print(f"[bold]{PROG} profile[/]: {len(competitors)} competitors x {len(cells)} cells on "
              f"{measure.gpu_name(device)} ({device}), {calls} calls after {warmup} warm-up runs -> "
              f"{escape(str(out / PROFILE_DIR))}", highlight=False)

    def progress(done: int, total: int, name: str, cell: PerfCell, entry: dict | None) -> None:
        if entry is None:
            return
        if entry["status"] == "ok":
            what = (f"{entry['device_time_us_per_call'] / 1e3:.3g} ms per call ({entry['time_basis']}), "
                    f"matmul {100 * (entry['matmul_fraction'] or 0):.0f}%")
        else:
            what = f"[yellow]{entry['status']}[/] {escape(entry['message'][:160])}"
        err.print(f"  [{done}/{total}] {escape(name)} {escape(cell.label)}: {what}", highlight=False)

    try:
        summary = run_profiles(competitors, cells, out, device=device, calls=calls, warmup=warmup, top=top,
                               trace=args.trace, seed=seed, channels_last=args.channels_last, progress=progress)
    except KeyboardInterrupt:
        err.print(f"interrupted: finished profiles are in {escape(str(out / PROFILE_DIR))}", highlight=False)
        return 130
    failed = [k for k, v in summary["profiles"].items() if v["status"] == "error"]
    err.print(f"summary: {escape(str(out / PROFILE_DIR / SUMMARY_FILE))}", highlight=False)
    return 1 if failed else 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", nargs="+", metavar="NAME", help="mlp, conv, cnf")
    parser.add_argument("--widths", nargs="+", metavar="W", help="widths / conv channels (multiples of 8)")
    parser.add_argument("--batch", nargs="+", metavar="B", help="batch sizes (multiples of 8)")
    parser.add_argument("--steps", nargs="+", metavar="N", help="rk4 step counts")
    parser.add_argument("--device", default="auto", help="auto (the GPU if any), cpu, cuda or cuda:N")
    parser.add_argument("--out", help="folder (default reports/<gpu-model>/perf on a GPU, reports/quick/cpu/perf "
                                      "on the CPU)")
    parser.add_argument("--seed", metavar="S", help="seed of the workloads (default 0)")
    parser.add_argument("--threads", metavar="N", help="torch CPU threads (torch.set_num_threads); default torch's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Ablate rampde's options; profile competitors; "
                                                               "probe GEMM throughput.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: log each row; -vv: debug")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{ablate,profile,gemm}")

    ablate = sub.add_parser("ablate", help="time, memory and gradient error of rampde variants per cell")
    _common(ablate)
    ablate.add_argument("--repeats", metavar="N", help="timed repeats (median reported; default 5)")
    ablate.add_argument("--warmup", metavar="N", help="untimed runs before timing (default 1)")
    ablate.add_argument("--variants", nargs="+", metavar="NAME",
                        help="only these variants (quote names with spaces; default all)")
    ablate.set_defaults(func=cmd_ablate)

    profile = sub.add_parser("profile", help="torch.profiler tables and a summary per competitor")
    _common(profile)
    profile.add_argument("--competitors", nargs="+", metavar="NAME",
                         help=f"registry names (default {' '.join(PROFILE_COMPETITORS)})")
    profile.add_argument("--repeats", metavar="N", help="profiled forward+backward calls (default 3)")
    profile.add_argument("--warmup", metavar="N", help="untimed calls before profiling (default 2)")
    profile.add_argument("--top", metavar="N", help="rows of each operator table (default 40)")
    profile.add_argument("--trace", action="store_true", help="also write a chrome trace per competitor")
    profile.add_argument("--channels-last", action="store_true", help="conv weights and y0 in channels_last")
    profile.set_defaults(func=cmd_profile)

    from . import gemm_probe

    gemm = sub.add_parser("gemm", help="a Linear's GEMMs with inner dimension width and width + 1, per precision")
    gemm_probe.add_arguments(gemm).set_defaults(func=gemm_probe.cmd_gemm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rampde.bench.profiling``; returns the exit code (2 for a bad value)."""
    from .cli import INTERRUPTED, UsageError, _console, _logging_to, _one_int

    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    args.console = _console(stderr=True)
    try:
        threads = _one_int("--threads", args.threads, 1)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    with _logging_to(args.console, args.verbose):
        try:
            code = int(args.func(args) or 0)
        except UsageError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: {INTERRUPTED}", file=sys.stderr)
            return 130
    log.debug("%s took %.1f s", args.command, time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
