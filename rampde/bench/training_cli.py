"""``rampde-bench train``: the command line of the train suite (``rampde.bench.training``).

``add_train_arguments`` adds its options to a parser; ``main_train`` runs ``run_training`` per task
with a progress bar and prints the parity table, one compact table per task. ``rampde-bench train``
and ``python -m rampde.bench.training`` run them.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from .training import CSV_NAME, SIZES, TrainingEvent, _check_int, resolve_device, run_training
from .training_recipes import DEFAULT_COMPETITORS, TRAINING_RECIPES, UnknownNameError
from .training_report import parity_table
from .training_tasks import TASKS

__all__ = [
    "add_train_arguments",
    "main_train",
]


# ----------------------------------------------------------------------------- CLI


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the options of ``rampde-bench train`` to ``parser``."""
    parser.add_argument("--task", default="digits",
                        help=f"task name(s), comma-separated, or 'all'; known: {', '.join(TASKS)} (default: digits)")
    parser.add_argument("--competitors", nargs="+", default=list(DEFAULT_COMPETITORS), metavar="NAME",
                        help=f"training recipes (space- or comma-separated, or 'all'); known: "
                             f"{', '.join(TRAINING_RECIPES)} (default: {' '.join(DEFAULT_COMPETITORS)})")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per run (default: the task's default for --size)")
    parser.add_argument("--out", type=Path, default=Path("reports/training"),
                        help="results folder: training.csv and checkpoints/ (default: reports/training); "
                             "rerun with the same folder to resume")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and data order (default: 0)")
    parser.add_argument("--size", choices=SIZES, default="full", help="problem size (default: full)")
    return parser


def _split_names(values: Sequence[str] | str, known: Mapping[str, Any], what: str) -> list[str]:
    items = [values] if isinstance(values, str) else list(values)
    names = [n.strip() for v in items for n in v.split(",") if n.strip()]
    if names == ["all"]:
        return list(known)
    if not names:
        raise ValueError(f"no {what} given; known: {', '.join(known)}")
    for n in names:
        if n not in known:
            raise UnknownNameError(f"unknown {what} {n!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(names))


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"--size must be one of {list(SIZES)}, got {size!r}")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a folder (it will hold training.csv and checkpoints/)")


def _usage_error(message: str) -> None:
    """One plain line on stderr, as the other rampde-bench commands print theirs (no wrapping)."""
    print(f"rampde-bench train: error: {message}", file=sys.stderr)


def _format_tables(table: pd.DataFrame) -> list:
    """One compact rich table per task (fits 80 columns)."""
    from rich import box
    from rich.table import Table

    tables = []
    for task, part in table.groupby("task", sort=False):
        metric = part["metric_name"].iloc[0]
        epochs = int(part["epochs"].max())
        out = Table(title=f"{task}: test {metric} after {epochs} epoch{'s' if epochs != 1 else ''}",
                    box=box.SIMPLE_HEAD, collapse_padding=True)
        out.add_column("competitor", no_wrap=True)
        for col in ("final", "Δ vs fp32", "wall s", "peak MiB", "skipped", "retries"):
            out.add_column(col, justify="right", no_wrap=True)
        for r in part.itertuples():
            delta = "—" if math.isnan(r.delta_vs_fp32) else f"{r.delta_vs_fp32:+.4f}"
            peak = "—" if math.isnan(r.peak_mem_bytes) else f"{r.peak_mem_bytes / 2**20:.1f}"
            out.add_row(r.competitor, f"{r.final_metric:.4f}", delta, f"{r.wall_s:.1f}", peak,
                        str(int(r.skipped_steps)), str(int(r.scaler_retries)))
        tables.append(out)
    return tables


def main_train(args: argparse.Namespace) -> int:
    """Runs ``rampde-bench train`` with a progress bar and prints the parity table; returns the exit code."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console, err = Console(), Console(stderr=True)
    checks = [
        ("--task", lambda: _split_names(args.task, TASKS, "task")),
        ("--competitors", lambda: _split_names(args.competitors, TRAINING_RECIPES, "competitor")),
        ("--epochs", lambda: args.epochs is None or _check_int("--epochs", args.epochs, 1)),
        ("--seed", lambda: _check_int("--seed", args.seed, 0)),
        ("--size", lambda: _check_size(args.size)),
        ("--device", lambda: resolve_device(args.device)),
        ("--out", lambda: _check_out(Path(args.out))),
    ]
    values = {}
    for option, check in checks:
        try:
            values[option] = check()
        except ValueError as exc:
            text = str(exc)
            _usage_error(text if text.startswith(option) else f"{option}: {text}")
            return 2
    tasks, competitors = values["--task"], values["--competitors"]

    frames = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as bar:
            for task in tasks:
                epochs = args.epochs or TASKS[task].sizes[args.size].default_epochs
                bar_id = bar.add_task(task, total=len(competitors) * epochs)
                done: dict[str, int] = {}

                def on_event(ev: TrainingEvent, bar_id=bar_id, done=done) -> None:
                    done[ev.competitor] = ev.epoch
                    bar.update(bar_id, completed=sum(done.values()),
                               description=f"{ev.task} · {ev.competitor} · epoch {ev.epoch}/{ev.epochs}")

                frames.append(run_training(task, competitors, epochs=epochs, out=args.out, device=args.device,
                                           seed=args.seed, size=args.size, progress=on_event))
        for table in _format_tables(parity_table(pd.concat(frames, ignore_index=True))):
            console.print(table)
    except KeyboardInterrupt:  # in a run or after them: every epoch written so far is whole
        err.print(f"interrupted; rerun the same command to resume from {args.out}")
        return 130
    except ValueError as exc:  # e.g. an out folder holding a run with other settings
        _usage_error(str(exc))
        return 2
    console.print(f"results: {Path(args.out) / CSV_NAME}")
    return 0


if __name__ == "__main__":  # pragma: no cover - the command proper is rampde-bench train
    import logging
    import sys

    logging.basicConfig(level=logging.WARNING)
    sys.exit(main_train(add_train_arguments(argparse.ArgumentParser(prog="rampde-bench train")).parse_args()))
