"""rampde.bench.results: the schema (and its agreement with docs/bench-interfaces.md), typed reading
and atomic writing, the store a sweep writes through, and the claims from a hand-made table."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from rampde.bench import results
from rampde.bench.results import (
    CLAIM_COLUMNS,
    COLUMNS,
    ResultsStore,
    claims,
    claims_summary,
    empty_results,
    read_results,
    write_csv_atomic,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "bench-interfaces.md"


# ----------------------------------------------------------------------------- schema


def test_schema_is_the_documented_one():
    text = DOC.read_text()
    section = text[text.index("## Results"):]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    documented = [name for line in table for name in re.findall(r"`([a-z0-9_]+)`", line.split("|")[1])]
    assert documented == list(COLUMNS), "results.COLUMNS and the contract list the same columns in order"
    assert set(results.INT_COLUMNS + results.BOOL_COLUMNS + results.STRING_COLUMNS + results.FLOAT_COLUMNS) \
        == set(COLUMNS)
    assert all(COLUMNS[c] for c in COLUMNS), "every column says its unit or meaning"


def _row(**values) -> dict:
    row = {c: math.nan for c in COLUMNS}
    row.update(gpu="NVIDIA H100 80GB HBM3", device="cuda", competitor="rampde-bf16", precision="bf16",
               workload="mlp", method="rk4", width=1024, batch=2048, steps=64, repeats=5, warmup=2, status="ok",
               message="", time_ms_median=12.5, tf32=False, cudnn_tf32=True, cudnn_benchmark=False,
               torch="2.13.0+cu128", cuda="12.10", driver="570.86.15", compute_capability="9.0",
               torchdiffeq="0.2.5", rampde="0.1.0", commit="0" * 40, timestamp="2026-11-25T08:00:00+00:00",
               cell_id="nvidia-h100-80gb-hbm3|rampde-bf16|mlp|rk4|w1024|b2048|s64|r5|wu2")
    row.update(values)
    return row


def test_write_then_read_keeps_types(tmp_path):
    path = tmp_path / "results.csv"
    odd = 'CUDA out of memory, "tried" to allocate\n2 GiB'
    write_csv_atomic(pd.DataFrame([_row(), _row(status="oom", message=odd, cell_id="x", time_ms_median=math.nan,
                                            tf32=math.nan)]), path)
    df = read_results(path)
    assert list(df.columns) == list(COLUMNS)
    assert df["cuda"].tolist() == ["12.10", "12.10"], "versions stay text"
    assert df["compute_capability"][0] == "9.0" and df["commit"][0] == "0" * 40
    assert df["width"].dtype == "int64" and df["steps"].tolist() == [64, 64]
    assert df["tf32"][0] is False or df["tf32"][0] == False  # noqa: E712  (pandas boolean)
    assert pd.isna(df["tf32"][1]) and bool(df["cudnn_tf32"][0])
    assert df["message"].tolist() == ["", odd]
    assert df["time_ms_median"][0] == 12.5 and math.isnan(df["time_ms_median"][1])
    assert math.isnan(df["peak_mem_bytes"][0])


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results file at .*missing.csv"):
        read_results(tmp_path / "missing.csv")
    (tmp_path / "other.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="other.csv is not a rampde results table"):
        read_results(tmp_path / "other.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_results(tmp_path / "empty.csv")
    assert list(empty_results().columns) == list(COLUMNS) and empty_results().empty


def test_atomic_write_interrupted_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    write_csv_atomic(pd.DataFrame({"a": [1]}), path)
    real_to_csv = pd.DataFrame.to_csv

    def half_then_ctrl_c(self, handle, *args, **kwargs):
        real_to_csv(self.head(1), handle, *args, **kwargs)  # part of the table is on disk...
        raise KeyboardInterrupt  # ...when Ctrl-C arrives

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        write_csv_atomic(pd.DataFrame({"a": [7, 8, 9]}), path)
    monkeypatch.undo()
    assert pd.read_csv(path)["a"].tolist() == [1], "the previous version, whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"], "no temporary file left"
    write_csv_atomic(pd.DataFrame({"a": [2]}), tmp_path / "new" / "results.csv")
    mode = os.stat(tmp_path / "new" / "results.csv").st_mode & 0o777
    assert mode & 0o044, "readable by others like any file (mkstemp's 0600 is not kept)"


def test_store_replaces_a_cell_and_its_timeline(tmp_path):
    store = ResultsStore(tmp_path)
    assert store.table.empty and store.status() == {}
    store.add(_row(cell_id="a", status="error", message="boom"), [{"t_s": 0.0, "mem_used_bytes": 1.0}])
    store.add(_row(cell_id="b"), [])
    store.add(_row(cell_id="a"), [{"t_s": 0.0, "power_w": 300.0}, {"t_s": 0.02, "power_w": 310.0}])
    again = ResultsStore(tmp_path)
    assert again.status() == {"b": "ok", "a": "ok"}
    assert len(again.table) == 2 and again.table["cell_id"].is_unique
    timelines = pd.read_csv(tmp_path / "timelines.csv")
    assert timelines.columns.tolist() == results.TIMELINE_COLUMNS
    assert timelines["power_w"].tolist() == [300.0, 310.0] and set(timelines["cell_id"]) == {"a"}


# ----------------------------------------------------------------------------- claims

H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"


def _cell(competitor: str, precision: str, time_ms: float = math.nan, peak: float = math.nan,
          err: float = math.nan, status: str = "ok", gpu: str = H100, width: int = 1024, **extra) -> dict:
    return _row(gpu=gpu, competitor=competitor, precision=precision, width=width, time_ms_median=time_ms,
                peak_mem_bytes=peak, grad_err_params=err, status=status, cell_id=f"{gpu}{competitor}{width}",
                **extra)


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame([
        _cell("torchdiffeq-fp32", "fp32", 100.0, 8e9, 1e-7),
        _cell("torchdiffeq-tf32", "tf32", 40.0, 8e9, 1e-4),
        _cell("autocast-bf16", "bf16", 30.0, 4e9, 0.05),
        _cell("autocast-nocache-bf16", "bf16", 32.0, 4.2e9, 0.0018),
        _cell("autocast-fp16", "fp16", 28.0, 4e9, status="nonfinite"),
        _cell("autocast-nocache-fp16", "fp16", 29.0, 4.2e9, 2e-4),
        _cell("rampde-bf16", "bf16", 60.0, 2e9, 0.004),  # an older measurement of the same cell...
        _cell("rampde-bf16", "bf16", 50.0, 2e9, 0.002, grad_err_y0=0.001),  # ...the latest ok one counts
        _cell("rampde-bf16", "bf16", status="error"),  # a failed rerun does not hide it
        _cell("rampde-bf16-fast", "bf16", 25.0, 4e9, 0.0021),
        _cell("rampde-fp16", "fp16", 48.0, 2e9, 3e-4),
        _cell("rampde-fp32", "fp32", 120.0, 4e9, 1e-7),
        # a larger cell where the fp32 baseline ran out of memory, and rampde-fp16 too
        _cell("torchdiffeq-fp32", "fp32", status="oom", width=2048),
        _cell("torchdiffeq-tf32", "tf32", 160.0, 30e9, width=2048),
        _cell("autocast-bf16", "bf16", 120.0, 16e9, 0.06, width=2048),
        _cell("rampde-bf16", "bf16", 200.0, 8e9, 0.003, width=2048),
        _cell("rampde-fp16", "fp16", status="oom", width=2048),
        # another GPU model
        _cell("torchdiffeq-fp32", "fp32", 300.0, gpu=A100),
        _cell("rampde-bf16", "bf16", 100.0, 0.0025, gpu=A100),
    ])


def test_claims_per_cell_exact_numbers(table):
    per_cell = claims(table)
    assert list(per_cell.columns) == CLAIM_COLUMNS
    keys = list(zip(per_cell["gpu"], per_cell["competitor"], per_cell["width"]))
    assert keys == [(A100, "rampde-bf16", 1024), (H100, "rampde-bf16", 1024), (H100, "rampde-bf16", 2048),
                    (H100, "rampde-bf16-fast", 1024), (H100, "rampde-fp16", 1024), (H100, "rampde-fp32", 1024)], \
        "one row per GPU, rampde competitor and cell that ran ok"
    row = {k: per_cell.iloc[i].to_dict() for i, k in enumerate(keys)}

    bf16 = row[(H100, "rampde-bf16", 1024)]
    assert (bf16["time_ms"], bf16["speedup_vs_fp32"], bf16["speedup_vs_tf32"]) == (50.0, 2.0, 0.8)
    assert bf16["mem_ratio_vs_fp32"] == 0.25
    assert (bf16["grad_err"], bf16["grad_err_y0"], bf16["naive_grad_err"], bf16["nocache_grad_err"]) == \
        (0.002, 0.001, 0.05, 0.0018)
    assert bf16["note"] == ""

    big = row[(H100, "rampde-bf16", 2048)]
    assert math.isnan(big["speedup_vs_fp32"]) and math.isnan(big["mem_ratio_vs_fp32"])
    assert big["speedup_vs_tf32"] == 0.8 and big["naive_grad_err"] == 0.06 and math.isnan(big["nocache_grad_err"])
    assert big["note"] == "torchdiffeq-fp32 oom"

    fast = row[(H100, "rampde-bf16-fast", 1024)]
    assert (fast["speedup_vs_fp32"], fast["speedup_vs_tf32"], fast["mem_ratio_vs_fp32"]) == (4.0, 1.6, 0.5)

    fp16 = row[(H100, "rampde-fp16", 1024)]
    assert fp16["speedup_vs_fp32"] == pytest.approx(100 / 48) and fp16["mem_ratio_vs_fp32"] == 0.25
    assert fp16["naive_grad_err"] == math.inf, "the naive fp16 run's gradients were not finite"
    assert fp16["nocache_grad_err"] == 2e-4 and fp16["note"] == "autocast-fp16 nonfinite"

    fp32 = row[(H100, "rampde-fp32", 1024)]
    assert fp32["speedup_vs_fp32"] == pytest.approx(100 / 120) and fp32["mem_ratio_vs_fp32"] == 0.5
    assert math.isnan(fp32["naive_grad_err"]), "no naive recipe in fp32"

    a100 = row[(A100, "rampde-bf16", 1024)]
    assert a100["speedup_vs_fp32"] == 3.0 and math.isnan(a100["speedup_vs_tf32"])
    assert math.isnan(a100["mem_ratio_vs_fp32"]), "no peak memory: no ratio"


def test_claims_summary_per_gpu(table):
    summary = claims_summary(claims(table)).set_index(["gpu", "competitor"])
    bf16 = summary.loc[(H100, "rampde-bf16")]
    assert bf16["cells"] == 2
    assert bf16["speedup_vs_fp32_geomean"] == pytest.approx(2.0)
    assert (bf16["speedup_vs_fp32_min"], bf16["speedup_vs_fp32_max"]) == (2.0, 2.0)
    assert bf16["speedup_vs_tf32_geomean"] == pytest.approx(0.8)
    assert bf16["mem_ratio_vs_fp32_geomean"] == pytest.approx(0.25)
    assert (bf16["grad_err_max"], bf16["naive_grad_err_max"], bf16["nocache_grad_err_max"]) == (0.003, 0.06, 0.0018)
    assert (bf16["beats_naive"], bf16["vs_naive"]) == (2, 2)
    fp16 = summary.loc[(H100, "rampde-fp16")]
    assert fp16["naive_grad_err_max"] == math.inf and (fp16["beats_naive"], fp16["vs_naive"]) == (1, 1)
    assert summary.loc[(A100, "rampde-bf16")]["speedup_vs_fp32_geomean"] == pytest.approx(3.0)
    assert len(summary) == 5


def test_claims_of_tables_without_rampde():
    assert claims(pd.DataFrame()).columns.tolist() == CLAIM_COLUMNS
    only_baseline = pd.DataFrame([_cell("torchdiffeq-fp32", "fp32", 1.0)])
    assert claims(only_baseline).empty and claims_summary(claims(only_baseline)).empty
