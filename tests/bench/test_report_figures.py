"""The dashboard's figures as plotly objects: which cell the memory bars and the accuracy panel
show, the legend's colours, line styles per precision, tick labels of log axes and the hover
text of the training curves."""

from __future__ import annotations

import itertools
import math

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("plotly")

from test_report import COMPETITORS, H100, _row  # noqa: E402

from rampde.bench.report import competitor_colours  # noqa: E402
from rampde.bench.report.figures import (  # noqa: E402
    accuracy_figure, line_figure, log_ticks, memory_bars,
)  # fmt: skip

FAILED = ("time_ms_median", "peak_mem_bytes", "grad_err_params", "grad_err_y0", "loss")


def _grid(widths=(64, 256), steps=(16, 64), workloads=("mlp",), oom=()) -> pd.DataFrame:
    """Every competitor in every cell; ``oom`` holds (competitor, workload, width, steps) that ran
    out of memory."""
    rows = []
    for workload in workloads:
        for width in widths:
            for n in steps:
                for comp in COMPETITORS:
                    row = _row(H100, comp, workload, width, n)
                    if (comp, workload, width, n) in oom:
                        row.update(status="oom", message="CUDA out of memory.",
                                   **{c: math.nan for c in FAILED})  # fmt: skip
                    rows.append(row)
    return pd.DataFrame(rows)


def _colours(cells: pd.DataFrame) -> dict[str, str]:
    return competitor_colours(cells["competitor"])


def _legend_traces(fig) -> dict[str, object]:
    """Competitor -> the one trace that carries its legend entry (each has exactly one)."""
    shown = [t for t in fig.data if t.showlegend is not False and t.name]
    names = [t.name for t in shown]
    assert len(names) == len(set(names)), names
    return {t.name: t for t in shown}


def _bar(fig, col: int, comp: str):
    axis = "x" if col == 1 else f"x{col}"
    (bar,) = [t for t in fig.data if t.type == "bar" and t.xaxis == axis and t.y == (comp,)]
    return bar


# ---------------------------------------------------------------------------------------------
# Memory bars
# ---------------------------------------------------------------------------------------------


def test_memory_bars_show_the_largest_cell_where_fp32_ran() -> None:
    cells = _grid(oom={("torchdiffeq-fp32", "mlp", 256, 64), ("autocast-fp16", "mlp", 256, 16)})
    fig = memory_bars(cells, _colours(cells))
    # 256x16 and 64x64 are equal work: the larger width wins, whatever the rows' order
    assert fig.layout.annotations[0].text == "mlp w=256 b=64 N=16"
    assert memory_bars(cells.iloc[::-1], _colours(cells)).layout.annotations[0].text == (
        "mlp w=256 b=64 N=16")  # fmt: skip
    fp32 = _bar(fig, 1, "torchdiffeq-fp32")
    assert fp32.marker.pattern.shape == "" and fp32.x[0] == pytest.approx(4096 * 256 * 16 / 2**20)
    assert _bar(fig, 1, "rampde-fp16").text[0].endswith("0.45× fp32")
    oom = _bar(fig, 1, "autocast-fp16")  # another competitor's OOM in that cell still shows
    assert oom.text == ("OOM",) and oom.marker.pattern.shape == "x"


def test_memory_bars_without_an_fp32_peak_show_no_ratio() -> None:
    """fp32 ran but its peak is missing (a run without the allocator's figure): no 'nan× fp32'."""
    cells = _grid()
    cells.loc[cells["competitor"] == "torchdiffeq-fp32", "peak_mem_bytes"] = math.nan
    fig = memory_bars(cells, _colours(cells))
    assert fig.layout.annotations[0].text.endswith("(no fp32 peak)")
    labels = [t.text[0] for t in fig.data if t.type == "bar" and t.text]
    assert labels and not any("nan" in label or "× fp32" in label for label in labels), labels


