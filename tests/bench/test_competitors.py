"""The competitor registry: every competitor runs, agrees with its fp64 reference, and the
checkpointing and reversible schemes do what their memory models say.

Figures measured on the CPU (torch 2.13.0; width 8, batch 8, 4 steps; parameter-gradient error
against the fp64 reference of the same scheme): fp32 competitors 1e-7 to 2e-7; fp16 ones 2e-4 to
6.4e-4 (naive autocast-fp16: up to 9.2e-3 on conv's y0 gradient); bf16 ones 2e-3 to 6.1e-3 (naive
autocast-bf16: 7.3e-3 on cnf).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rampde.bench.competitors import get_competitor, list_competitors, reference_run, tf32
from rampde.bench.reversible import reversible_solve
from rampde.bench.revolve import binomial_advances, forward_snapshots, optimal_advances, revolve_solve
from rampde.bench.workloads import WORKLOADS, build_workload

STEPS = 4
FP32_BOUND = 1e-5
LOW_BOUND = {"fp16": 5e-3, "bf16": 2e-2}
NAIVE_BOUND = 5e-2  # the naive recipe is poor by design: measured up to 9.2e-3 (fp16 y0 gradient, conv)
NAMES = [c.name for c in list_competitors()]


def _rel(a, b):
    a = torch.cat([x.reshape(-1).double() for x in a])
    b = torch.cat([x.reshape(-1).double() for x in b])
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def cells():
    """Every workload at a tiny size, with the fp64 reference of each scheme, computed once."""
    out = {}
    for name in WORKLOADS:
        w = build_workload(name, width=8, batch=8)
        refs = {}
        for c in list_competitors():
            if c.scheme not in refs:
                refs[c.scheme] = reference_run(c, w, STEPS)
        out[name] = (w, refs)
    return out


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("name", NAMES)
def test_every_competitor_against_its_reference(name, workload, cells):
    w, refs = cells[workload]
    c = get_competitor(name)
    before = [p.detach().clone() for p in w.field.parameters()]
    out = c.run(w, STEPS)
    ref = refs[c.scheme]
    assert out.grad_y0.shape == w.y0.shape
    assert [g.shape for g in out.grad_params] == [p.shape for p in w.field.parameters()]
    assert all(torch.isfinite(g).all() for g in (out.grad_y0, *out.grad_params))
    if c.precision in ("fp32", "tf32"):
        bound = FP32_BOUND
    else:
        bound = NAIVE_BOUND if name in ("autocast-fp16", "autocast-bf16") else LOW_BOUND[c.precision]
    assert _rel(out.grad_params, ref.grad_params) < bound
    assert _rel([out.grad_y0], [ref.grad_y0]) < bound
    if c.precision in ("fp16", "bf16"):
        # and the 16-bit arithmetic really ran: its round-off shows
        assert _rel(out.grad_params, ref.grad_params) > 1e-5
    assert abs(out.loss.item() - ref.loss.item()) <= 10 * bound * abs(ref.loss.item())
    # the workload is left untouched: no .grad, same values
    assert all(p.grad is None and torch.equal(p, q) for p, q in zip(w.field.parameters(), before))


@pytest.mark.parametrize("name", ["checkpoint-step", "checkpoint-revolve", "rampde-fp32"])
def test_discrete_schemes_equal_backprop_through_torchdiffeq_in_fp64(name):
    w = build_workload("mlp", width=8, batch=8).to(torch.float64)
    ref = get_competitor("torchdiffeq-fp32").run(w, 6)
    out = get_competitor(name).run(w, 6)
    assert _rel(out.grad_params, ref.grad_params) < 1e-12
    assert _rel([out.grad_y0], [ref.grad_y0]) < 1e-12


def test_continuous_adjoint_is_close_to_the_discrete_gradient():
    """The continuous adjoint differs from the discrete one by the solver's error, O(h^4)."""
    w = build_workload("mlp", width=8, batch=8).to(torch.float64)
    discrete = get_competitor("torchdiffeq-fp32").run(w, 8)
    continuous = get_competitor("torchdiffeq-adjoint").run(w, 8)
    err = _rel(continuous.grad_params, discrete.grad_params)
    assert 0 < err < 1e-4


