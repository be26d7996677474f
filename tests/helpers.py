"""Small numeric helpers for the solver tests."""

from __future__ import annotations

import torch


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
