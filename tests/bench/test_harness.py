"""The measuring harness, the sweep runner, the results table and the rampde-bench command."""

from __future__ import annotations

import math
import types

import pandas as pd
import pytest
import torch

from rampde.bench import measure, sweep
from rampde.bench.cli import main
from rampde.bench.results import COLUMNS, claims, claims_summary, read_results, write_csv_atomic
from rampde.bench.sweep import Cell, make_grid, run_sweep

CPU = torch.device("cpu")
TINY = {"mlp": {"widths": [8], "batches": [8]}}


# ----------------------------------------------------------------------------- measure

def test_timing_statistics():
    t = measure.Timing.from_samples([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (t.median_ms, t.min_ms, t.max_ms, t.q25_ms, t.q75_ms, t.repeats) == (3.0, 1.0, 5.0, 2.0, 4.0, 5)


def test_time_runs_calls_warmup_then_repeats():
    calls = []
    timing = measure.time_runs(lambda: calls.append(1), CPU, repeats=5, warmup=2)
    assert len(calls) == 7 and timing.repeats == 5 and timing.min_ms >= 0
    with pytest.raises(ValueError, match="repeats"):
        measure.time_runs(lambda: None, CPU, repeats=0)


def test_peak_memory_is_nan_off_cuda_and_gradient_errors():
    assert math.isnan(measure.peak_memory_bytes(lambda: None, CPU))
    f64 = torch.float64
    out = types.SimpleNamespace(grad_params=(torch.tensor([1.0, 2.0], dtype=f64),),
                                grad_y0=torch.tensor([3.0, 4.0], dtype=f64))
    ref = types.SimpleNamespace(grad_params=(torch.tensor([1.0, 2.001], dtype=f64),),
                                grad_y0=torch.tensor([3.0, 4.5], dtype=f64))
    p_err, y_err = measure.gradient_errors(out, ref)
    assert p_err == pytest.approx(1e-3 / math.hypot(1, 2.001)) and y_err == pytest.approx(0.5 / math.hypot(3, 4.5))


def test_gpu_slug():
    assert measure.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_environment_on_the_cpu():
    env = measure.environment(CPU)
    assert env["gpu"] == "cpu" and env["torch"] == torch.__version__ and env["driver"] == ""


def test_nvml_sampler_without_nvml(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name, *args, **kwargs):
        if name == "pynvml":
            raise ImportError("no pynvml")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    monkeypatch.setattr(measure, "_nvml_warned", False)
    assert measure._nvml() is None
    with measure.NvmlSampler(CPU) as sampler:
        pass
    assert sampler.timeline == [] and all(math.isnan(v) for v in sampler.summary().values())


def test_nvml_sampler_with_a_fake_device(monkeypatch):
    energy = iter([1_000_000, 1_600_000])  # mJ: 600 J over 3 calls
    fake = types.SimpleNamespace(
        nvmlDeviceGetHandleByIndex=lambda i: "handle",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=75),
        nvmlDeviceGetPowerUsage=lambda h: 300_000,
        nvmlDeviceGetTotalEnergyConsumption=lambda h: next(energy),
    )
    monkeypatch.setattr(measure, "_nvml", lambda: fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    sampler = measure.NvmlSampler("cuda", period_s=0.001)
    with sampler:
        import time

        time.sleep(0.02)
    assert len(sampler.timeline) >= 2
    assert sampler.timeline[0]["mem_used_bytes"] == 2 * 2**30 and sampler.timeline[0]["power_w"] == 300.0
    summary = sampler.summary(calls=3)
    assert summary == {"nvml_mem_peak_bytes": 2 * 2**30, "gpu_util_mean_pct": 75.0, "power_mean_w": 300.0,
                       "energy_j": 200.0}


# ----------------------------------------------------------------------------- results

def _row(competitor, precision, time_ms, mem, err, **cell):
    base = {"gpu": "H100", "workload": "mlp", "method": "rk4", "width": 2048, "batch": 2048, "steps": 64}
    base.update(cell)
    return {**base, "cell_id": f"{competitor}{cell}", "competitor": competitor, "precision": precision,
            "status": "ok", "time_ms_median": time_ms, "peak_mem_bytes": mem, "grad_err_params": err}


def test_claims_from_a_hand_made_table():
    df = pd.DataFrame([
        _row("torchdiffeq-fp32", "fp32", 700.0, 11e9, 1e-7),
        _row("torchdiffeq-tf32", "tf32", 350.0, 11e9, 1e-4),
        _row("autocast-bf16", "bf16", 300.0, 6e9, 0.05),
        _row("autocast-nocache-bf16", "bf16", 320.0, 6e9, 0.002),
        _row("rampde-bf16", "bf16", 200.0, 1.1e9, 0.002),
        _row("rampde-bf16", "bf16", 20.0, 1e8, 0.004, width=256),
        {**_row("rampde-fp16", "fp16", 1.0, 1.0, 1.0), "status": "oom"},
    ])
    per_cell = claims(df)
    big = per_cell[per_cell["width"] == 2048].iloc[0]
    assert big["speedup_vs_fp32"] == pytest.approx(3.5) and big["speedup_vs_tf32"] == pytest.approx(1.75)
    assert big["mem_ratio_vs_fp32"] == pytest.approx(0.1)
    assert (big["grad_err"], big["naive_grad_err"], big["nocache_grad_err"]) == (0.002, 0.05, 0.002)
    small = per_cell[per_cell["width"] == 256].iloc[0]
    assert math.isnan(small["speedup_vs_fp32"]), "no baseline in that cell"
    assert set(per_cell["competitor"]) == {"rampde-bf16"}, "oom cells make no claims"
    summary = claims_summary(per_cell)
    assert summary.loc[0, "cells"] == 2 and summary.loc[0, "grad_err_max"] == 0.004


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    write_csv_atomic(pd.DataFrame({"a": [1]}), path)

    def explode(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", explode)
    with pytest.raises(KeyboardInterrupt):
        write_csv_atomic(pd.DataFrame({"a": [1, 2]}), path)
    monkeypatch.undo()
    assert pd.read_csv(path)["a"].tolist() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"], "no temporary file left behind"


def test_read_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results file"):
        read_results(tmp_path / "missing.csv")
    (tmp_path / "other.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="not a rampde results table"):
        read_results(tmp_path / "other.csv")


# ----------------------------------------------------------------------------- sweep

def test_quick_sweep_end_to_end(tmp_path):
    cells = make_grid(["torchdiffeq-fp32", "rampde-bf16"], TINY, [2])
    table = run_sweep(cells, tmp_path, device="cpu", repeats=2, warmup=1)
    assert list(table.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert len(table) == 2 and set(table["status"]) == {"ok"}
    ours = table[table["competitor"] == "rampde-bf16"].iloc[0]
    assert 0 < ours["grad_err_params"] < 0.05 and ours["time_ms_median"] > 0 and ours["tflops"] > 0
    assert ours["gpu"] == "cpu" and ours["torch"] == torch.__version__
    assert len(read_results(tmp_path / "results.csv")) == 2


def test_interrupted_sweep_resumes_without_redoing_cells(tmp_path):
    cells = make_grid(["torchdiffeq-fp32", "rampde-fp32", "reversible"], TINY, [2])

    def stop_after_first(done, total, cell, row):
        if row is not None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(cells, tmp_path, device="cpu", repeats=1, warmup=1, progress=stop_after_first)
    first = read_results(tmp_path / "results.csv")
    assert len(first) == 1
    measured = []
    table = run_sweep(cells, tmp_path, device="cpu", repeats=1, warmup=1,
                      progress=lambda d, t, cell, row: row is None and measured.append(cell.competitor))
    assert len(table) == 3 and len(measured) == 2 and first["competitor"][0] not in measured
    assert table["cell_id"].is_unique


def test_out_of_memory_cell_is_a_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from rampde.bench import competitors

    original = competitors.get_competitor("rampde-fp32")

    def oom(workload, steps):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setitem(competitors._REGISTRY, "rampde-fp32", original.__class__(
        **{**original.__dict__, "run": oom}))
    cells = make_grid(["rampde-fp32", "torchdiffeq-fp32"], TINY, [2])
    table = run_sweep(cells, tmp_path, device="cpu", repeats=1, warmup=1)
    status = dict(zip(table["competitor"], table["status"]))
    assert status == {"rampde-fp32": "oom", "torchdiffeq-fp32": "ok"}
    assert "out of memory" in table.loc[table["competitor"] == "rampde-fp32", "message"].iloc[0]


def test_other_errors_are_rows_too(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "build_workload", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    table = run_sweep([Cell("rampde-fp32", "mlp", 8, 8, 2)], tmp_path, device="cpu", repeats=1, warmup=1)
    assert table["status"].tolist() == ["error"] and "boom" in table["message"][0]


def test_unknown_competitor_in_the_grid():
    with pytest.raises(KeyError, match="unknown competitor"):
        make_grid(["nope"], TINY, [2])


# ----------------------------------------------------------------------------- cli

def test_cli_run_then_claims_then_report(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["run", "--competitors", "torchdiffeq-fp32", "rampde-bf16", "--workloads", "mlp", "--widths", "8",
                 "--batch", "8", "--steps", "2", "--repeats", "1", "--warmup", "1", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert len(read_results(out / "results.csv")) == 2
    assert main(["claims", str(out / "results.csv")]) == 0
    assert "speedup_vs_fp32" in capsys.readouterr().out
    html = tmp_path / "index.html"
    assert main(["report", "--results", str(out / "results.csv"), "--out", str(html)]) == 0
    assert html.exists() and "dashboard:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--suite", "huge"], "--suite: unknown suite 'huge'"),
        (["run", "--competitors", "nope"], "--competitors: unknown competitor 'nope'"),
        (["run", "--workloads", "rnn"], "--workloads: unknown ['rnn']"),
        (["run", "--widths", "12"], "--widths: 12 is not a positive integer multiple of 8"),
        (["run", "--steps", "0"], "--steps: 0 is not a positive integer"),
        (["run", "--repeats", "0"], "--repeats: 0 is not a positive integer"),
        (["run", "--device", "cuda"], "--device: CUDA was asked for"),
        (["claims", "missing.csv"], "claims: no results file at missing.csv"),
    ],
)
def test_cli_errors_name_the_option(argv, message, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_env(capsys):
    assert main(["env", "--device", "cpu"]) == 0
    assert "torch" in capsys.readouterr().out
