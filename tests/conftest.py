"""Shared fixtures: small vector fields, kept tiny so that the suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


class MLPField(torch.nn.Module):
    """``Linear(w+1, w)`` on ``[y, t]``, tanh, ``Linear(w, w)``: time-dependent, like the benchmarks."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(width + 1, width)
        self.l2 = torch.nn.Linear(width, width)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.to(y.dtype).expand(*y.shape[:-1], 1)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], dim=-1))))


@pytest.fixture
def mlp_field():
    def make(width: int = 8, dtype: torch.dtype = torch.float64, seed: int = 0) -> MLPField:
        torch.manual_seed(seed)
        return MLPField(width).to(dtype)

    return make
