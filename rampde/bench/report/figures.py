"""The dashboard's plotly figures: time and memory against the grid, memory bars, accuracy against
speed, NVML timelines and the asv history."""

from __future__ import annotations

import itertools
import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .claims import BASELINE_FP32, GRAD_ERR_MAX, OURS_PREFIX
from .schema import CELL_COLUMNS, GRID_COLUMNS
from .style import (
    _EXTRA_COLOURS, _esc, _finite, _fmt, _fmt_bytes, _mem_unit, _wide, cell_label, competitor_order,
    precision_of,
)  # fmt: skip

PRECISION_LINES = {  # dash and marker per precision: equal values of two precisions stay visible
    "fp32": ("solid", "circle", 6),
    "tf32": ("dash", "diamond-open", 10),
    "fp16": ("dashdot", "square", 6),
    "bf16": ("dot", "triangle-up-open", 10),
    "fp64": ("longdash", "cross", 7),
}
_LOG_MANTISSAS = ((1,), (1, 3), (1, 2, 5), (1, 2, 3, 5, 7), (1, 2, 3, 4, 5, 6, 7, 8, 9))


def line_style(competitor: str) -> dict:
    """The dash, marker symbol and marker size of a competitor's lines, from its precision (the
    colour stays the competitor's): where lines of fp32 and tf32, or of fp16 and bf16, have equal
    values, both show (a dash over a solid line, a hollow marker around a filled one)."""
    dash, symbol, size = PRECISION_LINES.get(precision_of(competitor), ("solid", "circle", 6))
    return {"dash": dash, "symbol": symbol, "size": size}


def _number(value: float) -> str:
    """A tick label in full: ``2048``, ``0.005``, ``10,000``; never a bare mantissa digit."""
    text = f"{value:,.12g}" if abs(value) >= 1e4 else f"{value:.12g}"
    return text.replace("e-0", "e-")


def data_ticks(values: pd.Series, most: int = 12) -> dict:
    """Axis ticks exactly at the grid values present (every other one, or sparser, beyond
    ``most``), labelled as plain numbers: a log axis would label 8..256 as ``10 2 5 100 2``."""
    vals = sorted(set(pd.to_numeric(values, errors="coerce").dropna().astype(float)))
    keep = vals[:: math.ceil(len(vals) / most)] if vals else []
    text = [str(int(v)) if v.is_integer() else f"{v:g}" for v in keep]
    return dict(tickmode="array", tickvals=keep, ticktext=text)


def _round_steps(lo: float, hi: float) -> list[float]:
    """Two to six round numbers (1, 2 or 5 times a power of ten apart) within [lo, hi]."""
    want = (hi - lo) / 5
    exp = math.floor(math.log10(want))
    step = min(v for v in (float(f"{m}e{exp + e}") for e in (0, 1) for m in (1, 2, 5)) if v >= want)
    first, last = math.ceil(lo / step), math.floor(hi / step)
    return [float(f"{k * step:.12g}") for k in range(first, last + 1)]


def log_ticks(values: pd.Series, most: int = 10) -> dict:
    """Ticks of a log axis over ``values``: the densest series of 1, 1-3, 1-2-5, ... times the
    powers of ten with at most ``most`` ticks over the data (and a margin, as plotly's range has),
    each labelled as a full number (plotly's own labels on a log axis are bare digits ``2 5`` that
    pile up). A range too narrow for two of them gets round steps instead; one value, one tick."""
    pos = [float(v) for v in pd.to_numeric(values, errors="coerce") if _finite(v) and v > 0]
    if not pos:
        return {}
    lo, hi = min(pos), max(pos)
    if hi <= lo * (1 + 1e-9):
        return dict(tickmode="array", tickvals=[lo], ticktext=[_number(lo)])
    margin = (hi / lo) ** 0.05
    lo, hi = lo / margin, hi * margin
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ticks: list[float] = []
    for mantissas in reversed(_LOG_MANTISSAS):
        series = [float(f"{m}e{k}") for k in range(first, last + 1) for m in mantissas]
        ticks = [v for v in series if lo <= v <= hi]
        if len(ticks) <= most:
            break
    else:  # too many decades even for one tick each: every few decades
        stride = math.ceil(len(ticks) / most)
        ticks = [v for v in ticks if round(math.log10(v)) % stride == 0]
    if len(ticks) < 2:
        ticks = _round_steps(lo, hi)
    return dict(tickmode="array", tickvals=ticks, ticktext=[_number(v) for v in ticks])


