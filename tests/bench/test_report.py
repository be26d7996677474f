"""The dashboard: claims with exact numbers, the page built from small made-up results, the
messages for empty and partial results, and the page rendered in headless Chromium."""

from __future__ import annotations

import html
import importlib.util
import json
import logging
import math
import os
import re
import struct
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("plotly")

from rampde.bench import report  # noqa: E402
from rampde.bench.report.sections import CPU_NOTICE  # noqa: E402
from rampde.bench.results import claims as per_cell_claims  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-40GB"
COMPETITORS = {  # name: (precision, time factor, memory factor, gradient error)
    "torchdiffeq-fp32": ("fp32", 1.00, 1.00, 1e-6),
    "torchdiffeq-tf32": ("tf32", 0.70, 1.00, 2e-4),
    "autocast-fp16": ("fp16", 0.45, 0.55, 0.0073),
    "autocast-bf16": ("bf16", 0.45, 0.55, 0.0496),
    "reversible": ("fp32", 1.90, 0.05, 3e-6),
    "rampde-fp16": ("fp16", 0.50, 0.45, 0.0002),
    "rampde-bf16": ("bf16", 0.48, 0.45, 0.0019),
}
HERE = Path(__file__).resolve().parent
GRAPH_DIV = re.compile(r'class="plotly-graph-div"')


# ---------------------------------------------------------------------------------------------
# Made-up results
# ---------------------------------------------------------------------------------------------


def _row(gpu: str, competitor: str, workload: str, width: int, steps: int, **extra) -> dict:
    precision, tfac, mfac, err = COMPETITORS[competitor]
    base_ms = 0.002 * width * steps * (1.0 if gpu == H100 else 1.6)
    if precision in ("fp16", "bf16"):  # low precision pays off more at larger widths
        tfac *= (256 / width) ** 0.25
        err *= (steps / 16) ** 0.5
    cell_id = f"{gpu[:11]}|{competitor}|{workload}|{width}|{steps}"
    row = {
        "gpu": gpu, "device": "cuda", "competitor": competitor, "precision": precision,
        "workload": workload, "method": "rk4", "width": width, "batch": 64, "steps": steps,
        "repeats": 5, "status": "ok", "message": "",
        "time_ms_median": base_ms * tfac, "time_ms_q25": base_ms * tfac * 0.98,
        "time_ms_q75": base_ms * tfac * 1.02, "time_ms_min": base_ms * tfac * 0.97,
        "time_ms_max": base_ms * tfac * 1.05,
        "peak_mem_bytes": 4096.0 * width * steps * mfac, "loss": 0.5,
        "grad_err_params": err, "grad_err_y0": err / 2, "tflops": 12.5,
        "tf32": competitor == "torchdiffeq-tf32", "cudnn_tf32": True, "cudnn_benchmark": False,
        "torch": "2.13.0+cu128", "cuda": "12.8", "driver": "570.86",
        "compute_capability": "9.0" if gpu == H100 else "8.0", "torchdiffeq": "0.2.5",
        "rampde": "0.1.0", "commit": "abc1234", "timestamp": "2026-01-05T10:00:00Z",
        "cell_id": cell_id,
    }  # fmt: skip
    row.update(extra)
    return row


def gpu_rows(gpu: str, workloads: tuple[str, ...]) -> list[dict]:
    """A small grid: widths 64/256, steps 16/64, every competitor; one OOM cell on the A100."""
    rows = []
    for workload in workloads:
        for width in (64, 256):
            for steps in (16, 64):
                for comp in COMPETITORS:
                    rows.append(_row(gpu, comp, workload, width, steps))
    if gpu == A100:
        for row in rows:
            if (row["competitor"], row["workload"], row["width"], row["steps"]) == (
                "torchdiffeq-fp32", "mlp", 256, 64,
            ):  # fmt: skip
                row.update(status="oom", message="CUDA out of memory. Tried to allocate 2 GiB")
                for col in ("time_ms_median", "peak_mem_bytes", "grad_err_params", "loss"):
                    row[col] = math.nan
    return rows


