"""The HTML tables of a GPU model's tab: claims, performance targets, environments, failed cells
and the training parity table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from .claims import BASELINE_FP32, GRAD_ERR_MAX, meets_claim
from .schema import ENV_COLUMNS
from .style import _esc, _finite, _fmt, cell_label, competitor_order, slug

def _table(header: Sequence[str], rows: Iterable[Sequence[str]], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (then they are trusted HTML)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(c if raw else f"<td>{_esc(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _claim_value(claim: str, value: float, against: float) -> str:
    if value is None or math.isnan(value):
        return "—"
    if claim == "accuracy":
        return f"{100 * value:.3g}% (naive {_fmt(100 * against, 3)}%)"
    return f"{value:.3g}×"


def cell_anchor(gpu: str, competitor: str, cell: str) -> str:
    """The id of a competitor's row of a cell in the table behind the claims (``claim_cells_html``)."""
    return "cell-" + slug(f"{gpu} {competitor} {cell}")


def _cell_link(gpu: str, competitor: str, cell: str) -> str:
    if not cell:
        return ""
    return f'<a href="#{cell_anchor(gpu, competitor, cell)}">{_esc(cell)}</a>'


def claims_html(claims: pd.DataFrame, colours: dict[str, str]) -> str:
    """The claims table of one GPU: verdict, best and worst cell for each claim, each cell a link
    to its row in the table behind the claims."""
    if claims.empty:
        return (
            '<p class="empty">No claims to judge: these results hold no <code>rampde-*</code> '
            "competitor.</p>"
        )
    rows = []
    records = claims.to_dict("records")
    group_size = claims.groupby("competitor", sort=False).size().to_dict()
    for i, r in enumerate(records):
        held = r["held"]
        verdict, css = (
            ("held", "held") if held is True else
            ("not held", "not-held") if held is False else
            ("reported" if r["claim"] == "speedup_tf32" and r["n_cells"] else "no verdict",
             "no-verdict")
        )  # fmt: skip
        note = f"<br><small>{_esc(r['note'])}</small>" if r["note"] else ""
        colour = colours.get(r["competitor"], "#777")
        swatch = f'<span class="swatch" style="background:{colour}"></span>'
        first = i == 0 or records[i - 1]["competitor"] != r["competitor"]
        best = _claim_value(r["claim"], r["best"], r["best_against"])
        worst = _claim_value(r["claim"], r["worst"], r["worst_against"])
        meeting = r["n_meeting"] if r["claim"] != "speedup_tf32" else "—"
        rows.append([
            f'<td class="name" rowspan="{group_size[r["competitor"]]}">{swatch}'
            f"{_esc(r['competitor'])}</td>" if first else "",
            f'<td class="claim">{_esc(r["claim_text"])}<br><small>{_esc(r["rule"])}</small></td>',
            f'<td class="name">{_esc(r["against"])}</td>',
            f'<td class="{css}">{verdict}{note}</td>',
            f'<td class="value"><b>{best}</b><br><small>{_cell_link(r["gpu"], r["competitor"], r["best_cell"])}'
            "</small></td>",
            f'<td class="value"><b>{worst}</b><br><small>{_cell_link(r["gpu"], r["competitor"], r["worst_cell"])}'
            "</small></td>",
            f'<td class="num">{meeting} / {r["n_cells"]}</td>',
        ])  # fmt: skip
    header = ["competitor", "claim", "against", "verdict", "best (its cell)", "worst (its cell)",
              "cells meeting"]  # fmt: skip
    return f'<div class="scroll">{_table(header, rows, raw=True)}</div>'


def _judged_td(text: str, meets: bool | None) -> str:
    """A figure's cell, green where it meets its claim's threshold, red where not, plain for None."""
    css = "" if meets is None else ' class="held"' if meets else ' class="not-held"'
    return f'<td{css} style="text-align:right">{text}</td>'


def _ratio(value: float) -> str:
    return f"{_fmt(value, 3)}×" if _finite(value) else _fmt(value)


def _percent(value: float) -> str:
    return f"{100 * value:.3g}%" if _finite(value) else _fmt(value)


