"""fp64: rampde's trajectories and gradients equal torchdiffeq's (backprop through its solver)."""

from __future__ import annotations

import pytest
import torch
import torchdiffeq

import rampde
from helpers import rel_err

SHARED_METHODS = ["euler", "midpoint", "heun2", "heun3", "rk4"]
TRAJ_TOL = 1e-12
GRAD_TOL = 1e-10


def _grads(solver, field, y0, t, **kwargs):
    """Loss touching every output time, so that every output's cotangent matters."""
    sol = solver(field, y0, t, **kwargs)
    weights = torch.linspace(0.5, 1.5, sol.shape[0], dtype=sol.dtype)
    loss = (weights.view(-1, *[1] * (sol.ndim - 1)) * sol.pow(2)).sum()
    return sol, torch.autograd.grad(loss, [y0, t, *field.parameters()])


def _compare(field, y0, t, storage="states", **kwargs):
    sol_ref, g_ref = _grads(torchdiffeq.odeint, field, y0, t, **kwargs)
    options = {**kwargs.pop("options", {}), "storage": storage}
    sol, g = _grads(rampde.odeint, field, y0, t, options=options, **kwargs)
    assert sol.dtype == torch.float64 and sol.shape == sol_ref.shape
    assert rel_err(sol, sol_ref) < TRAJ_TOL
    names = ["y0", "t", *[n for n, _ in field.named_parameters()]]
    for name, a, b in zip(names, g, g_ref):
        assert rel_err(a, b) < GRAD_TOL, f"gradient of {name}"


@pytest.mark.parametrize("storage", ["states", "activations"])
@pytest.mark.parametrize("method", SHARED_METHODS)
def test_matches_torchdiffeq_on_the_output_grid(method, storage, mlp_field):
    field = mlp_field(8)
    y0 = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.1, 0.35, 0.6, 1.0], dtype=torch.float64, requires_grad=True)
    _compare(field, y0, t, storage, method=method)


@pytest.mark.parametrize("method", ["euler", "rk4"])
@pytest.mark.parametrize(
    "times", [[0.0, 1.0], [0.0, 0.45, 1.0], [1.0, 0.45, 0.0], [0.0, 0.3, 0.6, 0.9]], ids=["ends", "interior", "reversed", "on-grid"]
)
def test_matches_torchdiffeq_with_step_size(method, times, mlp_field):
    """step_size: a uniform grid from t[0], last point clamped to t[-1], outputs interpolated."""
    field = mlp_field(8)
    y0 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(times, dtype=torch.float64, requires_grad=True)
    _compare(field, y0, t, method=method, options={"step_size": 0.3})


def test_a_torchdiffeq_call_with_tolerances_runs_unchanged(mlp_field):
    """The same keyword arguments as a torchdiffeq call: fixed-grid methods use no tolerance, there
    and here, so rtol and atol (numbers or per-component tensors) change nothing."""
    field = mlp_field(8)
    y0 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64, requires_grad=True)
    _compare(field, y0, t, method="rk4", rtol=1e-3, atol=torch.full((8,), 1e-6, dtype=torch.float64),
             options={"step_size": 0.25})
    plain = rampde.odeint(field, y0, t, method="rk4")
    assert torch.equal(rampde.odeint(field, y0, t, rtol=1e-9, atol=1e-12, method="rk4", event_fn=None), plain)


def test_decreasing_times_match(mlp_field):
    field = mlp_field(8)
    y0 = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(1.0, -0.5, 7, dtype=torch.float64, requires_grad=True)
    _compare(field, y0, t, method="rk4")


def test_tuple_state_matches_torchdiffeq():
    torch.manual_seed(1)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def field(t, state):
        x, v = state
        return v, torch.tanh(x @ w) * torch.cos(t)

    x0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    v0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 6, dtype=torch.float64, requires_grad=True)
    ref = torchdiffeq.odeint(field, (x0, v0), t, method="rk4")
    out = rampde.odeint(field, (x0, v0), t, method="rk4", params=(w,))
    assert isinstance(out, tuple) and len(out) == 2
    for a, b in zip(out, ref):
        assert a.shape == b.shape == (6, 2, 3)
        assert rel_err(a, b) < TRAJ_TOL
    loss_ref = ref[0][-1].pow(2).sum() + ref[1].sin().sum()
    loss = out[0][-1].pow(2).sum() + out[1].sin().sum()
    for a, b in zip(torch.autograd.grad(loss, [x0, v0, t, w]), torch.autograd.grad(loss_ref, [x0, v0, t, w])):
        assert rel_err(a, b) < GRAD_TOL


def test_rk4_is_the_three_eighths_rule_and_rk4_classic_is_fourth_order():
    """On y' = cos(t) y: the 3/8 rule matches torchdiffeq's rk4; the classic one differs and has order 4."""
    field = lambda t, y: torch.cos(t) * y  # noqa: E731
    y0 = torch.ones(1, dtype=torch.float64)
    errors = []
    for steps in (4, 8):
        t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        classic = rampde.odeint(field, y0, t, method="rk4_classic", params=())[-1]
        errors.append(abs(classic.item() - torch.e ** torch.sin(torch.tensor(1.0, dtype=torch.float64)).item()))
        three_eighths = rampde.odeint(field, y0, t, method="rk4", params=())[-1]
        assert three_eighths.item() == pytest.approx(torchdiffeq.odeint(field, y0, t, method="rk4")[-1].item(), rel=1e-14)
        assert three_eighths.item() != pytest.approx(classic.item(), rel=1e-12)
    assert errors[0] / errors[1] == pytest.approx(16, rel=0.1)
