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
work, at the memory of the 16-bit activations. With fp16 the cotangents are scaled by a power of
two per step (see ``scaling``); one flag is read on the host per backward, and an overflowed
backward is redone with a lower scale. Linear/Conv weights are cast to 16-bit once per solve
(``WeightCast``); the trajectory keeps ``y0``'s memory layout (``channels_last`` included).
With ``cuda_graph`` every step runs on fixed buffers, replayed as a CUDA graph (``step_graphs``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import fused
from .scaling import DynamicScaler
from .step_graphs import StepReplay
from .tableaus import ButcherTableau

log = logging.getLogger(__name__)

Weights = Sequence[torch.Tensor]
# f(t, y, weights): ``weights`` (or None) stands in for the parameters of ``SolveSpec.cast`` in that call.
Field = Callable[[torch.Tensor, torch.Tensor, "Weights | None"], torch.Tensor]


@dataclass(frozen=True)
class WeightCast:
    """The field's parameters that are cast to 16-bit once per solve instead of at every use.

    Under autocast every Linear/Conv weight is cast again at each stage of each step (the cache
    is off, see ``SolveSpec.autocast``): ``s`` casts per weight per step, forward and backward.
    Instead the forward makes one 16-bit copy of each, and each evaluation of the field runs with
    the copies in the modules' parameter slots (as ``torch.func.functional_call`` does, without
    its per-call bookkeeping); the parameters are put back when the evaluation returns. In a
    graph, each stage sees its own alias of the copy (a ``detach``, no new memory), so that each
    stage's weight gradient still reaches the fp32 accumulator on its own, exactly as with the
    per-use casts.
    """

    params: tuple[torch.Tensor, ...]  # the module's fp32 parameters
    slots: tuple[tuple[tuple[torch.nn.Module, str], ...], ...]  # per parameter, where it sits
    dtype: torch.dtype

    def copies(self) -> list[torch.Tensor]:
        """One 16-bit copy of each parameter, outside any graph."""
        with torch.no_grad():
            return [p.detach().to(self.dtype) for p in self.params]

    def aliases(self, copies: list[torch.Tensor], grad: Sequence[bool]) -> list[torch.Tensor]:
        """Fresh leaves sharing the copies' memory; those of ``grad`` collect a gradient."""
        return [c.detach().requires_grad_(g) for c, g in zip(copies, grad)]

    def call(self, func: Callable[..., Any], weights: Weights, *args: Any) -> Any:
        """``func(*args)`` with ``weights`` in the parameters' slots; the parameters are back
        when it returns or raises. (A plain try/finally: about 0.8 us less per evaluation than a
        context manager on a 2-core CPU; small, launch-bound fields pay host time per call.)"""
        for slots, w in zip(self.slots, weights):
            for module, name in slots:
                module._parameters[name] = w
        try:
            return func(*args)
        finally:
            for slots, p in zip(self.slots, self.params):
                for module, name in slots:
                    module._parameters[name] = p


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
    cast: WeightCast | None = None  # parameters cast to 16-bit once per solve
    fuse: bool = False  # stage combinations and updates as fused kernels (``fused``)
    cuda_graph: bool = False  # each step on fixed buffers, replayed as a CUDA graph (``step_graphs``)
    grid_host: torch.Tensor | None = None  # the grid on the CPU (the solve's one host read of times)

    def autocast(self) -> torch.autocast:
        """The precision context of the field: the caller's autocast, with its weight cache only
        when whole steps' graphs are kept.

        Weights of Linear/Conv layers normally come in as 16-bit copies made once per solve (see
        ``WeightCast``), so autocast has nothing to cast for them. For any other parameter it
        casts: recomputing (the default) with the cache off, so that each stage's weight gradient
        reaches the fp32 accumulator on its own (the cache would sum a step's stage gradients in
        16-bit before the cast back); cost: one cast per such parameter per stage. Keeping
        activations, with the cache on, so that every step's graph shares one 16-bit copy of it
        instead of holding one per stage.
        """
        return torch.autocast(
            self.device_type,
            dtype=self.autocast_dtype or torch.get_autocast_dtype(self.device_type),
            enabled=self.autocast_dtype is not None,
            cache_enabled=self.keep_activations,
        )


@dataclass(frozen=True)
class _StepCoefficients:
    """Per-step constants of the scheme on one grid, computed once per solve on the device, and
    as Python numbers from the host copy of the grid.

    The host numbers are the device values exactly (the same fp32/fp64 arithmetic on the CPU):
    they go into the kernels as scalar arguments, so that a step indexes no coefficient tensor
    (each index is a dispatched view, host time that launch-bound small fields feel). ``stage_ts``
    holds the stage times as 0-d device views, made in one call.
    """

    c: torch.Tensor  # (s,)
    a: torch.Tensor  # (s, s), strictly lower triangular
    h: torch.Tensor  # (N,)
    stage_terms: list[list[int]]  # per stage j, the l with a_jl != 0
    ha_host: list[list[list[float]]]  # ha_host[i][j][l] = h_i a_jl
    hb_host: list[list[float]]  # hb_host[i][j] = h_i b_j
    stage_ts: list[list[torch.Tensor]]  # stage_ts[i][j] = t_i + c_j h_i, a 0-d view
    stage_coef_rows: list[list[torch.Tensor]]  # stage_coef_rows[j][i]: the nonzero h_i a_jl of stage j (fused)
    update_coef_rows: list[torch.Tensor]  # update_coef_rows[i]: the h_i b_j with b_j != 0 (fused)
    numbers: _StepNumbers | None  # the same per step in one fixed vector (replayed steps), or None

    @staticmethod
    def build(tableau: ButcherTableau, grid: torch.Tensor, grid_host: torch.Tensor | None,
              replayed: bool = False) -> "_StepCoefficients":
        """``grid_host``: the same grid on the CPU in the same dtype (read from ``grid`` if None);
        ``replayed``: also the ``numbers`` of steps replayed by ``StepReplay``."""
        device = _StepCoefficients.tensors(tableau, grid)
        host = _StepCoefficients.tensors(tableau, grid.detach().cpu() if grid_host is None else grid_host)
        terms = [[l for l, a_jl in enumerate(row) if a_jl != 0.0] for row in tableau.a]
        ha, hb = device["ha"], device["hb"]
        return _StepCoefficients(
            c=device["c"],
            a=device["a"],
            h=device["h"],
            stage_terms=terms,
            ha_host=host["ha"].tolist(),
            hb_host=host["hb"].tolist(),
            stage_ts=[list(row.unbind(0)) for row in device["stage_t"].unbind(0)],
            stage_coef_rows=[list(ha[:, j, t].contiguous().unbind(0)) for j, t in enumerate(terms)],
            update_coef_rows=list(hb[:, _weighted(tableau)].contiguous().unbind(0)),
            numbers=_StepNumbers(tableau.stages, device) if replayed else None,
        )

    @staticmethod
    def tensors(tableau: ButcherTableau, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        """``c``, ``a`` (s x s), ``h`` (N), ``stage_t`` (N x s), ``ha`` (N x s x s), ``hb`` (N x s) on
        ``grid``'s device and in its dtype."""
        s = tableau.stages
        square = [[*row, *([0.0] * (s - len(row)))] for row in tableau.a]
        c, a, b = (torch.tensor(x, dtype=grid.dtype, device=grid.device) for x in (tableau.c, square, tableau.b))
        h = grid[1:] - grid[:-1]
        return dict(c=c, a=a, h=h, stage_t=grid[:-1, None] + h[:, None] * c, ha=h[:, None, None] * a,
                    hb=h[:, None] * b)


def _stages(
    spec: SolveSpec,
    y: torch.Tensor,
    stage_t: Sequence[torch.Tensor],
    ha: torch.Tensor | Sequence[Sequence[float]],
    weights: Sequence[Weights | None],
) -> list[torch.Tensor]:
    """The stage derivatives ``k_j`` of one step from state ``y`` (accumulation dtype);
    stage ``j`` runs the field with ``weights[j]``."""
    ks: list[torch.Tensor] = []
    for j, row in enumerate(spec.tableau.a):
        stage_y = y
        for l, a_jl in enumerate(row):
            if a_jl != 0.0:
                # The 16-bit stage is promoted to the state's dtype inside the kernel.
                coefficient = ha[j][l]
                if isinstance(coefficient, float):
                    stage_y = torch.add(stage_y, ks[l], alpha=coefficient)
                else:  # a differentiated coefficient (the time gradient)
                    stage_y = torch.addcmul(stage_y, ks[l], coefficient)
        ks.append(spec.field(stage_t[j], stage_y, weights[j]))
    return ks


def _trajectory_buffer(y0: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty ``(length, *y0.shape)`` tensor whose every slice has ``y0``'s memory layout
    (e.g. ``channels_last``), so that the states keep the layout the field is fastest on."""
    like = torch.empty_like(y0, dtype=dtype)  # y0's strides when dense, else contiguous
    order = sorted(range(y0.ndim), key=lambda d: like.stride(d), reverse=True)  # outermost first
    base = torch.empty((length, *(y0.shape[d] for d in order)), dtype=dtype, device=y0.device)
    return base.permute(0, *(1 + order.index(d) for d in range(y0.ndim)))


def _fused_stages(spec: SolveSpec, y: torch.Tensor, coef: _StepCoefficients, i: int,
                  weights: Sequence[Weights | None]) -> list[torch.Tensor]:
    """``_stages`` of step ``i``, each stage input formed by one fused kernel (differentiable with
    respect to the state and the stages when grad is enabled; the coefficients are constants)."""
    combine = fused.combine_graph if torch.is_grad_enabled() else fused.combine
    ks: list[torch.Tensor] = []
    for j, terms in enumerate(coef.stage_terms):
        stage_y = combine(y, [ks[l] for l in terms], coef.stage_coef_rows[j][i]) if terms else y
        ks.append(spec.field(coef.stage_ts[i][j], stage_y, weights[j]))
    return ks


def _weighted(tableau: ButcherTableau) -> list[int]:
    return [j for j, b in enumerate(tableau.b) if b != 0.0]


class _ParamSlots:
    """Where each differentiated parameter's gradient comes from in one step's vjp.

    ``direct``: parameters the field uses as they are (the vjp is taken with respect to them).
    ``cast``: those of ``spec.cast``, differentiated through each stage's alias of their 16-bit
    copy; ``cast_of[k]`` is the index in ``spec.cast.params`` of the ``k``-th of them.
    """

    def __init__(self, spec: SolveSpec, diff_params: list[torch.Tensor]) -> None:
        cast_index = {id(p): k for k, p in enumerate(spec.cast.params)} if spec.cast else {}
        self.direct = [n for n, p in enumerate(diff_params) if id(p) not in cast_index]
        self.cast = [n for n, p in enumerate(diff_params) if id(p) in cast_index]
        self.cast_of = [cast_index[id(diff_params[n])] for n in self.cast]
        diff_ids = {id(p) for p in diff_params}
        self.cast_grad = [id(p) in diff_ids for p in spec.cast.params] if spec.cast else []


@dataclass
class _StepGraph:
    """One step's stages with the autograd graph that leads to them from its leaves."""

    y: torch.Tensor  # leaf: the step's starting state, accumulation dtype
    t0: torch.Tensor | None  # leaves for the time gradient, when asked for
    h: torch.Tensor | None
    ks: list[torch.Tensor]
    stage_weights: list[list[torch.Tensor]]  # per stage, its aliases of the 16-bit copies

    def inputs(self, params: list[torch.Tensor], slots: _ParamSlots) -> list[torch.Tensor]:
        """Leaves of the vjp: ``y``, the direct parameters, the cast aliases stage by stage, ``t0, h``."""
        direct = [params[n] for n in slots.direct]
        aliases = [w[k] for w in self.stage_weights for k in slots.cast_of]
        return [self.y, *direct, *aliases] + ([self.t0, self.h] if self.t0 is not None else [])


def _step_leaves(spec: SolveSpec, state: torch.Tensor, copies: list[torch.Tensor] | None,
                 slots: _ParamSlots) -> tuple[torch.Tensor, list[list[torch.Tensor]], list[Weights | None]]:
    """A step's leaves: its starting state, each stage's aliases of the 16-bit copies, and the
    weights each stage's field evaluation runs with."""
    # ``.data``, not ``.detach()``: an alias with its own version counter, so that the forward's
    # in-place writes of later states into the trajectory do not invalidate this step's kept graph.
    y = state.to(spec.acc_dtype).data.requires_grad_(True)
    stages = range(spec.tableau.stages)
    if spec.cast is None or copies is None:
        return y, [], [None for _ in stages]
    stage_weights = [spec.cast.aliases(copies, slots.cast_grad) for _ in stages]
    return y, stage_weights, list(stage_weights)


def _build_step(spec: SolveSpec, coef: _StepCoefficients, grid: torch.Tensor, state: torch.Tensor,
                i: int, need_t: bool, copies: list[torch.Tensor] | None, slots: _ParamSlots) -> _StepGraph:
    """Evaluates step ``i``'s stages from ``state`` with grad enabled (call under ``enable_grad``)."""
    y, stage_weights, weights = _step_leaves(spec, state, copies, slots)
    if need_t:  # the coefficients are differentiated too: the addcmul chain
        t0 = grid[i].detach().requires_grad_(True)
        h = coef.h[i].detach().requires_grad_(True)
        return _StepGraph(y, t0, h, _stages(spec, y, t0 + h * coef.c, h * coef.a, weights), stage_weights)
    if spec.fuse:
        return _StepGraph(y, None, None, _fused_stages(spec, y, coef, i, weights), stage_weights)
    return _StepGraph(y, None, None, _stages(spec, y, coef.stage_ts[i], coef.ha_host[i], weights), stage_weights)


def _build_replayed_step(spec: SolveSpec, state: torch.Tensor, numbers: _StepNumbers,
                         copies: list[torch.Tensor] | None, slots: _ParamSlots) -> _StepGraph:
    """``_build_step`` with the step's times and coefficients read from the fixed ``numbers``."""
    y, stage_weights, weights = _step_leaves(spec, state, copies, slots)
    return _StepGraph(y, None, None, _stages(spec, y, numbers.stage_t, numbers.ha, weights), stage_weights)


def _update(out: torch.Tensor, y: torch.Tensor, ks: list[torch.Tensor],
            hb: Sequence[float] | Sequence[torch.Tensor], weighted: list[int]) -> None:
    """``out = y + sum_j hb_j k_j`` in the state's dtype, written in place; ``hb`` host numbers
    or 0-d device tensors."""
    first = weighted[0]
    if isinstance(hb[first], float):
        torch.add(y, ks[first], alpha=hb[first], out=out)
        for j in weighted[1:]:
            out.add_(ks[j], alpha=hb[j])
        return
    torch.addcmul(y, ks[first], hb[first], out=out)
    for j in weighted[1:]:
        out.addcmul_(ks[j], hb[j])


class _StepNumbers:
    """A step's numbers as device values in one fixed vector, for steps replayed by ``StepReplay``:
    its stage times, ``|h|``, ``h a_jl`` and ``h b_j``. ``load(i)`` copies step ``i``'s in (one
    copy); the attributes are 0-d views of the vector, which the step's kernels read."""

    def __init__(self, s: int, per_step: dict[str, torch.Tensor]) -> None:
        """``s`` stages; ``per_step``: ``_StepCoefficients.tensors`` of the grid."""
        h = per_step["h"]
        self.table = torch.cat([per_step["stage_t"], h.abs()[:, None], per_step["ha"].reshape(-1, s * s),
                                per_step["hb"]], dim=1).detach()
        self.values = torch.empty_like(self.table[0])
        views = self.values.unbind(0)
        self.stage_t = list(views[:s])
        self.h_abs = views[s]
        self.ha = [list(views[s + 1 + j * s : s + 1 + (j + 1) * s]) for j in range(s)]
        self.hb = list(views[s + 1 + s * s :])

    def load(self, i: int) -> None:
        self.values.copy_(self.table[i])


def _replayed_forward(spec: SolveSpec, numbers: _StepNumbers, traj: torch.Tensor,
                      weights: Sequence[Weights | None], weighted: list[int]) -> None:
    """Fills ``traj[1:]`` from ``traj[0]``, each step a body on fixed buffers (``StepReplay``):
    the step's numbers are copied in, the new state copied out."""
    state = traj[0].clone()  # y0's layout

    def body() -> None:
        ks = _stages(spec, state, numbers.stage_t, numbers.ha, weights)
        _update(state, state, ks, numbers.hb, weighted)

    replay = StepReplay(traj.device)
    for i in range(traj.shape[0] - 1):
        numbers.load(i)
        replay.run(body)
        traj[i + 1].copy_(state)


def _unscaled(v: torch.Tensor, acc: torch.dtype, inv_scale: torch.Tensor | None) -> torch.Tensor:
    return v.to(acc) if inv_scale is None else v.to(acc) * inv_scale


def _accumulate(pairs: list[tuple[torch.Tensor, torch.Tensor]], inv_scale: torch.Tensor | None) -> None:
    """``g += v`` (or ``g += v * inv_scale``) for each pair, in ``g``'s dtype, in one foreach call.

    The targets must be distinct tensors: a multi-tensor kernel may update them concurrently.
    """
    if not pairs:
        return
    targets = [g for g, _ in pairs]
    updates = [v for _, v in pairs]
    if inv_scale is None:
        torch._foreach_add_(targets, updates)
    else:
        torch._foreach_addcmul_(targets, updates, [inv_scale] * len(pairs))


class DiscreteAdjointSolve(torch.autograd.Function):
    """``traj = DiscreteAdjointSolve.apply(spec, grid, y0, *params)``: the states at every grid point."""

    @staticmethod
    def forward(ctx, spec: SolveSpec, grid: torch.Tensor, y0: torch.Tensor, *params: torch.Tensor):
        coef = _StepCoefficients.build(spec.tableau, grid, spec.grid_host, replayed=spec.cuda_graph)
        weighted = _weighted(spec.tableau)
        traj = _trajectory_buffer(y0, grid.shape[0], spec.acc_dtype)
        traj[0] = y0
        copies = spec.cast.copies() if spec.cast is not None else None
        shared = [copies] * spec.tableau.stages
        slots = _ParamSlots(spec, list(params))
        graphs: list[_StepGraph] = []
        with spec.autocast():
            if spec.cuda_graph:
                _replayed_forward(spec, coef.numbers, traj, shared, weighted)
            else:
                for i in range(grid.shape[0] - 1):
                    if spec.keep_activations:
                        with torch.enable_grad():
                            graph = _build_step(spec, coef, grid, traj[i], i, ctx.needs_input_grad[1], copies, slots)
                        graphs.append(graph)
                        ks = [k.detach() for k in graph.ks]
                    elif spec.fuse:
                        ks = _fused_stages(spec, traj[i], coef, i, shared)
                    else:
                        ks = _stages(spec, traj[i], coef.stage_ts[i], coef.ha_host[i], shared)
                    if spec.fuse:
                        fused.combine_into(traj[i + 1], traj[i], [ks[j] for j in weighted], coef.update_coef_rows[i])
                    else:
                        _update(traj[i + 1], traj[i], ks, coef.hb_host[i], weighted)
        keep_traj = spec.keep_activations or spec.state_dtype == spec.acc_dtype
        stored = traj if keep_traj else traj.to(spec.state_dtype)
        ctx.spec, ctx.coef, ctx.graphs, ctx.copies = spec, coef, graphs, copies
        ctx.save_for_backward(grid, stored, *params)
        return traj

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_traj: torch.Tensor):
        spec: SolveSpec = ctx.spec
        grid, stored, *params = ctx.saved_tensors
        coef = ctx.coef
        graphs, ctx.graphs = ctx.graphs, None
        copies, ctx.copies = ctx.copies, None
        need_t = ctx.needs_input_grad[1]
        need_params = ctx.needs_input_grad[3:]
        diff_params = [p for p, need in zip(params, need_params) if need]
        incoming_ok = torch.isfinite(grad_traj).all()
        states_ok = torch.isfinite(stored).all()

        attempt = 0
        while True:
            grads = _adjoint_sweep(spec, coef, grid, stored, grad_traj, diff_params, need_t, graphs, copies)
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
    copies: list[torch.Tensor] | None,
) -> _SweepResult:
    """One backward pass over all steps; gradients accumulated in the accumulation dtype.

    Each step's graph comes from ``graphs`` (kept by the forward) or is rebuilt from its stored
    state. Kept graphs are retained through the vjp when a scaler may ask for another attempt.
    With ``spec.cuda_graph`` each rebuilt step is a body on fixed buffers (``StepReplay``),
    unless the time gradient is asked for or a differentiated parameter is used directly (not
    through the per-stage aliases of ``spec.cast``): autograd keeps such a parameter's gradient
    node from the forward, tied to the stream the solve was called on, and a vjp captured on the
    side stream would have to wait on that stream, which invalidates the capture.
    """
    acc = spec.acc_dtype
    weighted = _weighted(spec.tableau)
    retain = bool(graphs) and spec.scaler is not None
    slots = _ParamSlots(spec, diff_params)

    adjoint = grad_traj[-1].to(acc, copy=True)
    g_params = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, acc)) for p in diff_params]
    g_grid = torch.zeros_like(grid) if need_t else None
    accumulators = _Accumulators(adjoint, g_params, slots)

    with spec.autocast(), torch.enable_grad():
        if spec.cuda_graph and not graphs and not need_t and not slots.direct:
            _replayed_sweep(spec, coef.numbers, weighted, grid, stored, grad_traj, diff_params, copies,
                            accumulators)
            return _SweepResult(y0=adjoint, params=g_params, grid=None)
        h_abs = coef.h.abs()
        for i in range(grid.shape[0] - 2, -1, -1):
            step = graphs[i] if graphs else _build_step(spec, coef, grid, stored[i], i, need_t, copies, slots)
            vjps, inv_scale = _step_vjps(spec, step, weighted, coef.hb_host[i], adjoint, h_abs[i], diff_params,
                                         slots, retain)
            if need_t:
                # y_next = y + h sum_j b_j k_j also depends on h directly.
                flat_adj = adjoint.reshape(-1)
                dh_direct = sum(
                    spec.tableau.b[j] * torch.dot(flat_adj, step.ks[j].detach().reshape(-1).to(acc))
                    for j in weighted
                )
                dt0, dh = (None if v is None else _unscaled(v, acc, inv_scale) for v in vjps[-2:])
                dh = dh_direct if dh is None else dh + dh_direct
                if dt0 is not None:
                    g_grid[i] += dt0
                g_grid[i] -= dh
                g_grid[i + 1] += dh
            accumulators.add(step, vjps, inv_scale)
            adjoint.add_(grad_traj[i])

    return _SweepResult(y0=adjoint, params=g_params, grid=g_grid)


