"""Training parity reports: the parity table and the figures of the train suite's results.

Both read the per-epoch rows of ``rampde.bench.training`` (``read_training``, ``run_training``):
``parity_table`` gives the final test metric per task and competitor and its difference to
``torchdiffeq-fp32`` at the same epoch, ``training_figures`` the test metric against epoch and
against training wall time, in a fixed colour per competitor.

Public API: ``training_figures``, ``parity_table`` and ``BASELINE``; ``rampde.bench.training``
re-exports them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import pandas as pd

from .training_tasks import TASKS

from .training_recipes import TRAINING_RECIPES

__all__ = [
    "BASELINE",
    "training_figures",
    "parity_table",
]

BASELINE = "torchdiffeq-fp32"


# ----------------------------------------------------------------------------- reporting


def _default_colors() -> dict[str, str]:
    import plotly.colors

    palette = plotly.colors.qualitative.D3 + plotly.colors.qualitative.Set2
    return {name: palette[i % len(palette)] for i, name in enumerate(TRAINING_RECIPES)}


def _final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The last epoch of every (task, competitor, seed) run."""
    last = df.groupby(["task", "competitor", "seed"])["epoch"].transform("max")
    return df[df["epoch"] == last]


def training_figures(df: pd.DataFrame, colors: Mapping[str, str] | None = None) -> list[tuple[str, Any]]:
    """Per task: the test metric against epoch and against training wall time, one line per
    competitor (the mean over seeds when several), a fixed colour per competitor and a dash and
    marker per precision (equal curves of fp16 and bf16 both show). Hovering names the
    competitor in full, the epoch, the wall time and the metric.

    Returns ``[(title, plotly.graph_objects.Figure), ...]``.
    """
    import html

    import plotly.graph_objects as go

    from .report.figures import line_style

    palette = {**_default_colors(), **(colors or {})}
    figures: list[tuple[str, Any]] = []
    tasks = df["task"].unique()
    for task in [*[t for t in TASKS if t in tasks], *sorted(t for t in tasks if t not in TASKS)]:
        part = df[df["task"] == task]
        metric = part["metric_name"].iloc[0]
        label = "test accuracy" if metric == "accuracy" else "test NLL (nats)"
        curves = (part.groupby(["competitor", "epoch"], as_index=False)[["test_metric", "wall_s"]].mean()
                  .sort_values(["competitor", "epoch"]))
        for x, x_label, what in (("epoch", "epoch", "epoch"), ("wall_s", "training wall time (s)", "wall time")):
            fig = go.Figure()
            for name in _ordered(curves["competitor"].unique()):
                c = curves[curves["competitor"] == name]
                style = line_style(name)
                fig.add_trace(go.Scatter(
                    x=c[x], y=c["test_metric"], mode="lines+markers", name=name,
                    line={"color": palette.get(name), "dash": style["dash"]},
                    marker={"symbol": style["symbol"], "size": style["size"]},
                    customdata=c[["epoch", "wall_s"]].to_numpy(),
                    hovertemplate=(f"<b>{html.escape(name)}</b><br>epoch %{{customdata[0]}}<br>"
                                   f"training wall time %{{customdata[1]:.4g}} s<br>{label} %{{y:.4g}}"
                                   "<extra></extra>"),
                ))
            title = f"{task}: {label} against {what}"
            fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=label, legend_title="competitor",
                              template="plotly_white", hoverlabel={"namelength": -1})
            figures.append((title, fig))
    return figures


def _ordered(names: Sequence[str]) -> list[str]:
    known = list(TRAINING_RECIPES)
    return sorted(names, key=lambda n: (known.index(n) if n in known else len(known), n))


def parity_table(df: pd.DataFrame) -> pd.DataFrame:
    """Final test metric per task and competitor (mean over seeds) and its difference to
    ``torchdiffeq-fp32`` at the same epoch (``delta_vs_fp32``: competitor minus baseline, NaN
    without a baseline at that epoch; ``epochs`` says where each run ended),
    with the final epoch's wall time and allocator peak (means over seeds) and its cumulative
    skipped steps and adjoint retries (sums over seeds)."""
    cols = ["task", "competitor", "precision", "metric_name", "epochs", "final_metric", "delta_vs_fp32",
            "wall_s", "peak_mem_bytes", "skipped_steps", "scaler_retries", "seeds"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    final = _final_rows(df)
    table = final.groupby(["task", "competitor"], as_index=False).agg(
        precision=("precision", "first"), metric_name=("metric_name", "first"), epochs=("epoch", "max"),
        final_metric=("test_metric", "mean"), wall_s=("wall_s", "mean"), peak_mem_bytes=("peak_mem_bytes", "mean"),
        skipped_steps=("skipped_steps", "sum"), scaler_retries=("scaler_retries", "sum"), seeds=("seed", "nunique"),
    )
    # the baseline at the same epoch, so that a run cut short is not compared with a finished one
    base = df[df["competitor"] == BASELINE].groupby(["task", "epoch"])["test_metric"].mean()
    table["delta_vs_fp32"] = [metric - base.get((task, epoch), math.nan) for task, epoch, metric
                              in zip(table["task"], table["epochs"], table["final_metric"])]
    rank = {n: i for i, n in enumerate([*TASKS, *_ordered(table["competitor"].unique())])}
    table = table.sort_values(["task", "competitor"], key=lambda s: s.map(lambda n: (rank.get(n, len(rank)), n)))
    return table[cols].reset_index(drop=True)
