"""The registry of competitors: who is measured, in which precision, storing what.

Each competitor runs one forward solve (rk4, torchdiffeq's 3/8 rule, on ``workload.time_grid``)
and one backward of ``workload.loss_fn(y(T))``, and returns the loss and the gradients with
respect to ``y0`` and every parameter of the field. The CLI sweep, asv and pytest-benchmark all
draw on this one registry. ``python -m rampde.bench.competitors`` lists it.

Memory models use N (steps), s (stages, 4 for rk4), A (activations of one field evaluation in
fp32), S (one state in fp32), K (snapshots).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .reversible import reversible_solve
from .revolve import revolve_solve
from .workloads import Workload

log = logging.getLogger(__name__)

METHOD = "rk4"


@dataclass(frozen=True)
class RunOutput:
    """What one forward+backward gives: the loss and the gradients (detached)."""

    loss: torch.Tensor
    grad_y0: torch.Tensor
    grad_params: tuple[torch.Tensor, ...]
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Competitor:
    """One way of solving and differentiating; see docs/bench-interfaces.md."""

    name: str
    precision: str
    description: str
    memory_model: str
    scheme: str
    run: Callable[[Workload, int], RunOutput] = field(repr=False, compare=False)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Set TF32 for matmuls and convolutions for the block; restore the previous flags after."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _autocast(workload: Workload, dtype: torch.dtype | None, cache: bool = True):
    device_type = workload.device.type
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype, cache_enabled=cache)


def _finish(workload: Workload, y0: torch.Tensor, y_final: torch.Tensor, loss_scale: float = 1.0,
            extra: dict | None = None) -> RunOutput:
    """Loss of the final state, gradients by autograd, unscaled in fp32 when a loss scale is used."""
    params = tuple(workload.field.parameters())
    loss = workload.loss_fn(y_final)
    grads = torch.autograd.grad(loss * loss_scale if loss_scale != 1.0 else loss, (y0, *params))
    if loss_scale != 1.0:
        grads = tuple(g.float() / loss_scale for g in grads)
    return RunOutput(loss.detach(), grads[0], tuple(grads[1:]), extra or {})


def _leaf(workload: Workload) -> torch.Tensor:
    return workload.y0.detach().clone().requires_grad_(True)


def _torchdiffeq(autocast_dtype: torch.dtype | None, allow_tf32: bool, cache: bool = True,
                 loss_scale: float = 1.0) -> Callable[[Workload, int], RunOutput]:
    def run(workload: Workload, steps: int) -> RunOutput:
        import torchdiffeq

        y0 = _leaf(workload)
        with tf32(allow_tf32), _autocast(workload, autocast_dtype, cache):
            sol = torchdiffeq.odeint(workload.field, y0, workload.time_grid(steps), method=METHOD)
            return _finish(workload, y0, sol[-1], loss_scale)

    return run


def _torchdiffeq_adjoint(workload: Workload, steps: int) -> RunOutput:
    import torchdiffeq

    y0 = _leaf(workload)
    with tf32(False):
        sol = torchdiffeq.odeint_adjoint(
            workload.field, y0, workload.time_grid(steps), method=METHOD,
            adjoint_params=tuple(workload.field.parameters()),
        )
        return _finish(workload, y0, sol[-1])


def _checkpoint_step(workload: Workload, steps: int) -> RunOutput:
    """ANODE style: store each step's input state, recompute the step's graph in the backward."""
    import torchdiffeq
    from torch.utils.checkpoint import checkpoint

    y0 = _leaf(workload)
    grid = workload.time_grid(steps)

    def one_step(y: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
        return torchdiffeq.odeint(workload.field, y, torch.stack([t0, t1]), method=METHOD)[-1]

    with tf32(False):
        y = y0
        for i in range(steps):
            y = checkpoint(one_step, y, grid[i], grid[i + 1], use_reentrant=False)
        return _finish(workload, y0, y)


def _revolve(snapshots: int | None) -> Callable[[Workload, int], RunOutput]:
    def run(workload: Workload, steps: int) -> RunOutput:
        y0 = _leaf(workload)
        k = snapshots if snapshots is not None else default_snapshots(steps)
        with tf32(False):
            y_final, stats = revolve_solve(workload.field, y0, workload.time_grid(steps), k)
            return _finish(workload, y0, y_final, extra=stats)

    return run


def default_snapshots(steps: int) -> int:
    """About sqrt(N) snapshots: memory O(sqrt N), a few recomputations per step."""
    return max(1, int(round(steps ** 0.5)))


def _reversible(coupling: float) -> Callable[[Workload, int], RunOutput]:
    def run(workload: Workload, steps: int) -> RunOutput:
        y0 = _leaf(workload)
        with tf32(False):
            y_final = reversible_solve(workload.field, y0, workload.time_grid(steps), coupling)
            return _finish(workload, y0, y_final)

    return run


def rampde_run(autocast_dtype: torch.dtype | None, options: dict) -> Callable[[Workload, int], RunOutput]:
    """rampde's forward+backward with these odeint ``options``: ``y0`` a leaf, TF32 off, autocast
    in ``autocast_dtype`` around the solve and the loss of ``y(T)``, autograd's backward; in fp16
    one ``DynamicScaler`` kept across the runs of this function."""
    options = dict(options)
    scaler_box: dict[str, object] = {}

    def run(workload: Workload, steps: int) -> RunOutput:
        import rampde

        scaler = None
        if autocast_dtype == torch.float16:
            scaler = scaler_box.setdefault("scaler", rampde.DynamicScaler())
        retries_before = scaler.retries if scaler is not None else 0
        y0 = _leaf(workload)
        with tf32(False), _autocast(workload, autocast_dtype):
            sol = rampde.odeint(workload.field, y0, workload.time_grid(steps), method=METHOD,
                                options=dict(options), loss_scaler=scaler)
            out = _finish(workload, y0, sol[-1])
        if scaler is not None:
            out.extra.update(scaler_retries=scaler.retries - retries_before, scale_log2=scaler.target_log2)
        return out

    return run


LOSS_SCALE_FP16 = 2.0**16
REVERSIBLE_COUPLING = 0.999
_ACT = "N*s*A"

_REGISTRY: dict[str, Competitor] = {
    c.name: c
    for c in [
        Competitor("torchdiffeq-fp32", "fp32", "torchdiffeq.odeint, backprop through the solver, TF32 off",
                   f"{_ACT} fp32 activations", "rk4-discrete", _torchdiffeq(None, False)),
        Competitor("torchdiffeq-tf32", "tf32", "torchdiffeq.odeint with TF32 matmuls and convolutions",
                   f"{_ACT} fp32 activations", "rk4-discrete", _torchdiffeq(None, True)),
        Competitor("torchdiffeq-adjoint", "fp32", "torchdiffeq.odeint_adjoint: continuous adjoint, solved backwards",
                   "O(1): A + a few S", "adjoint-continuous", _torchdiffeq_adjoint),
        Competitor("autocast-fp16", "fp16",
                   "naive: torchdiffeq inside torch.autocast(fp16), loss scale 2^16 (GradScaler's start)",
                   f"{_ACT} 16-bit activations", "rk4-discrete",
                   _torchdiffeq(torch.float16, False, loss_scale=LOSS_SCALE_FP16)),
        Competitor("autocast-bf16", "bf16", "naive: torchdiffeq inside torch.autocast(bf16)",
                   f"{_ACT} 16-bit activations", "rk4-discrete", _torchdiffeq(torch.bfloat16, False)),
        Competitor("autocast-nocache-fp16", "fp16",
                   "one-line fix: autocast(fp16, cache_enabled=False), loss scale 2^16 unscaled in fp32",
                   f"{_ACT} 16-bit activations + a 16-bit weight copy per stage", "rk4-discrete",
                   _torchdiffeq(torch.float16, False, cache=False, loss_scale=LOSS_SCALE_FP16)),
        Competitor("autocast-nocache-bf16", "bf16", "one-line fix: autocast(bf16, cache_enabled=False)",
                   f"{_ACT} 16-bit activations + a 16-bit weight copy per stage", "rk4-discrete",
                   _torchdiffeq(torch.bfloat16, False, cache=False)),
        Competitor("checkpoint-step", "fp32", "per-step torch.utils.checkpoint (ANODE): one extra forward",
                   "(N+1)*S + s*A", "rk4-discrete", _checkpoint_step),
        Competitor("checkpoint-revolve", "fp32", "binomial checkpointing (revolve), about sqrt(N) snapshots",
                   "K*S + s*A, K = round(sqrt(N))", "rk4-discrete", _revolve(None)),
        Competitor("reversible", "fp32",
                   f"McCallum-Foster algebraically reversible rk4 (coupling {REVERSIBLE_COUPLING}), exact inversion",
                   "O(1): 2*S + 2*s*A", "reversible", _reversible(REVERSIBLE_COUPLING)),
        Competitor("rampde-fp32", "fp32", "rampde, fp32, discrete adjoint recomputing each step",
                   "(N+1)*S + s*A", "rk4-discrete", rampde_run(None, {})),
        Competitor("rampde-fp16", "fp16", "rampde, fp16 field, fp32 state and adjoint, dynamic adjoint scaling",
                   "(N+1)*S + s*A/2", "rk4-discrete", rampde_run(torch.float16, {})),
        Competitor("rampde-bf16", "bf16", "rampde, bf16 field, fp32 state and adjoint",
                   "(N+1)*S + s*A/2", "rk4-discrete", rampde_run(torch.bfloat16, {})),
        Competitor("rampde-fp16-fast", "fp16", "rampde, fp16, keeps 16-bit stage activations (no recompute)",
                   "(N+1)*S + N*s*A/2", "rk4-discrete", rampde_run(torch.float16, {"storage": "activations"})),
        Competitor("rampde-bf16-fast", "bf16", "rampde, bf16, keeps 16-bit stage activations (no recompute)",
                   "(N+1)*S + N*s*A/2", "rk4-discrete", rampde_run(torch.bfloat16, {"storage": "activations"})),
        Competitor("rampde-fp16-graph", "fp16",
                   "rampde, fp16, each step forward and backward replayed as one CUDA graph (eager off CUDA)",
                   "(N+1)*S + s*A/2", "rk4-discrete", rampde_run(torch.float16, {"cuda_graph": True})),
        Competitor("rampde-bf16-graph", "bf16",
                   "rampde, bf16, each step forward and backward replayed as one CUDA graph (eager off CUDA)",
                   "(N+1)*S + s*A/2", "rk4-discrete", rampde_run(torch.bfloat16, {"cuda_graph": True})),
    ]
}

# The fp64 run each scheme's gradients are compared with. For the discrete rk4 gradient it is
# rampde's discrete adjoint: the same gradient as backprop through torchdiffeq (equal to 1e-12 in
# fp64, tested), with memory of the N+1 states instead of every stage's activations, so that the
# reference still fits on the GPU for the largest cells of the paper suite.
REFERENCE_OF_SCHEME = {"rk4-discrete": "rampde-fp32", "adjoint-continuous": "torchdiffeq-adjoint",
                       "reversible": "reversible"}


def list_competitors() -> list[Competitor]:
    return list(_REGISTRY.values())


def get_competitor(name: str) -> Competitor:
    """Look a competitor up by name; ``KeyError`` listing the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown competitor {name!r}; known: {', '.join(_REGISTRY)}") from None


def reference_run(competitor: Competitor, workload: Workload, steps: int) -> RunOutput:
    """The same scheme in fp64 on an fp64 copy of the workload: what gradient errors compare to."""
    reference = _REGISTRY[REFERENCE_OF_SCHEME[competitor.scheme]]
    return reference.run(workload.to(torch.float64), steps)


def _main() -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is in the bench extra
        for c in list_competitors():
            print(f"{c.name:24} {c.precision:5} {c.scheme:20} {c.memory_model}")
        return
    table = Table(title="rampde competitors")
    for col in ("name", "precision", "scheme"):
        table.add_column(col, no_wrap=True)
    table.add_column("memory model")
    table.add_column("description")
    for c in list_competitors():
        table.add_row(c.name, c.precision, c.scheme, c.memory_model, c.description)
    Console(width=max(Console().width, 160)).print(table)


if __name__ == "__main__":
    _main()
