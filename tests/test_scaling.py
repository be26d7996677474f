"""fp16 adjoint scaling: the scale rule, overflow detection and retry, and clear failures."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

import rampde
from helpers import StiffLinear, flat, rel_err


def test_step_scale_is_a_power_of_two_aimed_at_the_target():
    scaler = rampde.DynamicScaler(target_log2=8)
    adjoint = torch.tensor([3.0e-7, -2.5e-5, 1.0e-6])
    h = torch.tensor(0.01)
    scale, inv = scaler.step_scale(adjoint, h)
    exponent = math.log2(scale.item())
    assert exponent == int(exponent) and inv.item() == 2.0 ** -exponent
    scaled_max = 2.5e-5 * 0.01 * scale.item()
    assert 2.0**7 <= scaled_max <= 2.0**8


def test_step_scale_of_a_zero_adjoint_is_finite():
    scale, inv = rampde.DynamicScaler().step_scale(torch.zeros(4), torch.tensor(0.1))
    assert torch.isfinite(scale) and torch.isfinite(inv) and scale.item() > 0


def test_backoff_and_growth():
    scaler = rampde.DynamicScaler(target_log2=8, backoff_log2=4, growth_interval=3, max_target_log2=9)
    scaler.record(overflowed=True)
    assert scaler.target_log2 == 4 and scaler.retries == 1
    for _ in range(3):
        scaler.record(overflowed=False)
    assert scaler.target_log2 == 5 and scaler.solves == 3
    for _ in range(12):
        scaler.record(overflowed=False)
    assert scaler.target_log2 == 9, "growth stops at max_target_log2"
    state = scaler.state_dict()
    other = rampde.DynamicScaler()
    other.load_state_dict(state)
    assert other.stats() == scaler.stats()


@pytest.mark.parametrize(
    "kwargs, name",
    [({"target_log2": 30}, "target_log2"), ({"backoff_log2": 0}, "backoff_log2"),
     ({"growth_interval": 0}, "growth_interval"), ({"max_retries": -1}, "max_retries")],
)
def test_bad_scaler_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rampde.DynamicScaler(**kwargs)


def _solve_grads(field, y0, t, autocast_dtype, **kwargs):
    y0 = y0.clone().requires_grad_()
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        sol = rampde.odeint(field, y0, t, method="rk4", **kwargs)
    loss = sol[-1].double().pow(2).sum()
    return torch.autograd.grad(loss, [y0, *field.parameters()])


@pytest.mark.parametrize("options", [{"storage": "states"}, {"storage": "activations"}, {"cuda_graph": True}],
                         ids=["states", "activations", "cuda_graph"])
def test_overflow_is_detected_and_redone_with_a_lower_scale(options):
    field = StiffLinear()
    y0 = torch.randn(8, 16) * 0.01
    t = torch.linspace(0, 0.004, 3)
    ref = _solve_grads(copy.deepcopy(field).double(), y0.double(), t.double(), None)

    scaler = rampde.DynamicScaler(target_log2=14)
    grads = _solve_grads(field, y0, t, torch.float16, loss_scaler=scaler, options=options)
    assert scaler.retries >= 1, "the first backward at 2**14 must overflow in fp16"
    assert all(torch.isfinite(g).all() for g in grads)
    assert rel_err(flat(grads), flat(ref)) < 1e-2

    # The scaler keeps its lower target: the next solve needs no retry.
    retries = scaler.retries
    _solve_grads(field, y0, t, torch.float16, loss_scaler=scaler, options=options)
    assert scaler.retries == retries and scaler.solves == 2


class _SqrtField(torch.nn.Module):
    """d sqrt(y)/dy is infinite at 0: a backward that no scale can save."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, t, y):
        return torch.sqrt(y.abs()) * self.w


def test_unsalvageable_fp16_backward_raises_instead_of_returning_nan():
    scaler = rampde.DynamicScaler(max_retries=3)
    with pytest.raises(FloatingPointError, match="fp16 adjoint still overflowed"):
        _solve_grads(_SqrtField(), torch.zeros(2, 4), torch.linspace(0, 1, 3), torch.float16, loss_scaler=scaler)
    assert scaler.retries == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, None], ids=["bf16", "fp32"])
def test_non_finite_gradients_without_scaling_raise(dtype):
    with pytest.raises(FloatingPointError, match="non-finite gradients"):
        _solve_grads(_SqrtField(), torch.zeros(2, 4), torch.linspace(0, 1, 3), dtype)


def test_non_finite_forward_is_reported_as_such():
    field = lambda t, y: y * 1e30  # noqa: E731  overflows fp32 within a few steps
    y0 = torch.ones(3, requires_grad=True)
    sol = rampde.odeint(field, y0, torch.linspace(0, 1, 5), params=())
    with pytest.raises(FloatingPointError, match="non-finite states"):
        sol[-1].sum().backward()


def test_non_finite_incoming_gradient_is_passed_on_and_logged(caplog):
    """An upstream GradScaler must see the inf/NaN and skip its step: no retry, no error."""
    field = StiffLinear()
    y0 = torch.randn(2, 16, requires_grad=True) * 0.01
    with torch.autocast("cpu", dtype=torch.float16):
        sol = rampde.odeint(field, y0, torch.linspace(0, 0.004, 3), loss_scaler=rampde.DynamicScaler())
    with caplog.at_level(logging.INFO, logger="rampde"):
        (sol[-1].float().sum() * float("inf")).backward()
    assert not torch.isfinite(field.lin.weight.grad).all()
    assert "incoming gradient is not finite" in caplog.text
