"""The GEMM probe (``rampde.bench.gemm_probe``): the work it times, its rows and its command line."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from rampde.bench import gemm_probe, profiling, sweep
from rampde.bench.gemm_probe import GEMM_COLUMNS, GemmShape, linear_gemms, mlp_gemm_ceiling, probe_shapes, run_probe


def test_shapes_pair_each_width_with_its_odd_inner_dimension():
    shapes = probe_shapes([16, 32], 24, ["fp32", "bf16"])
    assert [(s.precision, s.m, s.n, s.k) for s in shapes] == [
        ("fp32", 24, 16, 16), ("fp32", 24, 16, 17), ("fp32", 24, 32, 32), ("fp32", 24, 32, 33),
        ("bf16", 24, 16, 16), ("bf16", 24, 16, 17), ("bf16", 24, 32, 32), ("bf16", 24, 32, 33)]
    assert shapes[1].flops == 3 * 2 * 24 * 16 * 17
    assert list(gemm_probe.PRECISIONS)[:2] == ["bf16", "fp16"]  # a probe cut short has the tensor-core rows


@pytest.mark.parametrize("precision, k, expected", [
    ("fp16", 2048, 16), ("fp16", 2049, 2), ("bf16", 2052, 8), ("fp32", 2049, 4), ("tf32", 2050, 8),
    ("fp32", 2048, 16),
])
def test_row_alignment_is_where_a_row_of_k_elements_starts(precision, k, expected):
    assert GemmShape(precision, 8, 8, k).row_alignment() == expected


@pytest.mark.parametrize("kwargs, name", [
    ({"precision": "fp8"}, "precision"), ({"m": 0}, "m"), ({"n": 2.0}, "n"), ({"k": True}, "k"),
])
def test_bad_shape_names_the_argument(kwargs, name):
    args = {"precision": "fp32", "m": 8, "n": 8, "k": 8, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name} must"):
        GemmShape(**args)


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("bf16", 2e-2), ("fp16", 2e-3)])
def test_the_timed_call_computes_a_linear_layers_three_gemms(precision, tol):
    call, t = linear_gemms(GemmShape(precision, 24, 16, 17), torch.device("cpu"), inner=2, seed=3)
    call()
    x, w, g = (t[name].double() for name in ("x", "w", "g"))
    assert t["y"].shape == (24, 16) and t["dx"].shape == (24, 17) and t["dw"].shape == (16, 17)
    for got, want in ((t["y"], x @ w.T), (t["dx"], g @ w), (t["dw"], g.T @ x)):
        assert got.dtype == gemm_probe.PRECISIONS[precision]
        assert torch.linalg.norm(got.double() - want) <= tol * torch.linalg.norm(want)


def test_the_probe_writes_one_row_per_shape_on_the_cpu(tmp_path):
    shapes = probe_shapes([16], 16, ["fp32", "tf32", "bf16"])
    seen_rows = []

    def progress(done, total, shape, row):
        if row is not None:  # the file holds every finished row when the next one starts
            seen_rows.append(len(pd.read_csv(tmp_path / "gemm.csv")))

    before = torch.backends.cuda.matmul.allow_tf32
    table = run_probe(shapes, tmp_path, device="cpu", inner=2, repeats=2, warmup=1, progress=progress)
    assert torch.backends.cuda.matmul.allow_tf32 == before
    assert seen_rows == [1, 2, 3, 4, 5, 6]
    on_disk = pd.read_csv(tmp_path / "gemm.csv")
    assert list(on_disk.columns) == list(GEMM_COLUMNS) == list(table.columns)
    assert list(on_disk["status"]) == ["ok", "ok", "unsupported", "unsupported", "ok", "ok"]
    assert on_disk.loc[2, "message"].startswith("TF32 is a CUDA matmul mode")
    ok = on_disk[on_disk["status"] == "ok"]
    assert (ok["tflops"] > 0).all() and (ok["time_us_q25"] <= ok["time_us_median"]).all()
    assert (ok["time_us_median"] <= ok["time_us_q75"]).all()
    # measured, not compared with the triple's time: on a shared CPU core either can be the slower one
    assert (ok["forward_us_median"] > 0).all() and ok["forward_us_median"].notna().all()
    assert list(ok["vs_aligned"].round(12))[::2] == [1.0, 1.0]  # the k = n rows are their own reference
    odd = ok.iloc[1]
    assert odd["vs_aligned"] == pytest.approx(odd["tflops"] / ok.iloc[0]["tflops"])
    assert on_disk["fraction_of_fp16_peak"].isna().all()  # no tensor-core peak on the CPU
    assert (on_disk["gpu"] == "cpu").all() and on_disk["top_kernel"].isna().all()


def _timed(precision, n, k, triple_us, forward_us, status="ok", m=2048):
    return {"precision": precision, "m": m, "n": n, "k": k, "time_us_median": triple_us,
            "forward_us_median": forward_us, "status": status}


def test_gemm_ceiling_of_the_mlp_field():
    """rk4 at width 2048: useful work = 4 triples of each layer; the default storage adds 4
    forward GEMMs of each. Hand-computed from the flops of the two shapes."""
    rows = pd.DataFrame([_timed("fp16", 2048, 2048, 60.0, 20.0), _timed("fp16", 2048, 2049, 90.0, 40.0),
                         _timed("bf16", 2048, 2048, 50.0, 15.0)])
    useful = 4 * 6 * 2048 * 2048 * (2048 + 2049)  # flops per step
    got = mlp_gemm_ceiling(rows, 2048, "fp16", peak_tflops=1000.0)
    assert got["activations"] == pytest.approx(useful / (4 * 150.0e-6) / 1e12 / 1000.0)
    assert got["states"] == pytest.approx(useful / (4 * 210.0e-6) / 1e12 / 1000.0)
    assert got["states"] < got["activations"]
    bf16 = mlp_gemm_ceiling(rows, 2048, "bf16", peak_tflops=1000.0)  # no k = 2049 row
    assert math.isnan(bf16["activations"]) and math.isnan(bf16["states"])
    oom = rows.assign(status=["ok", "oom", "ok"])
    assert math.isnan(mlp_gemm_ceiling(oom, 2048, "fp16", 1000.0)["states"])
    assert math.isnan(mlp_gemm_ceiling(rows, 2048, "fp16", math.nan)["states"]), "no peak, no fraction"
    older = mlp_gemm_ceiling(rows.drop(columns="forward_us_median"), 2048, "fp16", 1000.0)  # an older gemm.csv
    assert older["activations"] == pytest.approx(got["activations"]) and math.isnan(older["states"])


def test_out_of_memory_and_errors_are_rows_and_the_probe_goes_on(tmp_path, monkeypatch):
    real = gemm_probe.measure_shape

    def failing(shape, device, **kwargs):
        if shape.k == 17:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        if shape.n == 32 and shape.k == 32:
            raise RuntimeError("cublas went away")
        return real(shape, device, **kwargs)

    monkeypatch.setattr(gemm_probe, "measure_shape", failing)
    table = run_probe(probe_shapes([16, 32], 16, ["fp32"]), tmp_path, device="cpu", inner=1, repeats=1, warmup=0)
    assert list(table["status"]) == ["ok", "oom", "error", "ok"]
    assert "out of memory" in table.loc[1, "message"]
    assert table.loc[2, "message"] == "RuntimeError: cublas went away"
    assert math.isnan(table.loc[1, "vs_aligned"]) and math.isnan(table.loc[3, "vs_aligned"])  # 33 has no 32 row


def test_a_shape_that_breaks_the_device_is_kept_and_the_probe_stops(tmp_path, monkeypatch):
    def crash(shape, device, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gemm_probe, "measure_shape", crash)
    monkeypatch.setattr(sweep.measure, "device_fault", lambda device: "CUDA error: an illegal memory access")
    with pytest.raises(sweep.DeviceLost, match=r"after GEMM probe fp32 m=16 n=16 k=16 failed.*the 1 shape"):
        run_probe(probe_shapes([16], 16, ["fp32"]), tmp_path, device="cpu", inner=1, repeats=1, warmup=0)
    on_disk = pd.read_csv(tmp_path / "gemm.csv")
    assert list(on_disk["k"]) == [16] and list(on_disk["status"]) == ["error"]


def test_bad_inner_is_refused(tmp_path):
    with pytest.raises(ValueError, match="inner must be >= 1"):
        run_probe(probe_shapes([16], 16, ["fp32"]), tmp_path, device="cpu", inner=0)


def test_command_line_runs_and_prints_each_row(tmp_path, capsys):
    code = profiling.main(["gemm", "--device", "cpu", "--widths", "16", "--batch", "8", "--precisions", "fp16",
                            "--repeats", "1", "--inner", "1", "--out", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert "2 shapes on cpu" in err and "[2/2] fp16 m=8 n=16 k=17:" in err and "TFLOP/s" in err
    assert len(pd.read_csv(tmp_path / "gemm.csv")) == 2


@pytest.mark.parametrize("args, message", [
    (["--precisions", "fp8"], "--precisions: unknown ['fp8']"),
    (["--widths", "0"], "--widths: 0 is not a positive integer"),
    (["--inner", "x"], "--inner: 'x' is not an integer"),
    (["--device", "tpu"], "--device:"),
])
def test_bad_command_line_values_name_the_option(args, message, tmp_path, capsys):
    assert profiling.main(["gemm", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "gemm.csv").exists()
