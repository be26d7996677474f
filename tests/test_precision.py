"""Mixed precision on the CPU: accuracy against fp64, against the naive autocast recipe, and hygiene.

Figures measured on the CPU with torch 2.13.0 for the case below (MLP width 64, batch 64, rk4,
32 steps, loss mean(y(T)^2), parameter-gradient error against fp64 backprop through torchdiffeq):
naive bf16 autocast 3.8e-2, naive bf16 without the weight cache 1.7e-3, rampde bf16 1.7e-3 (1.8e-3
with bf16 stored states), rampde fp16 2.2e-4, naive fp16 without loss scaling 3.8e-3.
The bounds below leave about 2x headroom over those figures.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchdiffeq

import rampde
from helpers import MLPField, flat, rel_err

WIDTH, BATCH, STEPS = 64, 64, 32
BF16_PARAM_BOUND = 4e-3
FP16_PARAM_BOUND = 5e-4


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    field = MLPField(WIDTH)
    y0 = torch.randn(BATCH, WIDTH)
    t = torch.linspace(0, 1, STEPS + 1)
    ref_field = copy.deepcopy(field).double()
    ref = _grads(torchdiffeq.odeint, ref_field, y0.double(), t.double())
    return field, y0, t, ref


def _grads(solver, field, y0, t, autocast=None, **kwargs):
    y0 = y0.clone().requires_grad_()
    with torch.autocast("cpu", **autocast) if autocast else torch.autocast("cpu", enabled=False):
        sol = solver(field, y0, t, method="rk4", **kwargs)
    loss = sol[-1].float().pow(2).mean() if sol.dtype != torch.float64 else sol[-1].pow(2).mean()
    grads = torch.autograd.grad(loss, [y0, *field.parameters()])
    return {"sol": sol.detach(), "y0": grads[0], "params": flat(grads[1:])}


def test_fp32_matches_fp64_reference(case):
    field, y0, t, ref = case
    out = _grads(rampde.odeint, field, y0, t)
    assert out["sol"].dtype == torch.float32
    assert rel_err(out["params"], ref["params"]) < 1e-5
    assert rel_err(out["y0"], ref["y0"]) < 1e-5


@pytest.mark.parametrize("storage", ["states", "activations"])
def test_bf16_beats_the_naive_recipe(case, storage):
    field, y0, t, ref = case
    ours = _grads(rampde.odeint, field, y0, t, autocast={"dtype": torch.bfloat16}, options={"storage": storage})
    naive = _grads(torchdiffeq.odeint, field, y0, t, autocast={"dtype": torch.bfloat16})
    ours_err = rel_err(ours["params"], ref["params"])
    naive_err = rel_err(naive["params"], ref["params"])
    assert ours["sol"].dtype == torch.float32, "the state is accumulated in fp32"
    assert ours_err < BF16_PARAM_BOUND
    assert rel_err(ours["y0"], ref["y0"]) < BF16_PARAM_BOUND
    assert naive_err > 5 * ours_err, (ours_err, naive_err)


def test_bf16_stored_states_option(case):
    field, y0, t, ref = case
    low = _grads(rampde.odeint, field, y0, t, autocast={"dtype": torch.bfloat16}, options={"state_dtype": "low"})
    assert rel_err(low["params"], ref["params"]) < BF16_PARAM_BOUND


@pytest.mark.parametrize("storage", ["states", "activations"])
def test_fp16_with_adjoint_scaling_is_accurate(case, storage):
    field, y0, t, ref = case
    scaler = rampde.DynamicScaler()
    ours = _grads(
        rampde.odeint, field, y0, t, autocast={"dtype": torch.float16}, loss_scaler=scaler, options={"storage": storage}
    )
    assert rel_err(ours["params"], ref["params"]) < FP16_PARAM_BOUND
    assert rel_err(ours["y0"], ref["y0"]) < FP16_PARAM_BOUND
    assert scaler.stats()["solves"] == 1


def test_field_runs_in_low_precision_and_state_in_fp32(mlp_field):
    field = mlp_field(8, torch.float32)
    seen = []

    def spy(t, y):
        out = field(t, y)
        seen.append((y.dtype, out.dtype))
        return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = rampde.odeint(spy, torch.randn(2, 8), torch.linspace(0, 1, 3), params=tuple(field.parameters()))
    assert sol.dtype == torch.float32
    assert seen and all(s == (torch.float32, torch.bfloat16) for s in seen)


def test_parameters_are_neither_mutated_nor_swapped(mlp_field):
    field = mlp_field(8, torch.float32)
    before = {n: (p, p.detach().clone(), p.data_ptr()) for n, p in field.named_parameters()}
    y0 = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        sol = rampde.odeint(field, y0, torch.linspace(0, 1, 5))
    sol[-1].pow(2).mean().backward()
    for name, p in field.named_parameters():
        obj, value, ptr = before[name]
        assert p is obj and p.dtype == torch.float32 and p.data_ptr() == ptr
        assert torch.equal(p.detach(), value)
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_autocast_weight_cache_is_left_clean(mlp_field):
    """Code after the solve in the same autocast region still gets weight gradients."""
    field = mlp_field(8, torch.float32)
    y = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rampde.odeint(field, y, torch.linspace(0, 1, 3))
        direct = field(torch.tensor(0.0), y).float().sum()
    grads = torch.autograd.grad(direct, list(field.parameters()), allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_only_the_trajectory_is_kept_for_the_backward(mlp_field):
    """No graph across steps: the saved tensors are the grid, the solution itself and the parameters."""
    field = mlp_field(8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = rampde.odeint(field, torch.randn(4, 8, requires_grad=True), torch.linspace(0, 1, 9))
    assert "DiscreteAdjointSolve" in sol.grad_fn.name()
    saved = sol.grad_fn.saved_tensors
    assert len(saved) == 2 + len(list(field.parameters()))
    assert saved[1].data_ptr() == sol.data_ptr() and saved[1].shape == (9, 4, 8)


def test_low_stored_states_halve_the_saved_trajectory(mlp_field):
    field = mlp_field(8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = rampde.odeint(
            field, torch.randn(4, 8, requires_grad=True), torch.tensor([0.0, 1.0]),
            options={"step_size": 0.125, "state_dtype": "low"},
        )
    node = _solve_node(sol.grad_fn)
    grid, stored = node.saved_tensors[:2]
    assert grid.shape == (9,) and stored.dtype == torch.bfloat16 and stored.shape == (9, 4, 8)


def _solve_node(node):
    """The solver's autograd node below the interpolation of the outputs (breadth-first)."""
    queue = [node]
    while queue:
        node = queue.pop(0)
        if "DiscreteAdjointSolve" in node.name():
            return node
        queue.extend(n for n, _ in node.next_functions if n is not None)
    raise AssertionError("no DiscreteAdjointSolve node in the graph")