def _hover(row: dict) -> str:
    """The exact figures of one cell, for the hover box."""
    lines = [f"<b>{_esc(row['competitor'])}</b>", _esc(cell_label(row))]
    if row.get("status", "ok") != "ok":
        lines.append(f"status <b>{_esc(row['status'])}</b> {_esc(row.get('message', ''))[:120]}")
    if _finite(row.get("time_ms_median")):
        lines.append(
            f"time {row['time_ms_median']:.6g} ms (q25 {_fmt(row.get('time_ms_q25'), 6)}, "
            f"q75 {_fmt(row.get('time_ms_q75'), 6)})"
        )
    if _finite(row.get("peak_mem_bytes")):
        lines.append(f"peak memory {_fmt_bytes(row['peak_mem_bytes'])}")
    if _finite(row.get("grad_err_params")):
        lines.append(
            f"grad error params {100 * row['grad_err_params']:.4g}%"
            f", y0 {_fmt(100 * row['grad_err_y0'] if _finite(row.get('grad_err_y0')) else None)}%"
        )
    if _finite(row.get("tflops")):
        lines.append(f"{row['tflops']:.4g} TFLOP/s")
    return "<br>".join(lines)


def _base_layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(
        template="plotly_white",
        title=dict(text=title, x=0.0, xanchor="left", font=dict(size=15)),
        height=height,
        margin=dict(l=70, r=20, t=80, b=60),
        hovermode="closest",
        legend=dict(title=dict(text="competitor"), tracegroupgap=2),
    )
    return fig


