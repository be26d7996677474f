"""``rampde-bench``: run a sweep, print the environment, the claims or the targets, build the
dashboard, train.

    rampde-bench run [--suite quick|paper|perf] [--competitors ...] [--workloads ...] [--widths ...]
                     [--steps ...] [--batch ...] [--repeats N] [--warmup N] [--device D] [--out DIR]
                     [--seed S] [--threads N] [--retry-errors]
    rampde-bench env [--device D] [--json]
    rampde-bench claims [RESULTS.csv ...] [--csv OUT.csv]
    rampde-bench targets [--results CSV ...] [--markdown]      (the performance targets, met or not)
    rampde-bench report [--results CSV ...] [--asv-results DIR] [--training CSV ...] [--out HTML]
    rampde-bench train --task digits|cnf ...        (rampde.bench.training)

Lists take space- or comma-separated values; ``--competitors all`` takes every competitor. Every
``run`` option overrides the suite's choice. A bad value exits with code 2 and a message naming
the option; an interrupted run exits with 130 and resumes when run again with the same options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import measure

log = logging.getLogger("rampde.bench")

DEFAULT_REPORT = Path("reports/index.html")
RESULTS_GLOB = "**/results.csv"  # under reports/: a folder per GPU model, and quick/cpu/
TRAINING_GLOB = "**/training.csv"
DEFAULT_ASV = Path("reports") / "asv" / "results"  # asv.conf.json's results_dir


class UsageError(Exception):
    """A bad command-line value: printed with the option's name, exit code 2."""


# ----------------------------------------------------------------------------- parsing values


