"""``torch.autograd.gradcheck`` of the discrete adjoint on small fp64 problems."""

from __future__ import annotations

import pytest
import torch

import rampde

torch.manual_seed(0)
W = torch.randn(3, 3, dtype=torch.float64) * 0.5


def _field(w, b):
    def field(t, y):
        return torch.tanh(y @ w + b * torch.sin(2 * t))

    return field


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun3", "rk4", "rk4_classic"])
def test_gradcheck_tensor_state_params_and_t(method):
    def solve(y0, t, w, b):
        return rampde.odeint(_field(w, b), y0, t, method=method, params=(w, b))

    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.2, 0.5, 0.6], dtype=torch.float64, requires_grad=True)
    w = W.clone().requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(solve, (y0, t, w, b))


def test_gradcheck_tuple_state():
    def solve(x0, v0, t, w):
        def field(t, state):
            x, v = state
            return v, -torch.tanh(x @ w) * (1 + t)

        x, v = rampde.odeint(field, (x0, v0), t, method="rk4", params=(w,))
        return x, v

    x0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    v0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 0.8, 4, dtype=torch.float64, requires_grad=True)
    w = W.clone().requires_grad_()
    assert torch.autograd.gradcheck(solve, (x0, v0, t, w))


@pytest.mark.parametrize("storage", ["states", "activations"])
@pytest.mark.parametrize("times", [[0.0, 0.5, 1.0], [1.0, 0.25, 0.0]], ids=["forward", "reversed"])
def test_gradcheck_step_size_with_interpolated_outputs(times, storage):
    def solve(y0, t, w):
        options = {"step_size": 0.3, "storage": storage}
        return rampde.odeint(_field(w, 0.1), y0, t, method="rk4", options=options, params=(w,))

    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(times, dtype=torch.float64, requires_grad=True)
    w = W.clone().requires_grad_()
    assert torch.autograd.gradcheck(solve, (y0, t, w))


def test_gradcheck_module_field(mlp_field):
    field = mlp_field(4)

    def solve(y0, t, *params):
        return rampde.odeint(field, y0, t, method="rk4")

    y0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(solve, (y0, t, *field.parameters()))
