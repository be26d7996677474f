"""rampde.bench.targets: the performance targets judged from small hand-made results tables (met, missed,
not measured, OOM, nonfinite, only a fast variant meeting one), the peak table, the perf suite,
the ``rampde-bench targets`` command and the dashboard's targets table."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from rampde.bench import measure
from rampde.bench.cli import main
from rampde.bench.results import COLUMNS, write_csv_atomic
from rampde.bench.suites import PERF_COMPETITORS, SUITE_NAMES, get_suite
from rampde.bench.targets import (
    SUMMARY_COLUMNS,
    TARGET_COLUMNS,
    TARGETS,
    evaluate_targets,
    format_markdown,
    summary_line,
    targets_summary,
)

H100 = "NVIDIA H100 80GB HBM3"
TARGET_IDS = [t.id for t in TARGETS]
# competitor: (precision, ms, peak bytes, gradient error, TFLOP/s). Against torchdiffeq-fp32 (100 ms,
# 1000 B) and torchdiffeq-tf32 (60 ms): rampde-bf16 1.5x over TF32, rampde-fp16 2.5x over fp32,
# memory 0.1x (lean) and 0.12x (fast); every target met.
FIGURES = {
    "torchdiffeq-fp32": ("fp32", 100.0, 1000.0, 1e-7, 100.0),
    "torchdiffeq-tf32": ("tf32", 60.0, 1000.0, 1e-4, 160.0),
    "autocast-fp16": ("fp16", 50.0, 500.0, 0.007, 200.0),
    "autocast-bf16": ("bf16", 50.0, 500.0, 0.05, 200.0),
    "rampde-fp16": ("fp16", 40.0, 100.0, 2e-4, 500.0),
    "rampde-bf16": ("bf16", 40.0, 100.0, 2e-3, 450.0),
    "rampde-fp16-fast": ("fp16", 25.0, 120.0, 3e-4, 800.0),
    "rampde-bf16-fast": ("bf16", 30.0, 120.0, 4e-3, 700.0),
}
CELLS = [("mlp", w, n) for w in (256, 1024, 2048) for n in (8, 64)] + [("conv", 128, n) for n in (8, 64)]


def _row(competitor: str, workload: str, width: int, steps: int, gpu: str = H100, **values) -> dict:
    precision, ms, peak, err, tflops = FIGURES[competitor]
    row = {c: math.nan for c in COLUMNS}
    row.update(gpu=gpu, device="cuda", competitor=competitor, precision=precision, workload=workload, method="rk4",
               width=width, batch=2048 if workload == "mlp" else 64, steps=steps, repeats=5, warmup=2,
               status="ok", message="", time_ms_median=ms, peak_mem_bytes=peak, grad_err_params=err,
               grad_err_y0=err, tflops=tflops, tf32=competitor == "torchdiffeq-tf32", cudnn_tf32=False,
               cudnn_benchmark=False, torch="2.13.0+cu128", cuda="12.8", driver="570.86", compute_capability="9.0",
               torchdiffeq="0.2.5", rampde="0.1.0", commit="abc", timestamp="2026-01-05T10:00:00Z",
               cell_id=f"{gpu}|{competitor}|{workload}|{width}|{steps}")
    row.update(values)
    return row


def perf_table(changes: dict | None = None, drop: tuple = (), gpu: str = H100) -> pd.DataFrame:
    """The perf suite's grid, every target met; ``changes`` maps (competitor, workload, width,
    steps) to new values of that row; ``drop`` lists rows to leave out."""
    changes = changes or {}
    rows = [_row(c, w, width, n, gpu=gpu, **changes.get((c, w, width, n), {}))
            for (w, width, n) in CELLS for c in FIGURES if (c, w, width, n) not in drop]
    return pd.DataFrame(rows)


def pick(table: pd.DataFrame, target: str, competitor: str, cell: str, role: str = "named",
         gpu: str = H100) -> dict:
    found = table[(table["target"] == target) & (table["competitor"] == competitor) & (table["cell"] == cell)
                  & (table["role"] == role) & (table["gpu"] == gpu)]
    assert len(found) == 1, (target, competitor, cell, role, found)
    return found.iloc[0].to_dict()


def status(table: pd.DataFrame) -> dict[str, str]:
    summary = targets_summary(table)
    return dict(zip(summary["target"], summary["status"]))


def oom(**extra) -> dict:
    return {"status": "oom", "message": "CUDA out of memory", "time_ms_median": math.nan, "peak_mem_bytes": math.nan,
            "grad_err_params": math.nan, "tflops": math.nan, **extra}


MLP2048, CONV128 = "mlp w=2048 b=2048 N=64", "conv w=128 b=64 N=64"


# ----------------------------------------------------------------------------- peak throughput


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4),  # the SXM5 part, as torch names it
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("Tesla V100-SXM2-16GB", 125.0),
])
def test_dense_fp16_peak_of_known_gpus(name, peak):
    assert measure.dense_fp16_peak_tflops(name) == peak


@pytest.mark.parametrize("name", ["cpu", "NVIDIA L40", "NVIDIA H800", "", "AMD Instinct MI300X"])
def test_dense_fp16_peak_of_unknown_gpus_is_nan(name):
    assert math.isnan(measure.dense_fp16_peak_tflops(name))


def test_peak_table_says_where_each_figure_comes_from():
    assert all(entry.source and entry.tflops > 0 for entry in measure.PEAK_FP16_TFLOPS)
    assert measure.peak_throughput("NVIDIA H100 PCIe").model == "H100 PCIe"


# ----------------------------------------------------------------------------- met


def test_every_target_met_with_exact_figures():
    table = evaluate_targets(perf_table())
    assert list(table.columns) == TARGET_COLUMNS
    assert status(table) == {t: "met" for t in TARGET_IDS}

    bf16 = pick(table, "speed-bf16-vs-tf32", "rampde-bf16", MLP2048)
    assert (bf16["measured"], bf16["threshold"], bf16["comparison"], bf16["met"]) == (1.5, 1.5, ">=", True)
    best = pick(table, "speed-bf16-vs-tf32", "rampde-bf16-fast", MLP2048, role="best variant")
    assert (best["measured"], best["met"]) == (2.0, True)
    assert best["note"] == "best of rampde-bf16, rampde-bf16-fast"
    fp16 = pick(table, "speed-fp16-vs-fp32", "rampde-fp16", CONV128)
    assert (fp16["measured"], fp16["met"]) == (2.5, True)
    assert pick(table, "speed-fp16-vs-fp32", "rampde-fp16-fast", CONV128, "best variant")["measured"] == 4.0
    # never slower at MLP 256: one row per step count measured
    w256 = table[(table["target"] == "speed-fp16-vs-fp32-w256") & (table["role"] == "named")]
    assert w256["cell"].tolist() == ["mlp w=256 b=2048 N=8", "mlp w=256 b=2048 N=64"]

    memory = table[(table["target"] == "memory-64-steps")]
    assert len(memory) == 2 * 4, "rampde-fp16/bf16 x the 4 cells of 64 steps (the fast variants are not judged)"
    assert set(memory["competitor"]) == {"rampde-fp16", "rampde-bf16"}
    assert pick(table, "memory-64-steps", "rampde-bf16", CONV128)["measured"] == pytest.approx(0.1)
    assert len(table[table["target"] == "memory-half"]) == 2 * 8
    acc = pick(table, "accuracy-bf16", "rampde-bf16-fast", "mlp w=256 b=2048 N=8")
    assert (acc["measured"], acc["threshold"], acc["met"]) == (4e-3, 0.03, True)
    assert set(table.loc[table["target"] == "accuracy-fp16", "competitor"]) == {"rampde-fp16", "rampde-fp16-fast"}

    eff = pick(table, "efficiency", "rampde-fp16", MLP2048)
    assert eff["measured"] == pytest.approx(500 / 989.4) and eff["met"] is True
    assert eff["note"] == "500 of 989.4 TFLOP/s"

    summary = targets_summary(table).set_index("target")
    assert list(targets_summary(table).columns) == SUMMARY_COLUMNS
    speed = summary.loc["speed-bf16-vs-tf32"]
    assert (speed["worst"], speed["worst_competitor"]) == (1.5, "rampde-bf16")
    assert (speed["cells"], speed["met_cells"], speed["missed_cells"], speed["unmeasured_cells"]) == (2, 2, 0, 0)
    mem = summary.loc["memory-64-steps"]
    assert mem["worst"] == pytest.approx(0.1) and mem["worst_competitor"] in ("rampde-fp16", "rampde-bf16")
    assert summary.loc["finite", "worst"] == 0.0 and summary.loc["finite", "cells"] == 4
    assert summary.loc["efficiency", "worst"] == pytest.approx(450 / 989.4)
    assert summary_line(targets_summary(table).iloc[0].to_dict()) == (
        "speed-bf16-vs-tf32: met (worst 1.5x, rampde-bf16 at mlp w=2048 b=2048 N=64; needs >= 1.5x)")


# ----------------------------------------------------------------------------- missed


def test_speed_missed_and_met_only_by_the_fast_variant():
    slow = {("rampde-bf16", "conv", 128, 64): {"time_ms_median": 50.0},  # 60/50 = 1.2x < 1.5
            ("rampde-fp16", "mlp", 256, 8): {"time_ms_median": 125.0}}  # 100/125 = 0.8x: slower
    table = evaluate_targets(perf_table(slow))
    row = pick(table, "speed-bf16-vs-tf32", "rampde-bf16", CONV128)
    assert (row["measured"], row["met"]) == (pytest.approx(1.2), False)
    assert row["note"] == "met only by rampde-bf16-fast (2x)"
    assert pick(table, "speed-bf16-vs-tf32", "rampde-bf16", MLP2048)["met"] is True

    w256 = pick(table, "speed-fp16-vs-fp32-w256", "rampde-fp16", "mlp w=256 b=2048 N=8")
    assert (w256["measured"], w256["met"]) == (0.8, False)
    assert w256["note"] == "met only by rampde-fp16-fast (4x)"

    summary = targets_summary(table).set_index("target")
    speed = summary.loc["speed-bf16-vs-tf32"]
    assert speed["status"] == "missed" and speed["worst"] == pytest.approx(1.2)
    assert (speed["worst_competitor"], speed["worst_cell"]) == ("rampde-bf16", CONV128)
    assert speed["note"] == "missed by rampde-bf16 in 1 of 2 cells; met only by rampde-bf16-fast (2x)"
    assert summary.loc["speed-fp16-vs-fp32-w256", "status"] == "missed"
    assert summary.loc["speed-fp16-vs-fp32-w256", "worst"] == 0.8
    assert summary.loc["speed-fp16-vs-fp32", "status"] == "met"


def test_fast_variant_slower_than_the_default_is_not_credited():
    table = evaluate_targets(perf_table({("rampde-bf16", "conv", 128, 64): {"time_ms_median": 50.0},
                                         ("rampde-bf16-fast", "conv", 128, 64): {"time_ms_median": 55.0}}))
    row = pick(table, "speed-bf16-vs-tf32", "rampde-bf16", CONV128)
    assert row["met"] is False and row["note"] == ""
    best = pick(table, "speed-bf16-vs-tf32", "rampde-bf16", CONV128, role="best variant")
    assert (best["measured"], best["met"]) == (pytest.approx(1.2), False)


def test_memory_accuracy_and_efficiency_missed():
    changes = {("rampde-bf16", "mlp", 2048, 64): {"peak_mem_bytes": 480.0,  # 0.48: <= 0.5, > 0.15
                                                  "tflops": 300.0},
               ("rampde-fp16-fast", "mlp", 2048, 64): {"peak_mem_bytes": 900.0},  # not judged on memory
               ("rampde-fp16", "mlp", 1024, 8): {"peak_mem_bytes": 600.0},  # 0.6 > 0.5 at 8 steps
               ("rampde-fp16", "conv", 128, 8): {"grad_err_params": 0.012}}
    table = evaluate_targets(perf_table(changes))
    assert status(table) == {**{t: "met" for t in TARGET_IDS}, "memory-half": "missed",
                             "memory-64-steps": "missed", "accuracy-fp16": "missed", "efficiency": "missed"}
    assert pick(table, "memory-64-steps", "rampde-bf16", MLP2048)["met"] is False
    assert pick(table, "memory-half", "rampde-bf16", MLP2048)["met"] is True
    summary = targets_summary(table).set_index("target")
    assert (summary.loc["memory-half", "worst"], summary.loc["memory-half", "worst_cell"]) == (
        0.6, "mlp w=1024 b=2048 N=8")
    assert summary.loc["memory-64-steps", "worst"] == 0.48
    assert summary.loc["accuracy-fp16", "worst"] == 0.012
    assert summary.loc["accuracy-fp16", "note"] == "missed by rampde-fp16 in 1 of 16 cells"
    eff = pick(table, "efficiency", "rampde-bf16", MLP2048)
    assert eff["measured"] == pytest.approx(300 / 989.4) and eff["met"] is False
    assert pick(table, "efficiency", "rampde-bf16-fast", MLP2048, "best variant")["met"] is True
    assert "met only by rampde-bf16-fast (70.7%)" in eff["note"]


# ----------------------------------------------------------------------------- not measured, OOM, nonfinite


def test_missing_cells_are_rows_that_say_not_measured():
    no_tf32 = tuple(("torchdiffeq-tf32", w, width, n) for (w, width, n) in CELLS)
    no_256 = tuple((c, "mlp", 256, n) for c in FIGURES for n in (8, 64))
    table = evaluate_targets(perf_table(drop=no_tf32 + no_256))
    row = pick(table, "speed-bf16-vs-tf32", "rampde-bf16", MLP2048)
    assert math.isnan(row["measured"]) and math.isnan(row["met"])
    assert row["note"] == "not measured: torchdiffeq-tf32 missing at mlp w=2048 b=2048 N=64"
    w256 = pick(table, "speed-fp16-vs-fp32-w256", "rampde-fp16", "mlp w=256 b=2048 N=any")
    assert w256["note"] == "not measured: no cell of mlp w=256 b=2048"
    summary = targets_summary(table).set_index("target")
    assert list(summary.index) == TARGET_IDS, "every target is listed"
    assert summary.loc["speed-bf16-vs-tf32", "status"] == "not measured"
    assert summary.loc["speed-bf16-vs-tf32", "note"] == (
        "2 of 2 not measured (e.g. torchdiffeq-tf32 missing at mlp w=2048 b=2048 N=64)")
    assert summary.loc["speed-bf16-vs-tf32-w1024", "note"] == (
        "not measured: torchdiffeq-tf32 missing at mlp w=1024 b=2048 N=64")
    assert summary.loc["speed-fp16-vs-fp32", "status"] == "met"


def test_a_missing_competitor_in_an_every_cell_target():
    drop = tuple(("rampde-fp16-fast", w, width, n) for (w, width, n) in CELLS)
    table = evaluate_targets(perf_table(drop=drop))
    row = pick(table, "accuracy-fp16", "rampde-fp16-fast", "conv w=128 b=64 N=8")
    assert math.isnan(row["met"]) and row["note"] == "not measured: rampde-fp16-fast missing at conv w=128 b=64 N=8"
    summary = targets_summary(table).set_index("target")
    assert summary.loc["accuracy-fp16", "status"] == "met where measured", "no cell missed, some not measured"
    assert (summary.loc["accuracy-fp16", "met_cells"], summary.loc["accuracy-fp16", "unmeasured_cells"]) == (8, 8)
    assert summary.loc["finite", "note"] == "1 of 4 not measured (e.g. no rampde-fp16-fast row)"


def test_empty_results_list_every_target_as_not_measured():
    table = evaluate_targets(pd.DataFrame())
    summary = targets_summary(table)
    assert summary["target"].tolist() == TARGET_IDS
    assert set(summary["status"]) == {"not measured"} and set(table["met"].map(type)) == {float}


def test_oom_cells():
    changes = {("torchdiffeq-tf32", "mlp", 2048, 64): oom(),  # the baseline ran out of memory
               ("rampde-bf16", "conv", 128, 64): oom(),  # ours ran out where the baseline ran
               ("torchdiffeq-fp32", "mlp", 1024, 64): oom()}
    table = evaluate_targets(perf_table(changes))
    base = pick(table, "speed-bf16-vs-tf32", "rampde-bf16", MLP2048)
    assert math.isnan(base["met"]) and base["note"] == "not measured: torchdiffeq-tf32 oom"
    ours = pick(table, "speed-bf16-vs-tf32", "rampde-bf16", CONV128)
    assert ours["met"] is False and ours["note"].startswith(
        "oom: rampde-bf16 ran out of memory where torchdiffeq-tf32 ran")
    assert pick(table, "memory-half", "rampde-bf16", CONV128)["met"] is False
    assert math.isnan(pick(table, "accuracy-bf16", "rampde-bf16", CONV128)["met"])
    assert pick(table, "accuracy-bf16", "rampde-bf16", CONV128)["note"] == "not measured: rampde-bf16 oom"
    mem = pick(table, "memory-64-steps", "rampde-fp16", "mlp w=1024 b=2048 N=64")
    assert math.isnan(mem["met"]) and mem["note"] == "not measured: torchdiffeq-fp32 oom"
    summary = targets_summary(table).set_index("target")
    assert summary.loc["speed-bf16-vs-tf32", "status"] == "missed"
    assert math.isnan(summary.loc["speed-bf16-vs-tf32", "worst"]), "the OOM miss is the worst, without a figure"
    assert summary.loc["speed-bf16-vs-tf32", "worst_cell"] == CONV128


def test_nonfinite_rows_miss_accuracy_and_finiteness():
    changes = {("rampde-fp16", "mlp", 256, 64): {"status": "nonfinite", "message": "loss or gradients not finite",
                                                 "grad_err_params": math.nan}}
    table = evaluate_targets(perf_table(changes))
    acc = pick(table, "accuracy-fp16", "rampde-fp16", "mlp w=256 b=2048 N=64")
    assert (acc["measured"], acc["met"], acc["note"]) == (math.inf, False, "nonfinite: inf or NaN returned")
    finite = pick(table, "finite", "rampde-fp16", "every cell")
    assert (finite["measured"], finite["met"]) == (1.0, False)
    assert finite["note"] == "nonfinite at mlp w=256 b=2048 N=64"
    assert pick(table, "finite", "rampde-bf16", "every cell")["met"] is True
    speed = pick(table, "speed-fp16-vs-fp32-w256", "rampde-fp16", "mlp w=256 b=2048 N=64")
    assert math.isnan(speed["met"])
    assert speed["note"] == "not measured: rampde-fp16 nonfinite; met only by rampde-fp16-fast (4x)"
    summary = targets_summary(table).set_index("target")
    assert (summary.loc["finite", "status"], summary.loc["finite", "worst"]) == ("missed", 1.0)
    assert summary.loc["accuracy-fp16", "worst"] == math.inf


def test_latest_ok_row_counts_and_gpus_are_judged_apart():
    a100 = "NVIDIA A100-SXM4-80GB"
    rerun = _row("rampde-bf16", "conv", 128, 64, status="error", message="boom", time_ms_median=math.nan)
    older = _row("rampde-bf16", "conv", 128, 64, time_ms_median=80.0)
    df = pd.concat([pd.DataFrame([older]), perf_table(), pd.DataFrame([rerun]), perf_table(gpu=a100)],
                   ignore_index=True)
    table = evaluate_targets(df)
    assert pick(table, "speed-bf16-vs-tf32", "rampde-bf16", CONV128)["measured"] == 1.5
    assert set(table["gpu"]) == {H100, a100}
    a100_eff = table[(table["gpu"] == a100) & (table["target"] == "efficiency") & (table["role"] == "named")]
    assert a100_eff["measured"].tolist() == [pytest.approx(500 / 312), pytest.approx(450 / 312)]


def test_efficiency_on_a_gpu_without_a_known_peak():
    table = evaluate_targets(perf_table(gpu="NVIDIA H800"))
    row = pick(table, "efficiency", "rampde-fp16", MLP2048, gpu="NVIDIA H800")
    assert math.isnan(row["met"])
    assert row["note"] == "not measured: 500 TFLOP/s, dense fp16 peak of 'NVIDIA H800' unknown"
    best = pick(table, "efficiency", "rampde-fp16", MLP2048, role="best variant", gpu="NVIDIA H800")
    assert best["note"] == "not measured: none of rampde-fp16, rampde-fp16-fast measured here"


def test_markdown_lists_every_target():
    text = format_markdown(evaluate_targets(perf_table({("rampde-bf16", "conv", 128, 64): {"time_ms_median": 50.0}})))
    assert text.startswith("### Performance targets\n")
    for target in TARGET_IDS:
        assert f"| {H100} | {target} |" in text
    assert f"| {H100} | speed-bf16-vs-tf32 | missed | 1.2x | rampde-bf16 | {CONV128} | >= 1.5x |" in text
    assert "| rampde-bf16-fast | best variant |" in text and "#### Per cell" in text
    short = format_markdown(evaluate_targets(perf_table()), cells=False)
    assert "#### Per cell" not in short and short.count("| met |") == len(TARGET_IDS)


# ----------------------------------------------------------------------------- the perf suite


def test_perf_suite_holds_every_cell_and_competitor_the_targets_need():
    assert "perf" in SUITE_NAMES
    suite = get_suite("perf", "cuda")
    assert suite.competitors == PERF_COMPETITORS and (suite.repeats, suite.warmup) == (5, 2)
    assert suite.workloads == {"mlp": {"widths": [256, 1024, 2048], "batches": [2048]},
                               "conv": {"widths": [128], "batches": [64]}}
    assert suite.steps == [8, 64]
    for target in TARGETS:
        assert set(target.competitors) <= set(PERF_COMPETITORS)
        assert target.baseline in PERF_COMPETITORS + [""]
        for cell in target.cells:
            sizes = suite.workloads[cell.workload]
            assert cell.width in sizes["widths"] and cell.batch in sizes["batches"], (target.id, cell)
            assert cell.steps is None or cell.steps in suite.steps
    cpu = get_suite("perf", "cpu")
    assert cpu.competitors == PERF_COMPETITORS and "timings" in cpu.notes
    assert max(cpu.workloads["mlp"]["widths"]) <= 64


# ----------------------------------------------------------------------------- the command and the dashboard


def test_targets_command_prints_the_table(tmp_path, capsys):
    path = tmp_path / "results.csv"
    write_csv_atomic(perf_table({("rampde-bf16", "conv", 128, 64): {"time_ms_median": 50.0}}), path)
    assert main(["targets", "--results", str(path)]) == 0
    out = capsys.readouterr().out
    assert "targets per cell" in out and "targets per GPU" in out
    for target in TARGET_IDS:
        assert target in out
    assert "met only by rampde-bf16-fast (2x)" in out and "missed" in out
    assert main(["targets", "--results", str(path), "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("### Performance targets") and "| speed-bf16-vs-tf32 | missed | 1.2x |" in markdown


def test_targets_command_errors(tmp_path, capsys, monkeypatch):
    assert main(["targets", "--results", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rampde-bench: error: targets: no results file at") and "missing.csv" in err
    monkeypatch.chdir(tmp_path)
    assert main(["targets"]) == 2
    assert "targets: no results file given and none at reports/**/results.csv" in capsys.readouterr().err


def test_dashboard_has_the_targets_table(tmp_path):
    pytest.importorskip("plotly")
    from rampde.bench import report

    path = tmp_path / "results.csv"
    write_csv_atomic(perf_table({("rampde-bf16", "conv", 128, 64): {"time_ms_median": 50.0}}), path)
    text = report.build_dashboard([path], tmp_path / "d.html").read_text(encoding="utf-8")
    assert "<h3>Performance targets</h3>" in text
    assert text.index("Claims of the paper") < text.index("Performance targets") < text.index("<h3>Time</h3>")
    section = text[text.index("Performance targets"):text.index("<h3>Time</h3>")]
    for target in TARGET_IDS:
        assert f"<small>{target}</small>" in section
    assert section.count('<td class="held">met') == len(TARGET_IDS) - 1
    assert section.count('<td class="not-held">missed') == 1
    assert "<b>1.2x</b><br><small>rampde-bf16, conv w=128 b=64 N=64</small>" in section