def claim_cells_html(per_cell: pd.DataFrame, colours: dict[str, str], gpu: str) -> str:
    """Every cell behind one GPU's claims, one row per rampde competitor and cell (``results.claims``),
    folded: the figures the verdicts above were judged on, coloured by whether each cell meets its
    claim's threshold. The claims table's best and worst cells link to their rows here."""
    if per_cell.empty:
        return ""
    order = {name: i for i, name in enumerate(competitor_order(per_cell["competitor"]))}
    rows = []
    for r in sorted(per_cell.to_dict("records"), key=lambda r: order[r["competitor"]]):
        cell = cell_label(r)
        speed, tf32, memory = r["speedup_vs_fp32"], r["speedup_vs_tf32"], r["mem_ratio_vs_fp32"]
        error, naive = r["grad_err"], r["naive_grad_err"]
        limit = GRAD_ERR_MAX.get(r["precision"])
        # an infinite naive error is a naive run that was not finite: ours beats it (as compute_claims says)
        accurate = (None if limit is None or not _finite(error) or math.isnan(naive)
                    else bool(meets_claim("accuracy", error, naive, limit)))  # fmt: skip
        colour = colours.get(r["competitor"], "#777")
        rows.append([
            f'<td class="name" id="{cell_anchor(gpu, r["competitor"], cell)}"><span class="swatch" '
            f'style="background:{colour}"></span>{_esc(r["competitor"])}</td>',
            f"<td>{_esc(cell)}</td>",
            f'<td style="text-align:right">{_fmt(r["time_ms"], 4)}</td>',
            _judged_td(_ratio(speed), meets_claim("speedup", speed) if _finite(speed) else None),
            _judged_td(_ratio(tf32), None),
            _judged_td(_ratio(memory), meets_claim("memory", memory) if _finite(memory) else None),
            _judged_td(_percent(error), accurate),
            _judged_td(_percent(naive), None),
            f"<td><small>{_esc(r['note'])}</small></td>",
        ])  # fmt: skip
    header = ["competitor", "cell", "time (ms)", "speedup vs torchdiffeq-fp32", "speedup vs torchdiffeq-tf32",
              "memory vs torchdiffeq-fp32", "gradient error", "naive recipe's error", "baselines that did not run"]
    what = "1 cell" if len(rows) == 1 else f"{len(rows)} cells"
    return (f"<details><summary>Every cell behind these claims ({what}; green: meets its claim's threshold, "
            f"red: does not)</summary>"
            f'<div class="scroll">{_table(header, rows, raw=True)}</div></details>')  # fmt: skip


def _short_path(path: str) -> str:
    """``…/<folder>/<file>``: enough to tell the results files apart."""
    parts = Path(path).parts
    return str(Path(*parts[-2:])) if len(parts) > 2 else path


def _or_dash(value: object) -> str:
    return str(value) if str(value) else "—"


def env_html(results: pd.DataFrame) -> str:
    """The environments the results were measured in, with their competitors, rows and dates."""
    cols = [c for c in ENV_COLUMNS if c != "gpu"]
    rows = []
    for key, part in results.groupby(cols + ["source"], dropna=False, sort=True):
        env = dict(zip(cols, map(_or_dash, key)))
        stamps = sorted(t for t in part["timestamp"] if t)
        when = "—" if not stamps else stamps[0] if stamps[0] == stamps[-1] else (
            f"{stamps[0]} … {stamps[-1]}")  # fmt: skip
        rows.append([
            f"{env['device']} (compute capability {env['compute_capability']})",
            f"driver {env['driver']}, CUDA {env['cuda']}",
            f"torch {env['torch']}, torchdiffeq {env['torchdiffeq']}, rampde {env['rampde']}",
            f"TF32 matmul {env['tf32']}, cuDNN TF32 {env['cudnn_tf32']}, "
            f"cuDNN benchmark {env['cudnn_benchmark']}",
            env["commit"], _short_path(str(key[-1])),
            ", ".join(competitor_order(part["competitor"])), str(len(part)), when,
        ])  # fmt: skip
    header = ["device", "driver, CUDA", "versions", "TF32 and cuDNN", "commit", "results file",
              "competitors", "rows", "measured"]  # fmt: skip
    return f'<div class="scroll">{_table(header, rows)}</div>'


def _status_summary(results: pd.DataFrame) -> str:
    counts = results["status"].value_counts()
    parts = [f"{int(n)} {s}" for s, n in counts.items()]
    return f"{len(results)} cells: " + ", ".join(parts)


def _failures_html(results: pd.DataFrame) -> str:
    bad = results[results["status"] != "ok"]
    if bad.empty:
        return ""
    rows = [[r["competitor"], cell_label(r), r["status"], r["message"][:200]]
            for r in bad.to_dict("records")]  # fmt: skip
    table = _table(["competitor", "cell", "status", "message"], rows)
    what = "1 cell did" if len(bad) == 1 else f"{len(bad)} cells did"
    return f"<details><summary>{what} not run to completion</summary>{table}</details>"


PARITY_ACCURACY_POINTS = 0.3  # training parity's goal: within 0.3 points of fp32's test accuracy...
PARITY_NLL_RELATIVE = 0.01  # ...and within 1% of its test NLL


