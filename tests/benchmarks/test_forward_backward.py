"""pytest-benchmark: forward+backward of every competitor through the shared registry.

    pytest tests/benchmarks --benchmark-only                       # on a tensor-core GPU
    pytest tests/benchmarks --benchmark-only --benchmark-json=reports/<gpu>/pytest-benchmark.json

Grouped so that each group compares the competitors at one size; each benchmark's extra info
carries the allocator peak, the gradient error against the fp64 same-scheme run, and the GPU.
The timed function synchronises CUDA, so the wall clock covers the kernels, not their launch.
"""

from __future__ import annotations

import pytest
import torch

from rampde.bench import measure
from rampde.bench.competitors import get_competitor, list_competitors, reference_run
from rampde.bench.workloads import build_workload

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
COMPETITORS = [c.name for c in list_competitors()]
CELLS = (
    [("mlp", 256, 2048, 64), ("mlp", 2048, 2048, 64), ("conv", 128, 64, 64)]
    if ON_GPU
    else [("mlp", 8, 8, 2)]
)


@pytest.fixture(scope="module")
def references():
    return {}


@pytest.mark.parametrize("workload, width, batch, steps", CELLS, ids=[f"{w}-w{n}-b{b}-N{s}" for w, n, b, s in CELLS])
@pytest.mark.parametrize("name", COMPETITORS)
def test_forward_backward(benchmark, references, name, workload, width, batch, steps):
    competitor = get_competitor(name)
    work = build_workload(workload, width=width, batch=batch, device=DEVICE)
    benchmark.group = f"{workload} width {width} batch {batch} steps {steps}"
    try:
        first = competitor.run(work, steps)
    except torch.OutOfMemoryError as exc:
        pytest.skip(f"out of memory: {exc}")
    key = (competitor.scheme, workload, width, batch, steps)
    if key not in references:
        references[key] = reference_run(competitor, work, steps)
    p_err, y_err = measure.gradient_errors(first, references[key])
    assert measure.all_finite(first)

    def once():
        competitor.run(work, steps)
        measure.synchronize(DEVICE)

    benchmark.extra_info.update(
        gpu=measure.gpu_name(DEVICE), precision=competitor.precision, grad_err_params=p_err, grad_err_y0=y_err,
        peak_mem_bytes=measure.peak_memory_bytes(once, DEVICE),
    )
    benchmark.pedantic(once, rounds=5, iterations=1, warmup_rounds=1)
