"""Small numeric helpers for the solver tests."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def flat(tensors) -> torch.Tensor:
    return torch.cat([x.detach().reshape(-1).double() for x in tensors])