def _main_method(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of the most common method only (a panel compares one scheme)."""
    if rows.empty or rows["method"].nunique() <= 1:
        return rows
    return rows[rows["method"] == rows["method"].value_counts().idxmax()]


def pick_slice(rows: pd.DataFrame, vary: str) -> dict[str, int] | None:
    """The other grid axes' values with the most distinct ``vary`` values (ties: largest)."""
    fixed = [c for c in GRID_COLUMNS if c != vary]
    if rows.empty:
        return None
    counts = rows.groupby(fixed)[vary].nunique()
    best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
    return dict(zip(fixed, (int(v) for v in best)))


def _workloads(cells: pd.DataFrame) -> list[str]:
    order = {"mlp": 0, "conv": 1, "cnf": 2}
    return sorted(cells["workload"].unique(), key=lambda w: (order.get(w, 9), w))


def _legend_once(seen: set[str], name: str) -> bool:
    first = name not in seen
    seen.add(name)
    return first


def line_figure(
    cells: pd.DataFrame, vary: str, metric: str, colours: dict[str, str], *, title: str,
    ytitle: str, scale: float = 1.0,
) -> go.Figure | None:  # fmt: skip
    """``metric`` against ``vary`` per workload, one line per competitor; OOM cells marked ×."""
    panels = []
    for workload in _workloads(cells):
        rows = _main_method(cells[cells["workload"] == workload])
        chosen = pick_slice(rows[(rows["status"] == "ok") & rows[metric].notna()], vary)
        if chosen is not None:  # the slice's failed cells come along, to be marked
            mask = (rows[list(chosen)] == pd.Series(chosen)).all(axis=1)
            panels.append((workload, chosen, rows[mask]))
    if not panels:
        return None
    names = [
        f"{w}: " + ", ".join(f"{k}={v}" for k, v in chosen.items()) for w, chosen, _ in panels
    ]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=names, horizontal_spacing=0.07)
    seen: set[str] = set()
    for col, (_, _, rows) in enumerate(panels, start=1):
        ok = rows[(rows["status"] == "ok") & rows[metric].notna()]
        ylog = _wide(ok[metric], 10)
        top = float(ok[metric].max()) / scale * (1.4 if ylog else 1.08)  # OOM marks go here
        for comp in competitor_order(rows["competitor"]):
            mine = rows[rows["competitor"] == comp].sort_values(vary)
            good = mine[(mine["status"] == "ok") & mine[metric].notna()]
            failed = mine[mine["status"] == "oom"]
            show = not good.empty and _legend_once(seen, comp)
            recs = good.to_dict("records")
            style = line_style(comp)
            fig.add_trace(go.Scatter(
                x=good[vary], y=good[metric] / scale, mode="lines+markers", name=comp,
                legendgroup=comp, showlegend=show, line=dict(color=colours[comp],
                width=3 if comp.startswith(OURS_PREFIX) else 1.8, dash=style["dash"]),
                marker=dict(symbol=style["symbol"], size=style["size"]),
                text=[_hover(r) for r in recs], hovertemplate="%{text}<extra></extra>",
            ), row=1, col=col)  # fmt: skip
            if not failed.empty:
                fig.add_trace(go.Scatter(
                    x=failed[vary], y=[top] * len(failed), mode="markers+text", name=comp,
                    legendgroup=comp, showlegend=False, text=["OOM"] * len(failed),
                    textposition="top center", textfont=dict(color=colours[comp], size=10),
                    marker=dict(symbol="x", size=11, color=colours[comp]),
                    hovertext=[_hover(r) for r in failed.to_dict("records")],
                    hovertemplate="%{hovertext}<extra></extra>",
                ), row=1, col=col)  # fmt: skip
        fig.update_xaxes(
            title_text=vary if vary != "steps" else "steps N", row=1, col=col,
            type="log" if _wide(rows[vary], 4) else "linear", **data_ticks(rows[vary]),
        )  # fmt: skip
        fig.update_yaxes(
            title_text=ytitle if col == 1 else None, row=1, col=col,
            type="log" if ylog else "linear", **(log_ticks(ok[metric] / scale) if ylog else {}),
        )  # fmt: skip
    for trace in fig.data:  # a competitor that only failed: its first × carries the entry
        if trace.legendgroup not in seen and len(trace.x):
            trace.showlegend = _legend_once(seen, trace.legendgroup)
    fig = _base_layout(fig, title, 440)
    fig.update_layout(legend_title_text="competitor<br><sup>dash and marker: precision</sup>")
    return fig


def _cell_rank(cell: dict, competitors: int = 0) -> tuple:
    """How a figure prefers a cell: more competitors, then more work (width·batch·steps), then
    the larger width, batch and steps, then by name; the rows' order never decides."""
    work = cell["width"] * cell["batch"] * cell["steps"]
    return (competitors, work, cell["width"], cell["batch"], cell["steps"],
            str(cell["workload"]), str(cell["method"]))  # fmt: skip


def largest_cell(rows: pd.DataFrame, metric: str) -> dict | None:
    """The cell with the most work (width·batch·steps) where some competitor measured ``metric``."""
    ok = rows[(rows["status"] == "ok") & rows[metric].notna()]
    if ok.empty:
        return None
    cells = [dict(zip(CELL_COLUMNS, key)) for key in ok[list(CELL_COLUMNS)].itertuples(index=False)]
    return max(cells, key=_cell_rank)


def memory_cell(rows: pd.DataFrame) -> tuple[dict | None, bool]:
    """The largest cell where torchdiffeq-fp32 measured its peak, so that every bar compares
    with it, and True; else the largest measured cell and False."""
    cell = largest_cell(rows[rows["competitor"] == BASELINE_FP32], "peak_mem_bytes")
    if cell is not None:
        return cell, True
    return largest_cell(rows, "peak_mem_bytes"), False


def _at_cell(rows: pd.DataFrame, cell: dict) -> pd.DataFrame:
    return rows[(rows[list(CELL_COLUMNS)] == pd.Series(cell)).all(axis=1)]


def _short(value: float) -> str:
    """Three significant figures, but whole numbers from 1000 on (``1024``, not ``1.02e+03``)."""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _measured(rec: dict) -> bool:
    return rec["status"] == "ok" and _finite(rec["peak_mem_bytes"])


