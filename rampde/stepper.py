"""Forward stepping and the exact discrete adjoint, as one ``torch.autograd.Function``.

Forward: ``N`` explicit Runge-Kutta steps on a fixed grid. The vector field runs under the
caller's ``torch.autocast`` (16-bit matmuls); the stage inputs ``y + h sum a_ij k_j`` and the
update ``y + h sum b_i k_i`` are formed in the accumulation dtype (fp32, or wider when ``y0`` is).
No autograd graph is built: memory holds the ``N+1`` states of the trajectory.

Backward (discretize-then-optimize): for each step, newest first, the stages are recomputed from
the stored state with a graph of that one step only, and one ``torch.autograd.grad`` call takes
the vector-Jacobian products of all stages in low precision; the adjoint, the parameter gradients
and the time gradients are accumulated in fp32. Cost per step: ``s`` evaluations forward, ``s``
recomputed and ``s`` vjps (about 4s evaluation units against 3s for backprop through the solver).
With ``keep_activations`` (the "activations" storage) the forward keeps each step's graph
instead, its activations in 16-bit, and the backward skips the recomputation: about 3s units of
work, at the memory of the 16-bit activations. With fp16 the cotangents are scaled by a power of two per step (see ``scaling``); one flag is read
on the host per backward, and an overflowed backward is redone with a lower scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .scaling import DynamicScaler
from .tableaus import ButcherTableau

log = logging.getLogger(__name__)

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SolveSpec:
    """What one solve needs besides its tensors."""

    field: Field
    tableau: ButcherTableau
    device_type: str
    autocast_dtype: torch.dtype | None  # None: no autocast, the field runs in the state's dtype
    acc_dtype: torch.dtype
    state_dtype: torch.dtype  # dtype in which the trajectory is kept for the backward
    scaler: DynamicScaler | None
    keep_activations: bool = False  # "activations" storage: keep each step's 16-bit graph

    def autocast(self) -> torch.autocast:
        """The precision context of the field: the caller's autocast, with its weight cache only
        when whole steps' graphs are kept.

        Recomputing (the default), the cache is off: it would share one 16-bit copy of each
        weight between the stages of a step and sum their weight gradients in 16-bit before the
        cast back, whereas without it each stage's weight gradient reaches the fp32 accumulator on
        its own (the no-grad forward does not use the cache either way); cost: one cast per
        weight per stage. Keeping activations, the cache is on, so that every step's graph shares
        one 16-bit copy of each weight instead of holding one per stage; the per-step vjps still
        bring each step's weight gradient to fp32 on its own.
        """
        return torch.autocast(
            self.device_type,
            dtype=self.autocast_dtype or torch.get_autocast_dtype(self.device_type),
            enabled=self.autocast_dtype is not None,
            cache_enabled=self.keep_activations,
        )


@dataclass(frozen=True)
class _StepCoefficients:
    """Per-step constants of the scheme on one grid, computed once per solve on the device."""

    c: torch.Tensor  # (s,)
    a: torch.Tensor  # (s, s), strictly lower triangular
    h: torch.Tensor  # (N,)
    stage_t: torch.Tensor  # (N, s): t_i + c_j h_i
    ha: torch.Tensor  # (N, s, s): h_i a_jl
    hb: torch.Tensor  # (N, s): h_i b_j

    @staticmethod
    def build(tableau: ButcherTableau, grid: torch.Tensor) -> "_StepCoefficients":
        s = tableau.stages
        square = [[*row, *([0.0] * (s - len(row)))] for row in tableau.a]
        c, a, b = (torch.tensor(x, dtype=grid.dtype, device=grid.device) for x in (tableau.c, square, tableau.b))
        h = grid[1:] - grid[:-1]
        return _StepCoefficients(
            c=c,
            a=a,
            h=h,
            stage_t=grid[:-1, None] + h[:, None] * c,
            ha=h[:, None, None] * a,
            hb=h[:, None] * b,
        )


def _stages(
    spec: SolveSpec, y: torch.Tensor, stage_t: Sequence[torch.Tensor], ha: torch.Tensor
) -> list[torch.Tensor]:
    """The stage derivatives ``k_j`` of one step from state ``y`` (accumulation dtype)."""
    ks: list[torch.Tensor] = []
    for j, row in enumerate(spec.tableau.a):
        stage_y = y
        for l, a_jl in enumerate(row):
            if a_jl != 0.0:
                # addcmul promotes the 16-bit stage to the state's dtype inside the kernel.
                stage_y = torch.addcmul(stage_y, ks[l], ha[j, l])
        ks.append(spec.field(stage_t[j], stage_y))
    return ks


def _weighted(tableau: ButcherTableau) -> list[int]:
    return [j for j, b in enumerate(tableau.b) if b != 0.0]


@dataclass
class _StepGraph:
    """One step's stages with the autograd graph that leads to them from its leaves."""

    y: torch.Tensor  # leaf: the step's starting state, accumulation dtype
    t0: torch.Tensor | None  # leaves for the time gradient, when asked for
    h: torch.Tensor | None
    ks: list[torch.Tensor]

    def inputs(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.y, *params] + ([self.t0, self.h] if self.t0 is not None else [])