def test_memory_bars_legend_shows_plain_colours() -> None:
    """An OOM bar first (mlp), a measured one later (conv); fp32 never measured anywhere."""
    oom = {("autocast-fp16", "mlp", 256, 64)} | {
        ("torchdiffeq-fp32", w, width, n) for w in ("mlp", "conv") for width in (64, 256)
        for n in (16, 64)
    }  # fmt: skip
    cells = _grid(workloads=("mlp", "conv"), oom=oom)
    colours = _colours(cells)
    fig = memory_bars(cells, colours)
    legend = _legend_traces(fig)
    assert set(legend) == set(COMPETITORS)
    for comp, trace in legend.items():
        assert trace.marker.color == colours[comp], comp
        if trace.type == "bar":
            assert trace.marker.pattern.shape == "", comp
    ranks = [legend[c].legendrank for c in COMPETITORS]
    assert ranks == sorted(ranks)  # the legend keeps the palette's order
    assert [a.text for a in fig.layout.annotations] == [
        "mlp w=256 b=64 N=64 (no fp32 peak)", "conv w=256 b=64 N=64 (no fp32 peak)",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Line styles and ticks
# ---------------------------------------------------------------------------------------------


def test_lines_of_equal_values_differ_in_dash_and_marker_by_precision() -> None:
    cells = _grid(widths=(64, 256), steps=(8, 16, 32, 64))
    colours = _colours(cells)
    fig = line_figure(cells, "steps", "peak_mem_bytes", colours, title="t", ytitle="y")
    lines = {t.name: t for t in fig.data if t.mode == "lines+markers"}
    for comp, trace in lines.items():
        assert trace.line.color == colours[comp]
    for a, b in (("torchdiffeq-fp32", "torchdiffeq-tf32"), ("autocast-fp16", "autocast-bf16"),
                 ("rampde-fp16", "rampde-bf16")):  # fmt: skip
        assert list(lines[a].y) == list(lines[b].y)  # equal memory: one line hid the other
        assert lines[a].line.dash != lines[b].line.dash, (a, b)
        assert lines[a].marker.symbol != lines[b].marker.symbol, (a, b)
    # the style follows the precision: the same for two competitors of one precision
    assert lines["autocast-fp16"].line.dash == lines["rampde-fp16"].line.dash
    assert lines["autocast-bf16"].marker.symbol == lines["rampde-bf16"].marker.symbol


def test_a_competitor_that_only_ran_out_of_memory_keeps_its_legend_entry() -> None:
    oom = {("torchdiffeq-fp32", "mlp", 256, n) for n in (16, 64)}
    cells = _grid(oom=oom)
    fig = line_figure(cells, "steps", "time_ms_median", _colours(cells), title="t", ytitle="y")
    fp32 = _legend_traces(fig)["torchdiffeq-fp32"]
    assert len(fp32.x) == 2 and fp32.marker.symbol == "x"


def test_grid_axes_tick_at_the_values_present_as_plain_integers() -> None:
    cells = _grid(widths=(64, 256, 1024, 2048, 4096), steps=(8, 16, 32, 64, 128, 256))
    colours = _colours(cells)
    steps = line_figure(cells, "steps", "time_ms_median", colours, title="t", ytitle="y")
    assert steps.layout.xaxis.type == "log"
    assert list(steps.layout.xaxis.tickvals) == [8, 16, 32, 64, 128, 256]
    assert list(steps.layout.xaxis.ticktext) == ["8", "16", "32", "64", "128", "256"]
    width = line_figure(cells, "width", "time_ms_median", colours, title="t", ytitle="y")
    assert list(width.layout.xaxis.ticktext) == ["64", "256", "1024", "2048", "4096"]
    y = steps.layout.yaxis
    assert y.type == "log" and len(y.tickvals) >= 2
    # every label is the full number at its tick, never a bare mantissa digit such as "2"
    assert [float(t.replace(",", "")) for t in y.ticktext] == pytest.approx(list(y.tickvals))


@pytest.mark.parametrize("lo, hi", [(200, 800), (410, 430), (0.8, 1.3), (60, 800), (1e-4, 20),
                                    (0.005, 5), (1e-9, 1e5)])  # fmt: skip
def test_log_ticks_are_full_numbers_at_least_two_and_not_crowded(lo: float, hi: float) -> None:
    ticks = log_ticks(pd.Series([lo, (lo * hi) ** 0.5, hi]))
    vals, text = ticks["tickvals"], ticks["ticktext"]
    assert 2 <= len(vals) <= 10
    assert [float(t.replace(",", "")) for t in text] == pytest.approx(vals)
    gaps = [math.log10(b / a) for a, b in itertools.pairwise(vals)]
    assert min(gaps) >= 0.999 * max(gaps) / 12  # no pile of labels at one end
    margin = (hi / lo) ** 0.05
    assert all(lo / margin * (1 - 1e-9) <= v <= hi * margin * (1 + 1e-9) for v in vals)


def test_log_ticks_of_one_value_and_of_none() -> None:
    assert log_ticks(pd.Series([42.0, 42.0]))["ticktext"] == ["42"]
    assert log_ticks(pd.Series([math.nan, 0.0])) == {}


# ---------------------------------------------------------------------------------------------
# The accuracy panel's cell
# ---------------------------------------------------------------------------------------------


def test_accuracy_panel_cell_depends_only_on_the_cells_not_on_row_order() -> None:
    """64x64 and 256x16 have all competitors and equal work: the larger width wins, on both GPUs,
    whatever the order of the rows; a cell with fewer competitors loses to them."""
    oom = {("torchdiffeq-fp32", "mlp", 256, 64)}
    cells = _grid(oom=oom)
    colours = _colours(cells)
    titles = set()
    for order in (cells, cells.iloc[::-1], cells.sample(frac=1, random_state=3)):
        fig = accuracy_figure(order.reset_index(drop=True), colours)
        titles.add(fig.layout.annotations[0].text)
    assert titles == {"mlp w=256 b=64 N=16"}
    other_gpu = _grid(oom=oom | {("reversible", "mlp", 64, 16)}).iloc[::-1]
    assert accuracy_figure(other_gpu, colours).layout.annotations[0].text == "mlp w=256 b=64 N=16"


# ---------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------


def test_training_curves_hover_with_names_and_axes() -> None:
    training = pytest.importorskip("rampde.bench.training")
    df = pd.DataFrame([
        {"task": "digits", "competitor": comp, "precision": COMPETITORS[comp][0], "epoch": ep,
         "test_metric": 0.9 - 0.5 / ep, "metric_name": "accuracy", "wall_s": 1.5 * ep, "seed": 0}
        for comp in ("torchdiffeq-fp32", "autocast-fp16", "autocast-bf16") for ep in (1, 2, 3)
    ])  # fmt: skip
    figures = training.training_figures(df)
    assert len(figures) == 2
    for _, fig in figures:
        assert fig.layout.hoverlabel.namelength == -1
        for trace in fig.data:
            template = trace.hovertemplate
            assert f"<b>{trace.name}</b>" in template
            assert "epoch %{customdata[0]}" in template and "test accuracy %{y" in template
            assert "wall time %{customdata[1]" in template
            assert [row[0] for row in trace.customdata] == [1, 2, 3]
        lines = {t.name: t for t in fig.data}
        assert lines["autocast-fp16"].line.dash != lines["autocast-bf16"].line.dash
