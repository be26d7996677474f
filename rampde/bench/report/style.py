"""Colours per competitor and the dashboard's small helpers: names, cell labels, number formats."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable

import pandas as pd

# --------------------------------------------------------------------------------------------
# Colours: fixed per competitor, in a stable order, across every plot
# --------------------------------------------------------------------------------------------

PALETTE: dict[str, str] = {
    "torchdiffeq-fp32": "#1f77b4",
    "torchdiffeq-tf32": "#6baed6",
    "torchdiffeq-adjoint": "#08306b",
    "autocast-fp16": "#d62728",
    "autocast-bf16": "#ff7f0e",
    "autocast-nocache-fp16": "#e377c2",
    "autocast-nocache-bf16": "#bcbd22",
    "checkpoint-step": "#8c564b",
    "checkpoint-revolve": "#c49c94",
    "reversible": "#9467bd",
    "rampde-fp32": "#74c476",
    "rampde-fp16": "#2ca02c",
    "rampde-bf16": "#00441b",
    "rampde-fp16-fast": "#17becf",
    "rampde-bf16-fast": "#006d77",
    "rampde-fp16-graph": "#98df8a",
    "rampde-bf16-graph": "#3f8f3f",
}
_EXTRA_COLOURS = ("#7f7f7f", "#393b79", "#ad494a", "#8c6d31", "#843c39", "#7b4173", "#5254a3")


# ============================================================================================
# Small helpers
# ============================================================================================


def competitor_order(names: Iterable[str]) -> list[str]:
    """Known competitors in the palette's order, then the others sorted by name."""
    present = set(names)
    known = [n for n in PALETTE if n in present]
    return known + sorted(present - set(PALETTE))


def competitor_colours(names: Iterable[str]) -> dict[str, str]:
    """One colour per competitor: the palette's for known names, spare ones for the rest."""
    order = competitor_order(names)
    unknown = [n for n in order if n not in PALETTE]
    colours = {n: PALETTE[n] for n in order if n in PALETTE}
    for i, name in enumerate(unknown):
        colours[name] = _EXTRA_COLOURS[i % len(_EXTRA_COLOURS)]
    return colours


def slug(text: str) -> str:
    """Lower-case, alphanumerics joined by '-': how GPU names and asv machines are matched."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def precision_of(name: str) -> str:
    """The precision in a competitor's name (``rampde-bf16-fast`` -> ``bf16``), or ''."""
    found = re.search(r"(fp16|bf16|fp32|tf32|fp64)", name)
    return found.group(1) if found else ""


def cell_label(row: pd.Series | dict) -> str:
    """A cell in words: ``mlp w=256 b=256 N=64`` (the method is named when it is not rk4)."""
    method = str(row.get("method", "") or "")
    extra = f" {method}" if method and method != "rk4" else ""
    return (
        f"{row['workload']}{extra} w={int(row['width'])} b={int(row['batch'])} "
        f"N={int(row['steps'])}"
    )


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: object, digits: int = 4) -> str:
    """A number with ``digits`` significant figures, '—' for a missing one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}"


def _mem_unit(max_bytes: float) -> tuple[float, str]:
    """The divisor and name of the memory unit that suits ``max_bytes``."""
    return (2.0**30, "GiB") if max_bytes >= 2.0**31 else (2.0**20, "MiB")


def _fmt_bytes(value: float) -> str:
    if not _finite(value):
        return "not measured"
    div, unit = _mem_unit(value)
    return f"{value / div:.4g} {unit} ({int(value):,} B)"


def _wide(values: Iterable[float], ratio: float) -> bool:
    """Whether positive values span at least ``ratio`` (a log axis helps)."""
    pos = [v for v in values if _finite(v) and v > 0]
    return bool(pos) and max(pos) / min(pos) >= ratio


def _esc(value: object) -> str:
    return html.escape(str(value))
