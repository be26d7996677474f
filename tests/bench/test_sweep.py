"""rampde.bench.sweep on the CPU: a real (tiny) sweep end to end, resuming an interrupted sweep,
out-of-memory, error and non-finite cells as rows, and the fp64 reference computed once."""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest
import torch

from rampde.bench import sweep
from rampde.bench.competitors import Competitor, RunOutput
from rampde.bench.results import COLUMNS, read_results
from rampde.bench.sweep import Cell, make_grid, run_sweep

TINY = {"mlp": {"widths": [8], "batches": [8]}}


# ----------------------------------------------------------------------------- fakes


def _ones(workload, scale: float = 1.0, dtype=None) -> RunOutput:
    dtype = dtype or workload.y0.dtype
    return RunOutput(torch.tensor(0.5, dtype=dtype), torch.full_like(workload.y0, scale, dtype=dtype),
                     tuple(torch.full_like(p, scale, dtype=dtype) for p in workload.field.parameters()), {})


class FakeRegistry:
    """Competitors whose run returns gradients of ones (the reference: 1.001), cheap and exact."""

    def __init__(self, monkeypatch) -> None:
        self.competitors: dict[str, Competitor] = {}
        self.runs: list[str] = []
        self.references: list[tuple] = []
        monkeypatch.setattr(sweep, "get_competitor", self.get)
        monkeypatch.setattr(sweep, "reference_run", self.reference_run)
        for name, scheme in (("fake-a", "rk4-discrete"), ("fake-b", "rk4-discrete"), ("fake-rev", "reversible")):
            self.add(name, scheme=scheme)

    def add(self, name: str, run=None, scheme: str = "rk4-discrete") -> None:
        def counted(workload, steps, run=run or (lambda w, s: _ones(w))):
            self.runs.append(name)
            return run(workload, steps)

        self.competitors[name] = Competitor(name, "bf16", "fake", "-", scheme, counted)

    def get(self, name: str) -> Competitor:
        try:
            return self.competitors[name]
        except KeyError:
            raise KeyError(f"unknown competitor {name!r}") from None

    def reference_run(self, competitor, workload, steps):
        self.references.append((competitor.scheme, workload.width, steps))
        return _ones(workload, 1.001, torch.float64)


@pytest.fixture
def fakes(monkeypatch) -> FakeRegistry:
    return FakeRegistry(monkeypatch)


# ----------------------------------------------------------------------------- the real thing


def test_tiny_real_sweep_end_to_end(tmp_path):
    cells = make_grid(["torchdiffeq-fp32", "rampde-bf16", "reversible"], TINY, [2])
    events = []
    table = run_sweep(cells, tmp_path, device="cpu", repeats=2, warmup=1,
                      progress=lambda done, total, cell, row: events.append((done, total, row is None)))
    assert events == [(0, 3, True), (1, 3, False), (1, 3, True), (2, 3, False), (2, 3, True), (3, 3, False)]
    assert list(table.columns) == list(COLUMNS)
    assert table["status"].tolist() == ["ok"] * 3 and table["message"].tolist() == [""] * 3
    by = table.set_index("competitor")
    assert by.loc["torchdiffeq-fp32", "grad_err_params"] < 1e-5, "fp32 against its own fp64 run"
    assert 1e-5 < by.loc["rampde-bf16", "grad_err_params"] < 0.05
    assert by.loc["reversible", "grad_err_y0"] < 1e-5
    for column in ("time_ms_median", "time_ms_min", "time_ms_max", "tflops", "loss"):
        assert (table[column] > 0).all(), column
    assert (table["time_ms_min"] <= table["time_ms_median"]).all()
    assert (table["time_ms_median"] <= table["time_ms_max"]).all()
    for column in ("peak_mem_bytes", "nvml_mem_peak_bytes", "energy_j"):
        assert table[column].isna().all(), f"{column} is NaN on the CPU"
    assert set(table["gpu"]) == {"cpu"} and set(table["precision"]) == {"fp32", "bf16"}
    assert table["repeats"].tolist() == [2, 2, 2] and table["warmup"].tolist() == [1, 1, 1]
    assert by.loc["rampde-bf16", "cell_id"] == "cpu|rampde-bf16|mlp|rk4|w8|b8|s2|r2|wu1"
    on_disk = read_results(tmp_path / "results.csv")
    pd.testing.assert_frame_equal(on_disk, table)
    assert not (tmp_path / "timelines.csv").exists(), "no NVML samples on the CPU"


