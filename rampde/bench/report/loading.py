"""Reading the dashboard's inputs: results and timelines CSVs, asv results, training CSVs."""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..results import CSV_ERRORS, csv_error
from .schema import (
    CELL_COLUMNS, GRID_COLUMNS, NUMERIC_COLUMNS, REQUIRED_COLUMNS, STRING_COLUMNS, TIMELINE_COLUMNS,
    UNKNOWN_GPU,
)  # fmt: skip
from .style import PALETTE, _finite, precision_of

log = logging.getLogger(__package__)  # the dashboard logs as one: rampde.bench.report


def _empty_results() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in REQUIRED_COLUMNS + ("gpu",)})


class NotACsv(ValueError):
    """A file given as a table that does not parse as CSV; its message is the dashboard's notice."""


def _read_csv(path: Path, kind: str = "file") -> pd.DataFrame:
    """A CSV as a DataFrame (text columns kept as text: CUDA "12.10" is not 12.1); an empty file
    gives an empty frame; a missing one raises FileNotFoundError naming it ("<kind> not found");
    one that does not parse raises NotACsv."""
    if not path.is_file():
        raise FileNotFoundError(f"{kind} not found: {path}")
    try:
        return pd.read_csv(path, dtype={c: str for c in STRING_COLUMNS})
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except CSV_ERRORS as exc:
        raise NotACsv(f"{path} is not a CSV file ({csv_error(exc)}); it was left out.") from None


def _normalise_results(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Add missing optional columns, coerce types, fill defaults; drop rows without a grid."""
    notices: list[str] = []
    df = df.copy()
    for col in NUMERIC_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else float("nan")
    for col in STRING_COLUMNS:
        df[col] = df[col].astype("object").where(df[col].notna(), "") if col in df else ""
        df[col] = df[col].map(lambda v: "" if v is None else str(v))
    for col in GRID_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    bad = df[list(GRID_COLUMNS)].isna().any(axis=1)
    if bad.any():
        notices.append(f"{int(bad.sum())} result rows without width/batch/steps were left out.")
        df = df[~bad]
    for col in GRID_COLUMNS:
        df[col] = df[col].astype("int64")
    df["competitor"] = df["competitor"].astype(str)
    df["workload"] = df["workload"].astype(str)
    df["gpu"] = df["gpu"].replace("", UNKNOWN_GPU)
    df["status"] = df["status"].str.strip().str.lower().replace("", "ok")
    no_precision = df["precision"] == ""
    df.loc[no_precision, "precision"] = df.loc[no_precision, "competitor"].map(precision_of)
    return df.reset_index(drop=True), notices


def load_results(paths: Sequence[Path]) -> tuple[pd.DataFrame, list[str]]:
    """All results tables as one frame, with notices about files that gave nothing usable.

    Raises FileNotFoundError naming a missing file.
    """
    frames: list[pd.DataFrame] = []
    notices: list[str] = []
    for path in map(Path, paths):
        try:
            frame = _read_csv(path, "results file")
        except NotACsv as exc:
            notices.append(str(exc))
            continue
        if frame.empty:
            notices.append(f"{path} holds no result rows.")
            continue
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            notices.append(f"{path} lacks the column(s) {', '.join(missing)}; it was left out.")
            continue
        frame["source"] = str(path)
        frames.append(frame)
    if not frames:
        return _empty_results(), notices
    df, more = _normalise_results(pd.concat(frames, ignore_index=True))
    return df, notices + more


def load_timelines(results_paths: Sequence[Path], results: pd.DataFrame) -> pd.DataFrame:
    """The ``timelines.csv`` beside each results file, joined to its cells' GPU and competitor."""
    frames = []
    for path in map(Path, results_paths):
        tl_path = path.parent / "timelines.csv"
        if not tl_path.is_file():
            continue
        try:
            tl = _read_csv(tl_path)
        except NotACsv as exc:
            log.warning("%s", exc)
            continue
        if tl.empty or "cell_id" not in tl or "t_s" not in tl:
            log.warning("timelines file %s is empty or lacks cell_id/t_s; skipped", tl_path)
            continue
        for col in TIMELINE_COLUMNS[1:]:
            tl[col] = pd.to_numeric(tl[col], errors="coerce") if col in tl else float("nan")
        tl["cell_id"] = tl["cell_id"].astype(str)
        tl["source"] = str(path)
        frames.append(tl[list(TIMELINE_COLUMNS) + ["source"]])
    if not frames or results.empty:
        return pd.DataFrame(columns=list(TIMELINE_COLUMNS) + ["source", "gpu", "competitor"])
    tl = pd.concat(frames, ignore_index=True)
    cells = results[results["cell_id"] != ""][
        ["source", "cell_id", "gpu", "competitor", *CELL_COLUMNS]
    ].drop_duplicates(["source", "cell_id"])
    return tl.merge(cells, on=["source", "cell_id"], how="inner")


def _strip_param(value: object) -> str:
    """An asv parameter as written in its results (a repr) back to plain text."""
    text = str(value)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _asv_unit(name: str, benchmarks: dict) -> str:
    unit = (benchmarks.get(name) or {}).get("unit")
    if unit:
        return str(unit)
    leaf = name.rsplit(".", 1)[-1]
    if leaf.startswith("time_"):
        return "seconds"
    if leaf.startswith(("peakmem_", "mem_")):
        return "bytes"
    return ""


def _looks_like_competitor(value: str) -> bool:
    return value in PALETTE or bool(
        re.match(r"(rampde|torchdiffeq|autocast|checkpoint|reversible)\b", value)
    )


def _asv_file_rows(path: Path, machine: str, benchmarks: dict) -> list[dict]:
    """The rows of one asv 0.6 result file: one per benchmark and parameter combination."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("version", 2) != 2:
        log.warning("asv result %s has api version %s, expected 2", path, data.get("version"))
    columns = data.get("result_columns") or ["result", "params"]
    commit = str(data.get("commit_hash", ""))
    date = data.get("date")
    rows = []
    for name, values in (data.get("results") or {}).items():
        record = dict(zip(columns, values))
        result = record.get("result")
        if result is None:
            continue
        result = result if isinstance(result, list) else [result]
        params = record.get("params") or []
        combos = list(itertools.product(*params)) if params else [()]
        names = (benchmarks.get(name) or {}).get("param_names") or []
        for combo, value in zip(combos, result):
            if not _finite(value):
                continue
            plain = [_strip_param(p) for p in combo]
            label = ", ".join(
                f"{n}={p}" if i < len(names) else p
                for i, (n, p) in enumerate(itertools.zip_longest(names, plain))
                if p is not None
            )
            competitor = next((p for p in plain if _looks_like_competitor(p)), "")
            rows.append({
                "machine": machine, "commit": commit, "date": date, "benchmark": name,
                "params": label, "competitor": competitor, "value": float(value),
                "unit": _asv_unit(name, benchmarks),
            })  # fmt: skip
    return rows


def load_asv(results_dir: Path) -> pd.DataFrame:
    """An asv 0.6 results folder as one row per (machine, commit, benchmark, parameters)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"asv results folder not found: {results_dir}")
    bench_file = results_dir / "benchmarks.json"
    benchmarks = json.loads(bench_file.read_text(encoding="utf-8")) if bench_file.is_file() else {}
    rows: list[dict] = []
    for machine_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        machine_file = machine_dir / "machine.json"
        if not machine_file.is_file():
            continue
        machine = json.loads(machine_file.read_text(encoding="utf-8")).get("machine")
        machine = str(machine or machine_dir.name)
        for path in sorted(machine_dir.glob("*.json")):
            if path.name == "machine.json":
                continue
            try:
                rows.extend(_asv_file_rows(path, machine, benchmarks))
            except (ValueError, KeyError, TypeError) as err:
                log.warning("unreadable asv result %s: %s", path, err)
    columns = ["machine", "commit", "date", "benchmark", "params", "competitor", "value", "unit"]
    df = pd.DataFrame(rows, columns=columns)
    df["date"] = pd.to_datetime(pd.to_numeric(df["date"], errors="coerce"), unit="ms", utc=True)
    return df