def write_timelines(folder: Path, rows: list[dict]) -> None:
    """An NVML timeline for the largest cell of each competitor."""
    lines = []
    for row in rows:
        if row["width"] == 256 and row["steps"] == 64 and row["workload"] == "mlp":
            _, tfac, mfac, _ = COMPETITORS[row["competitor"]]
            for i in range(20):
                lines.append({
                    "cell_id": row["cell_id"], "t_s": 0.05 * i * tfac,
                    "mem_used_bytes": 2**29 + mfac * 2**25 * i,
                    "gpu_util_pct": min(95, 12 * i / tfac), "power_w": 90 + 12 * i / tfac,
                })  # fmt: skip
    pd.DataFrame(lines).to_csv(folder / "timelines.csv", index=False)


def write_asv(root: Path) -> Path:
    """A fake asv 0.6 results folder: two machines named after the GPUs, two commits each."""
    results = root / "asv-results"
    bench = "benchmarks.TimeSolve.time_forward_backward"
    mem = "benchmarks.MemSolve.peakmem_forward_backward"
    track = "benchmarks.Accuracy.track_grad_error"
    (results).mkdir(parents=True)
    (results / "benchmarks.json").write_text(json.dumps({
        bench: {"unit": "seconds", "param_names": ["competitor", "width"], "params": []},
        mem: {"unit": "bytes", "param_names": ["competitor"], "params": []},
        track: {"unit": "relative error", "param_names": [], "params": []},
        "version": 2,
    }))  # fmt: skip
    columns = ["result", "params", "version", "started_at", "duration", "stats_ci_99_a"]
    for machine in (report.slug(H100), report.slug(A100)):
        folder = results / machine
        folder.mkdir()
        (folder / "machine.json").write_text(json.dumps(
            {"machine": machine, "arch": "x86_64", "cpu": "x", "num_cpu": "16", "os": "Linux",
             "ram": "128", "version": 1}))  # fmt: skip
        for i, (commit, date) in enumerate((("a" * 40, 1767600000000), ("b" * 40, 1767700000000))):
            data = {
                "commit_hash": commit, "env_name": "existing-py", "date": date,
                "params": {"machine": machine, "python": "3.11"}, "python": "3.11",
                "requirements": {}, "env_vars": {}, "result_columns": columns,
                "results": {
                    bench: [[0.010 - 0.001 * i, 0.040, 0.006, None],
                            [["'torchdiffeq-fp32'", "'rampde-bf16'"], ["64", "256"]], "v1"],
                    mem: [[2.0e8, 1.1e8], [["'torchdiffeq-fp32'", "'rampde-bf16'"]]],
                    track: [[0.002 + 0.0001 * i], []],
                    "benchmarks.Broken.time_nan": [[float("nan")], []],
                },
                "durations": {}, "version": 2,
            }  # fmt: skip
            (folder / f"{commit[:8]}-existing-py.json").write_text(json.dumps(data))
    return results


def make_sweep(tmp_path: Path) -> dict:
    """Results of two GPU models (one with an OOM cell and timelines) and an asv folder."""
    paths = []
    for gpu, workloads in ((H100, ("mlp", "conv")), (A100, ("mlp",))):
        folder = tmp_path / "reports" / report.slug(gpu)
        folder.mkdir(parents=True)
        rows = gpu_rows(gpu, workloads)
        pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
        if gpu == A100:
            write_timelines(folder, rows)
        paths.append(folder / "results.csv")
    training = tmp_path / "training.csv"  # rampde-bench train's format
    pd.DataFrame([
        {"task": "digits", "competitor": comp, "precision": COMPETITORS[comp][0], "epoch": ep,
         "train_loss": 2.0 / ep + 0.01 * k, "test_metric": 0.9 - 0.5 / ep - 0.01 * k,
         "metric_name": "accuracy", "wall_s": 1.5 * ep * COMPETITORS[comp][1],
         "peak_mem_bytes": 2e8 * COMPETITORS[comp][2], "skipped_steps": 0, "scaler_retries": k,
         "seed": 0, "device": "cuda", "gpu": H100, "torch": "2.13.0", "commit": "abc1234",
         "timestamp": "2026-01-05T10:00:00Z"}
        for k, comp in enumerate(("torchdiffeq-fp32", "rampde-bf16")) for ep in range(1, 6)
    ]).to_csv(training, index=False)  # fmt: skip
    return {"results": paths, "asv": write_asv(tmp_path), "training": [training]}


@pytest.fixture
def sweep(tmp_path: Path) -> dict:
    return make_sweep(tmp_path)