def _memory_bar(rec: dict, colour: str, div: float, unit: str, high: float,
                base: float | None) -> go.Bar:  # fmt: skip
    """One competitor's bar: its peak and its ratio to torchdiffeq-fp32's (``base``, bytes) in
    plain colour, or a hatched hollow bar at the panel's maximum ``high`` when it has none."""
    comp, ok = rec["competitor"], _measured(rec)
    ratio = rec["peak_mem_bytes"] / base if ok and base and comp != BASELINE_FP32 else None
    if not ok:
        label = rec["status"].upper()
        note = "<br><i>bar drawn at the panel's maximum: no measurement</i>"
    elif ratio is None:
        label, note = f"{_short(rec['peak_mem_bytes'] / div)} {unit}", ""
    else:
        label = f"{_short(rec['peak_mem_bytes'] / div)} {unit} · {ratio:.2g}× fp32"
        note = f"<br>{ratio:.3g}× torchdiffeq-fp32's peak"
    return go.Bar(
        x=[rec["peak_mem_bytes"] / div if ok else high], y=[comp], orientation="h", name=comp,
        legendgroup=comp, showlegend=False, text=[label], textposition="auto",
        marker=dict(
            color=colour if ok else "rgba(255,255,255,0.6)", line=dict(color=colour, width=1.5),
            pattern=dict(shape="" if ok else "x", fgcolor=colour, size=8),
        ),
        hovertext=[_hover(rec) + note], hovertemplate="%{hovertext}<extra></extra>",
    )  # fmt: skip


def memory_bars(cells: pd.DataFrame, colours: dict[str, str]) -> go.Figure | None:
    """Peak memory per competitor at each workload's largest cell where torchdiffeq-fp32 ran
    (else its largest measured cell), with the ratio to fp32; failures hatched. The legend shows
    each competitor's plain colour: a hatched bar never carries the entry."""
    panels = []
    for workload in _workloads(cells):
        rows = cells[cells["workload"] == workload]
        cell, with_base = memory_cell(rows)
        if cell is not None:
            panels.append((cell, with_base, _at_cell(rows, cell)))
    if not panels:
        return None
    top = max(float(r["peak_mem_bytes"].max()) for _, _, r in panels)
    div, unit = _mem_unit(top)
    order = competitor_order(pd.concat([r["competitor"] for _, _, r in panels]))
    titles = [cell_label(c) + ("" if base else " (no fp32 peak)") for c, base, _ in panels]
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=titles)  # fmt: skip
    seen: set[str] = set()
    for col, (_, _, rows) in enumerate(panels, start=1):
        high = float(rows["peak_mem_bytes"].max()) / div
        fp32 = [r for r in rows[rows["competitor"] == BASELINE_FP32].to_dict("records") if _measured(r)]
        base = float(fp32[0]["peak_mem_bytes"]) if fp32 else None
        for comp in [c for c in order if c in set(rows["competitor"])]:
            rec = rows[rows["competitor"] == comp].iloc[0].to_dict()
            bar = _memory_bar(rec, colours[comp], div, unit, high, base)
            bar.showlegend = _measured(rec) and _legend_once(seen, comp)
            fig.add_trace(bar, row=1, col=col)
        fig.update_xaxes(title_text=f"peak memory ({unit})", row=1, col=col)
    for comp in [c for c in order if c not in seen]:  # never measured: a plain swatch for it
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", name=comp, legendgroup=comp, hoverinfo="skip",
            marker=dict(symbol="square", size=12, color=colours[comp]),
        ), row=1, col=1)  # fmt: skip
    for trace in fig.data:
        trace.legendrank = 1000 + order.index(trace.name)
    fig.update_yaxes(categoryorder="array", categoryarray=order[::-1])
    height = max(320, 26 * len(order) + 160)
    title = ("Peak allocator memory at each workload's largest cell where torchdiffeq-fp32 ran "
             "(hatched: no measurement)")  # fmt: skip
    return _base_layout(fig, title, height)


