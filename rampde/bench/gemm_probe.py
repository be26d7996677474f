"""Matmul throughput by shape and precision: what the MLP field's ``width + 1`` inputs cost.

The MLP workload (``Linear(width+1, width)`` on ``[y, t]``, as issue 8 and the paper fix it) runs
its first layer with an inner dimension of ``width + 1``: an odd number of elements per row, so
rows of the 16-bit and fp32 operands do not start on 16-byte boundaries. cuBLAS picks its
tensor-core kernels by the operands' alignment; whether an odd inner dimension costs speed on a
GPU, and how much, is what this probe measures, so that a result set can tell the field's shape
from the solver when the MLP's throughput falls short.

For each precision (``bf16``, ``fp16``, ``tf32``, ``fp32`` with TF32 off) and width ``n`` it times
the three GEMMs of one ``nn.Linear`` forward+backward on a batch of ``m`` rows, with the layouts
``nn.Linear`` uses (``x`` m x k, ``w`` n x k, ``g`` m x n, all row-major): ``x w^T``, ``g w`` and
``g^T x``, once with ``k = n`` and once with ``k = n + 1``. One timed call runs ``inner`` such
triples into preallocated outputs (``measure.time_runs``: CUDA events on a GPU); figures are per
triple, and the forward GEMM is also timed alone (what rampde's default storage recomputes). On a
GPU the probe also names the kernel that took the most device time (``torch.profiler``), which is
where cuBLAS's choice shows. ``mlp_gemm_ceiling`` turns a width's two rows into the fraction of
the fp16 peak an MLP solve would reach if its GEMMs were all its time: the most the efficiency
target can get on that GPU, whatever the solver does around them.

    python -m rampde.bench.profiling gemm [--out DIR] [--device auto] [--widths 256 1024 2048]
                                          [--batch 2048] [--precisions bf16 fp16 tf32 fp32]
                                          [--repeats 5] [--inner 10]

Writes ``<out>/gemm.csv`` (columns in ``GEMM_COLUMNS``), rewritten atomically after each row. Out
of memory is a row (``status="oom"``); TF32 on the CPU is a row with ``status="unsupported"``.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from . import measure
from .competitors import tf32
from .results import write_csv_atomic
from .sweep import _now, failure_columns, free_memory, raise_if_device_lost

log = logging.getLogger(__name__)

__all__ = ["GEMM_COLUMNS", "PRECISIONS", "GemmShape", "probe_shapes", "linear_gemms", "measure_shape", "run_probe",
           "mlp_gemm_ceiling", "add_arguments", "cmd_gemm"]

# The tensor-core precisions first: a probe stopped at its time limit has measured those.
PRECISIONS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16,
                                      "tf32": torch.float32, "fp32": torch.float32}
GEMM_FILE = "gemm.csv"
DEFAULT_SIZES = {"cuda": ((256, 1024, 2048), 2048), "cpu": ((64,), 64)}  # (widths, batch)

GEMM_COLUMNS: dict[str, str] = {
    "gpu": "GPU model name, or 'cpu'",
    "device": "cuda or cpu",
    "precision": "fp32 (TF32 off), tf32, bf16 or fp16",
    "m": "rows of x and g (the batch)",
    "n": "output features (the width)",
    "k": "inner dimension: the width, or the width + 1 of the MLP's first layer",
    "row_alignment_bytes": "largest power of two up to 16 dividing k * element size: where a k-row starts",
    "inner": "GEMM triples per timed call",
    "repeats": "timed calls",
    "time_us_median": "us per triple (x w^T, g w, g^T x), median of the calls",
    "time_us_q25": "us per triple, first quartile",
    "time_us_q75": "us per triple, third quartile",
    "forward_us_median": "us per forward GEMM x w^T alone, median of the calls (what a recomputation repeats)",
    "tflops": "TFLOP/s: 3 * 2*m*n*k per triple / median time",
    "fraction_of_fp16_peak": "tflops / the GPU's dense fp16 tensor-core peak (measure.dense_fp16_peak_tflops)",
    "vs_aligned": "this row's tflops / the tflops of k = n at the same precision and n",
    "top_kernel": "the kernel with the most device time in one profiled call (CUDA only)",
    "status": "ok, oom, error or unsupported",
    "message": "error text or a note; empty when ok",
    "commit": "git commit of this project",
    "timestamp": "UTC time the row was measured, ISO 8601",
}


class GemmShape:
    """One probe: a precision and the (m, n, k) of a Linear's GEMMs."""

    def __init__(self, precision: str, m: int, n: int, k: int) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        for name, value in (("m", m), ("n", n), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.precision, self.m, self.n, self.k = precision, m, n, k

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def flops(self) -> float:
        """FLOPs of one triple: three GEMMs of 2*m*n*k each."""
        return 3.0 * 2 * self.m * self.n * self.k

    def row_alignment(self) -> int:
        """Largest power of two up to 16 that divides a k-row's size in bytes."""
        row = self.k * torch.empty((), dtype=self.dtype).element_size()
        return math.gcd(row, 16)

    def label(self) -> str:
        return f"{self.precision} m={self.m} n={self.n} k={self.k}"


def probe_shapes(widths: Sequence[int], batch: int, precisions: Sequence[str]) -> list[GemmShape]:
    """Per precision and width: k = width, then k = width + 1 (the aligned one first, so that each
    odd row has its reference)."""
    return [GemmShape(p, batch, n, k) for p in precisions for n in widths for k in (n, n + 1)]


def linear_gemms(shape: GemmShape, device: torch.device, inner: int, seed: int = 0
                 ) -> tuple[Callable[[], None], dict[str, torch.Tensor]]:
    """``inner`` triples of a Linear's forward+backward GEMMs on fixed operands and outputs; returns
    the call and its tensors (operands ``x``, ``w``, ``g``; outputs ``y = x w^T``, ``dx = g w``,
    ``dw = g^T x``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def operand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) / math.sqrt(size[-1])).to(device=device, dtype=shape.dtype)

    x, w, g = operand(shape.m, shape.k), operand(shape.n, shape.k), operand(shape.m, shape.n)
    y, dx, dw = (torch.empty(r, c, device=device, dtype=shape.dtype)
                 for r, c in ((shape.m, shape.n), (shape.m, shape.k), (shape.n, shape.k)))

    def call() -> None:
        for _ in range(inner):
            torch.mm(x, w.t(), out=y)
            torch.mm(g, w, out=dx)
            torch.mm(g.t(), x, out=dw)
    return call, {"x": x, "w": w, "g": g, "y": y, "dx": dx, "dw": dw}


def _forward_only(tensors: dict[str, torch.Tensor], inner: int) -> Callable[[], None]:
    """``inner`` forward GEMMs ``x w^T`` of ``linear_gemms``' operands, into its ``y``."""
    x, w, y = tensors["x"], tensors["w"], tensors["y"]

    def call() -> None:
        for _ in range(inner):
            torch.mm(x, w.t(), out=y)
    return call


def _top_kernel(call: Callable[[], None], device: torch.device) -> str:
    """The name of the device activity with the most self time in one call; empty off CUDA."""
    if device.type != "cuda":
        return ""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        call()
        measure.synchronize(device)
    kernels = [(float(getattr(avg, "self_device_time_total", 0.0)), avg.key) for avg in prof.key_averages()
               if avg.device_type != torch.autograd.DeviceType.CPU]
    return max(kernels)[1] if kernels else ""


def _shape_row(shape: GemmShape, inner: int, repeats: int) -> dict[str, Any]:
    """A row's columns that describe what was (or was to be) measured; the figures NaN."""
    row: dict[str, Any] = {c: math.nan for c in GEMM_COLUMNS}
    row.update(precision=shape.precision, m=shape.m, n=shape.n, k=shape.k,
               row_alignment_bytes=shape.row_alignment(), inner=inner, repeats=repeats)
    return row


def measure_shape(shape: GemmShape, device: torch.device, *, inner: int = 10, repeats: int = 5,
                  warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """One row of ``GEMM_COLUMNS`` for ``shape`` (without the environment, ``vs_aligned`` NaN)."""
    row = _shape_row(shape, inner, repeats)
    row.update(top_kernel="", status="ok", message="")
    if shape.precision == "tf32" and device.type != "cuda":
        row.update(status="unsupported", message="TF32 is a CUDA matmul mode; the CPU has none")
        return row
    with tf32(shape.precision == "tf32"):
        call, tensors = linear_gemms(shape, device, inner, seed)
        timing = measure.time_runs(call, device, repeats=repeats, warmup=warmup)
        forward = measure.time_runs(_forward_only(tensors, inner), device, repeats=repeats, warmup=warmup)
        row["top_kernel"] = _top_kernel(call, device)
    per_call_us = 1e3 / inner
    row.update(time_us_median=timing.median_ms * per_call_us, time_us_q25=timing.q25_ms * per_call_us,
               time_us_q75=timing.q75_ms * per_call_us, forward_us_median=forward.median_ms * per_call_us,
               tflops=measure.achieved_tflops(shape.flops * inner, timing.median_ms))
    return row


def mlp_gemm_ceiling(rows: pd.DataFrame, width: int, precision: str, peak_tflops: float,
                     stages: int = 4) -> dict[str, float]:
    """The fraction of ``peak_tflops`` that an explicit RK solve of the MLP field at ``width``
    would reach if its GEMMs were all the time it took, from this probe's times (batch = ``m``).

    The field's layers are ``Linear(width+1, width)`` (the row with ``k = width + 1``) and
    ``Linear(width, width)`` (``k = width``). Per step, ``stages`` evaluations each run both
    layers' forward GEMMs and ``stages`` vector-Jacobian products their two backward GEMMs: one
    probe triple per layer and stage, the useful work (``measure.solve_flops`` counts the same).
    ``"activations"``: that alone; ``"states"`` (rampde's default storage) also recomputes the
    forward GEMMs in the backward (``forward_us_median``). NaN where a row is missing or not ok
    (``"states"`` also where the forward GEMM was not timed alone).
    """
    def row(k: int) -> dict[str, Any] | None:
        match = rows[(rows["precision"] == precision) & (rows["n"] == width) & (rows["k"] == k)
                     & (rows["status"] == "ok")]
        return match.iloc[-1].to_dict() if len(match) else None

    layers = [row(width + 1), row(width)]
    if any(r is None for r in layers) or not peak_tflops > 0:
        return {"activations": math.nan, "states": math.nan}
    useful = stages * sum(3.0 * 2 * r["m"] * r["n"] * r["k"] for r in layers)
    triples_us = stages * sum(r["time_us_median"] for r in layers)
    recompute_us = stages * sum(r.get("forward_us_median", math.nan) for r in layers)  # NaN: a probe before it
    return {storage: useful / (us * 1e-6) / 1e12 / peak_tflops
            for storage, us in (("activations", triples_us), ("states", triples_us + recompute_us))}


def _add_ratios(rows: list[dict[str, Any]], peak_tflops: float) -> None:
    """``fraction_of_fp16_peak`` of every row, and ``vs_aligned`` where the k = n row exists."""
    aligned = {(r["precision"], r["m"], r["n"]): r["tflops"] for r in rows if r["k"] == r["n"]}
    for r in rows:
        tflops = r["tflops"]
        r["fraction_of_fp16_peak"] = tflops / peak_tflops if peak_tflops > 0 else math.nan
        reference = aligned.get((r["precision"], r["m"], r["n"]), math.nan)
        r["vs_aligned"] = tflops / reference if reference > 0 else math.nan


Progress = Callable[[int, int, GemmShape, "dict[str, Any] | None"], None]


def run_probe(shapes: Sequence[GemmShape], out_dir: Path, *, device: str | torch.device = "auto",
              inner: int = 10, repeats: int = 5, warmup: int = 2, seed: int = 0,
              progress: Progress | None = None) -> pd.DataFrame:
    """Measure each shape into ``out_dir/gemm.csv`` (rewritten after each row); returns the table."""
    if inner < 1:
        raise ValueError(f"inner must be >= 1, got {inner!r}")
    device = measure.resolve_device(device)
    env = measure.environment(device)
    peak = measure.dense_fp16_peak_tflops(env["gpu"]) if device.type == "cuda" else math.nan
    path = Path(out_dir) / GEMM_FILE
    rows: list[dict[str, Any]] = []
    for index, shape in enumerate(shapes):
        if progress:
            progress(index, len(shapes), shape, None)
        try:
            row = measure_shape(shape, device, inner=inner, repeats=repeats, warmup=warmup, seed=seed)
        except Exception as exc:
            row = {**_shape_row(shape, inner, repeats), **failure_columns(exc)}
            if row["status"] == "error":
                log.exception("GEMM probe %s failed", shape.label())
        row.update(gpu=env["gpu"], device=env["device"], commit=env.get("commit", ""), timestamp=_now())
        rows.append(row)
        _add_ratios(rows, peak)
        table = pd.DataFrame(rows, columns=list(GEMM_COLUMNS))
        write_csv_atomic(table, path)
        if progress:
            progress(index + 1, len(shapes), shape, rows[-1])
        if row["status"] == "error":
            raise_if_device_lost(device, f"GEMM probe {shape.label()}",
                                 f"the {len(shapes) - index - 1} shape(s) after it were not run; the rows so far are "
                                 f"in {path}")
        free_memory()
    return pd.DataFrame(rows, columns=list(GEMM_COLUMNS))


# ----------------------------------------------------------------------------- command line
# ``python -m rampde.bench.profiling gemm``: the parser and the console come from there.


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``gemm`` subcommand's options."""
    parser.add_argument("--widths", nargs="+", metavar="N", help="output features n (default 256 1024 2048 on "
                                                                 "a GPU, 64 on the CPU)")
    parser.add_argument("--batch", metavar="M", help="rows m (default 2048 on a GPU, 64 on the CPU)")
    parser.add_argument("--precisions", nargs="+", metavar="P", help=f"of {', '.join(PRECISIONS)} (default all)")
    parser.add_argument("--repeats", metavar="N", help="timed calls (median reported; default 5)")
    parser.add_argument("--inner", metavar="N", help="GEMM triples per timed call (default 10)")
    parser.add_argument("--device", default="auto", help="auto (the GPU if any), cpu, cuda or cuda:N")
    parser.add_argument("--out", help="folder of gemm.csv (default reports/<gpu-model>/perf on a GPU, "
                                      "reports/quick/cpu/perf on the CPU)")
    parser.add_argument("--threads", metavar="N", help="torch CPU threads (torch.set_num_threads); default torch's")
    return parser


def cmd_gemm(args: argparse.Namespace) -> int:
    """Runs the probe for ``profiling gemm``; ``UsageError`` for a bad value; the exit code."""
    from rich.markup import escape

    from .cli import UsageError, _device, _ints, _items, _one_int, _out_folder
    from .profiling import PROG, _default_out

    device = _device(args.device)
    widths_default, batch_default = DEFAULT_SIZES["cuda" if device.type == "cuda" else "cpu"]
    widths = _ints("--widths", args.widths) or list(widths_default)
    batch = _one_int("--batch", args.batch, 1) or batch_default
    precisions = _items(args.precisions) or list(PRECISIONS)
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise UsageError(f"--precisions: unknown {unknown}; known: {', '.join(PRECISIONS)}")
    repeats = _one_int("--repeats", args.repeats, 1) or 5
    inner = _one_int("--inner", args.inner, 1) or 10
    out = _out_folder(args.out, _default_out(device))
    shapes = probe_shapes(widths, batch, list(dict.fromkeys(precisions)))
    err = args.console
    err.print(f"[bold]{PROG} gemm[/]: {len(shapes)} shapes on {measure.gpu_name(device)} ({device}) -> "
              f"{escape(str(out / GEMM_FILE))}", highlight=False)

    def progress(done: int, total: int, shape: GemmShape, row: dict | None) -> None:
        if row is None:
            return
        what = (f"{row['time_us_median']:.4g} us, {row['tflops']:.4g} TFLOP/s" if row["status"] == "ok"
                else f"[yellow]{row['status']}[/] {escape(str(row['message'])[:160])}")
        err.print(f"  [{done}/{total}] {escape(shape.label())}: {what}", highlight=False)

    try:
        table = run_probe(shapes, out, device=device, inner=inner, repeats=repeats, progress=progress)
    except KeyboardInterrupt:
        err.print(f"interrupted: the finished rows are in {escape(str(out / GEMM_FILE))}", highlight=False)
        return 130
    return 1 if (table["status"] == "error").any() else 0