def _step_vjps(spec: SolveSpec, step: _StepGraph, weighted: list[int],
               hb: Sequence[float] | Sequence[torch.Tensor], adjoint: torch.Tensor, h_abs: torch.Tensor,
               diff_params: list[torch.Tensor], slots: _ParamSlots,
               retain: bool) -> tuple[Sequence[torch.Tensor | None], torch.Tensor | None]:
    """The vjps of one step's stages with the adjoint, in the order of ``step.inputs``, and the
    inverse of the scale they carry (None when unscaled)."""
    if spec.scaler is not None:
        scale, inv_scale = spec.scaler.step_scale(adjoint, h_abs)
        cotangent = adjoint * scale
    else:
        inv_scale = None
        cotangent = adjoint
    # Stages with equal weights share one cotangent (rk4: b = 1/6, 1/3, 1/3, 1/6): two
    # multiplies and casts per step instead of four, the same values.
    outputs, cotangents, scaled = [], [], {}
    for j in weighted:
        k = step.ks[j]
        if k.requires_grad:
            key = (spec.tableau.b[j], k.dtype)
            if key not in scaled:
                scaled[key] = (cotangent * hb[j]).to(k.dtype)
            outputs.append(k)
            cotangents.append(scaled[key])
    inputs = step.inputs(diff_params, slots)
    if not outputs:
        return (None,) * len(inputs), inv_scale
    return torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True, retain_graph=retain), inv_scale