TRAINING_REQUIRED = ("task", "competitor", "epoch", "test_metric")
TRAINING_NUMERIC = ("epoch", "train_loss", "test_metric", "wall_s", "peak_mem_bytes",
                    "skipped_steps", "scaler_retries", "seed")  # fmt: skip


def load_training(paths: Sequence[Path]) -> tuple[pd.DataFrame, list[str]]:
    """The per-epoch rows of ``training.csv`` files, with notices about unusable ones."""
    frames, notices = [], []
    for path in map(Path, paths):
        try:
            df = _read_csv(path, "training file")
        except NotACsv as exc:
            notices.append(f"Training file {exc}")
            continue
        missing = [c for c in TRAINING_REQUIRED if c not in df.columns]
        if df.empty or missing:
            what = "holds no rows" if df.empty else f"lacks the column(s) {', '.join(missing)}"
            notices.append(f"Training file {path} {what}; it was left out.")
            continue
        for col in TRAINING_NUMERIC:
            df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else 0.0
        for col, default in (("gpu", UNKNOWN_GPU), ("metric_name", ""), ("precision", "")):
            df[col] = df[col].fillna(default).astype(str) if col in df else default
        df["competitor"] = df["competitor"].astype(str)
        frames.append(df.dropna(subset=["epoch"]))
    if not frames:
        return pd.DataFrame(columns=[*TRAINING_REQUIRED, "gpu"]), notices
    return pd.concat(frames, ignore_index=True), notices
