"""The public entry point: argument checks, tuple states, the time grid, dispatch to the stepper."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Sequence

import torch

from .scaling import DynamicScaler
from .stepper import DiscreteAdjointSolve, SolveSpec, WeightCast, Weights
from .tableaus import get_tableau

log = logging.getLogger(__name__)

State = torch.Tensor | tuple[torch.Tensor, ...]

_OPTION_KEYS = ("step_size", "state_dtype", "storage", "cast_weights", "fuse", "cuda_graph")
_STORAGE = ("states", "activations")
_CAST_WEIGHTS = ("once", "per-use")
# Layers whose weights autocast runs in 16-bit: their fp32 parameters are cast once per solve.
# Not nn.Bilinear: autocast runs bilinear in the widest dtype of its inputs (CUDA) or not at all
# (CPU), so a 16-bit weight copy would fail next to fp32 inputs, or feed rounded weights to fp32.
_CAST_LAYERS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
_DTYPE_MISMATCH = ("dtype", "scalar type", "should be the same", "same type")  # torch's wording
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def odeint(
    func: Callable[..., State],
    y0: State,
    t: torch.Tensor,
    *,
    rtol: float | torch.Tensor | None = None,
    atol: float | torch.Tensor | None = None,
    method: str = "rk4",
    options: dict[str, Any] | None = None,
    event_fn: Callable[..., Any] | None = None,
    params: Iterable[torch.Tensor] | None = None,
    loss_scaler: DynamicScaler | None = None,
) -> State:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` on a fixed grid; a drop-in for ``torchdiffeq.odeint``.

    Precision comes from the surrounding ``torch.autocast`` region of ``y0``'s device: the vector
    field runs in its fp16/bf16, while the state, the stage combinations, the adjoint and every
    gradient are kept in fp32 (or in ``y0``'s dtype when that is wider). Gradients are the exact
    discrete adjoint of the scheme, flowing to ``y0``, to ``params`` and to ``t``.

    Args:
        func: ``f(t, y)``; for a tuple ``y0`` it takes and returns a tuple of the same shapes.
        y0: the initial state, a floating tensor or a tuple of them on one device.
        t: strictly increasing or decreasing 1-D times; the solution is returned at each.
        method: ``euler``, ``midpoint``, ``heun2`` (``heun``, ``rk2``), ``heun3``, ``rk4``
            (torchdiffeq's 3/8 rule) or ``rk4_classic``.
        options: ``step_size`` (steps on a uniform grid from ``t[0]``, outputs linearly
            interpolated, as torchdiffeq does); ``storage``: ``"states"`` (default: keep the
            states, recompute each step's stages in the backward; 4s evaluation units per step)
            or ``"activations"`` (keep each step's 16-bit activations; 3s units, more memory);
            ``state_dtype`` (with ``"states"``: ``None`` keeps the solution itself, no extra
            memory; ``"low"`` or a 16-bit dtype keeps a 16-bit copy, useful when ``step_size``
            makes many more steps than outputs); ``cast_weights``: ``"once"`` (default: under
            fp16/bf16 autocast, the fp32 weights and biases of the ``nn.Linear`` and
            convolution layers of an ``nn.Module`` field are cast to 16-bit once per solve,
            and each evaluation runs with those copies in the layers' parameter slots, as
            ``torch.func.functional_call`` does; the parameters are put back after it) or
            ``"per-use"`` (autocast casts them at every use: for a field that runs such a layer
            outside autocast, or uses its weight where 16-bit would not do); ``fuse``: ``True``
            forms each no-grad stage input and update in one fused kernel (``torch.compile``;
            the first solve compiles) instead of a chain of ``addcmul``; default ``False``;
            ``cuda_graph``: ``True`` runs each step on fixed buffers and, on a CUDA device,
            captures the first step forward and backward as a CUDA graph and replays it for the
            others (one launch per step instead of one per kernel: for small, launch-bound
            fields); with ``storage="states"`` and without ``fuse`` only; off CUDA the same
            steps run eagerly; the backward runs without graphs when the time gradient is asked
            for or when a differentiated parameter is not one of the 16-bit weight copies
            (fp32 solves, ``cast_weights="per-use"``, parameters outside Linear/Conv layers, a
            ``params=`` callable); default ``False``.
        rtol, atol: accepted as ``torchdiffeq.odeint`` accepts them; every method here steps on
            the fixed grid, which uses no tolerance (torchdiffeq's fixed-grid methods ignore them
            too). A value that is not a non-negative number or tensor is an error.
        event_fn: must be ``None``: there is no event handling on a fixed grid.
        params: the tensors ``func`` depends on; defaults to ``func.parameters()`` for an
            ``nn.Module``, and must be given (``()`` for none) for any other callable.
        loss_scaler: a ``DynamicScaler`` for the fp16 adjoint, kept across calls; a fresh one per
            call when ``None`` under fp16 autocast, no scaling otherwise.

    Returns:
        The solution at ``t``: shape ``(len(t), *y0.shape)`` (a tuple for a tuple ``y0``), in the
        accumulation dtype.

    Cost: ``s`` field evaluations per step forward; backward recomputes them (unless
    ``storage="activations"``) and takes ``s`` vector-Jacobian products per step. Memory: the
    ``N+1`` states plus one step's activations (or every step's 16-bit activations).
    """
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
    _check_torchdiffeq_arguments(rtol, atol, method, event_fn)
    tableau = get_tableau(method)
    step_size, state_dtype_opt, storage, cast_weights, fuse, cuda_graph = _check_options(options)
    y0_flat, shapes = _flatten_state(y0)
    device_type = y0_flat.device.type
    acc_dtype = torch.promote_types(y0_flat.dtype, torch.float32)
    t = _check_t(t, y0_flat.device, acc_dtype)
    diff_params = _collect_params(func, params)

    autocast_dtype = _autocast_dtype(device_type)
    state_dtype = _resolve_state_dtype(state_dtype_opt, acc_dtype, autocast_dtype)
    if loss_scaler is not None and not isinstance(loss_scaler, DynamicScaler):
        raise TypeError(f"loss_scaler must be a rampde.DynamicScaler or None, got {type(loss_scaler).__name__}")
    if loss_scaler is None and autocast_dtype == torch.float16:
        loss_scaler = DynamicScaler()

    t_host = t.detach().cpu()
    grid = t if step_size is None else _uniform_grid(t, t_host, step_size)
    grid_host = t_host if step_size is None else _uniform_grid(t_host, t_host, step_size)

    cast = _weight_cast(func, autocast_dtype, device_type) if cast_weights == "once" else None
    spec = SolveSpec(
        field=_checked_field(func, cast, shapes, y0_flat, acc_dtype, autocast_dtype),
        tableau=tableau,
        device_type=device_type,
        autocast_dtype=autocast_dtype,
        acc_dtype=acc_dtype,
        state_dtype=state_dtype,
        scaler=loss_scaler,
        # Graphs are kept only when a backward can follow: not under no_grad or for constants.
        keep_activations=storage == "activations" and torch.is_grad_enabled()
        and any(x.requires_grad for x in (grid, y0_flat, *diff_params)),
        cast=cast,
        fuse=fuse,
        cuda_graph=cuda_graph,
        grid_host=grid_host,
    )
    log.debug(
        "rampde.odeint: %s, %d steps, field in %s, state in %s, stored in %s",
        tableau.name, grid.shape[0] - 1, autocast_dtype or acc_dtype, acc_dtype, state_dtype,
    )
    traj = DiscreteAdjointSolve.apply(spec, grid, y0_flat.to(acc_dtype), *diff_params)
    solution = traj if step_size is None else _at_output_times(traj, grid, t, t_host)
    return solution if shapes is None else _unflatten(solution, shapes)


