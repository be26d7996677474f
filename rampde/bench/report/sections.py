"""One GPU model's tab of the dashboard: its data (``Section``), its figures as HTML, its training
runs and the notices about what is missing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from ..results import claims as per_cell_claims, latest_cells
from .claims import BASELINE_FP32, BASELINE_TF32, OURS_PREFIX
from .figures import (
    _base_layout, accuracy_figure, asv_figure, line_figure, memory_bars, timeline_figure,
)  # fmt: skip
from .style import _esc, _mem_unit, slug
from .tables import (
    _failures_html, _parity_html, _status_summary, claim_cells_html, claims_html, env_html, targets_html,
)  # fmt: skip

log = logging.getLogger(__package__)  # the dashboard logs as one: rampde.bench.report


@dataclass
class Section:
    """Everything shown for one GPU model."""

    gpu: str
    results: pd.DataFrame
    timelines: pd.DataFrame
    asv: pd.DataFrame
    training: pd.DataFrame
    notices: list[str] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return "gpu-" + slug(self.gpu)


class _Figures:
    """Figures as a div plus their JSON, drawn by the page's script when their tab shows."""

    def __init__(self) -> None:
        self.count = 0

    def html(self, fig: go.Figure | None, div_id: str, empty: str, note: str = "") -> str:
        if fig is None:
            return f'<p class="empty">{_esc(empty)}</p>'
        self.count += 1
        # "<" only occurs inside JSON strings, where \u003c means the same: no "</script>".
        data = pio.to_json(fig, validate=True).replace("<", "\\u003c")
        note_html = f'<p class="fig-note">{_esc(note)}</p>' if note else ""
        return (
            f'<div class="figure"><div id="{div_id}" class="plotly-graph-div" '
            f'style="height:{int(fig.layout.height)}px;width:100%"></div>'
            f'<script type="application/json" class="figure-data" data-for="{div_id}">{data}'
            f"</script></div>{note_html}"
        )


def training_html(training: pd.DataFrame, colours: dict[str, str], figures: _Figures,
                  anchor: str) -> str:  # fmt: skip
    """The training runs of one GPU: ``rampde.bench.training``'s figures and parity table."""
    try:
        from rampde.bench.training import parity_table, training_figures
    except ImportError as err:
        log.warning("training curves left out: %s", err)
        return f'<p class="empty">Training curves need rampde.bench.training ({_esc(err)}).</p>'
    try:
        drawn = training_figures(training, colors=colours)
        table = parity_table(training)
    except (KeyError, ValueError, TypeError) as err:
        log.warning("training curves could not be drawn: %s", err)
        return f'<p class="empty">The training results could not be drawn: {_esc(err)}.</p>'
    parts = [_parity_html(table)]
    for i, (title, fig) in enumerate(drawn):
        _base_layout(fig, title, 400)
        parts.append(figures.html(fig, f"{anchor}-training-{i}", ""))
    return "\n".join(parts)


