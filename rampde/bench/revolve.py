"""Binomial checkpointing (revolve, Griewank & Walther) for a fixed-step rk4 solve.

The forward returns ``y(T)`` and keeps ``y0`` and the first snapshots of the schedule (those the
backward would take first, on the way to the end). The backward reverses the ``N`` steps with at
most ``K`` snapshots alive at once, placing them where the dynamic programme below says, so that
the number of extra forward steps ("advances") is the minimum possible for ``K`` snapshots.
Memory: ``K`` states plus one step's graph; work: ``N`` forward steps, the advances, then one
recomputed step with its vjp per step.
"""

from __future__ import annotations

from functools import lru_cache
from math import comb
from typing import Callable

import torch

from .rk import rk_step


@lru_cache(maxsize=None)
def _plan(steps: int, snapshots: int) -> tuple[int, int]:
    """(minimal advances to reverse ``steps`` steps from a stored start, best first split)."""
    if steps == 1:
        return 0, 0
    if snapshots == 0:
        return steps * (steps - 1) // 2, 0
    best, best_m = None, 0
    for m in range(1, steps):
        cost = m + _plan(steps - m, snapshots - 1)[0] + _plan(m, snapshots)[0]
        if best is None or cost < best:
            best, best_m = cost, m
    return best, best_m


def optimal_advances(steps: int, snapshots: int) -> int:
    """Fewest extra forward steps needed to reverse ``steps`` steps with ``snapshots`` free snapshots."""
    if steps < 1 or snapshots < 0:
        raise ValueError(f"need steps >= 1 and snapshots >= 0, got steps={steps}, snapshots={snapshots}")
    return _plan(steps, snapshots)[0]


def binomial_advances(steps: int, snapshots: int) -> int:
    """Griewank's closed form of the same count. With ``c = snapshots + 1`` checkpoints (the
    stored start included) and ``r`` the least integer with ``C(c + r, c) >= steps``, the
    advances are ``r * steps - C(c + r, r - 1)``."""
    c = snapshots + 1
    r = 0
    while comb(c + r, c) < steps:
        r += 1
    return r * steps - comb(c + r, r - 1) if r > 0 else 0


def forward_snapshots(steps: int, snapshots: int) -> list[int]:
    """Step indices whose states the forward keeps: the schedule's first split, then the first
    split of the rest with one snapshot fewer, and so on."""
    points, start, free = [], 0, snapshots
    while free > 0 and steps - start > 1:
        start += _plan(steps - start, free)[1]
        points.append(start)
        free -= 1
    return points


class _RevolveSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, field, grid, snapshots, stats, y0, *params):
        steps = grid.shape[0] - 1
        keep = set(forward_snapshots(steps, snapshots))
        kept: dict[int, torch.Tensor] = {}
        y = y0
        for i in range(steps):
            y = rk_step(field, grid[i], grid[i + 1], y)
            if i + 1 in keep:
                kept[i + 1] = y
        ctx.field, ctx.snapshots, ctx.stats, ctx.kept = field, snapshots, stats, kept
        stats["peak_snapshots"] = len(kept)
        ctx.save_for_backward(grid, y0, *params)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        grid, y0, *params = ctx.saved_tensors
        field, stats, kept = ctx.field, ctx.stats, ctx.kept
        ctx.kept = None
        adjoint = grad_y
        g_params = [torch.zeros_like(p) for p in params]
        live = [len(kept)]

        def advance(state, start, end):
            with torch.no_grad():
                for i in range(start, end):
                    state = rk_step(field, grid[i], grid[i + 1], state)
            stats["advances"] += end - start
            return state

        def reverse_step(state, i):
            nonlocal adjoint
            with torch.enable_grad():
                leaf = state.detach().requires_grad_(True)
                out = rk_step(field, grid[i], grid[i + 1], leaf)
                grads = torch.autograd.grad(out, [leaf, *params], adjoint, allow_unused=True)
            adjoint = grads[0]
            for g, v in zip(g_params, grads[1:]):
                if v is not None:
                    g.add_(v)
            stats["step_vjps"] += 1

        def reverse(state, start, end, free):
            if end - start == 1:
                reverse_step(state, start)
                return
            if free == 0:
                for k in range(end - 1, start - 1, -1):
                    reverse_step(advance(state, start, k), k)
                return
            split = start + _plan(end - start, free)[1]
            if split in kept:  # taken by the forward
                snapshot = kept.pop(split)
            else:
                snapshot = advance(state, start, split)
                live[0] += 1
                stats["peak_snapshots"] = max(stats["peak_snapshots"], live[0])
            reverse(snapshot, split, end, free - 1)
            del snapshot
            live[0] -= 1
            reverse(state, start, split, free)

        reverse(y0, 0, grid.shape[0] - 1, ctx.snapshots)
        return (None, None, None, None, adjoint, *g_params)


def revolve_solve(field: Callable, y0: torch.Tensor, grid: torch.Tensor, snapshots: int,
                  params: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, dict]:
    """``y(T)`` of rk4 on ``grid``, differentiable with binomial checkpointing; and its counters
    (``advances`` in the backward, ``peak_snapshots``, ``step_vjps``), filled in by the backward."""
    if snapshots < 0:
        raise ValueError(f"snapshots must be >= 0, got {snapshots}")
    params = tuple(field.parameters()) if params is None else params
    stats = {"advances": 0, "peak_snapshots": 0, "step_vjps": 0, "snapshots": snapshots}
    return _RevolveSolve.apply(field, grid, snapshots, stats, y0, *params), stats