# ----------------------------------------------------------------------------- argument checks


def _check_torchdiffeq_arguments(rtol: Any, atol: Any, method: Any, event_fn: Any) -> None:
    """Clear errors for torchdiffeq arguments that rampde cannot honour."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a non-negative number or floating tensor, got a {value.dtype} tensor")
            bad = not bool((value.detach() >= 0).all())  # NaN too
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            bad = not value >= 0  # NaN too
        else:
            raise TypeError(f"{name} must be a non-negative number or floating tensor, got {type(value).__name__}")
        if bad:
            raise ValueError(f"{name} must be non-negative, got {value!r}")
    if method is None:
        raise ValueError("method=None means torchdiffeq's default, dopri5, an adaptive method that rampde does "
                         "not have; name a fixed-grid method such as 'rk4' (rampde's default when method is "
                         "left out)")
    if event_fn is not None:
        raise ValueError("event_fn is not supported: rampde steps on the fixed grid t and has no event "
                         "handling; solve over the grid and locate the event in the solution")


def _check_options(options: dict[str, Any] | None) -> tuple[float | None, Any, str, str, bool, bool]:
    """``step_size``, ``state_dtype`` (resolved later), ``storage``, ``cast_weights``, ``fuse``,
    ``cuda_graph``."""
    if options is None:
        return None, None, "states", "once", False, False
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict with keys among {_OPTION_KEYS}, got {type(options).__name__}")
    unknown = sorted(set(options) - set(_OPTION_KEYS))
    if unknown:
        raise ValueError(
            f"options has unsupported key(s) {unknown}; rampde's fixed-grid solvers take only {list(_OPTION_KEYS)}"
        )
    step_size = options.get("step_size")
    if step_size is not None:
        if isinstance(step_size, torch.Tensor):
            if step_size.numel() != 1:
                raise ValueError("options['step_size'] must be a single number")
            step_size = step_size.item()
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
            raise TypeError(f"options['step_size'] must be a positive number, got {type(step_size).__name__}")
        if not (math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"options['step_size'] must be positive and finite, got {step_size}")
        step_size = float(step_size)
    storage = options.get("storage", "states")
    if storage not in _STORAGE:
        raise ValueError(f"options['storage'] must be one of {list(_STORAGE)}, got {storage!r}")
    if storage == "activations" and options.get("state_dtype") is not None:
        raise ValueError(
            "options['state_dtype'] applies to storage='states' only: with storage='activations' the "
            "backward uses the kept activations, not stored states"
        )
    cast_weights = options.get("cast_weights", "once")
    if cast_weights not in _CAST_WEIGHTS:
        raise ValueError(f"options['cast_weights'] must be one of {list(_CAST_WEIGHTS)}, got {cast_weights!r}")
    fuse = options.get("fuse", False)
    if not isinstance(fuse, bool):
        raise TypeError(f"options['fuse'] must be True or False, got {fuse!r}")
    cuda_graph = options.get("cuda_graph", False)
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"options['cuda_graph'] must be True or False, got {cuda_graph!r}")
    if cuda_graph and (storage != "states" or fuse):
        raise ValueError(
            "options['cuda_graph'] applies to storage='states' without 'fuse': the kept activations "
            "of every step and the compiled kernels cannot be replayed from one captured step"
        )
    return step_size, options.get("state_dtype"), storage, cast_weights, fuse, cuda_graph


def _flatten_state(y0: State) -> tuple[torch.Tensor, tuple[torch.Size, ...] | None]:
    """A tensor stays as it is; a tuple becomes one flat vector (and its shapes, to undo it)."""
    if isinstance(y0, torch.Tensor):
        _check_floating("y0", y0)
        return y0, None
    if not isinstance(y0, (tuple, list)) or len(y0) == 0:
        raise TypeError(f"y0 must be a floating tensor or a non-empty tuple of them, got {type(y0).__name__}")
    for i, y in enumerate(y0):
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y0[{i}] must be a tensor, got {type(y).__name__}")
        _check_floating(f"y0[{i}]", y)
    devices = {y.device for y in y0}
    if len(devices) > 1:
        raise ValueError(f"y0's tensors must all be on one device, got {sorted(map(str, devices))}")
    dtype = y0[0].dtype
    for y in y0[1:]:
        dtype = torch.promote_types(dtype, y.dtype)
    flat = torch.cat([y.reshape(-1).to(dtype) for y in y0])
    return flat, tuple(y.shape for y in y0)


def _check_floating(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_t(t: Any, device: torch.device, acc_dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 1-D floating tensor of times, got {type(t).__name__}")
    if t.ndim != 1:
        raise ValueError(f"t must be 1-D, got shape {tuple(t.shape)}")
    if t.shape[0] < 2:
        raise ValueError(f"t must hold at least 2 times (start and end), got {t.shape[0]}")
    _check_floating("t", t)
    values = t.detach().cpu()  # the one host read of the times, before any step
    if not torch.isfinite(values).all():
        raise ValueError("t must hold finite times")
    diffs = values[1:] - values[:-1]
    if not ((diffs > 0).all() or (diffs < 0).all()):
        raise ValueError("t must be strictly increasing or strictly decreasing")
    return t.to(device=device, dtype=acc_dtype)


def _collect_params(func: Any, params: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
    """The tensors to differentiate: those of ``params`` (or the module's) that require grad."""
    if params is None:
        if not isinstance(func, torch.nn.Module):
            raise TypeError(
                "params is required when func is not an nn.Module: pass params=(...) with the tensors "
                "func uses (or params=() if it has none), so that their gradients are computed"
            )
        params = func.parameters()
    if isinstance(params, torch.Tensor):
        params = (params,)
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"params must be an iterable of tensors, got {type(params).__name__}") from None
    seen: set[int] = set()
    out = []
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a tensor, got {type(p).__name__}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _resolve_state_dtype(option: Any, acc_dtype: torch.dtype, autocast_dtype: torch.dtype | None) -> torch.dtype:
    if option is None or option == "high":
        return acc_dtype
    if option == "low":
        return autocast_dtype or acc_dtype
    if isinstance(option, torch.dtype) and option.is_floating_point:
        return option
    raise ValueError(
        f"options['state_dtype'] must be None, 'high', 'low' or a floating torch.dtype, got {option!r}"
    )


