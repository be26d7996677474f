"""The whole dashboard page, its style and scripts, and ``build_dashboard``, which writes it."""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.offline

from ..results import atomic_write, claims as per_cell_claims
from .claims import compute_claims
from .loading import load_asv, load_results, load_timelines, load_training
from .sections import _Figures, _sections, section_html
from .style import _esc, competitor_colours, slug

log = logging.getLogger(__package__)  # the dashboard logs as one: rampde.bench.report

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 margin:0;color:#222;background:#fafafa}
header{background:#14323f;color:#fff;padding:14px 28px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;color:#cfe0e6;font-size:13px}
main{max-width:1400px;margin:0 auto;padding:12px 28px 40px}
nav.tabs{display:flex;flex-wrap:wrap;gap:6px;margin:14px 0 4px}
nav.tabs button{font:inherit;padding:7px 16px;border:1px solid #9ab;border-radius:6px 6px 0 0;
 background:#eef3f5;cursor:pointer}
nav.tabs button[aria-selected=true]{background:#14323f;color:#fff;border-color:#14323f}
section.gpu{background:#fff;border:1px solid #dde;border-radius:0 8px 8px 8px;padding:8px 22px 22px}
h2{margin:12px 0 4px;font-size:20px} h3{margin:26px 0 6px;font-size:17px;
 border-bottom:1px solid #e3e7ea;padding-bottom:3px}
p.note,.fig-note{color:#555;font-size:13px;margin:4px 0}
.notice{background:#fff7d6;border:1px solid #e8cf6a;border-radius:6px;padding:8px 12px;margin:8px 0}
.empty{background:#f3f3f3;border:1px dashed #bbb;border-radius:6px;padding:10px 14px;color:#444}
#js-errors{background:#fde2e2;border:1px solid #d88;padding:8px 12px;border-radius:6px;margin:8px 0}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d8dde0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f3f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.held{background:#dff3e2;color:#145a24;font-weight:600}
td.not-held{background:#fbe0e0;color:#8a1c1c;font-weight:600}
td.no-verdict{color:#777} td.name,td.value,td.num{white-space:nowrap} td.claim{min-width:230px}
td small{font-weight:normal;color:#555}
td.held,td.not-held,td.no-verdict{min-width:210px;max-width:300px}
div.scroll{overflow-x:auto}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
details{margin:10px 0} summary{cursor:pointer;color:#14323f}
.figure{margin:6px 0 4px}
"""

_ERROR_CATCHER = """
(function(){
  var errors = [];
  function show(){
    var box = document.getElementById('js-errors');
    if (box && errors.length){ box.hidden = false;
      box.textContent = 'Script errors on this page: ' + errors.join(' | '); }
  }
  function record(msg){ errors.push(String(msg)); document.documentElement.setAttribute(
    'data-js-errors', String(errors.length)); show(); }
  window.addEventListener('error', function(e){ record(e.message || e); });
  window.addEventListener('unhandledrejection', function(e){ record(e.reason); });
  var original = console.error;
  console.error = function(){ record(Array.prototype.join.call(arguments, ' '));
    return original.apply(console, arguments); };
  document.addEventListener('DOMContentLoaded', show);
})();
"""

_TABS = """
(function(){
  var buttons = Array.prototype.slice.call(document.querySelectorAll('nav.tabs button'));
  var sections = Array.prototype.slice.call(document.querySelectorAll('section.gpu'));
  var config = {responsive: true, displaylogo: false};
  function nextFrame(){ return new Promise(function(ok){ setTimeout(ok, 0); }); }
  // Draw a section's figures one at a time, so the page paints (claims first) in between.
  function draw(section){
    var pending = Array.prototype.slice.call(section.querySelectorAll('script.figure-data'));
    return pending.reduce(function(chain, data){
      return chain.then(nextFrame).then(function(){
        var el = document.getElementById(data.dataset.for);
        if (!el || el.dataset.drawn) { return; }
        el.dataset.drawn = 'true';
        function failed(err){ console.error('figure ' + el.id + ' was not drawn: ' + err); }
        try {  // one broken figure must not keep the others from being drawn
          var fig = JSON.parse(data.textContent);
          return Plotly.newPlot(el, fig.data, fig.layout, config).catch(failed);
        } catch (err) { failed(err); }
      });
    }, Promise.resolve());
  }
  // The tab holding element `id` (a tab itself, or a cell's row inside one); else the first tab.
  function show(id){
    var target = id ? document.getElementById(id) : null;
    var tab = target ? target.closest('section.gpu') : null;
    id = tab ? tab.id : (sections.length ? sections[0].id : null);
    sections.forEach(function(s){ s.hidden = s.id !== id; });
    buttons.forEach(function(b){
      b.setAttribute('aria-selected', String(b.dataset.target === id)); });
    var shown = document.getElementById(id);
    if (!shown || !window.Plotly) { return Promise.resolve(); }
    // Plots drawn while hidden, or before a window resize, take the visible width now.
    shown.querySelectorAll('.js-plotly-plot').forEach(function(el){
      var p = Plotly.Plots.resize(el); if (p && p.catch) { p.catch(function(){}); } });
    return draw(shown).then(function(){ shown.dataset.drawn = 'true'; });
  }
  // A link to a cell's row (the claims table's best and worst cells): unfold and scroll to it.
  function reveal(id){
    var target = id ? document.getElementById(id) : null;
    if (!target || target.matches('section.gpu')) { return; }
    var box = target.closest('details'); if (box) { box.open = true; }
    target.scrollIntoView({block: 'center'});
  }
  buttons.forEach(function(b){ b.addEventListener('click', function(){
    history.replaceState(null, '', '#' + b.dataset.target); show(b.dataset.target); }); });
  window.addEventListener('hashchange', function(){
    var id = location.hash.slice(1); show(id); reveal(id); });
  var first = location.hash.slice(1);
  show(first).then(function(){
    reveal(first);
    document.documentElement.setAttribute('data-dashboard-ready', 'true'); });
})();
"""


def page_html(sections_html: Sequence[tuple[str, str, str]], notices: Sequence[str],
              sources: Sequence[str]) -> str:  # fmt: skip
    """The whole page: header, notices, GPU tabs, sections, plotly.js once."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tabs = "".join(
        f'<button type="button" data-target="{anchor}" aria-selected="false">{_esc(name)}</button>'
        for name, anchor, _ in sections_html
    )
    body_sections = "\n".join(body for _, _, body in sections_html)
    notice_html = "".join(f'<div class="notice">{_esc(n)}</div>' for n in notices)
    src = ", ".join(_esc(s) for s in sources) or "none"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rampde benchmark dashboard</title>
<style>{_CSS}</style>
<script>{_ERROR_CATCHER}</script>
<script>{plotly.offline.get_plotlyjs()}</script>
</head><body>
<header><h1>rampde benchmark dashboard</h1>
<p>Speed, memory and gradient accuracy of rampde against torchdiffeq and the other recipes,
per GPU model. Built {now} from: {src}</p></header>
<main>
<div id="js-errors" hidden></div>
{notice_html}
<nav class="tabs" aria-label="GPU model">{tabs}</nav>
{body_sections}
</main>
<script>{_TABS}</script>
</body></html>
"""


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and os.replace."""
    atomic_write(path, lambda handle: handle.write(text))


def _targets_summary(df: pd.DataFrame) -> pd.DataFrame | None:
    """Issue 8's targets per GPU model (``targets.targets_summary``); None without results."""
    if df.empty:
        return None
    from rampde.bench.targets import evaluate_targets, targets_summary

    return targets_summary(evaluate_targets(df))


def build_dashboard(
    results: list[Path],
    out: Path,
    asv_results: Path | None = None,
    training: list[Path] | None = None,
) -> Path:
    """Write the dashboard of ``results`` (and asv history, training curves) to ``out``.

    One self-contained HTML file (plotly.js inlined once), written atomically; returns its path
    (``out/dashboard.html`` when ``out`` is an existing folder). Missing files raise
    FileNotFoundError; empty or partial results give a page that says what is missing.
    """
    out = Path(out)
    if out.is_dir():
        out = out / "dashboard.html"
    paths = [Path(p) for p in results]
    df, notices = load_results(paths)
    timelines = load_timelines(paths, df)
    asv = load_asv(Path(asv_results)) if asv_results is not None else None
    train, train_notices = load_training([Path(p) for p in training or []])
    notices += train_notices
    if df.empty:
        where = ", ".join(map(str, paths)) or "no results file given"
        notices.insert(0, f"No benchmark results to show ({where}): run 'rampde-bench run' first.")
    if asv is not None and asv.empty:
        notices.append(f"The asv results folder {asv_results} holds no measurement.")
    for notice in notices:
        log.warning("%s", notice)
    sections = _sections(df, timelines, asv, train)
    everyone = set(df["competitor"]) | set(train["competitor"])
    if asv is not None:
        everyone |= set(asv["competitor"]) - {""}
    colours = competitor_colours(everyone)
    per_cell = per_cell_claims(df)  # once: the verdicts and each tab's table behind them
    claims = compute_claims(df, per_cell)
    targets = _targets_summary(df)
    figures = _Figures()
    bodies = []
    for section in sections:
        for notice in section.notices:
            log.warning("%s: %s", section.gpu, notice)
        mine = claims[claims["gpu"].map(slug) == slug(section.gpu)] if len(claims) else claims
        cells = per_cell[per_cell["gpu"].map(slug) == slug(section.gpu)] if len(per_cell) else per_cell
        goals = None if targets is None else targets[targets["gpu"].map(slug) == slug(section.gpu)]
        bodies.append((section.gpu, section.anchor,
                       section_html(section, mine, colours, figures, goals, cell_claims=cells)))
    if not sections:
        nothing = '<p class="empty">Nothing to show: no results, no asv history.</p>'
        body = f'<section class="gpu" id="gpu-none">{nothing}</section>'
        bodies.append(("no data", "gpu-none", body))
    sources = [str(p) for p in paths] + ([str(asv_results)] if asv_results else [])
    sources += [str(p) for p in training or []]
    _write_atomic(out, page_html(bodies, notices, sources))
    log.info("dashboard with %d figures written to %s", figures.count, out)
    return out
