"""``rampde-bench``: run a sweep, print the environment or the claims, build the dashboard, train.

    rampde-bench run [--suite quick|paper] [--competitors ...] [--workloads ...] [--widths ...]
                     [--steps ...] [--batch ...] [--repeats N] [--warmup N] [--device D] [--out DIR]
    rampde-bench env [--device D]
    rampde-bench claims [RESULTS.csv ...]
    rampde-bench report [--results CSV ...] [--asv-results DIR] [--training CSV ...] [--out HTML]
    rampde-bench train --task digits|cnf ...
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

log = logging.getLogger("rampde.bench")

DEFAULT_REPORT = Path("reports/index.html")


class UsageError(Exception):
    """A bad command-line value: printed with the option's name, exit code 2."""


def _positive(option: str, values: Sequence[int], multiple_of: int = 1) -> list[int]:
    for v in values:
        if v <= 0 or v % multiple_of:
            need = "a positive integer" + (f" multiple of {multiple_of}" if multiple_of > 1 else "")
            raise UsageError(f"{option}: {v} is not {need}")
    return list(values)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: CUDA was asked for but torch sees no GPU")
    return device


def _default_out(device: torch.device) -> Path:
    if device.type == "cuda":
        return Path("reports") / measure.gpu_slug(measure.gpu_name(device))
    return Path("reports") / "quick" / "cpu"


def _plan(args: argparse.Namespace, device: torch.device):
    from .competitors import get_competitor
    from .suites import get_suite
    from .sweep import make_grid
    from .workloads import WORKLOADS

    try:
        suite = get_suite(args.suite, device.type)
    except ValueError as exc:
        raise UsageError(f"--suite: {exc}") from None
    competitors = args.competitors or suite.competitors
    for name in competitors:
        try:
            get_competitor(name)
        except KeyError as exc:
            raise UsageError(f"--competitors: {exc.args[0]}") from None
    workloads = dict(suite.workloads)
    if args.workloads:
        unknown = [w for w in args.workloads if w not in WORKLOADS]
        if unknown:
            raise UsageError(f"--workloads: unknown {unknown}; known: {', '.join(WORKLOADS)}")
        default = {"widths": [32], "batches": [32]}
        workloads = {w: dict(suite.workloads.get(w, default)) for w in args.workloads}
    for sizes in workloads.values():
        if args.widths:
            sizes["widths"] = _positive("--widths", args.widths, 8)
        if args.batch:
            sizes["batches"] = _positive("--batch", args.batch, 8)
    steps = _positive("--steps", args.steps) if args.steps else suite.steps
    repeats = _positive("--repeats", [args.repeats])[0] if args.repeats is not None else suite.repeats
    warmup = _positive("--warmup", [args.warmup])[0] if args.warmup is not None else suite.warmup
    return suite, make_grid(competitors, workloads, steps), repeats, warmup


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .results import claims, claims_summary
    from .sweep import run_sweep

    device = _resolve_device(args.device)
    suite, cells, repeats, warmup = _plan(args, device)
    out = Path(args.out) if args.out else _default_out(device)
    console = Console(stderr=True, width=max(Console(stderr=True).width, 150))
    console.print(f"[bold]rampde-bench[/] suite {suite.name}: {len(cells)} cells on {measure.gpu_name(device)}"
                  f" -> {out}" + (f"  ({suite.notes})" if suite.notes else ""))
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("cells", total=None)

        def progress(done, total, cell, row):
            label = f"{cell.competitor} {cell.workload} w{cell.width} b{cell.batch} N{cell.steps}"
            bar.update(task, total=total, completed=done, description=label)
            if row is not None and row["status"] != "ok":
                console.print(f"  {label}: [yellow]{row['status']}[/] {row['message'][:120]}")

        table = run_sweep(cells, out, device=device, repeats=repeats, warmup=warmup, progress=progress)
    console.print(f"{len(table)} cells in {out / 'results.csv'} ({time.perf_counter() - started:.0f} s)")
    _print_claims(claims_summary(claims(table)), console)
    return 0