# ----------------------------------------------------------------------------- the field


def _weight_cast(func: Any, autocast_dtype: torch.dtype | None, device_type: str) -> WeightCast | None:
    """The fp32 parameters of ``func``'s Linear/Conv layers on the autocast device, to cast once,
    with every place each of them sits (a tied weight sits in several modules)."""
    if autocast_dtype not in _LOW_PRECISION or not isinstance(func, torch.nn.Module):
        return None
    slots: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    params: dict[int, torch.Tensor] = {}
    for module in func.modules():
        for name, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((module, name))
                params[id(p)] = p
    # Cast: fp32 parameters on the device that sit in Linear/Conv layers only (a tied one may sit in several).
    cast = [k for k, p in params.items() if p.dtype == torch.float32 and p.device.type == device_type
            and all(isinstance(m, _CAST_LAYERS) for m, _ in slots[k])]
    if not cast:
        return None
    return WeightCast(tuple(params[k] for k in cast), tuple(tuple(slots[k]) for k in cast), autocast_dtype)


def _call(func: Callable[..., State], cast: WeightCast | None, t: torch.Tensor, y: Any,
          weights: Weights | None) -> Any:
    """``func(t, y)``, on the 16-bit weight copies when ``weights`` is given."""
    if weights is None or cast is None:
        return func(t, y)
    try:
        return cast.call(func, weights, t, y)
    except RuntimeError as exc:
        if not any(sign in str(exc).lower() for sign in _DTYPE_MISMATCH):
            raise
        raise RuntimeError(
            f"rampde: the vector field failed on its 16-bit weight copies ({exc}); if it runs a "
            f"Linear/Conv layer outside autocast or needs its weights in fp32, pass "
            f"options={{'cast_weights': 'per-use'}}"
        ) from exc