def test_make_grid_orders_by_size_and_checks_names():
    cells = make_grid(["rampde-fp32", "torchdiffeq-fp32"],
                      {"mlp": {"widths": [16, 8], "batches": [8]}, "cnf": {"widths": [8], "batches": [16]}}, [4, 2])
    assert len(cells) == 2 * 2 * 3
    sizes = [c.width * c.batch * c.steps for c in cells]
    assert sizes == sorted(sizes)
    assert [c.competitor for c in cells[:2]] == ["rampde-fp32", "torchdiffeq-fp32"], "competitors side by side"
    with pytest.raises(KeyError, match="unknown competitor 'nope'"):
        make_grid(["nope"], TINY, [2])


# ----------------------------------------------------------------------------- resume


def test_interrupted_sweep_resumes_without_redoing_cells(tmp_path, fakes):
    cells = make_grid(["fake-a", "fake-b", "fake-rev"], TINY, [2, 4])

    def interrupt_after_first(done, total, cell, row):
        if row is not None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(cells, tmp_path, device="cpu", repeats=1, warmup=0, progress=interrupt_after_first)
    first = read_results(tmp_path / "results.csv")
    assert len(first) == 1 and first["status"][0] == "ok", "the finished cell is on disk, whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"], "no temporary file left"

    fakes.runs.clear()
    measured = []
    table = run_sweep(cells, tmp_path, device="cpu", repeats=1, warmup=0,
                      progress=lambda d, t, cell, row: row is None and measured.append(cell))
    assert measured == cells[1:], "only the remaining cells, in order"
    assert len(fakes.runs) == len(cells) - 1
    assert len(table) == len(cells) and table["cell_id"].is_unique
    pd.testing.assert_series_equal(table.iloc[0], first.iloc[0], check_names=False)

    fakes.runs.clear()
    again = run_sweep(cells, tmp_path, device="cpu", repeats=1, warmup=0)
    assert fakes.runs == [] and len(again) == len(cells), "a finished sweep measures nothing"
    other = run_sweep(cells[:1], tmp_path, device="cpu", repeats=2, warmup=0)
    assert len(fakes.runs) == 2 and len(other) == len(cells) + 1, "other repeat settings: another cell"


def test_reference_is_computed_once_per_cell_and_scheme(tmp_path, fakes):
    cells = make_grid(["fake-a", "fake-b", "fake-rev"], TINY, [2, 4])
    table = run_sweep(cells, tmp_path, device="cpu", repeats=1, warmup=0)
    assert sorted(fakes.references) == [("reversible", 8, 2), ("reversible", 8, 4),
                                        ("rk4-discrete", 8, 2), ("rk4-discrete", 8, 4)]
    assert table["grad_err_params"].tolist() == pytest.approx([0.001 / 1.001] * 6)
    assert table["grad_err_y0"].tolist() == pytest.approx([0.001 / 1.001] * 6)


# ----------------------------------------------------------------------------- failures are rows


def test_out_of_memory_is_a_row_and_the_sweep_goes_on(tmp_path, fakes, monkeypatch):
    def oom(workload, steps):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    def oom_as_runtime_error(workload, steps):
        raise RuntimeError("CUDA error: out of memory")

    fakes.add("fake-oom", oom)
    fakes.add("fake-oom-rt", oom_as_runtime_error)
    freed = []
    real_free = sweep.free_memory
    monkeypatch.setattr(sweep, "free_memory", lambda: (freed.append(1), real_free()))
    table = run_sweep(make_grid(["fake-oom", "fake-a", "fake-oom-rt"], TINY, [2]), tmp_path, device="cpu",
                      repeats=1, warmup=0)
    assert dict(zip(table["competitor"], table["status"])) == {"fake-oom": "oom", "fake-a": "ok",
                                                               "fake-oom-rt": "oom"}
    oom_row = table[table["competitor"] == "fake-oom"].iloc[0]
    assert oom_row["message"] == "CUDA out of memory. Tried to allocate 80.00 GiB"
    assert math.isnan(oom_row["time_ms_median"]) and math.isnan(oom_row["grad_err_params"])
    assert len(freed) >= 2, "memory is freed after each out-of-memory cell"


