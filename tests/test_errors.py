"""Every bad input gets a clear error that names the argument."""

from __future__ import annotations

import pytest
import torch

import rampde

T = torch.linspace(0, 1, 3)


def field(t, y):
    return -y


def test_func_not_callable():
    with pytest.raises(TypeError, match="func must be callable"):
        rampde.odeint(42, torch.ones(2), T, params=())


def test_plain_callable_needs_params():
    with pytest.raises(TypeError, match="params is required"):
        rampde.odeint(field, torch.ones(2), T)


def test_params_must_hold_tensors():
    with pytest.raises(TypeError, match=r"params\[1\] must be a tensor"):
        rampde.odeint(field, torch.ones(2), T, params=(torch.ones(1), "w"))
    with pytest.raises(TypeError, match="params must be an iterable"):
        rampde.odeint(field, torch.ones(2), T, params=3)


@pytest.mark.parametrize(
    "y0, match",
    [
        (torch.ones(2, dtype=torch.int64), "y0 must be a floating-point tensor"),
        ((torch.ones(2), torch.ones(2, dtype=torch.int32)), r"y0\[1\] must be a floating-point tensor"),
        ((), "y0 must be a floating tensor or a non-empty tuple"),
        ([1.0, 2.0], r"y0\[0\] must be a tensor"),
        ("y", "y0 must be a floating tensor"),
    ],
)
def test_bad_y0(y0, match):
    with pytest.raises(TypeError, match=match):
        rampde.odeint(field, y0, T, params=())


def test_mixed_device_y0():
    meta = torch.ones(2, device="meta")
    with pytest.raises(ValueError, match="y0's tensors must all be on one device"):
        rampde.odeint(field, (torch.ones(2), meta), T, params=())


@pytest.mark.parametrize(
    "t, error, match",
    [
        ([0.0, 1.0], TypeError, "t must be a 1-D floating tensor"),
        (torch.zeros(2, 2), ValueError, "t must be 1-D"),
        (torch.tensor([0.0]), ValueError, "at least 2 times"),
        (torch.tensor([0, 1]), TypeError, "t must be a floating-point tensor"),
        (torch.tensor([0.0, 0.5, 0.5, 1.0]), ValueError, "strictly increasing or strictly decreasing"),
        (torch.tensor([0.0, 0.7, 0.2]), ValueError, "strictly increasing or strictly decreasing"),
        (torch.tensor([0.0, float("nan")]), ValueError, "t must hold finite times"),
    ],
)
def test_bad_t(t, error, match):
    with pytest.raises(error, match=match):
        rampde.odeint(field, torch.ones(2), t, params=())


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method='rk45'.*euler.*rk4_classic"):
        rampde.odeint(field, torch.ones(2), T, method="rk45", params=())


@pytest.mark.parametrize("method", ["dopri5", "adaptive_heun", "implicit_adams"])
def test_adaptive_or_implicit_method_is_refused_with_the_reason(method):
    with pytest.raises(ValueError, match=rf"method='{method}' is .*not supported.*fixed-grid explicit"):
        rampde.odeint(field, torch.ones(2), T, method=method, params=())


def test_method_must_be_a_string():
    with pytest.raises(TypeError, match="method must be a string"):
        rampde.odeint(field, torch.ones(2), T, method=4, params=())


def test_method_none_is_torchdiffeqs_adaptive_default():
    with pytest.raises(ValueError, match=r"method=None means torchdiffeq's default, dopri5.*'rk4'"):
        rampde.odeint(field, torch.ones(2), T, method=None, params=())


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value, error, match", [
    ("tight", TypeError, "must be a non-negative number or floating tensor, got str"),
    (True, TypeError, "must be a non-negative number or floating tensor, got bool"),
    (-1e-3, ValueError, "must be non-negative, got -0.001"),
    (float("nan"), ValueError, "must be non-negative, got nan"),
    (torch.tensor([1e-3, -1.0]), ValueError, "must be non-negative"),
    (torch.tensor([1e-3, float("nan")]), ValueError, "must be non-negative"),
    (torch.tensor([1, 2]), TypeError, "must be a non-negative number or floating tensor, got a torch.int64 tensor"),
])
def test_bad_tolerances(name, value, error, match):
    with pytest.raises(error, match=rf"{name} {match}"):
        rampde.odeint(field, torch.ones(2), T, params=(), **{name: value})


def test_event_fn_is_refused():
    with pytest.raises(ValueError, match="event_fn is not supported: rampde steps on the fixed grid"):
        rampde.odeint(field, torch.ones(2), T, params=(), event_fn=lambda t, y: y.sum())


def test_func_returning_the_wrong_shape():
    with pytest.raises(ValueError, match=r"func returned shape \(3,\) for the state, expected \(2,\)"):
        rampde.odeint(lambda t, y: torch.ones(3), torch.ones(2), T, params=())


def test_func_returning_the_wrong_dtype():
    with pytest.raises(TypeError, match="func returned dtype torch.float64"):
        rampde.odeint(lambda t, y: y.double(), torch.ones(2), T, params=())
    with pytest.raises(TypeError, match="func must return a tensor"):
        rampde.odeint(lambda t, y: 1.0, torch.ones(2), T, params=())


def test_tuple_func_returning_the_wrong_structure():
    with pytest.raises(TypeError, match="tuple of 2 tensors"):
        rampde.odeint(lambda t, s: s[0], (torch.ones(2), torch.ones(3)), T, params=())
    with pytest.raises(ValueError, match=r"for y\[1\]"):
        rampde.odeint(lambda t, s: (s[0], s[0]), (torch.ones(2), torch.ones(3)), T, params=())


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"rtol": 1e-3}, ValueError, r"unsupported key\(s\) \['rtol'\]"),
        ({"step_size": 0.1, "perturb": True}, ValueError, r"unsupported key\(s\) \['perturb'\]"),
        ([("step_size", 0.1)], TypeError, "options must be a dict"),
        ({"step_size": -0.1}, ValueError, r"options\['step_size'\] must be positive"),
        ({"step_size": "0.1"}, TypeError, r"options\['step_size'\] must be a positive number"),
        ({"state_dtype": "half-ish"}, ValueError, r"options\['state_dtype'\]"),
        ({"storage": "graph"}, ValueError, r"options\['storage'\] must be one of"),
        ({"storage": "activations", "state_dtype": "low"}, ValueError, r"applies to storage='states' only"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        rampde.odeint(field, torch.ones(2), T, options=options, params=())


def test_bad_loss_scaler():
    with pytest.raises(TypeError, match="loss_scaler must be a rampde.DynamicScaler"):
        rampde.odeint(field, torch.ones(2), T, params=(), loss_scaler=2.0**16)


def test_parameterless_callable_with_empty_params_works():
    sol = rampde.odeint(field, torch.ones(2), T, params=())
    assert torch.allclose(sol[-1], torch.exp(torch.tensor(-1.0)) * torch.ones(2), rtol=1e-3)