def _checked_field(
    func: Callable[..., State],
    cast: WeightCast | None,
    shapes: tuple[torch.Size, ...] | None,
    y0: torch.Tensor,
    acc_dtype: torch.dtype,
    autocast_dtype: torch.dtype | None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Wraps ``func`` so that it sees the caller's shapes and returns one checked tensor."""
    allowed = {acc_dtype} if autocast_dtype is None else {acc_dtype, autocast_dtype, torch.float32}

    def check(name: str, out: Any, shape: torch.Size) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"func must return a tensor for {name}, got {type(out).__name__}")
        if out.shape != shape:
            raise ValueError(f"func returned shape {tuple(out.shape)} for {name}, expected {tuple(shape)}")
        if out.dtype not in allowed:
            raise TypeError(
                f"func returned dtype {out.dtype} for {name}; expected one of "
                f"{sorted(str(d) for d in allowed)} (the state's dtype, or the autocast dtype)"
            )
        return out

    if shapes is None:
        shape = y0.shape

        def field(t: torch.Tensor, y: torch.Tensor, weights: Weights | None = None) -> torch.Tensor:
            return check("the state", _call(func, cast, t, y, weights), shape)

        return field

    sizes = [math.prod(s) for s in shapes]

    def tuple_field(t: torch.Tensor, y: torch.Tensor, weights: Weights | None = None) -> torch.Tensor:
        parts = tuple(p.view(s) for p, s in zip(torch.split(y, sizes), shapes))
        out = _call(func, cast, t, parts, weights)
        if not isinstance(out, (tuple, list)) or len(out) != len(shapes):
            raise TypeError(f"func must return a tuple of {len(shapes)} tensors for a tuple state")
        return torch.cat([check(f"y[{i}]", o, s).reshape(-1) for i, (o, s) in enumerate(zip(out, shapes))])

    return tuple_field


