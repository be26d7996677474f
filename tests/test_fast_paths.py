"""The solver's fast paths, guarded against the per-use casts and the fp64 reference on the CPU.

- ``cast_weights="once"`` (default): Linear/Conv weights cast to 16-bit once per solve. With the
  default storage it must give bitwise the same solution and gradients as autocast's per-use
  casts (same 16-bit values, each stage's weight gradient added to the fp32 accumulator on its
  own); with ``storage="activations"`` it must equal the default storage, which the per-use path
  (autocast's cache, stage gradients summed in 16-bit) does not.
- Trajectories keep ``y0``'s memory layout (``channels_last`` for convolutions).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rampde
from helpers import assert_same, case, flat, rel_err, solve_grads

LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("dtype", LOW)
def test_cast_once_is_bitwise_the_per_use_cast(kind, dtype):
    field, y0 = case(kind)
    t = torch.linspace(0, 1, 6)
    once = solve_grads(field, y0, t, dtype)
    per_use = solve_grads(field, y0, t, dtype, cast_weights="per-use")
    assert_same(once, per_use)
    assert once["params"].abs().sum() > 0 and once["y0"].abs().sum() > 0


def test_cast_once_time_gradient_is_bitwise_the_per_use_cast():
    field, y0 = case("mlp")
    t = torch.linspace(0, 1, 5).requires_grad_()
    once = solve_grads(field, y0, t, torch.bfloat16)
    per_use = solve_grads(field, y0, t, torch.bfloat16, cast_weights="per-use")
    assert once["t"].abs().sum() > 0
    assert_same(once, per_use)


class _BilinearField(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = torch.nn.Linear(8, 8)
        self.mix = torch.nn.Bilinear(8, 8, 8)
        with torch.no_grad():
            self.mix.weight.mul_(0.1)  # a tame quadratic term over [0, 1]

    def forward(self, t, y):
        return torch.tanh(self.inner(y)) + self.mix(y, y)


@pytest.mark.parametrize("dtype", LOW)
def test_a_bilinear_layer_keeps_its_fp32_weights_under_cast_once(dtype):
    """Autocast runs bilinear in its inputs' widest dtype (CUDA) or leaves it alone (CPU): its
    weights are not cast once (that failed next to fp32 inputs), only the Linear's are, bitwise as
    the per-use casts."""
    field, y0 = _BilinearField(), torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0, 1, 5)
    once = solve_grads(field, y0, t, dtype)
    per_use = solve_grads(field, y0, t, dtype, cast_weights="per-use")
    assert_same(once, per_use)
    assert torch.isfinite(once["params"]).all() and once["params"].abs().sum() > 0


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("dtype", LOW)
def test_activations_storage_gives_the_default_storage_gradients(kind, dtype):
    field, y0 = case(kind)
    t = torch.linspace(0, 1, 6)
    fast = solve_grads(field, y0, t, dtype, storage="activations")
    lean = solve_grads(field, y0, t, dtype)
    assert_same(fast, lean)
    # Autocast's weight cache (the per-use path) sums a step's stage gradients in 16-bit first.
    cached = solve_grads(field, y0, t, dtype, storage="activations", cast_weights="per-use")
    assert not torch.equal(cached["params"], lean["params"])


@pytest.mark.parametrize("storage", ["states", "activations"])
def test_cast_once_accuracy_against_fp64(storage):
    field, y0 = case("mlp")
    t = torch.linspace(0, 1, 9)
    ref = solve_grads(copy.deepcopy(field).double(), y0.double(), t.double(), None)
    once = solve_grads(field, y0, t, torch.bfloat16, storage=storage)
    per_use = solve_grads(field, y0, t, torch.bfloat16, storage=storage, cast_weights="per-use")
    err_once = rel_err(once["params"], ref["params"])
    assert err_once < 1e-2
    assert err_once <= rel_err(per_use["params"], ref["params"]) * (1 + 1e-6)


class _WeightCasts(TorchDispatchMode):
    """Counts fp32 -> 16-bit copies of tensors shaped like the given weights."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes = {tuple(s) for s in shapes}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            src = args[0]
            if src.dtype == torch.float32 and kwargs.get("dtype") in LOW and tuple(src.shape) in self.shapes:
                self.count += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("storage", ["states", "activations"])