def _items(values: Sequence[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``."""
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def _ints(option: str, values: Sequence[str] | None, *, minimum: int = 1, multiple_of: int = 1) -> list[int]:
    out = []
    for item in _items(values):
        try:
            value = int(item)
        except ValueError:
            raise UsageError(f"{option}: {item!r} is not an integer") from None
        if value < minimum or value % multiple_of:
            if minimum >= 1:
                need = "a positive integer" + (f" multiple of {multiple_of}" if multiple_of > 1 else "")
            else:
                need = f"an integer >= {minimum}"
            raise UsageError(f"{option}: {value} is not {need}")
        out.append(value)
    if values is not None and not out:
        raise UsageError(f"{option}: no value given")
    return list(dict.fromkeys(out))


def _one_int(option: str, value: str | None, minimum: int) -> int | None:
    return None if value is None else _ints(option, [value], minimum=minimum)[0]


def _device(name: str):
    try:
        return measure.resolve_device(name)
    except ValueError as exc:
        raise UsageError(f"--device: {exc}") from None


def _console(stderr: bool = False):
    """A rich console; wide when it writes to a file or a pipe, so that tables stay whole."""
    from rich.console import Console

    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=200)


@contextlib.contextmanager
def _logging_to(console, verbose: int) -> Iterator[None]:
    """Show the library's log records on ``console`` (rich) for the command's duration, then put
    the logging configuration back as it was (the CLI may run inside another program or a test)."""
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    handler = RichHandler(console=console, show_path=False, show_time=verbose > 0, markup=False)
    handler.setLevel(level)
    root, ours = logging.getLogger(), logging.getLogger("rampde")
    before = ours.level
    ours.setLevel(level)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        ours.setLevel(before)


# ----------------------------------------------------------------------------- run


def _plan(args: argparse.Namespace, device) -> tuple[Any, list, int, int]:
    """The suite, its cells after the command line's overrides, repeats and warm-up runs."""
    from .competitors import get_competitor, list_competitors
    from .suites import get_suite
    from .sweep import make_grid
    from .workloads import WORKLOADS

    try:
        suite = get_suite(args.suite, device.type)
    except ValueError as exc:
        raise UsageError(f"--suite: {exc}") from None
    competitors = _items(args.competitors) or suite.competitors
    if competitors == ["all"]:
        competitors = [c.name for c in list_competitors()]
    for name in competitors:
        try:
            get_competitor(name)
        except KeyError as exc:
            raise UsageError(f"--competitors: {exc.args[0]}") from None
    names = _items(args.workloads) or list(suite.workloads)
    if names == ["all"]:
        names = list(WORKLOADS)
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise UsageError(f"--workloads: unknown {unknown}; known: {', '.join(WORKLOADS)}")
    workloads = {w: suite.sizes_of(w) for w in dict.fromkeys(names)}
    widths = _ints("--widths", args.widths, multiple_of=8)
    batches = _ints("--batch", args.batch, multiple_of=8)
    for sizes in workloads.values():
        sizes["widths"] = widths or sizes["widths"]
        sizes["batches"] = batches or sizes["batches"]
    steps = _ints("--steps", args.steps) or suite.steps
    repeats = _one_int("--repeats", args.repeats, 1) or suite.repeats
    warmup = _one_int("--warmup", args.warmup, 0)
    warmup = suite.warmup if warmup is None else warmup
    return suite, make_grid(competitors, workloads, steps), repeats, warmup


def _out_folder(value: str | None, default: Path) -> Path:
    """``--out`` as a folder (``default`` when not given); UsageError when it names a file."""
    out = Path(value) if value else default
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} is a file; give a folder for the results")
    return out


def _default_out(suite: str, device) -> Path:
    """``reports/<gpu-slug>/`` on a GPU (the committed data; quick and perf cells are paper cells
    too); on the CPU ``reports/cpu/`` for the paper suite, else ``reports/quick/cpu/`` (quick) or
    ``reports/quick/cpu-<suite>/``, which git ignores: CPU timings of GPU suites mean nothing."""
    if device.type == "cuda":
        return Path("reports") / measure.gpu_slug(measure.gpu_name(device))
    if suite == "paper":
        return Path("reports") / "cpu"
    return Path("reports") / "quick" / ("cpu" if suite == "quick" else f"cpu-{suite}")


def cmd_run(args: argparse.Namespace) -> int:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from rich.markup import escape

    from .results import claims
    from .sweep import DeviceLost, run_sweep

    device = _device(args.device)
    seed = _one_int("--seed", args.seed, 0) or 0
    threads = _one_int("--threads", args.threads, 1)
    suite, cells, repeats, warmup = _plan(args, device)
    out = _out_folder(args.out, _default_out(suite.name, device))
    err = args.console
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    err.print(f"[bold]rampde-bench run[/] suite [bold]{suite.name}[/]: {len(cells)} cells on "
              f"{measure.gpu_name(device)} ({device}), {repeats} repeats after {warmup} warm-up runs "
              f"-> {escape(str(out))}")
    if suite.notes:
        err.print(f"  note: {suite.notes}")
    started = time.perf_counter()
    statuses: dict[str, int] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    try:
        with Progress(*columns, console=err, transient=False) as bar:
            task = bar.add_task("cells", total=None)

            def progress(done: int, total: int, cell, row) -> None:
                bar.update(task, total=total, completed=done, description=f"{cell.label:44.44}")
                if row is not None:
                    statuses[row["status"]] = statuses.get(row["status"], 0) + 1
                    if row["status"] != "ok":
                        err.print(f"  {escape(cell.label)}: [yellow]{row['status']}[/] "
                                  f"{escape(row['message'][:160])}", highlight=False)

            table = run_sweep(cells, out, device=device, repeats=repeats, warmup=warmup, seed=seed,
                              retry_errors=args.retry_errors, progress=progress)
    except KeyboardInterrupt:
        err.print(f"interrupted: finished cells are in {escape(str(out / 'results.csv'))}; "
                  "run the same command to resume", highlight=False)
        return 130
    except DeviceLost as exc:
        err.print(f"[red]stopped:[/] {escape(str(exc))}; finished cells are in "
                  f"{escape(str(out / 'results.csv'))}", highlight=False)
        return 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "nothing new"
    err.print(f"{counts} in {time.perf_counter() - started:.0f} s; {len(table)} cells in "
              f"{escape(str(out / 'results.csv'))}", highlight=False)
    _print_claims(claims(table), _console())
    if statuses.get("error"):
        err.print(f"[red]{statuses['error']} cell(s) failed with an error[/] (see their message); "
                  "rerun with --retry-errors once fixed")
        return 1
    return 0


# ----------------------------------------------------------------------------- claims


def _fmt(value: Any, kind: str) -> str:
    """A table cell: text escaped for rich, NaN as a dash, numbers by kind."""
    if isinstance(value, str):
        from rich.markup import escape

        return escape(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if kind == "ratio":
        return f"{value:.2f}"
    if kind == "err":
        return f"{value:.2e}"
    if kind == "ms":
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


_CELL_COLUMNS = [("gpu", ""), ("competitor", ""), ("workload", ""), ("width", ""), ("batch", ""), ("steps", ""),
                 ("time_ms", "ms"), ("speedup_vs_fp32", "ratio"), ("speedup_vs_tf32", "ratio"),
                 ("mem_ratio_vs_fp32", "ratio"), ("grad_err", "err"), ("naive_grad_err", "err"),
                 ("nocache_grad_err", "err"), ("note", "")]


def _print_claims(per_cell, console) -> None:
    """The per-cell claims table and the summary per GPU and rampde competitor."""
    from rich.table import Table

    from .results import claims_summary

    if per_cell.empty:
        console.print("no rampde cell ran fine: no claims to show")
        return
    cells = Table(title="claims per cell (speedup = baseline time / ours; memory = our peak / torchdiffeq-fp32's; "
                        "gradient errors against fp64)", title_justify="left")
    for name, kind in _CELL_COLUMNS:
        cells.add_column(name, justify="right" if kind else "left", no_wrap=name != "note")
    for row in per_cell.to_dict("records"):
        cells.add_row(*[_fmt(row[name], kind) for name, kind in _CELL_COLUMNS])
    console.print(cells)

    summary = claims_summary(per_cell)
    table = Table(title="claims per GPU (geometric mean \\[min – max] over the cells)", title_justify="left")
    for name in ("gpu", "competitor", "cells", "speedup vs fp32", "speedup vs tf32", "memory vs fp32",
                 "grad err max", "naive max", "nocache max", "beats naive"):
        table.add_column(name, justify="left" if name in ("gpu", "competitor") else "right", no_wrap=True)

    def spread(row: dict, metric: str) -> str:
        mean = row[f"{metric}_geomean"]
        if math.isnan(mean):
            return "—"
        return f"{mean:.2f} [{row[f'{metric}_min']:.2f} – {row[f'{metric}_max']:.2f}]"

    for row in summary.to_dict("records"):
        table.add_row(_fmt(row["gpu"], ""), _fmt(row["competitor"], ""), str(row["cells"]), spread(row, "speedup_vs_fp32"),
                      spread(row, "speedup_vs_tf32"), spread(row, "mem_ratio_vs_fp32"),
                      _fmt(row["grad_err_max"], "err"), _fmt(row["naive_grad_err_max"], "err"),
                      _fmt(row["nocache_grad_err_max"], "err"),
                      f"{row['beats_naive']}/{row['vs_naive']}" if row["vs_naive"] else "—")
    console.print(table)


def _results_arguments(parser: argparse.ArgumentParser) -> None:
    """Results files as arguments or after --results, both accepted by claims, targets and report."""
    parser.add_argument("files", nargs="*", metavar="RESULTS", help=f"results.csv files (default "
                                                                     f"reports/{RESULTS_GLOB})")
    parser.add_argument("--results", nargs="+", default=[], help="results.csv files, as the arguments")


def _given_results(args: argparse.Namespace) -> list[str]:
    return [*args.files, *args.results]


def _results_paths(given: Sequence[str] | None) -> list[Path]:
    if given:
        return [Path(p) for p in given]
    return sorted(Path("reports").glob(RESULTS_GLOB))


def _read_all(command: str, given: Sequence[str] | None):
    """The results files given (default every ``reports/**/results.csv``) as one table; a missing
    or malformed file is a usage error naming ``command``."""
    import pandas as pd

    from .results import read_results

    paths = _results_paths(given)
    if not paths:
        raise UsageError(f"{command}: no results file given and none at reports/{RESULTS_GLOB}")
    try:
        return pd.concat([read_results(p) for p in paths], ignore_index=True)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{command}: {exc}") from None


def cmd_claims(args: argparse.Namespace) -> int:
    from .results import claims, write_csv_atomic

    per_cell = claims(_read_all("claims", _given_results(args)))
    _print_claims(per_cell, _console())
    if args.csv:
        write_csv_atomic(per_cell, Path(args.csv))
        args.console.print(f"claims per cell written to {args.csv}")
    return 0


# ----------------------------------------------------------------------------- targets

_VERDICT_STYLE = {"met": "green", "met where measured": "green", "missed": "bold red", "not measured": "yellow"}


def _print_targets(table, console) -> None:
    """The targets per cell, then one line per GPU and target (rich tables)."""
    from rich.table import Table

    from .targets import format_value, needs, targets_summary, verdict

    def styled(text: str) -> str:
        return f"[{_VERDICT_STYLE[text]}]{text}[/]"

    cells = Table(title="targets per cell ('best variant' rows are reported, the named competitor "
                        "decides)", title_justify="left")
    for name in ("gpu", "target", "competitor", "role", "cell", "measured", "needs", "verdict", "note"):
        cells.add_column(name, justify="right" if name in ("measured", "needs") else "left",
                         no_wrap=name != "note")
    for r in table.to_dict("records"):
        cells.add_row(_fmt(r["gpu"] or "—", ""), r["target"], _fmt(r["competitor"], ""), r["role"],
                      _fmt(r["cell"], ""), format_value(r["target"], r["measured"]), needs(r),
                      styled(verdict(r["met"])), _fmt(r["note"], ""))
    console.print(cells)

    summary = Table(title="targets per GPU (worst: the figure furthest from the threshold among the cells "
                          "that decide)", title_justify="left")
    for name in ("gpu", "target", "status", "worst", "competitor", "cell", "needs", "met/missed/not measured",
                 "note"):
        summary.add_column(name, justify="right" if name in ("worst", "needs") else "left", no_wrap=name != "note")
    for r in targets_summary(table).to_dict("records"):
        summary.add_row(_fmt(r["gpu"] or "—", ""), r["target"], styled(r["status"]),
                        format_value(r["target"], r["worst"]), _fmt(r["worst_competitor"], ""),
                        _fmt(r["worst_cell"], ""), needs(r),
                        f"{r['met_cells']}/{r['missed_cells']}/{r['unmeasured_cells']}", _fmt(r["note"], ""))
    console.print(summary)


def cmd_targets(args: argparse.Namespace) -> int:
    from .targets import evaluate_targets, format_markdown

    table = evaluate_targets(_read_all("targets", _given_results(args)))
    if args.markdown:
        print(format_markdown(table), end="")
    else:
        _print_targets(table, _console())
    return 0


# ----------------------------------------------------------------------------- env, report, train


def cmd_env(args: argparse.Namespace) -> int:
    from rich.table import Table

    device = _device(args.device)
    if args.slug:  # the results folder and asv machine name of this GPU model
        print(measure.gpu_slug(measure.gpu_name(device)))
        return 0
    env = measure.environment(device)
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    table = Table(title="environment recorded with every result",
                  caption="tf32 and cudnn_tf32 are torch's settings in this process; each measured cell "
                          "records the ones it ran with (on for torchdiffeq-tf32 only)")
    table.add_column("key", no_wrap=True)
    table.add_column("value")
    for key, value in env.items():
        table.add_row(key, str(value))
    _console().print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_dashboard

    width, height = _size(args.screenshot_size)
    results = _results_paths(_given_results(args))
    training = [Path(p) for p in args.training] if args.training else sorted(Path("reports").glob(TRAINING_GLOB))
    if not results:
        log.warning("no results file given and none at reports/%s: the dashboard will say so", RESULTS_GLOB)
    extra = {"training": training} if training else {}
    asv_results = Path(args.asv_results) if args.asv_results else (DEFAULT_ASV if DEFAULT_ASV.is_dir() else None)
    try:
        path = build_dashboard(results, Path(args.out), asv_results=asv_results, **extra)
    except FileNotFoundError as exc:
        raise UsageError(f"report: {exc}") from None
    print(f"dashboard: {Path(path).resolve()}")
    if args.screenshot:
        from .browser import screenshot_dashboard

        try:
            shot = screenshot_dashboard(Path(path), Path(args.screenshot), width=width, height=height)
        except (FileNotFoundError, RuntimeError, TimeoutError) as exc:
            raise UsageError(f"report --screenshot: {exc}") from None
        print(f"screenshot: {shot.resolve()}")
    return 0


def _size(text: str) -> tuple[int, int]:
    """``1400x1600`` -> (1400, 1600); ``UsageError`` naming --screenshot-size otherwise (checked
    before the dashboard is built)."""
    from .browser import MIN_SCREENSHOT_PX as low

    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or min(int(p) for p in parts) < low:
        raise UsageError(f"--screenshot-size: expected WIDTHxHEIGHT of at least {low}x{low} pixels, got {text!r}")
    return int(parts[0]), int(parts[1])


def _train(argv: Sequence[str]) -> int:
    """``rampde-bench train ...``: the training-parity suite (rampde.bench.training)."""
    from .training_cli import add_train_arguments, main_train

    parser = add_train_arguments(argparse.ArgumentParser(prog="rampde-bench train",
                                                         description="training parity per competitor"))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return int(main_train(args) or 0)


# ----------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rampde-bench", description="Benchmark rampde against its competitors.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: log each cell; -vv: debug")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,env,claims,targets,report,train}")

    run = sub.add_parser("run", help="measure a sweep into a results folder (resumable)")
    run.add_argument("--suite", default="quick",
                     help="quick (minutes), paper (hours on a GPU) or perf (the targets' cells); default quick")
    run.add_argument("--competitors", nargs="+", metavar="NAME", help="competitor names, or 'all'")
    run.add_argument("--workloads", nargs="+", metavar="NAME", help="mlp, conv, cnf, or 'all'")
    run.add_argument("--widths", nargs="+", metavar="W", help="MLP widths / conv channels (multiples of 8)")
    run.add_argument("--steps", nargs="+", metavar="N", help="step counts")
    run.add_argument("--batch", nargs="+", metavar="B", help="batch sizes (multiples of 8)")
    run.add_argument("--repeats", metavar="N", help="timed repeats per cell (median reported; suite default 5)")
    run.add_argument("--warmup", metavar="N", help="untimed runs before timing (suite default)")
    run.add_argument("--device", default="auto", help="auto (the GPU if any), cpu, cuda or cuda:N")
    run.add_argument("--out", help="results folder (default reports/<gpu-model>/ on a GPU, reports/quick/cpu/ "
                                   "for the quick suite on the CPU)")
    run.add_argument("--seed", metavar="S", help="seed of the workloads (default 0)")
    run.add_argument("--retry-errors", action="store_true", help="measure again the cells stored as errors")
    run.add_argument("--threads", metavar="N", help="torch CPU threads (torch.set_num_threads); default torch's")
    run.set_defaults(func=cmd_run)

    env = sub.add_parser("env", help="print the environment results are recorded with")
    env.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    env.add_argument("--json", action="store_true", help="print JSON instead of a table")
    env.add_argument("--slug", action="store_true",
                     help="print only the GPU model's name as results folder and asv machine (nvidia-h100-80gb-hbm3)")
    env.set_defaults(func=cmd_env)

    claims = sub.add_parser("claims", help="print the claims computed from results files")
    _results_arguments(claims)
    claims.add_argument("--csv", help="also write the per-cell claims to this CSV file")
    claims.set_defaults(func=cmd_claims)

    targets = sub.add_parser("targets", help="judge the performance targets from results files")
    _results_arguments(targets)
    targets.add_argument("--markdown", action="store_true", help="print Markdown tables instead")
    targets.set_defaults(func=cmd_targets)

    report = sub.add_parser("report", help="build the HTML dashboard")
    _results_arguments(report)
    report.add_argument("--asv-results", help=f"asv results folder, one sub-folder per GPU model (default "
                        f"{DEFAULT_ASV} when it exists)")
    report.add_argument("--training", nargs="+", help=f"training.csv files (default reports/{TRAINING_GLOB})")
    report.add_argument("--out", default=str(DEFAULT_REPORT), help=f"HTML file (default {DEFAULT_REPORT})")
    report.add_argument("--screenshot", metavar="PNG", help="also save a PNG of the dashboard's first view "
                        "(headless Chromium)")
    report.add_argument("--screenshot-size", default="1400x1600", metavar="WxH",
                        help="the screenshot's viewport in CSS pixels (default 1400x1600)")
    report.set_defaults(func=cmd_report)

    sub.add_parser("train", add_help=False, help="training parity per competitor (see 'rampde-bench train -h')")
    return parser


# A Ctrl-C outside a command's own handler (while it prints its tables, say). Every file the
# commands write is replaced atomically, so what exists is complete.
INTERRUPTED = "interrupted; every results file written so far is complete"


def _command_index(argv: Sequence[str]) -> int | None:
    """Where the sub-command stands in ``argv`` (after the global options)."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return i
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The ``rampde-bench`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    at = _command_index(argv)
    try:
        args = parser.parse_args(argv[: at + 1] if at is not None and argv[at] == "train" else argv)
    except SystemExit as exc:  # argparse's own errors (exit 2) and --help (exit 0)
        return int(exc.code or 0)
    args.console = _console(stderr=True)
    with _logging_to(args.console, args.verbose):
        try:
            if args.command == "train":
                return _train(argv[at + 1:])
            return int(args.func(args) or 0)
        except UsageError as exc:
            print(f"rampde-bench: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # after the work (or before it began): each file is whole or absent
            print(f"rampde-bench: {INTERRUPTED}", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
