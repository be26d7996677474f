"""The HTML dashboard: speed, memory and accuracy per GPU model, in one self-contained page.

``build_dashboard`` reads one or more ``results.csv`` files (the schema of
``docs/bench-interfaces.md``; optional columns may be missing), the ``timelines.csv`` beside each
of them, optionally an asv 0.6 results folder (one sub-folder per machine, named after the GPU
model) and optional training-curve CSVs, and writes one HTML file with plotly.js inlined once, so
that the page reads offline. Each GPU model gets its own tab: the paper's claims on top
(``compute_claims``) and the performance targets (``rampde.bench.targets``), then time, memory,
the accuracy-speed trade-off, NVML timelines, training curves, the asv history and the environment
of each run.

Training files are ``rampde-bench train``'s ``training.csv`` (one row per task, competitor, seed
and epoch); their figures and parity table come from ``rampde.bench.training``, drawn here with
the dashboard's colours.

The modules: ``schema`` (the results columns read), ``style`` (colours and small helpers),
``loading`` (reading the files), ``claims`` (cells and the paper's claims), ``figures`` (plotly),
``tables`` (HTML tables), ``sections`` (one GPU model's tab) and ``page`` (the page and
``build_dashboard``). Their public names are importable from here.
"""

from .claims import (
    BASELINE_FP32, BASELINE_TF32, CLAIM_TEXT, GRAD_ERR_MAX, MEMORY_RATIO_MAX, NAIVE_RECIPE,
    OURS_PREFIX, SPEEDUP_MIN, compute_claims,
)  # fmt: skip
from .figures import (
    accuracy_figure, asv_figure, largest_cell, line_figure, memory_bars, pick_slice,
    timeline_figure,
)  # fmt: skip
from .loading import (
    TRAINING_NUMERIC, TRAINING_REQUIRED, load_asv, load_results, load_timelines, load_training,
)  # fmt: skip
from .loading import _normalise_results as _normalise_results  # used by the tests
from .page import build_dashboard, page_html
from .schema import (
    CELL_COLUMNS, ENV_COLUMNS, GRID_COLUMNS, NUMERIC_COLUMNS, REQUIRED_COLUMNS, STRING_COLUMNS,
    TIMELINE_COLUMNS, UNKNOWN_GPU,
)  # fmt: skip
from .sections import Section, section_html, training_html
from .style import PALETTE, cell_label, competitor_colours, competitor_order, precision_of, slug
from .tables import claims_html, env_html, targets_html

__all__ = [
    "BASELINE_FP32", "BASELINE_TF32", "CELL_COLUMNS", "CLAIM_TEXT", "ENV_COLUMNS",
    "GRAD_ERR_MAX", "GRID_COLUMNS", "MEMORY_RATIO_MAX", "NAIVE_RECIPE", "NUMERIC_COLUMNS",
    "OURS_PREFIX", "PALETTE", "REQUIRED_COLUMNS", "SPEEDUP_MIN", "STRING_COLUMNS",
    "TIMELINE_COLUMNS", "TRAINING_NUMERIC", "TRAINING_REQUIRED", "UNKNOWN_GPU", "Section",
    "accuracy_figure", "asv_figure", "build_dashboard", "cell_label", "claims_html",
    "competitor_colours", "competitor_order", "compute_claims", "env_html",
    "largest_cell", "line_figure", "load_asv", "load_results", "load_timelines",
    "load_training", "memory_bars", "page_html", "pick_slice", "precision_of", "section_html",
    "slug", "targets_html", "timeline_figure", "training_html",
]  # fmt: skip