def _build_step(spec: SolveSpec, coef: _StepCoefficients, grid: torch.Tensor, state: torch.Tensor,
                i: int, need_t: bool) -> _StepGraph:
    """Evaluates step ``i``'s stages from ``state`` with grad enabled (call under ``enable_grad``)."""
    # ``.data``, not ``.detach()``: an alias with its own version counter, so that the forward's
    # in-place writes of later states into the trajectory do not invalidate this step's kept graph.
    y = state.to(spec.acc_dtype).data.requires_grad_(True)
    if need_t:
        t0 = grid[i].detach().requires_grad_(True)
        h = coef.h[i].detach().requires_grad_(True)
        return _StepGraph(y, t0, h, _stages(spec, y, t0 + h * coef.c, h * coef.a))
    return _StepGraph(y, None, None, _stages(spec, y, coef.stage_t[i], coef.ha[i]))


def _update(out: torch.Tensor, y: torch.Tensor, ks: list[torch.Tensor], hb: torch.Tensor,
            weighted: list[int]) -> None:
    """``out = y + sum_j hb_j k_j`` in the state's dtype, written in place."""
    torch.addcmul(y, ks[weighted[0]], hb[weighted[0]], out=out)
    for j in weighted[1:]:
        out.addcmul_(ks[j], hb[j])


class DiscreteAdjointSolve(torch.autograd.Function):
    """``traj = DiscreteAdjointSolve.apply(spec, grid, y0, *params)``: the states at every grid point."""

    @staticmethod
    def forward(ctx, spec: SolveSpec, grid: torch.Tensor, y0: torch.Tensor, *params: torch.Tensor):
        coef = _StepCoefficients.build(spec.tableau, grid)
        weighted = _weighted(spec.tableau)
        traj = torch.empty((grid.shape[0], *y0.shape), dtype=spec.acc_dtype, device=y0.device)
        traj[0] = y0
        graphs: list[_StepGraph] = []
        with spec.autocast():
            for i in range(grid.shape[0] - 1):
                if spec.keep_activations:
                    with torch.enable_grad():
                        graph = _build_step(spec, coef, grid, traj[i], i, ctx.needs_input_grad[1])
                    graphs.append(graph)
                    ks = [k.detach() for k in graph.ks]
                else:
                    ks = _stages(spec, traj[i], coef.stage_t[i], coef.ha[i])
                _update(traj[i + 1], traj[i], ks, coef.hb[i], weighted)
        keep_traj = spec.keep_activations or spec.state_dtype == spec.acc_dtype
        stored = traj if keep_traj else traj.to(spec.state_dtype)
        ctx.spec, ctx.coef, ctx.graphs = spec, coef, graphs
        ctx.save_for_backward(grid, stored, *params)
        return traj

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_traj: torch.Tensor):
        spec: SolveSpec = ctx.spec
        grid, stored, *params = ctx.saved_tensors
        coef = ctx.coef
        graphs, ctx.graphs = ctx.graphs, None
        need_t = ctx.needs_input_grad[1]
        need_params = ctx.needs_input_grad[3:]
        diff_params = [p for p, need in zip(params, need_params) if need]
        incoming_ok = torch.isfinite(grad_traj).all()
        states_ok = torch.isfinite(stored).all()

        attempt = 0
        while True:
            grads = _adjoint_sweep(spec, coef, grid, stored, grad_traj, diff_params, need_t, graphs)
            results_ok = torch.stack([torch.isfinite(g).all() for g in grads.tensors()]).all()
            incoming, states, results = torch.stack([incoming_ok, states_ok, results_ok]).tolist()
            if results or not incoming:
                if not incoming:
                    # Expected when an upstream GradScaler overflows: it sees the inf and skips the step.
                    log.info("rampde backward: the incoming gradient is not finite; passing it on")
                if spec.scaler is not None and incoming:
                    spec.scaler.record(overflowed=False)
                break
            if not states:
                raise FloatingPointError(
                    "rampde: the forward solve produced non-finite states, so the gradients are not "
                    "finite; check the vector field and the step size (in fp16, the state or a stage "
                    "may exceed 65504: try bf16 autocast)"
                )
            if spec.scaler is None:
                raise FloatingPointError(
                    f"rampde: the backward produced non-finite gradients from a finite incoming gradient "
                    f"(vector field in {spec.autocast_dtype or spec.acc_dtype}); pass "
                    f"loss_scaler=rampde.DynamicScaler() to scale the adjoint, or use a wider precision"
                )
            spec.scaler.record(overflowed=True)
            attempt += 1
            if attempt > spec.scaler.max_retries or spec.scaler.exhausted():
                raise FloatingPointError(
                    f"rampde: the fp16 adjoint still overflowed after {attempt} attempts (scale target "
                    f"2**{spec.scaler.target_log2 + spec.scaler.backoff_log2}); the vector field's "
                    f"vector-Jacobian product exceeds the fp16 range: use bf16 autocast"
                )

        g_params = iter(grads.params)
        param_grads = [next(g_params).to(p.dtype) if need else None for p, need in zip(params, need_params)]
        g_y0 = grads.y0 if ctx.needs_input_grad[2] else None
        return (None, grads.grid, g_y0, *param_grads)


