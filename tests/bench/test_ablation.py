"""rampde.bench.ablation on the CPU: the ablation end to end at tiny sizes, an out-of-memory
variant as a row, an option this rampde refuses as "unsupported", the default cells and the order
of the plan."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

import rampde
from rampde.bench import ablation, sweep
from rampde.bench.ablation import ABLATION_COLUMNS, PerfCell, ablation_variants, rampde_run, run_ablation
from rampde.bench.competitors import get_competitor
from rampde.bench.profiling import main
from rampde.bench.workloads import build_workload

TINY = ["--device", "cpu", "--widths", "8", "--batch", "8", "--steps", "2", "--threads", "1"]
MLP = PerfCell("mlp", 8, 8, 2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(table: pd.DataFrame) -> dict[str, pd.Series]:
    return {row["variant"]: row for _, row in table.iterrows()}


# ----------------------------------------------------------------------------- ablate


def test_ablate_end_to_end(tmp_path, capsys):
    code = main(["ablate", *TINY, "--workload", "mlp", "--repeats", "1", "--warmup", "1", "--out", str(tmp_path)])
    assert code == 0
    table = pd.read_csv(tmp_path / "ablation.csv", keep_default_na=False, na_values=[""])
    assert list(table.columns) == list(ABLATION_COLUMNS)
    assert list(table["variant"]) == [v.name for v in ablation_variants("mlp")]
    assert len(table) == 15 and set(table["workload"]) == {"mlp"} and set(table["gpu"]) == {"cpu"}
    rows = _rows(table)
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["message"])
    for name in ("rampde-bf16 fuse", "rampde-fp16 storage=activations fuse", "rampde-bf16 cuda_graph",
                 "rampde-fp16 cuda_graph"):
        assert rows[name]["grad_err_params"] < 0.05 and rows[name]["time_ms_median"] > 0
    assert math.isfinite(rows["torchdiffeq-fp32"]["grad_err_params"])
    assert rows["torchdiffeq-fp32"]["grad_err_params"] < 1e-5
    for name in ("rampde-bf16", "rampde-fp16"):
        err = rows[name]["grad_err_params"]
        assert math.isfinite(err) and 0 < err < 0.05
        assert rows[name]["speedup_vs_default"] == 1.0 and rows[name]["speedup_vs_fp32"] > 0
        assert rows[name]["options"] == "{}" and rows[name]["time_ms_median"] > 0
    assert json.loads(rows["rampde-bf16 storage=activations"]["options"]) == {"storage": "activations"}
    assert rows["torchdiffeq-fp32"]["precision"] == "fp32" and rows["rampde-fp16"]["precision"] == "fp16"
    assert math.isnan(rows["rampde-bf16"]["scaler_retries"]) and rows["rampde-fp16"]["scaler_retries"] >= 0
    env = json.loads((tmp_path / "ablation-environment.json").read_text())
    assert env["gpu"] == "cpu" and env["torch"] == torch.__version__
    err = capsys.readouterr().err
    assert "[15/15] mlp w8 b8 N2" in err and "ablation.csv" in err


def test_conv_ablation_has_both_layouts(tmp_path):
    names = ["torchdiffeq-fp32", "rampde-bf16", "rampde-bf16 channels_last"]
    table = run_ablation([PerfCell("conv", 8, 8, 2)], tmp_path, device="cpu", repeats=1, warmup=0, variants=names)
    assert list(table["variant"]) == names and set(table["status"]) == {"ok"}
    assert list(table["channels_last"]) == [False, False, True]
    rows = _rows(table)
    assert rows["rampde-bf16 channels_last"]["grad_err_params"] < 0.05
    assert rows["rampde-bf16 channels_last"]["speedup_vs_default"] > 0
    assert len(ablation_variants("conv")) == 2 * len(ablation_variants("mlp"))


def test_default_variants_run_what_the_registry_runs():
    workload = build_workload("mlp", width=8, batch=8)
    for precision, options, registry in (("bf16", {}, "rampde-bf16"),
                                         ("fp16", {"storage": "activations"}, "rampde-fp16-fast")):
        ours = rampde_run(precision, options)(workload, 2)
        theirs = get_competitor(registry).run(workload, 2)
        assert torch.equal(ours.loss, theirs.loss) and torch.equal(ours.grad_y0, theirs.grad_y0)
        assert all(torch.equal(a, b) for a, b in zip(ours.grad_params, theirs.grad_params))


def test_out_of_memory_is_a_row_and_the_ablation_goes_on(tmp_path, monkeypatch):
    real = rampde.odeint

    def short_of_memory(func, y0, t, **kwargs):
        if (kwargs.get("options") or {}).get("storage") == "activations":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(func, y0, t, **kwargs)

    monkeypatch.setattr(rampde, "odeint", short_of_memory)
    names = ["rampde-bf16", "rampde-bf16 storage=activations", "rampde-bf16 state_dtype=low"]
    table = run_ablation([MLP], tmp_path, device="cpu", repeats=1, warmup=0, variants=names)
    assert list(table["status"]) == ["ok", "oom", "ok"]
    oom = _rows(table)["rampde-bf16 storage=activations"]
    assert oom["message"] == "CUDA out of memory. Tried to allocate 80.00 GiB"
    assert math.isnan(oom["time_ms_median"]) and math.isnan(oom["grad_err_params"])
    on_disk = pd.read_csv(tmp_path / "ablation.csv")
    assert list(on_disk["status"]) == ["ok", "oom", "ok"]


def test_an_odeint_refusing_cast_weights_gives_unsupported(tmp_path, monkeypatch):
    real = rampde.odeint

    def older(func, y0, t, **kwargs):  # what odeint said before cast_weights existed
        options = kwargs.get("options") or {}
        if "cast_weights" in options:
            raise ValueError("options has unsupported key(s) ['cast_weights']; rampde's fixed-grid solvers take "
                             "only ['step_size', 'state_dtype', 'storage']")
        return real(func, y0, t, **kwargs)

    monkeypatch.setattr(rampde, "odeint", older)
    table = run_ablation([MLP], tmp_path, device="cpu", repeats=1, warmup=0,
                         variants=["rampde-fp16", "rampde-fp16 cast_weights=per-use"])
    assert list(table["status"]) == ["ok", "unsupported"]
    assert "cast_weights" in _rows(table)["rampde-fp16 cast_weights=per-use"]["message"]


def test_other_failures_are_error_rows(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something else broke")

    monkeypatch.setattr(rampde, "odeint", broken)
    table = run_ablation([MLP], tmp_path, device="cpu", repeats=1, warmup=0, variants=["rampde-bf16"])
    assert list(table["status"]) == ["error"] and "something else broke" in table["message"][0]


def test_a_variant_that_breaks_the_device_is_kept_and_the_ablation_stops_with_exit_1(tmp_path, monkeypatch, capsys):
    """After an illegal memory access every later CUDA call fails: the failed row is written, no
    further variant is asked of the device, and the command says why it stopped."""
    real, lost = rampde.odeint, []

    def crash(func, y0, t, **kwargs):
        if (kwargs.get("options") or {}).get("storage") == "activations":
            lost.append(True)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        assert not lost, "a variant ran on a lost device"
        return real(func, y0, t, **kwargs)

    monkeypatch.setattr(rampde, "odeint", crash)
    monkeypatch.setattr(sweep.measure, "device_fault",
                        lambda device: "CUDA error: an illegal memory access was encountered" if lost else "")
    names = ["rampde-bf16", "rampde-bf16 storage=activations", "rampde-bf16 state_dtype=low"]
    code = main(["ablate", *TINY, "--workload", "mlp", "--variants", *names, "--out", str(tmp_path)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1
    assert "stopped:" in err and "illegal memory access" in err and "the 1 row(s) after it were not run" in err
    on_disk = pd.read_csv(tmp_path / "ablation.csv")
    assert list(on_disk["variant"]) == names[:2] and list(on_disk["status"]) == ["ok", "error"]


def test_default_cells_measure_every_workloads_headline_cell_first():
    from rampde.bench.ablation import default_cells

    cells = [(c.workload, c.width) for c in default_cells("cuda")]
    assert cells[:2] == [("mlp", 2048), ("conv", 128)]  # the efficiency and conv targets first
    assert sorted(cells) == [("conv", 128), ("mlp", 256), ("mlp", 1024), ("mlp", 2048)]
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        default_cells("cuda", ["mlp", "nope"])


def test_compiled_variants_come_last_in_each_layout():
    names = [v.name for v in ablation_variants("mlp")]
    fused = [i for i, n in enumerate(names) if "fuse" in n]
    assert fused == list(range(len(names) - len(fused), len(names)))
    assert names[:3] == ["torchdiffeq-fp32", "rampde-bf16", "rampde-fp16"]


def test_the_plan_measures_every_cells_plain_variants_then_graph_then_compiled_ones():
    cells = [MLP, PerfCell("conv", 8, 8, 2)]
    plan = ablation.ablation_plan(cells)
    kinds = ["compiled" if v.compiled else "graph" if v.captured else "plain" for _, v in plan]
    first_graph, first_compiled = kinds.index("graph"), kinds.index("compiled")
    assert set(kinds[:first_graph]) == {"plain"} and set(kinds[first_graph:first_compiled]) == {"graph"}
    assert set(kinds[first_compiled:]) == {"compiled"}
    assert [c for c, _ in plan[:first_graph]] == [MLP] * 9 + [cells[1]] * 18  # cell by cell
    assert [(c.workload, v.name) for c, v in plan[first_graph:first_graph + 2]] == [
        ("mlp", "rampde-bf16 cuda_graph"), ("mlp", "rampde-fp16 cuda_graph")]
    assert {(c, v.name) for c, v in plan} == {(c, v.name) for c in cells for v in ablation_variants(c.workload)}
    assert [(c.workload, v.name) for c, v in plan[first_compiled:first_compiled + 2]] == [
        ("mlp", "rampde-bf16 fuse"), ("mlp", "rampde-fp16 fuse")]
    named = ablation.ablation_plan(cells, ["rampde-bf16 fuse", "rampde-bf16"])
    assert [(c.workload, v.name) for c, v in named] == [("mlp", "rampde-bf16"), ("conv", "rampde-bf16"),
                                                        ("mlp", "rampde-bf16 fuse"), ("conv", "rampde-bf16 fuse")]


def test_compiled_rows_keep_their_cells_reference_and_default(tmp_path, monkeypatch):
    """The compiled pass comes back to each cell: its speedup is over that cell's default, and
    its gradient error against that cell's fp64 reference, computed once per cell, not again."""
    from rampde.bench import sweep

    computed = []
    real = sweep.reference_run

    def counted(competitor, workload, steps):
        computed.append(workload.describe())
        return real(competitor, workload, steps)

    monkeypatch.setattr(sweep, "reference_run", counted)
    # The "fuse" rows run rampde's defaults: no compile here, the same numbers as the plain rows.
    monkeypatch.setattr(ablation, "rampde_run", lambda precision, options: rampde_run(precision, {}))
    second = PerfCell("mlp", 16, 8, 2)
    table = run_ablation([MLP, second], tmp_path, device="cpu", repeats=1, warmup=0,
                         variants=["rampde-bf16", "rampde-bf16 fuse"])
    assert [(r["width"], r["variant"]) for _, r in table.iterrows()] == [
        (8, "rampde-bf16"), (16, "rampde-bf16"), (8, "rampde-bf16 fuse"), (16, "rampde-bf16 fuse")]
    assert set(table["status"]) == {"ok"} and len(computed) == 2
    by = {(r["width"], r["variant"]): r for _, r in table.iterrows()}
    for width in (8, 16):
        fused, plain = by[(width, "rampde-bf16 fuse")], by[(width, "rampde-bf16")]
        assert fused["speedup_vs_default"] == pytest.approx(plain["time_ms_median"] / fused["time_ms_median"])
        assert fused["grad_err_params"] == plain["grad_err_params"]  # the same numbers, the same reference