def fullest_cell(rows: pd.DataFrame) -> dict:
    """The cell of ``rows`` with the most competitors, then the most work, then ``_cell_rank``'s
    order: it depends only on which cells exist and who ran them, so GPU tabs with the same cells
    show the same one."""
    counts = rows.groupby(list(CELL_COLUMNS))["competitor"].nunique()
    cells = [(dict(zip(CELL_COLUMNS, key)), n) for key, n in counts.items()]
    return max(cells, key=lambda cn: _cell_rank(*cn))[0]


def accuracy_figure(cells: pd.DataFrame, colours: dict[str, str]) -> go.Figure | None:
    """Gradient error against time, one point per competitor, per workload's fullest cell."""
    panels = []
    for workload in _workloads(cells):
        rows = cells[(cells["workload"] == workload) & (cells["status"] == "ok")]
        rows = rows[rows["grad_err_params"].notna() & rows["time_ms_median"].notna()]
        if not rows.empty:
            panels.append((fullest_cell(rows), rows))
    if not panels:
        return None
    fig = make_subplots(
        rows=1, cols=len(panels), horizontal_spacing=0.07,
        subplot_titles=[cell_label(c) for c, _ in panels],
    )  # fmt: skip
    seen: set[str] = set()
    for col, (cell, rows) in enumerate(panels, start=1):
        at = _at_cell(rows, cell)
        for comp in competitor_order(at["competitor"]):
            rec = at[at["competitor"] == comp].iloc[0].to_dict()
            fig.add_trace(go.Scatter(
                x=[rec["time_ms_median"]], y=[100 * rec["grad_err_params"]], mode="markers",
                name=comp, legendgroup=comp, showlegend=_legend_once(seen, comp),
                marker=dict(color=colours[comp], size=13, line=dict(color="white", width=1),
                            symbol="star" if comp.startswith(OURS_PREFIX) else "circle"),
                hovertext=[_hover(rec)], hovertemplate="%{hovertext}<extra></extra>",
            ), row=1, col=col)  # fmt: skip
        axis = "" if col == 1 else str(col)
        bounds = {100 * GRAD_ERR_MAX[p]: f"{p} bound" for p in ("fp16", "bf16")}
        for bound, name in bounds.items():
            fig.add_hline(y=bound, line=dict(color="#999", dash="dot", width=1), row=1, col=col)
            fig.add_annotation(
                x=1, xref=f"x{axis} domain", y=math.log10(bound), yref=f"y{axis}",
                text=f"{bound:g}% {name}", showarrow=False, xanchor="right", yanchor="bottom",
                font=dict(size=10, color="#666"),
            )  # fmt: skip
        errors = pd.concat([100 * at["grad_err_params"], pd.Series(list(bounds))])  # lines too
        fig.update_xaxes(title_text="time per forward+backward (ms)", type="log", row=1, col=col,
                         **log_ticks(at["time_ms_median"], most=4))  # fmt: skip
        fig.update_yaxes(title_text="parameter-gradient error (%)" if col == 1 else None,
                         type="log", row=1, col=col, **log_ticks(errors))  # fmt: skip
    title = "Accuracy against speed: lower left is better (stars: rampde)"
    return _base_layout(fig, title, 440)


