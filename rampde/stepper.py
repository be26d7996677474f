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
With fp16 the cotangents are scaled by a power of two per step (see ``scaling``); one flag is read
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

    def autocast(self) -> torch.autocast:
        """The precision context of the field: the caller's autocast, without its weight cache.

        With the cache, the backward would share one 16-bit copy of each weight between the stages
        of a step and sum their weight gradients in 16-bit before the cast back; without it, each
        stage's weight gradient reaches the fp32 accumulator on its own. (The no-grad forward does
        not use the cache either way.) Cost: one cast per weight per stage.
        """
        return torch.autocast(
            self.device_type,
            dtype=self.autocast_dtype or torch.get_autocast_dtype(self.device_type),
            enabled=self.autocast_dtype is not None,
            cache_enabled=False,
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


class DiscreteAdjointSolve(torch.autograd.Function):
    """``traj = DiscreteAdjointSolve.apply(spec, grid, y0, *params)``: the states at every grid point."""

    @staticmethod
    def forward(ctx, spec: SolveSpec, grid: torch.Tensor, y0: torch.Tensor, *params: torch.Tensor):
        coef = _StepCoefficients.build(spec.tableau, grid)
        weighted = _weighted(spec.tableau)
        traj = torch.empty((grid.shape[0], *y0.shape), dtype=spec.acc_dtype, device=y0.device)
        traj[0] = y0
        with spec.autocast():
            for i in range(grid.shape[0] - 1):
                y = traj[i]
                ks = _stages(spec, y, coef.stage_t[i], coef.ha[i])
                out = traj[i + 1]
                hb = coef.hb[i]
                torch.addcmul(y, ks[weighted[0]], hb[weighted[0]], out=out)
                for j in weighted[1:]:
                    out.addcmul_(ks[j], hb[j])
        stored = traj if spec.state_dtype == spec.acc_dtype else traj.to(spec.state_dtype)
        ctx.spec = spec
        ctx.save_for_backward(grid, stored, *params)
        return traj

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_traj: torch.Tensor):
        spec: SolveSpec = ctx.spec
        grid, stored, *params = ctx.saved_tensors
        need_t = ctx.needs_input_grad[1]
        need_params = ctx.needs_input_grad[3:]
        diff_params = [p for p, need in zip(params, need_params) if need]
        incoming_ok = torch.isfinite(grad_traj).all()
        states_ok = torch.isfinite(stored).all()

        attempt = 0
        while True:
            grads = _adjoint_sweep(spec, grid, stored, grad_traj, diff_params, need_t)
            results_ok = torch.stack([torch.isfinite(g).all() for g in grads.tensors()]).all()
            incoming, states, results = torch.stack([incoming_ok, states_ok, results_ok]).tolist()
            if results or not incoming:
                if not incoming:
                    log.warning("rampde backward: the incoming gradient is not finite; passing it on")
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
    grid: torch.Tensor,
    stored: torch.Tensor,
    grad_traj: torch.Tensor,
    diff_params: list[torch.Tensor],
    need_t: bool,
) -> _SweepResult:
    """One backward pass over all steps; gradients accumulated in the accumulation dtype."""
    acc = spec.acc_dtype
    tableau = spec.tableau
    weighted = _weighted(tableau)
    coef = _StepCoefficients.build(tableau, grid)
    h_abs = coef.h.abs()

    adjoint = grad_traj[-1].to(acc, copy=True)
    g_params = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, acc)) for p in diff_params]
    g_grid = torch.zeros_like(grid) if need_t else None

    with spec.autocast(), torch.enable_grad():
        for i in range(grid.shape[0] - 2, -1, -1):
            y = stored[i].to(acc).detach().requires_grad_(True)
            if need_t:
                t0 = grid[i].detach().requires_grad_(True)
                h = coef.h[i].detach().requires_grad_(True)
                stage_t, ha = t0 + h * coef.c, h * coef.a
            else:
                stage_t, ha = coef.stage_t[i], coef.ha[i]
            hb = coef.hb[i]
            ks = _stages(spec, y, stage_t, ha)

            if spec.scaler is not None:
                scale, inv_scale = spec.scaler.step_scale(adjoint, h_abs[i])
                cotangent = adjoint * scale
            else:
                inv_scale = None
                cotangent = adjoint
            outputs, cotangents = [], []
            for j in weighted:
                if ks[j].requires_grad:
                    outputs.append(ks[j])
                    cotangents.append((cotangent * hb[j]).to(ks[j].dtype))
            inputs = [y, *diff_params] + ([t0, h] if need_t else [])
            if outputs:
                vjps = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
            else:
                vjps = (None,) * len(inputs)
            if inv_scale is not None:
                vjps = tuple(None if v is None else v.to(acc) * inv_scale for v in vjps)

            if need_t:
                # y_next = y + h sum_j b_j k_j also depends on h directly.
                flat_adj = adjoint.reshape(-1)
                dh_direct = sum(
                    tableau.b[j] * torch.dot(flat_adj, ks[j].detach().reshape(-1).to(acc)) for j in weighted
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