# ----------------------------------------------------------------------------- grids and outputs


def _uniform_grid(t: torch.Tensor, t_host: torch.Tensor, step_size: float) -> torch.Tensor:
    """torchdiffeq's grid for ``step_size``: ``t[0] + k h`` up to and including ``t[-1]``.

    Differentiable with respect to ``t[0]`` and ``t[-1]``.
    """
    span = (t_host[-1] - t_host[0]).abs()
    count = int(torch.ceil(span / step_size + 1).item())
    direction = 1.0 if t_host[-1] > t_host[0] else -1.0
    ks = torch.arange(0, count, dtype=t.dtype, device=t.device)
    grid = ks * (direction * step_size) + t[0]
    return torch.cat([grid[:-1], t[-1:]])


def _at_output_times(
    traj: torch.Tensor, grid: torch.Tensor, t: torch.Tensor, t_host: torch.Tensor
) -> torch.Tensor:
    """The solution at ``t`` from the states on ``grid``, linearly interpolated as torchdiffeq does."""
    sign = 1.0 if t_host[-1] > t_host[0] else -1.0
    g = (grid.detach().cpu() * sign).tolist()
    tv = (t_host * sign).tolist()
    rows = [traj[0]]
    j = 1
    for i in range(len(g) - 1):
        while j < len(tv) and g[i + 1] >= tv[j]:
            if tv[j] == g[i]:
                rows.append(traj[i])
            elif tv[j] == g[i + 1]:
                rows.append(traj[i + 1])
            else:
                slope = (t[j] - grid[i]) / (grid[i + 1] - grid[i])
                rows.append(traj[i] + slope * (traj[i + 1] - traj[i]))
            j += 1
    return torch.stack(rows)


def _unflatten(solution: torch.Tensor, shapes: Sequence[torch.Size]) -> tuple[torch.Tensor, ...]:
    length = solution.shape[0]
    sizes = [math.prod(s) for s in shapes]
    return tuple(p.view(length, *s) for p, s in zip(torch.split(solution, sizes, dim=1), shapes))
