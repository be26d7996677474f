"""Small numeric helpers for the solver tests."""

from __future__ import annotations

import torch

import rampde


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def flat(tensors) -> torch.Tensor:
    return torch.cat([x.detach().reshape(-1).double() for x in tensors])


class MLPField(torch.nn.Module):
    """``Linear(w+1, w)`` on ``[y, t]``, tanh, ``Linear(w, w)``: time-dependent, like the benchmarks."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(width + 1, width)
        self.l2 = torch.nn.Linear(width, width)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.to(y.dtype).expand(*y.shape[:-1], 1)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], dim=-1))))


class ConvField(torch.nn.Module):
    """3x3 convolution, tanh, 3x3 convolution, channels in = out, padding 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.c2 = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.tanh(self.c1(y)))


def case(kind: str):
    """A small seeded field and initial state: ``mlp`` (width 16) or ``conv`` (4 channels, 6x6)."""
    torch.manual_seed(0)
    if kind == "mlp":
        return MLPField(16), torch.randn(8, 16)
    return ConvField(4), torch.randn(2, 4, 6, 6)


def solve_grads(field, y0, t, dtype, **options):
    """Solution, y0 gradient, parameter gradients (and t's when t requires grad) of mean(y(T)^2)."""
    y0 = y0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        sol = rampde.odeint(field, y0, t, method="rk4", options=options)
    loss = sol[-1].to(torch.promote_types(sol.dtype, torch.float32)).pow(2).mean()
    params = [p for p in field.parameters() if p.requires_grad]
    inputs = [y0, *params] + ([t] if t.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs)
    return {"sol": sol.detach(), "y0": grads[0], "params": flat(grads[1 : 1 + len(params)]),
            "t": grads[-1] if t.requires_grad else None}


def assert_same(a, b):
    """The results of two ``solve_grads`` calls are bitwise equal."""
    for key in ("sol", "y0", "params", "t"):
        if a[key] is not None:
            assert torch.equal(a[key], b[key]), key


class StiffLinear(torch.nn.Module):
    """A linear field with large weights: its fp16 vjp overflows at a high scale, not at a low one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(16, 16, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(16, 16) * 64)

    def forward(self, t, y):
        return self.lin(y)