def _print_claims(summary, console) -> None:
    from rich.table import Table

    if summary.empty:
        console.print("no rampde cell with its baselines yet: no claims to show")
        return
    table = Table(title="claims (per GPU; ratios per cell, best/worst over cells)")
    for column in summary.columns:
        table.add_column(column, justify="right" if summary[column].dtype.kind in "fi" else "left")
    for _, row in summary.iterrows():
        table.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)


def cmd_env(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    env = measure.environment(_resolve_device(args.device))
    table = Table(title="environment")
    table.add_column("key")
    table.add_column("value")
    for key, value in env.items():
        table.add_row(key, str(value))
    Console().print(table)
    return 0


def cmd_claims(args: argparse.Namespace) -> int:
    import pandas as pd
    from rich.console import Console

    from .results import claims, claims_summary, read_results

    paths = [Path(p) for p in args.results] or sorted(Path("reports").glob("*/results.csv"))
    if not paths:
        raise UsageError("claims: no results file given and none under reports/*/results.csv")
    try:
        df = pd.concat([read_results(p) for p in paths], ignore_index=True)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"claims: {exc}") from None
    console = Console(width=max(Console().width, 150))
    per_cell = claims(df)
    if not per_cell.empty:
        console.print(per_cell.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    _print_claims(claims_summary(per_cell), console)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_dashboard

    results = [Path(p) for p in args.results] if args.results else sorted(Path("reports").glob("**/results.csv"))
    training = [Path(p) for p in args.training] if args.training else sorted(Path("reports").glob("**/training.csv"))
    asv = Path(args.asv_results) if args.asv_results else None
    if asv is None and Path("reports/asv/results").is_dir():
        asv = Path("reports/asv/results")
    try:
        path = build_dashboard(results, Path(args.out), asv_results=asv, training=training or None)
    except FileNotFoundError as exc:
        raise UsageError(f"report: {exc}") from None
    print(f"dashboard: {path.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rampde-bench", description="Benchmark rampde against its competitors.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="measure a sweep into a results folder")
    run.add_argument("--suite", default="quick", help="quick (minutes) or paper (hours); default quick")
    run.add_argument("--competitors", nargs="+", help="override the suite's competitors")
    run.add_argument("--workloads", nargs="+", help="mlp, conv, cnf")
    run.add_argument("--widths", nargs="+", type=int, help="widths / channels (multiples of 8)")
    run.add_argument("--steps", nargs="+", type=int, help="step counts")
    run.add_argument("--batch", nargs="+", type=int, help="batch sizes (multiples of 8)")
    run.add_argument("--repeats", type=int, help="timed repeats per cell (median reported)")
    run.add_argument("--warmup", type=int, help="untimed runs before timing")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--out", help="results folder (default reports/<gpu-model>/ or reports/quick/cpu/)")
    run.set_defaults(func=cmd_run)

    env = sub.add_parser("env", help="print the environment results are recorded with")
    env.add_argument("--device", default="auto")
    env.set_defaults(func=cmd_env)

    claims = sub.add_parser("claims", help="print the claims computed from results files")
    claims.add_argument("results", nargs="*", help="results.csv files (default reports/*/results.csv)")
    claims.set_defaults(func=cmd_claims)

    report = sub.add_parser("report", help="build the HTML dashboard")
    report.add_argument("--results", nargs="+", help="results.csv files (default reports/**/results.csv)")
    report.add_argument("--asv-results", help="asv results folder (default reports/asv/results if present)")
    report.add_argument("--training", nargs="+", help="training.csv files (default reports/**/training.csv)")
    report.add_argument("--out", default=str(DEFAULT_REPORT), help=f"HTML file (default {DEFAULT_REPORT})")
    report.set_defaults(func=cmd_report)

    from .training import add_train_arguments, main_train

    train = sub.add_parser("train", help="training parity runs per competitor")
    add_train_arguments(train)
    train.set_defaults(func=main_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"rampde-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rampde-bench: interrupted; finished cells are saved, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