@dataclass(frozen=True)
class _SweepResult:
    """The gradients of one backward sweep, in the accumulation dtype."""

    y0: torch.Tensor
    params: list[torch.Tensor]
    grid: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [self.y0, *self.params, *([] if self.grid is None else [self.grid])]


def _adjoint_sweep(
    spec: SolveSpec,
    coef: _StepCoefficients,
    grid: torch.Tensor,
    stored: torch.Tensor,
    grad_traj: torch.Tensor,
    diff_params: list[torch.Tensor],
    need_t: bool,
    graphs: list[_StepGraph],
) -> _SweepResult:
    """One backward pass over all steps; gradients accumulated in the accumulation dtype.

    Each step's graph comes from ``graphs`` (kept by the forward) or is rebuilt from its stored
    state. Kept graphs are retained through the vjp when a scaler may ask for another attempt.
    """
    acc = spec.acc_dtype
    tableau = spec.tableau
    weighted = _weighted(tableau)
    h_abs = coef.h.abs()
    retain = bool(graphs) and spec.scaler is not None

    adjoint = grad_traj[-1].to(acc, copy=True)
    g_params = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, acc)) for p in diff_params]
    g_grid = torch.zeros_like(grid) if need_t else None

    with spec.autocast(), torch.enable_grad():
        for i in range(grid.shape[0] - 2, -1, -1):
            step = graphs[i] if graphs else _build_step(spec, coef, grid, stored[i], i, need_t)
            hb = coef.hb[i]
            if spec.scaler is not None:
                scale, inv_scale = spec.scaler.step_scale(adjoint, h_abs[i])
                cotangent = adjoint * scale
            else:
                inv_scale = None
                cotangent = adjoint
            outputs, cotangents = [], []
            for j in weighted:
                if step.ks[j].requires_grad:
                    outputs.append(step.ks[j])
                    cotangents.append((cotangent * hb[j]).to(step.ks[j].dtype))
            inputs = step.inputs(diff_params)
            if outputs:
                vjps = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True, retain_graph=retain)
            else:
                vjps = (None,) * len(inputs)
            if inv_scale is not None:
                vjps = tuple(None if v is None else v.to(acc) * inv_scale for v in vjps)

            if need_t:
                # y_next = y + h sum_j b_j k_j also depends on h directly.
                flat_adj = adjoint.reshape(-1)
                dh_direct = sum(
                    tableau.b[j] * torch.dot(flat_adj, step.ks[j].detach().reshape(-1).to(acc)) for j in weighted
                )
                dt0, dh = vjps[-2], vjps[-1]
                dh = dh_direct if dh is None else dh + dh_direct
                if dt0 is not None:
                    g_grid[i] += dt0
                g_grid[i] -= dh
                g_grid[i + 1] += dh

            for g, v in zip(g_params, vjps[1 : 1 + len(diff_params)]):
                if v is not None:
                    g.add_(v)
            if vjps[0] is not None:
                adjoint.add_(vjps[0])
            adjoint.add_(grad_traj[i])

    return _SweepResult(y0=adjoint, params=g_params, grid=g_grid)
