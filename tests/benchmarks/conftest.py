"""pytest-benchmark suite settings: GPU sizes on CUDA, tiny CPU sizes only under --benchmark-disable."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or config.getoption("benchmark_disable", False):
        return
    skip = pytest.mark.skip(
        reason="no CUDA device: these benchmarks measure tensor cores; on the CPU they run only at tiny sizes "
        "under --benchmark-disable, as a check that they work"
    )
    for item in items:
        if "tests/benchmarks" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
