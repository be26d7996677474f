"""The README's tables of GPU results, generated from the committed data so that they never drift.

    python tools/readme_results.py            # rewrite the generated blocks of README.md
    python tools/readme_results.py --check    # exit 1 when a block differs from what the data gives
    python tools/readme_results.py --screenshot docs/dashboard.png   # also the dashboard picture

A block is the text between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``:

- ``claims``: per GPU model, the paper's claims judged on every committed cell
  (``rampde.bench.report.compute_claims``), with where and how they were measured;
- ``targets``: the performance targets per GPU model (``rampde.bench.targets``);
- ``training``: the training parity table per GPU model (``rampde.bench.training.parity_table``);
- ``ablation``: per GPU model, what each of rampde's options buys in each cell of the ablation
  (``reports/<gpu-model>/perf/ablation.csv``, ``rampde.bench.profiling``);
- ``gemm``: per GPU model, a Linear's GEMM throughput with inner dimension width and width + 1
  (``reports/<gpu-model>/perf/gemm.csv``, ``rampde.bench.gemm_probe``);
- ``dashboard``: the dashboard screenshot, when ``docs/dashboard.png`` exists.

Only rows measured on a GPU count (``device == "cuda"``): CPU sweeps check the pipeline, their
timings say nothing about tensor cores. The tests run ``--check`` on the repository.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rampde.bench.gemm_probe import mlp_gemm_ceiling  # noqa: E402
from rampde.bench.gpu_peaks import dense_fp16_peak_tflops  # noqa: E402
from rampde.bench.report import compute_claims  # noqa: E402
from rampde.bench.results import empty_results, read_results  # noqa: E402
from rampde.bench.targets import evaluate_targets, format_markdown, markdown_table  # noqa: E402

BLOCK = re.compile(r"(<!-- results:(?P<name>[a-z]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)
SCREENSHOT = Path("docs") / "dashboard.png"
NO_GPU = "_No GPU results are committed yet: `tools/gpu_campaign.py` measures them._\n"
VERDICT = {True: "held", False: "not held", None: "no verdict"}


def _number(value: float, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def _join(values: Iterable[object]) -> str:
    found = sorted({str(v) for v in values if isinstance(v, str) and v})
    return ", ".join(found) or "unknown"


def _short_commit(commit: str) -> str:
    """The first 7 hex digits, keeping a ``+modified`` label (the tree differed from the commit)."""
    sha, plus, label = commit.partition("+")
    return sha[:7] + plus + label


def _commits(df: pd.DataFrame) -> str:
    return _join(_short_commit(c) for c in df["commit"].astype(str) if c and c != "nan")


def provenance(df: pd.DataFrame) -> str:
    """Where and how one GPU model's rows were measured."""
    status = df["status"].value_counts()
    counts = ", ".join(f"{n} {s}" for s, n in status.items())
    stamps = sorted(t[:10] for t in df["timestamp"].dropna().astype(str) if t)
    dates = stamps[0] if stamps and stamps[0] == stamps[-1] else f"{stamps[0]} to {stamps[-1]}" if stamps else "?"
    return (f"**{df['gpu'].iloc[0]}**: {len(df)} cells ({counts}), measured {dates}; driver "
            f"{_join(df['driver'].astype(str))}, CUDA {_join(df['cuda'].astype(str))}, torch "
            f"{_join(df['torch'].astype(str))}, commit {_commits(df)}; TF32 off except `torchdiffeq-tf32`; "
            f"time is the median of {_join(df['repeats'].astype('Int64').astype(str))} CUDA-event-timed forward+backward runs.")