def section_html(section: Section, claims: pd.DataFrame, colours: dict[str, str],
                 figures: _Figures, targets: pd.DataFrame | None = None,
                 cell_claims: pd.DataFrame | None = None) -> str:  # fmt: skip
    """One GPU model's tab: claims, targets, time, memory, accuracy, timelines, training, asv, env.

    ``targets`` is this GPU's ``targets.targets_summary``; None leaves the targets table out.
    ``cell_claims`` is this GPU's ``results.claims`` (computed here when not given).
    """
    res, sid = section.results, section.anchor
    cells = latest_cells(res)
    parts = [f'<section class="gpu" id="{sid}"><h2>{_esc(section.gpu)}</h2>']
    if not res.empty:
        parts.append(f'<p class="note">{_esc(_status_summary(res))}</p>')
    parts += [f'<div class="notice">{_esc(n)}</div>' for n in section.notices]
    if not res.empty:
        where = "on the CPU" if section.gpu == "cpu" else "on this GPU"
        parts.append(f"<h3>Claims of the paper {where}</h3>")
        parts.append(claims_html(claims, colours))
        cell_claims = per_cell_claims(res) if cell_claims is None else cell_claims
        parts.append(claim_cells_html(cell_claims, colours, section.gpu))
        parts.append(
            '<p class="note">Speedup = time of the baseline / time of rampde in the same cell '
            "(workload, width, batch, steps; its newest successful run); memory ratio = peak allocator memory of rampde / "
            "torchdiffeq-fp32's; accuracy = relative error of the parameter gradient against "
            "fp64. Best and worst are over the cells where both ran.</p>"
        )
        if targets is not None:
            parts.append("<h3>Performance targets</h3>")
            parts.append(targets_html(targets))
            parts.append(
                '<p class="note">Each target is judged on its named competitor (speed: rampde-bf16 '
                "against torchdiffeq-tf32, rampde-fp16 against torchdiffeq-fp32; memory: rampde-fp16 and "
                "rampde-bf16, the default storage; accuracy and finiteness: every rampde-* competitor) "
                "from the latest row of each cell; the worst "
                "figure is the one furthest from the threshold. <code>rampde-bench targets</code> "
                "prints every cell, and the fastest variant of each precision.</p>"
            )
        parts.append("<h3>Time</h3>")
        time_y = "time per forward+backward (ms)"
        parts.append(figures.html(
            line_figure(cells, "steps", "time_ms_median", colours, ytitle=time_y,
                        title="Time against the number of steps"),
            f"{sid}-time-steps", "No successful timing to plot against steps.",
        ))  # fmt: skip
        parts.append(figures.html(
            line_figure(cells, "width", "time_ms_median", colours, ytitle=time_y,
                        title="Time against width"),
            f"{sid}-time-width", "No successful timing to plot against width.",
        ))  # fmt: skip
        parts.append("<h3>Memory</h3>")
        if res["peak_mem_bytes"].isna().all():
            where = "on the CPU" if section.gpu == "cpu" else "in these results"
            parts.append(f'<p class="empty">Memory was not measured {where}: peak_mem_bytes '
                         "is empty for every cell.</p>")  # fmt: skip
        else:
            parts.append(figures.html(memory_bars(cells, colours), f"{sid}-mem-bars", ""))
            top = float(res["peak_mem_bytes"].max())
            div, unit = _mem_unit(top)
            parts.append(figures.html(
                line_figure(cells, "steps", "peak_mem_bytes", colours, scale=div,
                            ytitle=f"peak memory ({unit})",
                            title="Peak memory against the number of steps"),
                f"{sid}-mem-steps", "No memory measurement to plot against steps.",
            ))  # fmt: skip
        parts.append("<h3>Accuracy and speed</h3>")
        parts.append(figures.html(
            accuracy_figure(cells, colours), f"{sid}-accuracy",
            "No cell has both a timing and a gradient error.",
        ))  # fmt: skip
        parts.append("<h3>NVML timelines</h3>")
        parts.append(figures.html(
            timeline_figure(section.timelines, colours), f"{sid}-timelines",
            "No NVML timeline was recorded for this GPU (no timelines.csv, or no NVML).",
        ))  # fmt: skip
    if not section.training.empty:
        parts.append("<h3>Training</h3>")
        parts.append(training_html(section.training, colours, figures, sid))
    if section.asv is not None:
        parts.append("<h3>asv history</h3>")
        parts.append(figures.html(
            asv_figure(section.asv, colours), f"{sid}-asv",
            "The asv results hold no finite measurement for this GPU model.",
        ))  # fmt: skip
    if not res.empty:
        parts.append("<h3>Environment</h3>")
        parts.append(env_html(res))
        parts.append(_failures_html(res))
    parts.append("</section>")
    return "\n".join(parts)


def _sections(results: pd.DataFrame, timelines: pd.DataFrame, asv: pd.DataFrame | None,
              training: pd.DataFrame) -> list[Section]:  # fmt: skip
    """One section per GPU model in the results, plus asv machines no results match."""
    names = {slug(g): g for g in sorted(results["gpu"].unique())} if not results.empty else {}
    for g in sorted(training["gpu"].unique()):
        names.setdefault(slug(g), g)
    if asv is not None:
        for m in sorted(asv["machine"].unique()):
            names.setdefault(slug(m), m)
    sections = []
    for key, gpu in sorted(names.items(), key=lambda kv: (kv[1] == "cpu", kv[1].lower())):
        res = results[results["gpu"].map(slug) == key] if not results.empty else results
        section = Section(
            gpu=gpu, results=res,
            timelines=timelines[timelines["gpu"].map(slug) == key] if len(timelines) else timelines,
            asv=None if asv is None else asv[asv["machine"].map(slug) == key],
            training=training[training["gpu"].map(slug) == key],
        )  # fmt: skip
        section.notices = _section_notices(section)
        sections.append(section)
    return sections


CPU_NOTICE = ("CPU results: the paper's claims are about a GPU's tensor cores, and the times here say nothing "
              "about them; the CPU has no TF32 and no allocator peak to measure. The gradient errors come from "
              "the same fp16/bf16 rounding as on a GPU. For the claims, run the sweep on a GPU.")


def _section_notices(section: Section) -> list[str]:
    """What is missing in one GPU's results, in words."""
    res = section.results
    if res.empty:
        return ["No sweep results for this GPU model; only the data below."]
    on_cpu = section.gpu == "cpu"
    notes = [CPU_NOTICE] if on_cpu else []
    ok = res[res["status"] == "ok"]
    if ok.empty:
        notes.append("Partial results: no cell ran successfully on this GPU.")
    present = set(ok["competitor"])
    baselines = (BASELINE_FP32,) if on_cpu else (BASELINE_FP32, BASELINE_TF32)  # TF32 is a CUDA mode
    missing = [b for b in baselines if b not in present]
    if missing:
        them = "them" if len(missing) > 1 else "it"
        notes.append(f"Partial results: no successful cell of {' or '.join(missing)}, "
                     f"so the claims against {them} cannot be judged.")  # fmt: skip
    if not any(c.startswith(OURS_PREFIX) for c in present):
        notes.append("Partial results: no successful rampde-* cell on this GPU.")
    if ok["time_ms_median"].isna().all() and not ok.empty:
        notes.append("Partial results: no timing (time_ms_median) in these results.")
    if res["peak_mem_bytes"].isna().all() and not on_cpu:  # the CPU notice says so
        notes.append("Peak memory was not measured in these results.")
    return notes