def test_cast_once_casts_each_weight_once_per_solve(storage):
    field, y0 = case("mlp")
    steps = 4
    t = torch.linspace(0, 1, steps + 1)
    shapes = [field.l1.weight.shape, field.l2.weight.shape]
    counts = {}
    for mode in ("once", "per-use"):
        with _WeightCasts(shapes) as casts:
            solve_grads(field, y0, t, torch.bfloat16, storage=storage, cast_weights=mode)
        counts[mode] = casts.count
    assert counts["once"] == len(shapes)
    if storage == "states":  # recomputing, autocast casts each weight at every stage
        assert counts["per-use"] >= len(shapes) * steps * 4
    else:  # keeping graphs, autocast's cache already shares one copy per solve
        assert counts["per-use"] == len(shapes)


def test_frozen_and_excluded_parameters():
    field, y0 = case("mlp")
    t = torch.linspace(0, 1, 5)
    field.l1.weight.requires_grad_(False)
    try:
        once = solve_grads(field, y0, t, torch.bfloat16)
        per_use = solve_grads(field, y0, t, torch.bfloat16, cast_weights="per-use")
        assert_same(once, per_use)
    finally:
        field.l1.weight.requires_grad_(True)
    # A Module with an explicit params= subset: only those get gradients; the others are still cast.
    y = y0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = rampde.odeint(field, y, t, params=[field.l2.weight])
    (g_w2,) = torch.autograd.grad(sol[-1].float().pow(2).mean(), [field.l2.weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = rampde.odeint(field, y, t, options={"cast_weights": "per-use"}, params=[field.l2.weight])
    (g_ref,) = torch.autograd.grad(sol[-1].float().pow(2).mean(), [field.l2.weight])
    assert torch.equal(g_w2, g_ref)


class _Tied(torch.nn.Module):
    """One Linear applied twice, and a second Linear sharing its weight."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, width, bias=False)
        self.b.weight = self.a.weight

    def forward(self, t, y):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(y)))))


def test_weights_used_several_times_per_evaluation():
    """Tied or reused weights work; their uses within one evaluation share one 16-bit copy, so those
    uses' gradients are summed in 16-bit before reaching fp32 (per-use casts keep them apart)."""
    torch.manual_seed(1)
    field, y0 = _Tied(8), torch.randn(4, 8)
    t = torch.linspace(0, 1, 5)
    ref = solve_grads(copy.deepcopy(field).double(), y0.double(), t.double(), None)
    once = solve_grads(field, y0, t, torch.bfloat16)
    per_use = solve_grads(field, y0, t, torch.bfloat16, cast_weights="per-use")
    assert torch.equal(once["sol"], per_use["sol"])
    assert rel_err(once["params"], per_use["params"]) < 1e-2
    assert rel_err(once["params"], ref["params"]) < 2e-2
    assert rel_err(once["y0"], ref["y0"]) < 2e-2


def test_parameters_are_the_same_objects_after_the_solve():
    field, y0 = case("mlp")
    before = {name: (p, p.detach().clone()) for name, p in field.named_parameters()}
    solve_grads(field, y0, torch.linspace(0, 1, 4), torch.bfloat16, storage="activations")
    for name, p in field.named_parameters():
        assert p is before[name][0], name
        assert torch.equal(p, before[name][1]), name
        assert p.dtype == torch.float32


class _FP32Island(torch.nn.Module):
    """Runs its layer outside autocast: it needs the fp32 weight."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, t, y):
        with torch.autocast("cpu", enabled=False):
            return self.lin(y.float())


def test_field_that_needs_fp32_weights_gets_a_clear_error_and_a_way_out():
    field, y0 = _FP32Island(), torch.randn(2, 4)
    weight = field.lin.weight
    t = torch.linspace(0, 1, 3)
    with pytest.raises(RuntimeError, match="cast_weights"):
        solve_grads(field, y0, t, torch.bfloat16)
    assert field.lin.weight is weight  # put back although the field raised
    out = solve_grads(field, y0, t, torch.bfloat16, cast_weights="per-use")
    assert torch.isfinite(out["params"]).all()


def test_tuple_state_with_cast_weights():
    torch.manual_seed(2)

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, t, y):
            a, b = y
            return self.lin(b), -self.lin(a)

    field = Pair()
    y0 = (torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True))
    grads = {}
    for mode in ("once", "per-use"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = rampde.odeint(field, y0, torch.linspace(0, 1, 4), options={"cast_weights": mode})
        grads[mode] = torch.autograd.grad((a[-1] * b[-1]).sum(), [*y0, *field.parameters()])
    for x, y in zip(grads["once"][:2], grads["per-use"][:2]):  # the adjoint is the same
        assert torch.equal(x, y)
    for x, y in zip(grads["once"][2:], grads["per-use"][2:]):  # lin is used twice per evaluation
        assert rel_err(x, y) < 2e-2


def test_cast_weights_option_is_checked():
    field, y0 = case("mlp")
    with pytest.raises(ValueError, match=r"options\['cast_weights'\]"):
        rampde.odeint(field, y0, torch.linspace(0, 1, 3), options={"cast_weights": "never"})


@pytest.mark.parametrize("storage", ["states", "activations"])
def test_channels_last_state_keeps_its_layout_and_values(storage):
    field, y0 = case("conv")
    t = torch.linspace(0, 1, 5)
    y_cl = y0.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = rampde.odeint(field, y_cl, t, options={"storage": storage})
    assert all(sol[i].is_contiguous(memory_format=torch.channels_last) for i in range(sol.shape[0]))
    plain = solve_grads(field, y0, t, torch.bfloat16, storage=storage)
    cl = solve_grads(field.to(memory_format=torch.channels_last), y_cl, t, torch.bfloat16, storage=storage)
    assert rel_err(cl["sol"], plain["sol"]) < 1e-2
    assert rel_err(cl["params"], plain["params"]) < 2e-2
    assert cl["y0"].shape == y0.shape


def test_channels_last_fp64_matches_contiguous_exactly_enough():
    field, y0 = case("conv")
    field = field.double()
    t = torch.linspace(0, 1, 4, dtype=torch.float64)
    plain = solve_grads(field, y0.double(), t, None)
    cl = solve_grads(field, y0.double().contiguous(memory_format=torch.channels_last), t, None)
    assert rel_err(cl["sol"], plain["sol"]) < 1e-12
    assert rel_err(cl["params"], plain["params"]) < 1e-12


# ----------------------------------------------------------------------------- fused combinations


@pytest.mark.parametrize("method", ["euler", "heun3", "rk4", "rk4_classic"])
def test_fused_combinations_match_the_addcmul_chain_in_fp64(method):
    """Backwards in time (negative steps); rk4_classic has zeros in its tableau rows."""
    field, y0 = case("mlp")
    field, y0 = field.double(), y0.double()
    t = torch.linspace(1, 0, 6, dtype=torch.float64)
    fused = rampde.odeint(field, y0, t, method=method, options={"fuse": True})
    chain = rampde.odeint(field, y0, t, method=method)
    assert rel_err(fused, chain) < 1e-14
    assert not torch.equal(fused[-1], fused[0])


@pytest.mark.parametrize("storage", ["states", "activations"])
def test_fused_combinations_match_the_addcmul_chain_in_bf16(storage):
    field, y0 = case("conv")
    t = torch.linspace(0, 1, 5)
    y_cl = y0.contiguous(memory_format=torch.channels_last)
    fused = solve_grads(field, y_cl, t, torch.bfloat16, storage=storage, fuse=True)
    chain = solve_grads(field, y_cl, t, torch.bfloat16, storage=storage)
    assert rel_err(fused["sol"], chain["sol"]) < 1e-6
    assert rel_err(fused["params"], chain["params"]) < 1e-5
    assert rel_err(fused["y0"], chain["y0"]) < 1e-5


def test_fused_gradients_against_fp64_and_torchdiffeq():
    import torchdiffeq

    field, y0 = case("mlp")
    field64 = copy.deepcopy(field).double()
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    ours = solve_grads(field64, y0.double(), t, None, fuse=True, step_size=0.15)
    y = y0.double().clone().requires_grad_()
    sol = torchdiffeq.odeint(field64, y, t, method="rk4", options={"step_size": 0.15})
    grads = torch.autograd.grad(sol[-1].pow(2).mean(), [y, *field64.parameters()])
    assert rel_err(ours["sol"], sol.detach()) < 1e-13
    assert rel_err(ours["y0"], grads[0]) < 1e-11
    assert rel_err(ours["params"], flat(grads[1:])) < 1e-11


def test_fuse_option_is_checked():
    field, y0 = case("mlp")
    with pytest.raises(TypeError, match=r"options\['fuse'\]"):
        rampde.odeint(field, y0, torch.linspace(0, 1, 3), options={"fuse": "yes"})


def test_fuse_without_a_working_compiler_names_the_option(monkeypatch):
    from rampde import fused

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no working C++ compiler found")

        return run

    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_ran", set())
    monkeypatch.setattr(torch, "compile", broken)
    field, y0 = case("mlp")
    with pytest.raises(RuntimeError, match=r"options\['fuse'\] needs torch.compile.*no working C\+\+ compiler"):
        rampde.odeint(field, y0, torch.linspace(0, 1, 3), options={"fuse": True})


def test_fused_combination_in_a_graph_passes_gradcheck():
    from rampde import fused

    torch.manual_seed(3)
    coefs = torch.tensor([0.25, -0.5, 1.0], dtype=torch.float64)
    y, k1, k2, k3 = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(4))
    assert torch.autograd.gradcheck(lambda *a: fused.combine_graph(a[0], a[1:], coefs), (y, k1, k2, k3))
    # 16-bit stages get their gradient in their own dtype, as coefs[l] * g rounded once
    k16 = torch.randn(3, 4, dtype=torch.bfloat16, requires_grad=True)
    y32 = torch.randn(3, 4, requires_grad=True)
    out = fused.combine_graph(y32, [k16], coefs[:1].float())
    g = torch.randn(3, 4)
    gy, gk = torch.autograd.grad(out, [y32, k16], g)
    assert out.dtype == torch.float32 and gk.dtype == torch.bfloat16
    assert torch.equal(gy, g) and torch.equal(gk, (0.25 * g).to(torch.bfloat16))


def test_fused_with_a_time_gradient_matches_the_chain():
    field, y0 = case("mlp")
    t = torch.linspace(0, 1, 5).requires_grad_()
    fused = solve_grads(field, y0, t, torch.bfloat16, fuse=True)
    chain = solve_grads(field, y0, t, torch.bfloat16)
    assert fused["t"].abs().sum() > 0
    for key in ("sol", "y0", "params", "t"):
        assert rel_err(fused[key], chain[key]) < 1e-5, key


# ----------------------------------------------------------------------------- host-side overhead


class _Ops(TorchDispatchMode):
    """Counts dispatched aten ops by name."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("storage", ["states", "activations"])
def test_steps_index_no_coefficient_tensors(storage):
    """Each coefficient reaches its kernel as a number: per extra step, only a handful of views
    (the state, its cotangent), not one per stage coefficient (about 50 per rk4 step before)."""
    field, y0 = case("mlp")
    selects = {}
    for steps in (8, 16):
        with _Ops() as ops:
            solve_grads(field, y0, torch.linspace(0, 1, steps + 1), torch.bfloat16, storage=storage)
        selects[steps] = ops.counts.get("aten.select", 0)
    assert (selects[16] - selects[8]) / 8 <= 8, selects


@pytest.mark.parametrize("storage", ["states", "activations"])
def test_stages_with_equal_weights_share_one_cotangent(storage, monkeypatch):
    """rk4's b = 1/6, 1/3, 1/3, 1/6: each step's vjp gets two scaled cotangents (a multiply and a
    cast each), shared by the stages of equal weight, not four; the gradients stay exact."""
    seen = []
    grad = torch.autograd.grad

    def recording(outputs, inputs, grad_outputs=None, **kwargs):
        if isinstance(grad_outputs, (list, tuple)) and len(grad_outputs) == 4:
            seen.append([id(g) for g in grad_outputs])
        return grad(outputs, inputs, grad_outputs, **kwargs)

    field, y0 = case("mlp")
    t = torch.linspace(0, 1, 5)
    reference = solve_grads(field, y0, t, torch.bfloat16, storage=storage)
    monkeypatch.setattr(torch.autograd, "grad", recording)
    shared = solve_grads(field, y0, t, torch.bfloat16, storage=storage)
    assert len(seen) == 4  # one vjp per step
    assert all(ids[0] == ids[3] and ids[1] == ids[2] and ids[0] != ids[1] for ids in seen), seen
    assert_same(shared, reference)


def test_host_coefficients_are_the_device_values():
    from rampde.stepper import _StepCoefficients
    from rampde.tableaus import get_tableau

    grid = torch.cumsum(torch.rand(7, dtype=torch.float32), 0)
    coef = _StepCoefficients.build(get_tableau("rk4"), grid, grid.clone())
    device = _StepCoefficients.tensors(get_tableau("rk4"), grid)
    assert coef.ha_host == device["ha"].tolist() and coef.hb_host == device["hb"].tolist()
    assert [[float(x) for x in row] for row in coef.stage_ts] == device["stage_t"].tolist()
    read = _StepCoefficients.build(get_tableau("rk4"), grid, None)  # reads the grid itself
    assert read.ha_host == coef.ha_host