def _claim_value(claim: str, value: float, against: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if claim == "accuracy":
        return f"{100 * value:.3g}% (naive {100 * against:.3g}%)"
    return f"{value:.3g}x"


def _per_gpu(df: pd.DataFrame, section: Callable[[str, pd.DataFrame], list[str]]) -> str:
    """``section(gpu, rows)``'s lines for each GPU model, or the no-results line."""
    if df.empty:
        return NO_GPU
    return "\n\n".join("\n".join(section(gpu, rows)) for gpu, rows in df.groupby("gpu", sort=True)) + "\n"


def _claims_section(gpu: str, rows: pd.DataFrame) -> list[str]:
    table = [[r["competitor"], r["claim_text"], r["against"],
              VERDICT.get(r["held"], "no verdict") if r["claim"] != "speedup_tf32" else "reported",
              f"{_claim_value(r['claim'], r['best'], r['best_against'])} ({r['best_cell'] or '—'})",
              f"{_claim_value(r['claim'], r['worst'], r['worst_against'])} ({r['worst_cell'] or '—'})",
              f"{r['n_meeting']} / {r['n_cells']}"]
             for r in compute_claims(rows).to_dict("records")]
    header = ["competitor", "claim", "against", "verdict", "best (cell)", "worst (cell)", "cells meeting"]
    return [provenance(rows), "", *markdown_table(header, table)]


def claims_block(df: pd.DataFrame) -> str:
    """Per GPU model: its provenance and the claims table."""
    return _per_gpu(df, _claims_section)


def targets_block(df: pd.DataFrame) -> str:
    """The performance targets per GPU model, without the per-cell rows (the dashboard has them)."""
    if df.empty:
        return NO_GPU
    text = format_markdown(evaluate_targets(df), cells=False)
    return text.split("\n", 2)[2]  # without its own heading


def _training_section(gpu: str, rows: pd.DataFrame) -> list[str]:
    from rampde.bench.report.tables import parity_of
    from rampde.bench.training import parity_table

    table = [[r["task"], r["competitor"], r["epochs"],
              f"{r['final_metric']:.4f} ({'accuracy' if r['metric_name'] == 'accuracy' else 'NLL'})",
              parity_of(r)[0], _number(r["wall_s"]),
              int(r["skipped_steps"])] for r in parity_table(rows).to_dict("records")]
    header = ["task", "competitor", "epochs", "final", "vs fp32 at that epoch", "wall s", "skipped steps"]
    return [f"**{gpu}** (torch {_join(rows['torch'].astype(str))}, commit {_commits(rows)}):", "",
            *markdown_table(header, table)]


def training_block(df: pd.DataFrame) -> str:
    """The parity table per GPU model and task."""
    return _per_gpu(df, _training_section)


def _ablation_cell(row: dict) -> str:
    if row["status"] != "ok":
        return str(row["status"])
    parts = [f"{_number(row['time_ms_median'])} ms"]
    if not math.isnan(row["speedup_vs_default"]):
        parts.append(f"x{row['speedup_vs_default']:.2f}")
    if not math.isnan(row["peak_mem_bytes"]):
        parts.append(f"{row['peak_mem_bytes'] / 2**30:.3g} GiB")
    return ", ".join(parts)


def _ablation_section(gpu: str, rows: pd.DataFrame) -> list[str]:
    """One table: a row per variant, a column per cell (time, speedup over rampde's defaults in
    the same precision and layout, peak memory)."""
    records = rows.to_dict("records")
    cell_of = [f"{r['workload']} {r['width']}, {r['steps']} steps" for r in records]
    by_variant: dict[str, dict[str, str]] = {}
    for r, cell in zip(records, cell_of):
        by_variant.setdefault(r["variant"], {})[cell] = _ablation_cell(r)
    cells = list(dict.fromkeys(cell_of))
    table = [[f"`{name}`", *(values.get(c, "—") for c in cells)] for name, values in by_variant.items()]
    repeats = _join(rows["repeats"].astype("Int64").astype(str))
    return [f"**{gpu}** (commit {_commits(rows)}; median of {repeats} runs; "
            "xN: rampde's defaults in the same precision and layout / this variant):", "",
            *markdown_table(["variant", *cells], table)]


def ablation_block(df: pd.DataFrame) -> str:
    """What each rampde option buys, per GPU model and cell."""
    return _per_gpu(df, _ablation_section)


def _gemm_section(gpu: str, rows: pd.DataFrame) -> list[str]:
    table = []
    ok = rows[rows["status"] == "ok"]

    def tflops(r: dict | None) -> str:
        return "—" if r is None else _number(r["tflops"]) if r["status"] == "ok" else str(r["status"])

    for (precision, m, n), group in rows.groupby(["precision", "m", "n"], sort=False):
        by_k = {int(r["k"]): r for r in group.to_dict("records")}
        even, odd = by_k.get(int(n)), by_k.get(int(n) + 1)
        table.append([precision, int(m), int(n), tflops(even), tflops(odd),
                      _number(odd["vs_aligned"]) if odd is not None else "—",
                      f"`{odd['top_kernel']}`" if odd is not None and isinstance(odd["top_kernel"], str) else "—"])
    header = ["precision", "m", "n", "TFLOP/s, k = n", "TFLOP/s, k = n + 1", "ratio", "kernel at k = n + 1"]
    return [f"**{gpu}** (commit {_commits(rows)}; the three GEMMs of a Linear's forward+backward, "
            f"{len(ok)} of {len(rows)} shapes measured):", "", *markdown_table(header, table),
            *_ceiling_lines(gpu, rows)]


def _ceiling_lines(gpu: str, rows: pd.DataFrame) -> list[str]:
    """The most of the fp16 peak an rk4 solve of the MLP field can reach on this GPU, if its GEMMs
    (as the probe timed them) were all its time: per tensor-core precision and width."""
    peak = dense_fp16_peak_tflops(gpu)
    table = []
    tensor_core = rows.loc[rows["precision"].isin(["fp16", "bf16"]), ["precision", "n"]].drop_duplicates()
    for precision, n in tensor_core.itertuples(index=False):
        ceiling = mlp_gemm_ceiling(rows, int(n), precision, peak)
        if not math.isnan(ceiling["activations"]):
            table.append([precision, int(n), *("—" if math.isnan(ceiling[k]) else f"{100 * ceiling[k]:.0f}%"
                                               for k in ("states", "activations"))])
    if not table:
        return []
    header = ["precision", "width", "default storage (recomputes)", '`storage="activations"`']
    return ["", f"If its GEMMs were all the time, an rk4 solve of the MLP field (batch = m) would reach "
                f"this fraction of the {_number(peak)} TFLOP/s dense fp16 peak: the ceiling of the "
                "efficiency target on this GPU.", "", *markdown_table(header, table)]


def gemm_block(df: pd.DataFrame) -> str:
    """Per GPU model: a Linear's GEMM throughput with k = width and width + 1."""
    return _per_gpu(df, _gemm_section)


def gpu_rows(root: Path, pattern: str, read: Callable[[Path], pd.DataFrame] = pd.read_csv,
             empty: Callable[[], pd.DataFrame] = lambda: pd.DataFrame(columns=["device", "gpu"])) -> pd.DataFrame:
    """Every row of the committed ``reports/<pattern>`` CSV files (each read by ``read``) measured on
    a GPU; ``empty()`` without a file."""
    frames = [read(p) for p in sorted((root / "reports").glob(pattern))]
    df = pd.concat(frames, ignore_index=True) if frames else empty()
    return df[df["device"] == "cuda"].reset_index(drop=True)


def dashboard_block(root: Path) -> str:
    if not (root / SCREENSHOT).exists():
        return "_The dashboard's picture comes with the first committed GPU results._\n"
    return (f"![The dashboard built from the committed GPU results]({SCREENSHOT.as_posix()})\n\n"
            "`rampde-bench report --screenshot docs/dashboard.png` rebuilds the dashboard and this picture.\n")


def gpu_results(root: Path) -> pd.DataFrame:
    """Every committed sweep row measured on a GPU, typed by the results schema."""
    return gpu_rows(root, "**/results.csv", read_results, empty_results)


def blocks(root: Path) -> dict[str, Callable[[], str]]:
    """Each block's text, computed when asked for (the results files read once)."""
    results = functools.cache(lambda: gpu_results(root))
    return {"claims": lambda: claims_block(results()),
            "targets": lambda: targets_block(results()),
            "training": lambda: training_block(gpu_rows(root, "**/training.csv")),
            "ablation": lambda: ablation_block(gpu_rows(root, "**/perf/ablation.csv")),
            "gemm": lambda: gemm_block(gpu_rows(root, "**/perf/gemm.csv")),
            "dashboard": lambda: dashboard_block(root)}


def render(text: str, root: Path) -> str:
    """``text`` with every known block filled in; ``ValueError`` naming an unknown block."""
    makers = blocks(root)
    unknown = sorted({m["name"] for m in BLOCK.finditer(text)} - set(makers))
    if unknown:
        raise ValueError(f"unknown README block(s) {', '.join(unknown)}; known: {', '.join(makers)}")
    cache: dict[str, str] = {}

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in cache:
            cache[name] = makers[name]()
        return f"{match.group(1)}{cache[name]}{match.group(4)}"

    return BLOCK.sub(fill, text)


def stale_blocks(readme: Path, root: Path) -> list[str]:
    """The names of the blocks whose text differs from what the data gives."""
    text = readme.read_text(encoding="utf-8")
    fresh = render(text, root)
    old = {m["name"]: m["body"] for m in BLOCK.finditer(text)}
    new = {m["name"]: m["body"] for m in BLOCK.finditer(fresh)}
    return [name for name in old if old[name] != new[name]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the file with the blocks")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when a block is stale")
    parser.add_argument("--screenshot", type=Path, metavar="PNG",
                        help="first build the dashboard from reports/ and save its picture here")
    args = parser.parse_args(argv)
    root = args.readme.resolve().parent
    if not args.readme.is_file():
        print(f"readme_results: no file {args.readme}", file=sys.stderr)
        return 2
    if args.check:
        stale = stale_blocks(args.readme, root)
        if stale:
            print(f"readme_results: stale block(s) in {args.readme}: {', '.join(stale)}; run "
                  "python tools/readme_results.py", file=sys.stderr)
            return 1
        print(f"{args.readme}: every generated block matches the committed data")
        return 0
    if args.screenshot:
        import os

        from rampde.bench.cli import main as bench

        shot = args.screenshot.resolve()
        os.chdir(root)  # the report reads reports/**/results.csv and training.csv from here
        code = bench(["report", "--out", "reports/index.html", "--screenshot", str(shot)])
        if code:
            return code
    text = args.readme.read_text(encoding="utf-8")
    args.readme.write_text(render(text, root), encoding="utf-8")
    print(f"{args.readme}: blocks {', '.join(m['name'] for m in BLOCK.finditer(text))} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