def parity_verdict(metric_name: str, final: float, delta: float) -> tuple[str, bool | None]:
    """How a run's final metric compares with torchdiffeq-fp32's at the same epoch, in words, and
    whether it is within the parity goal (None where there is no goal or no baseline).

    Accuracy (a fraction, higher is better): the difference in points, within the goal when it is
    no more than ``PARITY_ACCURACY_POINTS`` below. NLL (lower is better): the difference relative
    to the baseline's, within the goal when it is no more than ``PARITY_NLL_RELATIVE`` above.
    """
    if not (_finite(final) and _finite(delta)):
        return "—", None
    if metric_name == "accuracy":
        points = 100 * delta
        word = "better" if points > 0 else "worse" if points < 0 else "equal"
        ok = round(points, 9) >= -PARITY_ACCURACY_POINTS  # rounded: a run exactly at the goal meets it
        return f"{points:+.2f} points ({word}; goal: ≥ -{PARITY_ACCURACY_POINTS:g})", ok
    if metric_name == "nll":
        base = final - delta
        if not (_finite(base) and base != 0):
            return "—", None
        relative = 100 * delta / abs(base)
        word = "worse" if relative > 0 else "better" if relative < 0 else "equal"
        ok = round(relative, 9) <= 100 * PARITY_NLL_RELATIVE
        return f"{relative:+.2f}% ({word}; goal: ≤ +{100 * PARITY_NLL_RELATIVE:g}%)", ok
    return f"{delta:+.4g}", None


def parity_of(row: dict) -> tuple[str, bool | None]:
    """``parity_verdict`` of a ``parity_table`` row; torchdiffeq-fp32's own row is the baseline."""
    if row["competitor"] == BASELINE_FP32:
        return "the baseline", None
    return parity_verdict(row["metric_name"], row["final_metric"], row["delta_vs_fp32"])


def _parity_html(table: pd.DataFrame) -> str:
    """The final test metric of each training run against torchdiffeq-fp32's, with the parity goal."""
    rows = []
    for r in table.to_dict("records"):
        text, ok = parity_of(r)
        css = "" if ok is None else ' class="held"' if ok else ' class="not-held"'
        cells = [
            r["task"], r["competitor"], f"{r['metric_name']} {_fmt(r['final_metric'])}", None, _fmt(r["wall_s"]),
            f"{r['peak_mem_bytes'] / 2**20:.4g}" if _finite(r["peak_mem_bytes"]) else "—",
            _fmt(r["skipped_steps"]), _fmt(r["scaler_retries"]), _fmt(r["epochs"]), _fmt(r["seeds"]),
        ]  # fmt: skip
        rows.append([f"<td{css}>{_esc(text)}</td>" if c is None else f"<td>{_esc(c)}</td>" for c in cells])
    header = ["task", "competitor", "final test metric", "against torchdiffeq-fp32 at that epoch", "wall (s)",
              "peak (MiB)", "skipped steps", "adjoint retries", "epochs", "seeds"]  # fmt: skip
    return f'<div class="scroll">{_table(header, rows, raw=True)}</div>'


def targets_html(summary: pd.DataFrame) -> str:
    """The performance targets on one GPU: one row per target (``targets.targets_summary``), marked
    met, met where measured, missed or not measured, with the figure furthest from its threshold and
    that figure's cell."""
    from rampde.bench.targets import format_value

    if summary.empty:
        return '<p class="empty">No target could be judged: no results for this GPU.</p>'
    css = {"met": "held", "met where measured": "held", "missed": "not-held", "not measured": "no-verdict"}
    rows = []
    for r in summary.to_dict("records"):
        worst = format_value(r["target"], r["worst"])
        where = f"<br><small>{_esc(r['worst_competitor'])}, {_esc(r['worst_cell'])}</small>" if (
            r["worst_competitor"]) else ""  # fmt: skip
        note = f"<br><small>{_esc(r['note'])}</small>" if r["note"] else ""
        rows.append([
            f'<td class="claim">{_esc(r["description"])}<br><small>{_esc(r["target"])}</small></td>',
            f'<td class="{css[r["status"]]}">{_esc(r["status"])}{note}</td>',
            f'<td class="value"><b>{_esc(worst)}</b>{where}</td>',
            f'<td class="num">{_esc(r["comparison"])} {_esc(format_value(r["target"], r["threshold"]))}</td>',
            f'<td class="num">{r["met_cells"]} / {r["missed_cells"]} / {r["unmeasured_cells"]}</td>',
        ])  # fmt: skip
    header = ["target", "verdict", "worst measured (its cell)", "needs", "met / missed / not measured"]
    return f'<div class="scroll targets">{_table(header, rows, raw=True)}</div>'
