"""The benchmark workloads: shapes, determinism, the exact CNF trace, size checks."""

from __future__ import annotations

import pytest
import torch

from rampde.bench.workloads import WORKLOADS, build_workload, two_moons


@pytest.mark.parametrize("name, shape", [("mlp", (8, 16)), ("conv", (8, 16, 32, 32)), ("cnf", (8, 3))])
def test_builds_with_the_documented_shapes(name, shape):
    w = build_workload(name, width=16, batch=8)
    assert w.y0.shape == shape and w.y0.dtype == torch.float32
    out = w.field(torch.tensor(0.5), w.y0)
    assert out.shape == shape
    loss = w.loss_fn(w.y0)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    grid = w.time_grid(4)
    assert torch.equal(grid, torch.linspace(0, 1, 5))
    assert w.flops_per_eval() > 0


def test_mlp_flops_count_both_matmuls():
    w = build_workload("mlp", width=16, batch=8)
    assert w.flops_per_eval() == 2 * 8 * 17 * 16 + 2 * 8 * 16 * 16


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_same_seed_same_workload_and_fp64_copy_is_independent(name):
    a = build_workload(name, width=8, batch=8, seed=3)
    b = build_workload(name, width=8, batch=8, seed=3)
    assert torch.equal(a.y0, b.y0)
    assert all(torch.equal(p, q) for p, q in zip(a.field.parameters(), b.field.parameters()))
    c = build_workload(name, width=8, batch=8, seed=4)
    assert not torch.equal(next(a.field.parameters()), next(c.field.parameters()))
    d = a.to(torch.float64)
    assert d.y0.dtype == torch.float64 and next(d.field.parameters()).dtype == torch.float64
    with torch.no_grad():
        next(d.field.parameters()).add_(1.0)
    assert torch.equal(next(a.field.parameters()), next(b.field.parameters()))


def test_cnf_trace_is_the_exact_jacobian_trace():
    w = build_workload("cnf", width=16, batch=8).to(torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    for y in w.y0:
        jac = torch.autograd.functional.jacobian(lambda z: w.field(t, torch.cat([z, y[2:]])[None])[0, :2], y[:2])
        assert w.field(t, y[None])[0, 2].item() == pytest.approx(-torch.trace(jac).item(), rel=1e-12)


def test_two_moons_is_standardised_and_seeded():
    x = two_moons(64, seed=1)
    assert x.shape == (64, 2)
    assert torch.allclose(x.mean(0), torch.zeros(2), atol=1e-6)
    assert torch.equal(x, two_moons(64, seed=1))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"width": 12, "batch": 8}, "width must be a positive multiple of 8"),
     ({"width": 8, "batch": 0}, "batch must be a positive multiple of 8"),
     ({"width": 8.0, "batch": 8}, "width must be")],
)
def test_sizes_must_be_multiples_of_eight(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_workload("mlp", **kwargs)


def test_unknown_workload_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown workload 'rnn'; known: mlp, conv, cnf"):
        build_workload("rnn", width=8, batch=8)


def test_steps_must_be_positive():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        build_workload("mlp", width=8, batch=8).time_grid(0)


def test_channels_last_conv_has_the_same_values_in_the_other_layout():
    plain = build_workload("conv", width=8, batch=8, seed=2)
    nhwc = build_workload("conv", width=8, batch=8, seed=2, channels_last=True)
    fmt = torch.channels_last
    assert nhwc.channels_last and not plain.channels_last
    assert plain.y0.is_contiguous() and not nhwc.y0.is_contiguous()
    assert nhwc.y0.is_contiguous(memory_format=fmt)
    assert all(p.is_contiguous(memory_format=fmt) for p in nhwc.field.parameters() if p.dim() == 4)
    assert torch.equal(nhwc.y0, plain.y0)
    assert all(torch.equal(p, q) for p, q in zip(nhwc.field.parameters(), plain.field.parameters()))
    t = torch.tensor(0.5)
    out_plain, out_nhwc = plain.field(t, plain.y0), nhwc.field(t, nhwc.y0)
    assert out_nhwc.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out_nhwc, out_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nhwc.loss_fn(out_nhwc), plain.loss_fn(out_plain), rtol=1e-6, atol=0)
    wide = nhwc.to(torch.float64)  # the fp64 reference copy keeps the layout
    assert wide.channels_last and wide.y0.is_contiguous(memory_format=fmt)
    assert "channels_last" in nhwc.describe()


def test_channels_last_solve_gives_the_same_loss_and_gradients():
    from rampde.bench.competitors import get_competitor

    run = get_competitor("torchdiffeq-fp32").run
    plain = run(build_workload("conv", width=8, batch=8), 2)
    nhwc = run(build_workload("conv", width=8, batch=8, channels_last=True), 2)
    torch.testing.assert_close(nhwc.loss, plain.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(nhwc.grad_y0, plain.grad_y0, rtol=1e-4, atol=1e-7)
    for g, h in zip(nhwc.grad_params, plain.grad_params):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "cnf"])
def test_channels_last_is_for_the_conv_workload_only(name):
    with pytest.raises(ValueError, match="channels_last applies to the conv workload only"):
        build_workload(name, width=8, batch=8, channels_last=True)
    with pytest.raises(ValueError, match="channels_last must be True or False"):
        build_workload("conv", width=8, batch=8, channels_last="yes")
