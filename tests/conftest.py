"""Shared fixtures: small vector fields, kept tiny so that the suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


from helpers import MLPField  # noqa: E402


@pytest.fixture
def mlp_field():
    def make(width: int = 8, dtype: torch.dtype = torch.float64, seed: int = 0) -> MLPField:
        torch.manual_seed(seed)
        return MLPField(width).to(dtype)

    return make


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: tiny cells on a shared machine run far faster than with several."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
