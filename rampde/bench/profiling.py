"""Where the time of a forward+backward goes: an ablation of rampde's options, profiler tables,
and the GEMM probe. This module is their command line.

Three entry points (``python -m rampde.bench.profiling ablate|profile|gemm [options]``):

- ``ablate``: one row per (cell, variant) of rampde's options in ``<out>/ablation.csv``
  (``rampde.bench.ablation``).
- ``profile``: ``torch.profiler`` tables and a summary per competitor and cell in ``<out>/profile/``
  (``rampde.bench.kernel_profile``).
- ``gemm``: a Linear's three GEMMs with inner dimension width and width + 1, per precision, into
  ``<out>/gemm.csv`` (``rampde.bench.gemm_probe``).

The names of ``rampde.bench.ablation`` and ``rampde.bench.kernel_profile`` that other code imports
from here are imported here too.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from . import measure
from .ablation import (ABLATION_COLUMNS, ABLATION_FILE, DEFAULT_WORKLOADS, PerfCell, Variant, ablation_plan,
                       ablation_variants, default_cells, measure_variant, rampde_run, run_ablation, variant_names)
from .competitors import get_competitor
from .kernel_profile import (MARK, PROFILE_COMPETITORS, PROFILE_DIR, PROFILE_SIZES, SUMMARY_FILE, SUMMARY_KEYS,
                             TOP_COLUMNS, categorise_kernel, categorise_op, profile_competitor, run_profiles)
from .sweep import DeviceLost
from .workloads import WORKLOADS

log = logging.getLogger(__name__)

__all__ = [
    "PerfCell", "Variant", "ablation_variants", "ablation_plan", "run_ablation", "measure_variant", "rampde_run",
    "profile_competitor", "run_profiles", "categorise_kernel", "categorise_op", "default_cells",
    "ABLATION_COLUMNS", "TOP_COLUMNS", "SUMMARY_KEYS", "main",
    "variant_names", "MARK", "DEFAULT_WORKLOADS",
]


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

    from .cli import UsageError, _device, _items, _one_int, _out_folder

    device = _device(args.device)
    cells = _cells(args, device, DEFAULT_WORKLOADS)
    repeats, warmup = _counts(args, 5, 1)
    seed = _one_int("--seed", args.seed, 0) or 0
    names = _items(args.variants)
    known = variant_names(c.workload for c in cells)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"--variants: unknown {unknown}; known here: {', '.join(known)}")
    out = _out_folder(args.out, _default_out(device))
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

    from .cli import UsageError, _device, _items, _one_int, _out_folder

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
    out = _out_folder(args.out, _default_out(device))
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
        except DeviceLost as exc:
            print(f"{PROG}: stopped: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{PROG}: {INTERRUPTED}", file=sys.stderr)
            return 130
    log.debug("%s took %.1f s", args.command, time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