def test_other_errors_are_rows_with_the_message(tmp_path, fakes, caplog):
    def broken(workload, steps):
        raise ValueError("shapes do not match")

    fakes.add("fake-broken", broken)
    with caplog.at_level(logging.ERROR, logger="rampde.bench.sweep"):
        table = run_sweep(make_grid(["fake-broken", "fake-a"], TINY, [2]), tmp_path, device="cpu", repeats=1,
                          warmup=0)
    assert table["status"].tolist() == ["error", "ok"]
    assert table["message"][0] == "ValueError: shapes do not match"
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and "fake-broken" in logged[0].getMessage(), "the traceback is logged"

    fakes.runs.clear()
    run_sweep(make_grid(["fake-broken", "fake-a"], TINY, [2]), tmp_path, device="cpu", repeats=1, warmup=0)
    assert fakes.runs == [], "error cells are finished cells..."
    run_sweep(make_grid(["fake-broken", "fake-a"], TINY, [2]), tmp_path, device="cpu", repeats=1, warmup=0,
              retry_errors=True)
    assert fakes.runs == ["fake-broken"], "...unless retried"


def test_a_cell_that_breaks_the_device_is_stored_and_the_sweep_stops(tmp_path, fakes, monkeypatch):
    """After an illegal memory access every later CUDA call fails: the cell is an error row, the
    process stops, and a rerun (a fresh process, a working device) resumes after that cell."""
    lost, freed = [], []

    def crash(workload, steps):
        lost.append(len(freed))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    fakes.add("fake-crash", crash)
    monkeypatch.setattr(sweep.measure, "device_fault",
                        lambda device: "CUDA error: an illegal memory access was encountered" if lost else "")
    monkeypatch.setattr(sweep, "free_memory", lambda: freed.append(1))
    grid = make_grid(["fake-a", "fake-crash", "fake-b"], TINY, [2])
    with pytest.raises(sweep.DeviceLost, match=r"unusable after fake-crash.*1 cell\(s\) after it are left"):
        run_sweep(grid, tmp_path, device="cpu", repeats=1, warmup=0)
    stored = read_results(tmp_path / "results.csv")
    assert dict(zip(stored["competitor"], stored["status"])) == {"fake-a": "ok", "fake-crash": "error"}
    assert len(freed) == lost[0], "nothing more is asked of a lost device"

    lost.clear()  # a fresh process
    fakes.runs.clear()
    table = run_sweep(grid, tmp_path, device="cpu", repeats=1, warmup=0)
    assert fakes.runs == ["fake-b"]
    assert dict(zip(table["competitor"], table["status"])) == {"fake-a": "ok", "fake-crash": "error", "fake-b": "ok"}


def test_a_workload_that_cannot_be_built(tmp_path, fakes, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("no such device")

    monkeypatch.setattr(sweep, "build_workload", refuse)
    table = run_sweep([Cell("fake-a", "mlp", 8, 8, 2)], tmp_path, device="cpu", repeats=1, warmup=0)
    assert table["status"].tolist() == ["error"] and "no such device" in table["message"][0]


def test_nonfinite_gradients(tmp_path, fakes):
    def nan_grads(workload, steps):
        out = _ones(workload)
        return RunOutput(out.loss, out.grad_y0 * math.nan, out.grad_params, {})

    fakes.add("fake-nan", nan_grads)
    table = run_sweep(make_grid(["fake-nan"], TINY, [2]), tmp_path, device="cpu", repeats=2, warmup=0)
    row = table.iloc[0]
    assert row["status"] == "nonfinite" and "not finite" in row["message"]
    assert row["time_ms_median"] > 0, "the time is kept"
    assert math.isnan(row["grad_err_params"])


def test_failed_reference_leaves_errors_empty_with_a_note(tmp_path, fakes, monkeypatch):
    def no_reference(competitor, workload, steps):
        fakes.references.append(1)
        raise torch.OutOfMemoryError("out of memory in fp64")

    monkeypatch.setattr(sweep, "reference_run", no_reference)
    table = run_sweep(make_grid(["fake-a", "fake-b"], TINY, [2]), tmp_path, device="cpu", repeats=1, warmup=0)
    assert table["status"].tolist() == ["ok", "ok"] and table["grad_err_params"].isna().all()
    assert table["message"][0] == "no gradient error: the fp64 reference failed (out of memory)"
    assert fakes.references == [1], "a failed reference is not tried again for the same cell"


def test_bad_settings():
    with pytest.raises(ValueError, match="repeats >= 1"):
        run_sweep([], "unused", device="cpu", repeats=0)
    with pytest.raises(ValueError, match="not a torch device"):
        run_sweep([], "unused", device="tpu7")


def test_free_memory_releases_the_graph_pools_before_emptying_the_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(sweep, "release_graph_pools", lambda: calls.append("release"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    sweep.free_memory()
    assert calls == ["release", "empty_cache"], "a pool still held keeps its memory through empty_cache"