def test_float64_state_under_autocast_accumulates_in_float64(mlp_field):
    field = mlp_field(8, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = rampde.odeint(field, torch.randn(2, 8, dtype=torch.float64), torch.linspace(0, 1, 3, dtype=torch.float64))
    assert sol.dtype == torch.float64


@pytest.mark.parametrize("storage, backward_calls", [("states", 4 * 3), ("activations", 0)])
def test_activations_storage_skips_the_recomputation(mlp_field, storage, backward_calls):
    """rk4 over 3 steps: 12 evaluations forward; the backward recomputes them only with "states"."""
    field = mlp_field(8, torch.float32)
    calls = []

    def counted(t, y):
        calls.append(torch.is_grad_enabled())
        return field(t, y)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = rampde.odeint(counted, torch.randn(2, 8), torch.linspace(0, 1, 4),
                            params=tuple(field.parameters()), options={"storage": storage})
    assert len(calls) == 12
    sol[-1].sum().backward()
    assert len(calls) == 12 + backward_calls


def test_activations_storage_keeps_no_graph_without_grad(mlp_field):
    """Under no_grad (evaluation) the fast mode evaluates like the lean one and keeps nothing."""
    field = mlp_field(8, torch.float32)
    calls = []

    def counted(t, y):
        calls.append(torch.is_grad_enabled())
        return field(t, y)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rampde.odeint(counted, torch.randn(2, 8), torch.linspace(0, 1, 4), params=tuple(field.parameters()),
                      options={"storage": "activations"})
    assert len(calls) == 12 and not any(calls)
