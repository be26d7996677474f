"""One explicit Runge-Kutta step as plain autograd-able torch code, for the competitors that
manage their own steps (revolve, reversible). Uses rampde's public tableaus."""

from __future__ import annotations

from typing import Callable

import torch

from rampde.tableaus import ButcherTableau, get_tableau

RK4 = get_tableau("rk4")


def rk_increment(field: Callable, t0: torch.Tensor, h: torch.Tensor, y: torch.Tensor,
                 tableau: ButcherTableau = RK4) -> torch.Tensor:
    """``y_next - y`` for one step of ``tableau`` from ``(t0, y)`` with step ``h`` (may be negative)."""
    ks: list[torch.Tensor] = []
    for c, row in zip(tableau.c, tableau.a):
        stage = y
        for a, k in zip(row, ks):
            if a != 0.0:
                stage = stage + (h * a) * k
        ks.append(field(t0 + c * h, stage))
    increment = None
    for b, k in zip(tableau.b, ks):
        if b != 0.0:
            term = (h * b) * k
            increment = term if increment is None else increment + term
    return increment


def rk_step(field: Callable, t0: torch.Tensor, t1: torch.Tensor, y: torch.Tensor,
            tableau: ButcherTableau = RK4) -> torch.Tensor:
    return y + rk_increment(field, t0, t1 - t0, y, tableau)