def timeline_figure(timelines: pd.DataFrame, colours: dict[str, str]) -> go.Figure | None:
    """NVML device memory, utilisation and power over the largest cell of each competitor."""
    if timelines.empty:
        return None
    chosen = []
    for comp in competitor_order(timelines["competitor"]):
        mine = timelines[timelines["competitor"] == comp]
        cells = mine.drop_duplicates(["source", "cell_id"])
        size = cells["width"] * cells["batch"] * cells["steps"]
        best = cells.loc[size.sort_values(kind="stable").index[-1]]
        same = (mine["source"] == best["source"]) & (mine["cell_id"] == best["cell_id"])
        chosen.append((comp, best, mine[same].sort_values("t_s")))
    has_power = timelines["power_w"].notna().any()
    div, unit = _mem_unit(float(timelines["mem_used_bytes"].max() or 0))
    titles = ["device memory used (NVML)", "GPU utilisation (NVML)"]
    if has_power:
        titles.append("board power (NVML)")
    fig = make_subplots(rows=len(titles), cols=1, shared_xaxes=True, subplot_titles=titles,
                        vertical_spacing=0.08)  # fmt: skip
    series = [("mem_used_bytes", div, f"memory ({unit})"), ("gpu_util_pct", 1.0, "utilisation (%)")]
    if has_power:
        series.append(("power_w", 1.0, "power (W)"))
    for comp, best, tl in chosen:
        label = f"{comp}: {cell_label(best)}"
        for row, (col, scale, ytitle) in enumerate(series, start=1):
            fig.add_trace(go.Scatter(
                x=tl["t_s"], y=tl[col] / scale, mode="lines", name=comp, legendgroup=comp,
                showlegend=row == 1, line=dict(color=colours[comp], dash=line_style(comp)["dash"]),
                hovertemplate=f"<b>{_esc(label)}</b><br>t %{{x:.4g}} s<br>{ytitle} %{{y:.5g}}"
                              "<extra></extra>",
            ), row=row, col=1)  # fmt: skip
            fig.update_yaxes(title_text=ytitle, row=row, col=1)
    fig.update_xaxes(title_text="time since the cell started (s)", row=len(titles), col=1)
    title = "NVML timelines of the largest cell of each competitor (includes the CUDA context)"
    return _base_layout(fig, title, 260 * len(titles) + 80)


def _asv_scale(unit: str) -> tuple[float, str]:
    if unit == "seconds":
        return 1e-3, "ms"
    if unit == "bytes":
        return 2.0**20, "MiB"
    return 1.0, unit or "value"


def asv_figure(asv: pd.DataFrame, colours: dict[str, str]) -> go.Figure | None:
    """Each asv benchmark per commit (in commit-date order), one line per parameter set."""
    if asv.empty:
        return None
    commits = asv.groupby("commit")["date"].min().sort_values(kind="stable")
    order = [c[:8] for c in commits.index]
    benches = sorted(asv["benchmark"].unique())
    fig = make_subplots(rows=len(benches), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=benches)  # fmt: skip
    seen: set[str] = set()
    spare = itertools.cycle(_EXTRA_COLOURS)
    dashes = ("solid", "dash", "dot", "dashdot", "longdash")
    for row, bench in enumerate(benches, start=1):
        rows = asv[asv["benchmark"] == bench]
        scale, unit = _asv_scale(rows["unit"].iloc[0])
        per_competitor: dict[str, int] = {}
        for params, series in rows.groupby("params", sort=True):
            series = series.assign(rank=series["commit"].map(commits.rank(method="first")))
            series = series.sort_values("rank")
            comp = series["competitor"].iloc[0]
            colour = colours.get(comp) or next(spare)
            group = comp or f"{bench}:{params}"
            nth = per_competitor[comp] = per_competitor.get(comp, -1) + 1
            fig.add_trace(go.Scatter(
                x=series["commit"].str[:8], y=series["value"] / scale, mode="lines+markers",
                name=comp or params or bench.rsplit(".", 1)[-1], legendgroup=group,
                showlegend=_legend_once(seen, group),
                line=dict(color=colour, dash=dashes[nth % len(dashes)] if comp else "solid"),
                marker=dict(symbol=line_style(comp)["symbol"]),
                customdata=list(zip(series["commit"], series["date"].astype(str))),
                hovertemplate=(f"<b>{_esc(bench)}</b><br>{_esc(params)}<br>"
                               "commit %{customdata[0]}<br>date %{customdata[1]}<br>"
                               f"%{{y:.6g}} {unit}<extra></extra>"),
            ), row=row, col=1)  # fmt: skip
        fig.update_yaxes(title_text=unit, row=row, col=1)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=order)
    fig.update_xaxes(title_text="commit (oldest to newest)", row=len(benches), col=1)
    fig = _base_layout(fig, "asv history per commit (dashes: other parameters of the same "
                            "competitor; hover for them)", 240 * len(benches) + 140)  # fmt: skip
    fig.update_layout(legend_title_text="series")
    return fig