@dataclass(frozen=True)
class _Accumulators:
    """The fp32 adjoint and parameter gradients that each step's vjps are added to."""

    adjoint: torch.Tensor
    g_params: list[torch.Tensor]
    slots: _ParamSlots

    def add(self, step: _StepGraph, vjps: Sequence[torch.Tensor | None], inv_scale: torch.Tensor | None) -> None:
        """One multi-tensor update per group of distinct targets: the adjoint and the direct
        parameters, then each stage's aliases of the cast ones (each added on its own in fp32)."""
        slots, g_params = self.slots, self.g_params
        n_direct, n_cast = len(slots.direct), len(slots.cast)
        groups = [[(self.adjoint, vjps[0]), *((g_params[n], v) for n, v in zip(slots.direct, vjps[1:]))]]
        first_alias = 1 + n_direct
        for j in range(len(step.stage_weights)):
            stage_vjps = vjps[first_alias + j * n_cast : first_alias + (j + 1) * n_cast]
            groups.append([(g_params[n], v) for n, v in zip(slots.cast, stage_vjps)])
        for group in groups:
            _accumulate([(g, v) for g, v in group if v is not None], inv_scale)


def _replayed_sweep(spec: SolveSpec, numbers: _StepNumbers, weighted: list[int], grid: torch.Tensor,
                    stored: torch.Tensor, grad_traj: torch.Tensor, diff_params: list[torch.Tensor],
                    copies: list[torch.Tensor] | None, accumulators: _Accumulators) -> None:
    """The steps of ``_adjoint_sweep`` (no time gradient), each a body on fixed buffers
    (``StepReplay``): the stored state and the step's numbers are copied in; the vjps go into the
    accumulators, which stay in place for the whole sweep."""
    state = torch.empty_like(stored[0], dtype=spec.acc_dtype)

    def body() -> None:
        step = _build_replayed_step(spec, state, numbers, copies, accumulators.slots)
        vjps, inv_scale = _step_vjps(spec, step, weighted, numbers.hb, accumulators.adjoint, numbers.h_abs,
                                     diff_params, accumulators.slots, retain=False)
        accumulators.add(step, vjps, inv_scale)

    replay = StepReplay(grid.device)
    for i in range(grid.shape[0] - 2, -1, -1):
        numbers.load(i)
        state.copy_(stored[i])
        replay.run(body)
        accumulators.adjoint.add_(grad_traj[i])
