"""The McCallum-Foster algebraically reversible solver over rk4, with O(1) memory.

State pair ``(y, z)``, ``z0 = y0``; one step from ``t0`` to ``t1 = t0 + h``, with ``Psi(t, x, h)``
the increment of one base rk4 step and the coupling ``l`` (lambda, near 1):

    y1 = l y + (1 - l) z + Psi(t0, z, h)
    z1 = z - Psi(t1, y1, -h)

It inverts exactly (up to round-off): ``z = z1 + Psi(t1, y1, -h)``,
``y = (y1 - (1 - l) z - Psi(t0, z, h)) / l``. The backward rebuilds each step's input from its
output instead of storing it, and takes the step's vjps from the graphs of the two increments it
evaluates for the inversion. Memory: two states and one increment's graph; work: two rk4 steps
per step forward, two recomputed with their vjps backward. State and field in fp32 (or fp64).
"""

from __future__ import annotations

from typing import Callable

import torch

from .rk import rk_increment


def _reversible_step(field, t0, t1, y, z, coupling):
    h = t1 - t0
    y1 = coupling * y + (1 - coupling) * z + rk_increment(field, t0, h, z)
    z1 = z - rk_increment(field, t1, -h, y1)
    return y1, z1


class _ReversibleSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, field, grid, coupling, trace, y0, *params):
        y, z = y0, y0
        if trace is not None:
            trace["forward"] = [y0.clone()]
        for i in range(grid.shape[0] - 1):
            y, z = _reversible_step(field, grid[i], grid[i + 1], y, z, coupling)
            if trace is not None:
                trace["forward"].append(y.clone())
        ctx.field, ctx.coupling, ctx.trace = field, coupling, trace
        ctx.save_for_backward(grid, y, z, *params)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        grid, y1, z1, *params = ctx.saved_tensors
        field, lam, trace = ctx.field, ctx.coupling, ctx.trace
        adj_y, adj_z = grad_y, torch.zeros_like(grad_y)
        g_params = [torch.zeros_like(p) for p in params]
        rebuilt = [y1.detach().clone()]
        for i in range(grid.shape[0] - 2, -1, -1):
            t0, t1 = grid[i], grid[i + 1]
            h = t1 - t0
            with torch.enable_grad():
                y1_leaf = y1.detach().requires_grad_(True)
                back = rk_increment(field, t1, -h, y1_leaf)
                z = (z1 + back).detach()
                z_leaf = z.requires_grad_(True)
                ahead = rk_increment(field, t0, h, z_leaf)
                y = ((y1 - (1 - lam) * z - ahead) / lam).detach()
                # z1 = z - back(y1): cotangent -adj_z into back; y1's total adjoint follows.
                g_back = torch.autograd.grad(back, [y1_leaf, *params], -adj_z, allow_unused=True)
                adj_y1 = adj_y + g_back[0]
                g_ahead = torch.autograd.grad(ahead, [z_leaf, *params], adj_y1, allow_unused=True)
            adj_y, adj_z = lam * adj_y1, adj_z + (1 - lam) * adj_y1 + g_ahead[0]
            for g, a, b in zip(g_params, g_back[1:], g_ahead[1:]):
                for v in (a, b):
                    if v is not None:
                        g.add_(v)
            y1, z1 = y, z
            rebuilt.append(y)
        if trace is not None:
            trace["backward"] = rebuilt[::-1]
        return (None, None, None, None, adj_y + adj_z, *g_params)


def reversible_solve(field: Callable, y0: torch.Tensor, grid: torch.Tensor, coupling: float = 0.999,
                     params: tuple[torch.Tensor, ...] | None = None, trace: dict | None = None) -> torch.Tensor:
    """``y(T)`` of the reversible scheme on ``grid``; O(1)-memory backward by exact inversion.

    ``trace`` (a dict), if given, receives the forward states (``"forward"``) and the states the
    backward rebuilt (``"backward"``), for checking the reconstruction.
    """
    if not 0.0 < coupling <= 1.0:
        raise ValueError(f"coupling must lie in (0, 1], got {coupling}")
    params = tuple(field.parameters()) if params is None else params
    return _ReversibleSolve.apply(field, grid, coupling, trace, y0, *params)