@pytest.mark.parametrize("dtype, bound", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_reversible_backward_rebuilds_the_forward_states(dtype, bound):
    w = build_workload("mlp", width=8, batch=8).to(dtype)
    trace = {}
    y0 = w.y0.clone().requires_grad_()
    y = reversible_solve(w.field, y0, w.time_grid(16), 0.999, trace=trace)
    y.pow(2).sum().backward()
    assert len(trace["forward"]) == len(trace["backward"]) == 17
    for a, b in zip(trace["forward"], trace["backward"]):
        assert float((a - b).norm() / a.norm()) < bound


@pytest.mark.parametrize("coupling", [0.999, 0.5])
def test_reversible_gradients_equal_backprop_through_the_same_scheme(coupling):
    """The O(1)-memory backward against plain autograd through the same steps, in fp64."""
    from rampde.bench.reversible import _reversible_step

    w = build_workload("mlp", width=8, batch=8).to(torch.float64)
    params = list(w.field.parameters())
    grid = w.time_grid(6)
    y0 = w.y0.clone().requires_grad_()
    y, z = y0, y0
    for i in range(6):
        y, z = _reversible_step(w.field, grid[i], grid[i + 1], y, z, coupling)
    expected = torch.autograd.grad(y.pow(2).sum(), [y0, *params])
    y0b = w.y0.clone().requires_grad_()
    got = torch.autograd.grad(reversible_solve(w.field, y0b, grid, coupling).pow(2).sum(), [y0b, *params])
    assert _rel(got, expected) < 1e-10


def test_reversible_scheme_is_consistent_with_the_ode():
    import torchdiffeq

    w = build_workload("mlp", width=8, batch=8).to(torch.float64)
    exact = torchdiffeq.odeint(w.field, w.y0, w.time_grid(64), method="rk4")[-1]
    y = reversible_solve(w.field, w.y0, w.time_grid(32), 0.999)
    assert float((y - exact).detach().norm() / exact.detach().norm()) < 1e-6


def test_reversible_rejects_a_bad_coupling():
    w = build_workload("mlp", width=8, batch=8)
    with pytest.raises(ValueError, match="coupling must lie in"):
        reversible_solve(w.field, w.y0, w.time_grid(2), 1.5)


@pytest.mark.parametrize("steps, snapshots", [(1, 1), (5, 0), (8, 1), (10, 2), (16, 3), (21, 4)])
def test_revolve_advances_are_optimal_and_snapshots_bounded(steps, snapshots):
    w = build_workload("mlp", width=8, batch=8)
    y0 = w.y0.clone().requires_grad_()
    y, stats = revolve_solve(w.field, y0, w.time_grid(steps), snapshots)
    y.pow(2).sum().backward()
    # the forward took the first snapshots of the schedule on its way: their advances are saved
    on_the_way = max(forward_snapshots(steps, snapshots), default=0)
    assert stats["advances"] + on_the_way == optimal_advances(steps, snapshots) == binomial_advances(steps, snapshots)
    assert stats["peak_snapshots"] <= snapshots
    assert stats["step_vjps"] == steps


def test_revolve_count_matches_griewanks_closed_form():
    for steps in range(1, 60):
        for snapshots in range(0, 7):
            assert optimal_advances(steps, snapshots) == binomial_advances(steps, snapshots), (steps, snapshots)
    # the textbook corner cases: no snapshot means quadratic work, enough snapshots means N-1
    assert optimal_advances(10, 0) == 45
    assert optimal_advances(10, 9) == 9


@pytest.mark.parametrize("start", [(False, False), (True, True), (False, True)])
def test_tf32_flags_are_restored_even_on_error(start):
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = start
    try:
        with pytest.raises(RuntimeError):
            with tf32(not start[0]):
                assert torch.backends.cuda.matmul.allow_tf32 is (not start[0])
                assert torch.backends.cudnn.allow_tf32 is (not start[0])
                raise RuntimeError("boom")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == start
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_unknown_competitor_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown competitor 'scipy'; known: torchdiffeq-fp32"):
        get_competitor("scipy")


def test_registry_has_every_competitor_of_the_design():
    expected = {
        "torchdiffeq-fp32", "torchdiffeq-tf32", "torchdiffeq-adjoint", "autocast-fp16", "autocast-bf16",
        "autocast-nocache-fp16", "autocast-nocache-bf16", "checkpoint-step", "checkpoint-revolve", "reversible",
        "rampde-fp32", "rampde-fp16", "rampde-bf16", "rampde-fp16-fast", "rampde-bf16-fast",
    }
    assert expected <= set(NAMES)
    for c in list_competitors():
        assert c.precision in {"fp32", "tf32", "fp16", "bf16"} and c.memory_model and c.description


def test_module_lists_every_competitor_with_its_memory_model():
    out = subprocess.run([sys.executable, "-m", "rampde.bench.competitors"], capture_output=True, text=True,
                         check=True, env={"COLUMNS": "200", "PATH": ""}).stdout
    for c in list_competitors():
        assert c.name in out
    assert "memory model" in out and "N*s*A" in out
