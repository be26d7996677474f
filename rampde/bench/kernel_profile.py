"""Where the time of a forward+backward goes: ``torch.profiler`` tables and summaries per
competitor and cell, the kernels and ops put in categories by name.

``python -m rampde.bench.profiling profile [options]`` (the command line is in
``rampde.bench.profiling``):

- ``profile``: ``torch.profiler`` (CPU activity, and CUDA on a GPU) over a few forward+backward
  calls of registry competitors after warm-up. Per competitor and cell,
  ``<out>/profile/<competitor>-<cell>.csv`` holds the top operators and kernels (``TOP_COLUMNS``,
  every figure per forward+backward); ``<out>/profile/summary.json`` the totals per category, the
  kernel launches, the host-device synchronisations and how busy the GPU was (``SUMMARY_KEYS``);
  ``<out>/profile/environment.json`` the environment; with ``--trace`` a chrome trace each.

Categories are found by name (the patterns below): on CUDA each kernel, memcpy or memset by its
own name and the name of the aten op that launched it (the profiler links the two), summing device
time; on the CPU each aten op by its name, summing self CPU time (a kernel-free device).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch

from . import measure
from .ablation import PerfCell, _write_json
from .competitors import get_competitor
from .results import write_csv_atomic
from .sweep import failure_columns, free_memory, raise_if_device_lost
from .workloads import Workload, build_workload

log = logging.getLogger(__name__)

__all__ = [
    "profile_competitor", "run_profiles", "categorise_kernel", "categorise_op", "TOP_COLUMNS", "SUMMARY_KEYS", "MARK",
]

PROFILE_DIR = "profile"
SUMMARY_FILE = "summary.json"
PROFILE_ENV_FILE = "environment.json"
MARK = "rampde.profile.forward_backward"  # record_function range around each profiled call

# ``profile``'s default cell per device type and its default competitors.
PROFILE_SIZES: dict[str, PerfCell] = {"cuda": PerfCell("mlp", 2048, 2048, 64), "cpu": PerfCell("mlp", 16, 16, 4)}
PROFILE_COMPETITORS = ("torchdiffeq-fp32", "torchdiffeq-tf32", "rampde-fp16", "rampde-bf16")

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
    "host_us_per_call": "time the host spent inside the calls (launching, or computing on the CPU) / calls, "
                        "under the profiler (which records each op's shapes and dtypes): for the solve's own "
                        "host time, see the sweep's timings",
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
# named like CAST_KERNEL: a copy that changes the dtype; a copy whose source and destination have
# the same dtype, by the op's recorded input dtypes, is a memcpy), elementwise (ELEMENTWISE_KERNEL),
# reduction (REDUCTION_KERNEL), other.
# On the CPU an aten op is matched on its name: MATMUL_OPS, CAST_OPS (a same-dtype copy: memcpy),
# ELEMENTWISE_OPS, REDUCTION_OPS. The top-operator table goes by name alone.
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
COPY_OPS = frozenset({"aten::copy_", "aten::_copy_from", "aten::_copy_from_and_resize"})  # (dst, src, ...)
ELEMENTWISE_OPS = re.compile(
    r"^aten::(add|sub|rsub|mul|div|neg|tanh|tanh_backward|sigmoid|sigmoid_backward|relu|threshold_backward"
    r"|gelu|gelu_backward|silu|silu_backward|pow|exp|exp2|log|sqrt|rsqrt|square|abs|sign|clamp|clamp_min"
    r"|clamp_max|where|addcmul|addcdiv|lerp|fill|zero|reciprocal|maximum|minimum|_foreach_\w+)_?$")
REDUCTION_OPS = re.compile(r"^aten::(sum|mean|norm|linalg_vector_norm|amax|amin|max|min|prod|var|std|all|any"
                           r"|_softmax|_log_softmax)$")
# Host calls that wait for the device (an .item(), a copy to the host, an explicit synchronise).
SYNC_CALLS = re.compile(r"^cu(da)?(Stream|Device|Event|Ctx)Synchronize|^cudaMemcpy(2D)?$|^cuMemcpy[DH]to[DH]")
LAUNCH_CALLS = re.compile(r"^cu(da)?(Launch\w*Kernel\w*|GraphLaunch)")


def same_dtype_copy(op: str, dtypes: Sequence[str] = ()) -> bool:
    """Whether the aten op ``op`` with recorded input dtypes ``dtypes`` copies without a cast."""
    return op in COPY_OPS and len(dtypes) >= 2 and bool(dtypes[0]) and dtypes[0] == dtypes[1]


def categorise_kernel(kernel: str, op: str = "", dtypes: Sequence[str] = ()) -> str:
    """Category of a device activity named ``kernel``, launched by the aten op ``op`` (may be '')
    whose recorded input dtypes are ``dtypes`` (may be empty)."""
    if MEMCPY_KERNEL.search(kernel):
        return "memcpy"
    if MATMUL_KERNEL.search(kernel):
        return "matmul"
    if same_dtype_copy(op, dtypes):
        return "memcpy"
    if op in CAST_OPS or CAST_KERNEL.search(kernel):
        return "cast"
    if ELEMENTWISE_KERNEL.search(kernel):
        return "elementwise"
    if REDUCTION_KERNEL.search(kernel):
        return "reduction"
    return "other"


def categorise_op(name: str, dtypes: Sequence[str] = ()) -> str:
    """Category of a host event: an aten op by name (and, for a copy, its recorded input dtypes
    ``dtypes``), a CUDA runtime call (sync, launch), or other."""
    if SYNC_CALLS.search(name):
        return "sync"
    if LAUNCH_CALLS.search(name):
        return "launch"
    if MATMUL_OPS.search(name):
        return "matmul"
    if same_dtype_copy(name, dtypes):
        return "memcpy"
    if name in CAST_OPS:
        return "cast"
    if ELEMENTWISE_OPS.search(name):
        return "elementwise"
    if REDUCTION_OPS.search(name):
        return "reduction"
    return "other"


# ----------------------------------------------------------------------------- profile


class _Recorded:
    """The recorded input dtypes and launching op of a profiler event.

    torch 2.12 and later keep both on the event (``input_dtypes``, ``linked_correlation_id``);
    torch 2.11 only on the profiler's raw kineto events, whose correlation id is the event's ``id``
    (host and device ids are counted apart, so a device flag and the name pick the right one)."""

    def __init__(self, prof: Any) -> None:
        self._raw: dict[tuple[bool, int], list[tuple[str, list[str], int]]] = {}
        results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
        for k in results.events() if results is not None else ():
            key = (k.device_type() != torch.autograd.DeviceType.CPU, k.correlation_id())
            self._raw.setdefault(key, []).append((k.name(), list(k.dtypes()), k.linked_correlation_id()))

    def _find(self, event: Any) -> tuple[str, list[str], int]:
        found = self._raw.get((_is_device(event), event.id), [])
        named = [entry for entry in found if entry[0] == event.name]
        return named[0] if named else found[0] if len(found) == 1 else ("", [], 0)

    def dtypes(self, event: Any) -> list[str]:
        """Input dtypes of a host event ([] when shapes were not recorded)."""
        own = getattr(event, "input_dtypes", None)
        return list(own) if own else self._find(event)[1]

    def launcher(self, event: Any) -> int:
        """Id of the aten op that launched a device event or runtime call (0: none)."""
        own = getattr(event, "linked_correlation_id", None)
        return own if own is not None else self._find(event)[2]


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
    recorded = _Recorded(prof)
    host = [e for e in events if not _is_device(e)]
    device = [e for e in events if _is_device(e) and not _is_annotation(e)]
    categories = dict.fromkeys(("matmul", "cast", "elementwise", "reduction", "memcpy", "other"), 0.0)
    ops = [e for e in host if e.name.startswith("aten::")]
    out: dict[str, Any] = {"ops_per_call": len(ops) / calls,
                           "host_us_per_call": sum(hi - lo for lo, hi in ranges) / calls}
    if on_device:
        # A device event's linked_correlation_id is the id of the op that launched it. Runtime calls
        # made outside an op (cuda*, cu*) have ids of their own counter, which may equal an op's.
        launched_by = {e.id: e for e in host if not recorded.launcher(e) and not e.name.startswith("cu")}
        total = 0.0
        for e in device:
            duration = e.time_range.end - e.time_range.start
            total += duration
            op = launched_by.get(recorded.launcher(e))
            category = categorise_kernel(e.name, op.name, recorded.dtypes(op)) if op is not None else categorise_kernel(
                e.name)
            categories[category] += duration
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
            category = categorise_op(e.name, recorded.dtypes(e))
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
    # record_shapes: the input dtypes, which tell a cast from a plain copy
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
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
            entry.update(failure_columns(exc))
            if entry["status"] == "error":
                log.exception("profiling %s on %s failed", name, cell.label)
        summary["profiles"][stem] = entry
        _write_json(folder / SUMMARY_FILE, summary)
        if progress:
            progress(index + 1, len(plan), name, cell, entry)
        if entry["status"] == "error":
            raise_if_device_lost(device, f"profiling {name} on {cell.label}",
                                 f"the {len(plan) - index - 1} profile(s) after it were not run; the summary so far "
                                 f"is {folder / SUMMARY_FILE}")
        free_memory()
    return summary


_PATTERNS = {
    "cuda": "kernels by name (and launching aten op): memcpy ^mem(cpy|set); matmul " + MATMUL_KERNEL.pattern
            + "; cast: launched by " + ", ".join(sorted(CAST_OPS)) + " or " + CAST_KERNEL.pattern
            + " (a copy between equal dtypes: memcpy); elementwise " + ELEMENTWISE_KERNEL.pattern + "; reduction " + REDUCTION_KERNEL.pattern,
    "cpu": "aten ops' self CPU time by name: matmul " + MATMUL_OPS.pattern + "; cast " + ", ".join(sorted(CAST_OPS))
           + " (a copy between equal dtypes: memcpy); elementwise " + ELEMENTWISE_OPS.pattern + "; reduction " + REDUCTION_OPS.pattern,
    "syncs": SYNC_CALLS.pattern,
    "launches": LAUNCH_CALLS.pattern,
}