@pytest.fixture
def dashboard(sweep: dict, tmp_path: Path) -> Path:
    return report.build_dashboard(
        sweep["results"], tmp_path / "out" / "dashboard.html",
        asv_results=sweep["asv"], training=sweep["training"],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Claims, with exact numbers
# ---------------------------------------------------------------------------------------------


def _claims_table() -> pd.DataFrame:
    """Two cells (w=64, w=128) on one GPU, numbers chosen so that every ratio is exact."""
    rows = []

    def add(comp: str, width: int, t: float, mem: float, err: float, status: str = "ok") -> None:
        rows.append({
            "gpu": "G", "competitor": comp, "workload": "mlp", "method": "rk4", "width": width,
            "batch": 8, "steps": 16, "status": status, "time_ms_median": t, "peak_mem_bytes": mem,
            "grad_err_params": err,
        })  # fmt: skip

    add("torchdiffeq-fp32", 64, 10.0, 100.0, 1e-6)
    add("torchdiffeq-fp32", 128, 40.0, 200.0, 1e-6)
    add("torchdiffeq-tf32", 64, 8.0, 100.0, 1e-4)
    add("torchdiffeq-tf32", 128, 20.0, 200.0, 1e-4)
    add("autocast-bf16", 64, 4.0, 50.0, 0.05)
    add("autocast-bf16", 128, 15.0, 100.0, 0.04)
    add("autocast-fp16", 64, 4.0, 50.0, math.nan, status="nonfinite")
    add("autocast-fp16", 128, 15.0, 100.0, 0.02)
    add("rampde-bf16", 64, 5.0, 50.0, 0.002)
    add("rampde-bf16", 128, 25.0, 120.0, 0.045)
    add("rampde-fp16", 64, 4.0, math.nan, 0.005)
    add("rampde-fp16", 128, 20.0, math.nan, 0.005)
    df, _ = report._normalise_results(pd.DataFrame(rows))
    return df


def _claim(claims: pd.DataFrame, comp: str, claim: str) -> dict:
    found = claims[(claims["competitor"] == comp) & (claims["claim"] == claim)]
    assert len(found) == 1, (comp, claim, found)
    return found.iloc[0].to_dict()


def test_claims_exact_numbers() -> None:
    claims = report.compute_claims(_claims_table())
    assert set(claims["competitor"]) == {"rampde-bf16", "rampde-fp16"}

    speed = _claim(claims, "rampde-bf16", "speedup")  # 10/5 = 2.0, 40/25 = 1.6
    assert speed["best"] == pytest.approx(2.0) and speed["best_cell"] == "mlp w=64 b=8 N=16"
    assert speed["worst"] == pytest.approx(1.6) and speed["worst_cell"] == "mlp w=128 b=8 N=16"
    assert (speed["n_cells"], speed["n_meeting"], speed["held"]) == (2, 1, True)

    tf32 = _claim(claims, "rampde-bf16", "speedup_tf32")  # 8/5 = 1.6, 20/25 = 0.8
    assert (tf32["best"], tf32["worst"]) == (pytest.approx(1.6), pytest.approx(0.8))
    assert tf32["held"] is None

    memory = _claim(claims, "rampde-bf16", "memory")  # 50/100 = 0.5, 120/200 = 0.6
    assert memory["best"] == pytest.approx(0.5) and memory["best_cell"] == "mlp w=64 b=8 N=16"
    assert memory["worst"] == pytest.approx(0.6) and memory["worst_cell"] == "mlp w=128 b=8 N=16"
    assert (memory["n_meeting"], memory["held"]) == (1, True)

    # 0.045 > naive 0.04 in the w=128 cell: the accuracy claim fails there.
    acc = _claim(claims, "rampde-bf16", "accuracy")
    assert acc["against"] == "autocast-bf16"
    assert (acc["best"], acc["best_against"]) == (pytest.approx(0.002), pytest.approx(0.05))
    assert (acc["worst"], acc["worst_against"]) == (pytest.approx(0.045), pytest.approx(0.04))
    assert (acc["n_cells"], acc["n_meeting"], acc["held"]) == (2, 1, False)

    # fp16: 10/4 = 2.5 and 40/20 = 2.0, both >= 1.8; no memory measured for rampde-fp16.
    speed16 = _claim(claims, "rampde-fp16", "speedup")
    assert (speed16["best"], speed16["worst"], speed16["n_meeting"]) == (2.5, 2.0, 2)
    mem16 = _claim(claims, "rampde-fp16", "memory")
    assert mem16["held"] is None and mem16["n_cells"] == 0 and "peak_mem_bytes" in mem16["note"]
    # A non-finite naive run counts as an infinite error: both cells meet the 1% bound.
    acc16 = _claim(claims, "rampde-fp16", "accuracy")
    assert acc16["best_against"] == math.inf or acc16["worst_against"] == math.inf
    assert (acc16["n_cells"], acc16["n_meeting"], acc16["held"]) == (2, 2, True)


def test_claims_speedup_below_threshold_and_missing_baseline() -> None:
    df = _claims_table()
    slower = df.assign(time_ms_median=df["time_ms_median"].where(
        ~df["competitor"].str.startswith("rampde"), df["time_ms_median"] * 2))  # fmt: skip
    speed = _claim(report.compute_claims(slower), "rampde-bf16", "speedup")
    assert (speed["best"], speed["held"]) == (pytest.approx(1.0), False)

    no_base = df[df["competitor"] != "torchdiffeq-fp32"]
    claims = report.compute_claims(no_base)
    speed = _claim(claims, "rampde-bf16", "speedup")
    assert speed["held"] is None and "torchdiffeq-fp32 has no successful cell" in speed["note"]


def test_claims_count_cells_where_only_the_baseline_ran_out_of_memory() -> None:
    df = _claims_table()
    more = pd.DataFrame([
        {**df.iloc[0].to_dict(), "width": 512, "status": "oom", "time_ms_median": math.nan,
         "peak_mem_bytes": math.nan},  # torchdiffeq-fp32
        {**df[df["competitor"] == "rampde-bf16"].iloc[0].to_dict(), "width": 512},
    ])  # fmt: skip
    claims = report.compute_claims(pd.concat([df, more], ignore_index=True))
    speed = _claim(claims, "rampde-bf16", "speedup")
    assert (speed["n_cells"], speed["baseline_oom"]) == (2, 1)
    assert speed["note"] == "also ran in 1 cell where torchdiffeq-fp32 ran out of memory"
    assert _claim(claims, "rampde-bf16", "accuracy")["note"] == ""


def test_claims_on_cpu_say_memory_not_measured() -> None:
    df = _claims_table().assign(gpu="cpu", peak_mem_bytes=math.nan)
    memory = _claim(report.compute_claims(df), "rampde-bf16", "memory")
    assert memory["held"] is None and memory["note"] == "peak memory was not measured on the CPU"


def test_a_rerun_of_a_cell_replaces_the_older_measurement() -> None:
    df = _claims_table()
    ours = df[df["competitor"] == "rampde-bf16"]
    first, second = ours.assign(time_ms_median=[15.0, 25.0]), ours.assign(time_ms_median=[20.0, 50.0])
    failed = ours.assign(status="error", time_ms_median=math.nan)
    speed = _claim(report.compute_claims(pd.concat([df, first, second, failed])), "rampde-bf16", "speedup")
    # the newest ok row counts (a median of 5, 15, 20 would give 15): 10/20 and 40/50
    assert (speed["best"], speed["best_cell"]) == (pytest.approx(0.8), "mlp w=128 b=8 N=16")
    assert (speed["worst"], speed["n_cells"]) == (pytest.approx(0.5), 2)
    # newest by timestamp, not by the order of the files
    stamped = pd.concat([df.assign(timestamp="2026-01-02T00:00:00Z"),
                         first.assign(timestamp="2026-01-01T00:00:00Z")])
    speed = _claim(report.compute_claims(stamped), "rampde-bf16", "speedup")
    assert (speed["best"], speed["worst"]) == (pytest.approx(2.0), pytest.approx(1.6))


def test_the_dashboard_and_the_claims_command_quote_the_same_cells() -> None:
    df = _claims_table()
    rerun = df[df["competitor"] == "rampde-bf16"].assign(time_ms_median=[20.0, 50.0])
    both = pd.concat([df, rerun], ignore_index=True)
    per_cell = per_cell_claims(both)
    mine = per_cell[per_cell["competitor"] == "rampde-bf16"]
    speed = _claim(report.compute_claims(both), "rampde-bf16", "speedup")
    assert (speed["best"], speed["worst"]) == (mine["speedup_vs_fp32"].max(), mine["speedup_vs_fp32"].min())
    memory = _claim(report.compute_claims(both), "rampde-bf16", "memory")
    assert memory["worst"] == mine["mem_ratio_vs_fp32"].max()


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------


def test_dashboard_content(dashboard: Path) -> None:
    text = dashboard.read_text(encoding="utf-8")
    assert text.count("plotly.js v") == 1, "plotly.js must be inlined exactly once"
    assert not re.search(r"<script[^>]*\bsrc=", text), "the page must not load scripts"
    for anchor in ("gpu-" + report.slug(H100), "gpu-" + report.slug(A100)):
        assert f'id="{anchor}"' in text and f'data-target="{anchor}"' in text
    # per GPU: 2 time + 2 memory + accuracy + asv = 12; timelines on the A100; on the H100 the
    # training metric against epoch and against wall time (rampde.bench.training's figures)
    if importlib.util.find_spec("rampde.bench.training") is not None:
        assert len(GRAPH_DIV.findall(text)) == 15
        assert "against torchdiffeq-fp32 at that epoch" in text  # the training parity table
        assert "-1.00 points (worse; goal: ≥ -0.3)" in text  # rampde-bf16's digits run, 1 point below
    else:
        assert len(GRAPH_DIV.findall(text)) == 13 and "need rampde.bench.training" in text
    assert text.index("Claims of the paper") < text.index("-time-steps")
    assert "OOM" in text and "CUDA out of memory" in text
    assert "also ran in 1 cell where torchdiffeq-fp32 ran out of memory" in text  # the A100
    assert "570.86" in text and "2.13.0+cu128" in text  # the environment table
    assert "benchmarks.TimeSolve.time_forward_backward" in text
    assert "about 2× faster" in text and "accuracy kept" in text
    assert not list(dashboard.parent.glob(".*.tmp")), "the temporary file is left behind"


def test_each_best_and_worst_cell_links_to_its_row_behind_the_claims(sweep: dict, dashboard: Path) -> None:
    text = dashboard.read_text(encoding="utf-8")
    links = re.findall(r'<a href="#(cell-[a-z0-9-]+)">([^<]+)</a>', text)
    rows = set(re.findall(r'<td class="name" id="(cell-[a-z0-9-]+)">', text))
    assert links and all(target in rows for target, _ in links), "a claim names a cell with no row"
    assert text.count("Every cell behind these claims") == 2  # one per GPU tab
    per_cell = len(per_cell_claims(pd.concat([pd.read_csv(p) for p in sweep["results"]])))
    assert len(rows) == per_cell, "one row per rampde competitor and cell"
    h100 = text[text.index(f'id="gpu-{report.slug(H100)}"'):]
    row = re.search(r'<tr><td class="name" id="cell-nvidia-h100[^"]*-rampde-fp16-mlp-w-256-b-64-n-64">.*?</tr>', h100)
    assert row, "the H100's rampde-fp16 row of mlp w=256 N=64"
    assert 'class="held"' in row.group(0) or 'class="not-held"' in row.group(0), "each row is judged"


def test_palette_is_fixed_and_stable() -> None:
    colours = report.competitor_colours(["zeta-x", "rampde-bf16", "alpha-y", "torchdiffeq-fp32"])
    assert colours["rampde-bf16"] == report.PALETTE["rampde-bf16"]
    assert list(colours) == ["torchdiffeq-fp32", "rampde-bf16", "alpha-y", "zeta-x"]
    assert colours["alpha-y"] != colours["zeta-x"]
    alone = report.competitor_colours(["rampde-bf16"])
    assert alone == {"rampde-bf16": report.PALETTE["rampde-bf16"]}


def test_asv_reader(sweep: dict) -> None:
    asv = report.load_asv(sweep["asv"])
    assert set(asv["machine"]) == {report.slug(H100), report.slug(A100)}
    timing = asv[asv["benchmark"].str.endswith("time_forward_backward")]
    # 2 machines x 2 commits x 3 finite values of the 2x2 grid (None is skipped)
    assert len(timing) == 12
    label = "competitor=torchdiffeq-fp32, width=64"
    first = timing[(timing["commit"] == "a" * 40) & (timing["params"] == label)]
    assert first["value"].tolist() == [0.010, 0.010] and set(first["unit"]) == {"seconds"}
    assert set(timing["competitor"]) == {"torchdiffeq-fp32", "rampde-bf16"}
    assert not asv["benchmark"].str.contains("time_nan").any()
    assert str(asv["date"].dtype).startswith("datetime64")


def test_missing_results_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "results.csv"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        report.build_dashboard([missing], tmp_path / "d.html")
    with pytest.raises(FileNotFoundError, match="asv"):
        report.build_dashboard([], tmp_path / "d.html", asv_results=tmp_path / "no-asv")
    with pytest.raises(FileNotFoundError, match="training.csv"):
        report.build_dashboard([], tmp_path / "d.html", training=[tmp_path / "training.csv"])


def test_empty_results_give_a_clear_message(tmp_path: Path, caplog) -> None:
    empty = tmp_path / "results.csv"
    empty.write_text("")
    header_only = tmp_path / "b" / "results.csv"
    header_only.parent.mkdir()
    header_only.write_text("gpu,competitor,workload,width,batch,steps,status\n")
    with caplog.at_level(logging.WARNING, logger="rampde.bench.report"):
        out = report.build_dashboard([empty, header_only], tmp_path / "d.html")
    text = out.read_text(encoding="utf-8")
    assert "No benchmark results to show" in text and "holds no result rows" in text
    assert "Nothing to show" in text
    assert not GRAPH_DIV.findall(text)
    assert any("No benchmark results" in r.getMessage() for r in caplog.records)


def test_partial_results_give_a_clear_message(tmp_path: Path, caplog) -> None:
    """Only rampde ran, without memory or gradient columns; another file lacks key columns."""
    rows = [{k: v for k, v in _row(H100, "rampde-bf16", "mlp", w, 16).items()
             if k not in ("peak_mem_bytes", "grad_err_params", "grad_err_y0", "method")}
            for w in (64, 256)]  # fmt: skip
    partial = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(partial, index=False)
    broken = tmp_path / "x" / "results.csv"
    broken.parent.mkdir()
    broken.write_text("gpu,time_ms_median\nH100,1.0\n")
    training = tmp_path / "training.csv"
    training.write_text("competitor,epoch\nrampde-bf16,1\n")
    with caplog.at_level(logging.WARNING, logger="rampde.bench.report"):
        out = report.build_dashboard([partial, broken], tmp_path / "d.html", training=[training])
    text = out.read_text(encoding="utf-8")
    assert "lacks the column(s) competitor, workload, width, batch, steps" in text
    assert f"Training file {training} lacks the column(s) task, test_metric" in text
    assert "Partial results: no successful cell of torchdiffeq-fp32 or torchdiffeq-tf32" in text
    assert "torchdiffeq-fp32 has no successful cell on this GPU" in text  # in the claims table
    assert "Peak memory was not measured" in text
    assert "No cell has both a timing and a gradient error" in text
    assert len(GRAPH_DIV.findall(text)) == 2  # time against steps and against width
    assert any("Partial results" in r.getMessage() for r in caplog.records)


def test_cpu_results_say_memory_was_not_measured(tmp_path: Path) -> None:
    rows = [_row("cpu", c, "mlp", w, s, device="cpu", peak_mem_bytes=math.nan, driver="",
                 cuda="")
            for c in COMPETITORS for w in (64, 256) for s in (16, 64)]  # fmt: skip
    path = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    out = report.build_dashboard([path], tmp_path)  # a folder: dashboard.html inside
    assert out == tmp_path / "dashboard.html"
    text = out.read_text(encoding="utf-8")
    assert "Memory was not measured on the CPU" in text
    assert "peak memory was not measured on the CPU" in text  # the memory claim's note
    assert html.escape(CPU_NOTICE, quote=True) in text, "a newcomer is told what CPU times are worth"
    assert len(GRAPH_DIV.findall(text)) == 3  # two time plots and the accuracy plot


def test_cpu_results_without_tf32_are_not_called_partial(tmp_path: Path) -> None:
    """TF32 is a CUDA matmul mode: a CPU run without torchdiffeq-tf32 lacks nothing it could have."""
    rows = [_row("cpu", c, "mlp", 64, 16, device="cpu", peak_mem_bytes=math.nan)
            for c in COMPETITORS if c != "torchdiffeq-tf32"]
    path = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    text = report.build_dashboard([path], tmp_path / "d.html").read_text(encoding="utf-8")
    assert "Partial results" not in text and "Peak memory was not measured in these results" not in text
    gpu = tmp_path / "gpu.csv"
    pd.DataFrame([{**r, "gpu": "NVIDIA H100", "device": "cuda:0"} for r in rows]).to_csv(gpu, index=False)
    text = report.build_dashboard([gpu], tmp_path / "g.html").read_text(encoding="utf-8")
    assert "Partial results: no successful cell of torchdiffeq-tf32" in text
    assert html.escape(CPU_NOTICE, quote=True) not in text


# ---------------------------------------------------------------------------------------------
# In a browser
# ---------------------------------------------------------------------------------------------


def _browser_helper():
    """The headless-Chromium driver (rampde.bench.browser)."""
    from rampde.bench import browser

    return browser


def _chromium_or_skip() -> str:
    binary = _browser_helper().find_chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed (run .ci/install-chromium.sh)")
        pytest.skip("chromium not installed (bash .ci/install-chromium.sh); CI is not set")
    return binary


def _artifact_dir(tmp_path: Path) -> Path:
    root = os.environ.get("RAMPDE_ARTIFACTS")
    folder = Path(root) if root else tmp_path
    if not folder.is_absolute():
        folder = HERE.parents[1] / folder
    folder.mkdir(parents=True, exist_ok=True)
    return folder


PLOTS_PROBE = """(() => {
  const divs = [...document.querySelectorAll('.plotly-graph-div')];
  return divs.map(el => ({id: el.id, rendered: el.classList.contains('js-plotly-plot')
      && !!el.querySelector('svg.main-svg') && !!el._fullLayout,
    traces: (el.data || []).length,
    width: el.getBoundingClientRect().width,
    drawnWidth: el._fullLayout ? el._fullLayout.width : 0}));
})()"""


@pytest.mark.browser
def test_dashboard_in_headless_chromium(dashboard: Path, tmp_path: Path) -> None:
    """Every figure drawn in every tab, no console error or uncaught exception, a screenshot."""
    binary = _chromium_or_skip()
    helper = _browser_helper()
    expected = len(GRAPH_DIV.findall(dashboard.read_text(encoding="utf-8")))
    shot = _artifact_dir(tmp_path) / "dashboard.png"
    tabs = "[...document.querySelectorAll('nav.tabs button')]"
    sections = "[...document.querySelectorAll('section.gpu')]"
    with helper.DevTools(binary, width=1400, height=2000) as browser:
        load_s = browser.navigate(dashboard.resolve().as_uri())
        ready = helper.wait_until(browser, "document.documentElement.dataset.dashboardReady")
        assert ready, "the first tab's figures were not drawn"
        assert browser.evaluate(f"{sections}.map(s => !s.hidden)") == [True, False]
        assert browser.evaluate(f"{tabs}.map(b => b.textContent)") == [A100, H100]
        browser.screenshot(shot)
        for i in (1, 0):  # the second tab draws its figures when shown; back to the first
            browser.evaluate(f"{tabs}[{i}].click()")
            assert helper.wait_until(browser, f"{sections}[{i}].dataset.drawn === 'true'")
        assert browser.evaluate("location.hash") == "#gpu-" + report.slug(A100)
        plots = browser.evaluate(PLOTS_PROBE)
        # the shown plots fill the page's width (resized after the tab switches)
        fitted = helper.wait_until(browser, f"""{sections}[0].querySelectorAll('.js-plotly-plot')
            .length && [...{sections}[0].querySelectorAll('.js-plotly-plot')].every(el =>
            Math.abs(el._fullLayout.width - el.getBoundingClientRect().width) < 2)""")
        errors = browser.errors()
        page_errors = browser.evaluate("document.documentElement.dataset.jsErrors || '0'")
    assert len(plots) == expected
    assert all(p["rendered"] and p["traces"] > 0 for p in plots), plots
    assert fitted, plots
    assert errors == [] and page_errors == "0", errors
    assert load_s < 20
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 50_000, "the screenshot is suspiciously small"


@pytest.mark.browser
def test_a_link_to_a_cell_opens_its_tab_and_unfolds_its_row(dashboard: Path) -> None:
    """A best or worst cell of the claims table, followed from another tab or from outside the
    page, shows the tab that holds the row, opens the folded table and scrolls to the row."""
    binary = _chromium_or_skip()
    helper = _browser_helper()
    text = dashboard.read_text(encoding="utf-8")
    h100 = text[text.index(f'id="gpu-{report.slug(H100)}"'):]
    target = re.search(r'<a href="#(cell-[a-z0-9-]+)">', h100).group(1)
    where = f"document.getElementById('{target}')"
    with helper.DevTools(binary, width=1400, height=1200) as browser:
        browser.navigate(dashboard.resolve().as_uri() + "#" + target)
        assert helper.wait_until(browser, "document.documentElement.dataset.dashboardReady")
        shown = browser.evaluate("[...document.querySelectorAll('section.gpu')].filter(s => !s.hidden).map(s => s.id)")
        assert shown == [f"gpu-{report.slug(H100)}"]
        assert browser.evaluate(f"{where}.closest('details').open") is True
        top = browser.evaluate(f"{where}.getBoundingClientRect().top")
        assert 0 <= top <= 1200, "the row is scrolled into view"
        errors = browser.errors()
    assert errors == []


@pytest.mark.browser
def test_report_command_saves_a_screenshot(sweep: dict, tmp_path: Path, capsys) -> None:
    """``rampde-bench report --screenshot``: the dashboard drawn without errors, as a PNG."""
    _chromium_or_skip()
    from rampde.bench.cli import main

    out, shot = tmp_path / "site" / "index.html", _artifact_dir(tmp_path) / "report-command.png"
    args = ["report", "--results", *map(str, sweep["results"]), "--out", str(out), "--screenshot", str(shot),
            "--screenshot-size", "1200x900"]
    assert main(args) == 0
    assert f"screenshot: {shot.resolve()}" in capsys.readouterr().out
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", shot.read_bytes()[16:24]) == (1200, 900)  # the PNG header's width, height


def test_screenshot_of_a_missing_dashboard(tmp_path: Path) -> None:
    from rampde.bench.browser import screenshot_dashboard

    with pytest.raises(FileNotFoundError, match="no dashboard at"):
        screenshot_dashboard(tmp_path / "none.html", tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least 200x200"):
        screenshot_dashboard(tmp_path / "none.html", tmp_path / "x.png", width=100)


@pytest.mark.parametrize("metric, final, delta, text, ok", [
    ("accuracy", 0.970, -0.002, "-0.20 points (worse; goal: ≥ -0.3)", True),
    ("accuracy", 0.966, -0.004, "-0.40 points (worse; goal: ≥ -0.3)", False),
    ("accuracy", 0.975, 0.003, "+0.30 points (better; goal: ≥ -0.3)", True),
    ("nll", 2.03, 0.03, "+1.50% (worse; goal: ≤ +1%)", False),
    ("nll", 1.99, -0.01, "-0.50% (better; goal: ≤ +1%)", True),
    ("accuracy", 0.97, math.nan, "—", None),  # no baseline at that epoch
    ("accuracy", 0.897, 0.897 - 0.9, "-0.30 points (worse; goal: ≥ -0.3)", True),  # exactly at the goal
    ("nll", 1.01, 1.01 - 1.0, "+1.00% (worse; goal: ≤ +1%)", True),
])
def test_training_parity_is_read_against_its_goal(metric, final, delta, text, ok) -> None:
    from rampde.bench.report.tables import parity_verdict

    assert parity_verdict(metric, final, delta) == (text, ok)


def test_a_cell_beating_a_naive_run_that_was_not_finite_is_green() -> None:
    from rampde.bench.report.tables import claim_cells_html

    per_cell = pd.DataFrame([{
        "gpu": "G", "competitor": "rampde-bf16", "precision": "bf16", "workload": "mlp", "method": "rk4",
        "width": 8, "batch": 8, "steps": 4, "time_ms": 1.0, "speedup_vs_fp32": math.nan,
        "speedup_vs_tf32": math.nan, "mem_ratio_vs_fp32": math.nan, "grad_err": 0.002,
        "grad_err_y0": 0.001, "naive_grad_err": math.inf, "nocache_grad_err": math.nan, "note": "",
    }])  # fmt: skip
    text = claim_cells_html(per_cell, {"rampde-bf16": "#000"}, "G")
    assert '<td class="held" style="text-align:right">0.2%</td>' in text
