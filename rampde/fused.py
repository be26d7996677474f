"""Fused stage combinations: ``y + sum_l c_l k_l`` in one kernel, and its backward in one.

An explicit Runge-Kutta step forms ``s - 1`` stage inputs and one update, each a weighted sum of
the state (fp32) and earlier stages (16-bit). Done as a chain of ``addcmul``, every term rereads
and rewrites the whole fp32 state: for rk4 (3/8 rule) 10 passes over the state per step, where
one pass per combination (4) reads each operand once. ``torch.compile`` fuses the chain into one
kernel per combination; the coefficients come in as a tensor, so a new step size needs no
recompilation, and shapes are compiled dynamically, so neither does a new width.

Used by ``stepper`` with ``options={"fuse": True}``: every update, and every stage input, in the
forward and in the backward's recomputation. In a graph (``combine_graph``) the backward gives
each stage its ``c_l * g`` in its own dtype in one kernel, where the chain takes a product and a
cast per term. Not where the time gradient is asked for (the coefficients are then
differentiated: the chain does it). The arithmetic is the chain's up to the order of fp32
roundings.
"""

from __future__ import annotations

import logging
import types
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

_compiled: dict[tuple, Callable] = {}
_ran: set[tuple] = set()  # compiled functions that have run once: torch.compile works here


def _weighted_sum(y: torch.Tensor, ks: list[torch.Tensor], coefs: torch.Tensor) -> torch.Tensor:
    out = y
    for l, k in enumerate(ks):
        out = out + coefs[l] * k.to(y.dtype)
    return out


def _scaled_copies(g: torch.Tensor, coefs: torch.Tensor, dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    return [(coefs[l] * g).to(dtype) for l, dtype in enumerate(dtypes)]


def _weighted_sum_into(out: torch.Tensor, y: torch.Tensor, ks: list[torch.Tensor], coefs: torch.Tensor) -> None:
    out.copy_(_weighted_sum(y, ks, coefs))


def _own_copy(fn: Callable, tag: str) -> Callable:
    """``fn`` with a code object of its own: dynamo keeps its compiled versions (and its limit of
    recompilations) per code object, so each kind of call gets its own."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}__{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _layout(x: torch.Tensor) -> tuple:
    """What dynamo specialises a tensor argument on besides its sizes: device, dtype, rank, the
    order of its strides, and which sizes are 1."""
    order = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))
    return (x.device.type, x.dtype, x.dim(), order, tuple(n == 1 for n in x.shape))


def _kind(*tensors: torch.Tensor, constants: tuple = ()) -> tuple:
    """The kind of a call: its tensors' layouts and the constants compiled into it."""
    return (*(_layout(x) for x in tensors), *constants)


def _run(fn: Callable, kind: tuple, *args):
    """``fn(*args)`` compiled once per ``kind`` of call (``_kind``), sizes dynamic; the tensors of
    ``args`` go in detached (no autograd guards: the callers handle the gradient). A failure of
    the first call (no compiler, unsupported platform) becomes an error naming the option."""
    key = (fn.__name__, *kind)
    if key not in _compiled:
        log.debug("rampde.fused: compiling %s (#%d) for %s", fn.__name__, len(_compiled), key[1:])
        _compiled[key] = torch.compile(_own_copy(fn, str(len(_compiled))), dynamic=True, fullgraph=True)
    args = tuple(_detached(a) for a in args)
    if key in _ran:
        return _compiled[key](*args)
    try:
        result = _compiled[key](*args)
    except Exception as exc:
        raise RuntimeError(
            f"rampde: options['fuse'] needs torch.compile, which failed here ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); leave 'fuse' off"
        ) from exc
    _ran.add(key)
    return result


def _detached(arg):
    if isinstance(arg, torch.Tensor):
        return arg.detach()
    if isinstance(arg, list):
        return [_detached(a) for a in arg]
    return arg


def combine(y: torch.Tensor, ks: Sequence[torch.Tensor], coefs: torch.Tensor) -> torch.Tensor:
    """``y + sum_l coefs[l] * ks[l]`` in ``y``'s dtype, as one fused kernel (no autograd)."""
    ks = list(ks)
    return _run(_weighted_sum, _kind(y, *ks, coefs), y, ks, coefs)


class _Combine(torch.autograd.Function):
    """``combine`` inside a graph, with constant coefficients: the backward passes the gradient
    on to ``y`` and gives each ``k_l`` its ``coefs[l] * g`` in ``k_l``'s dtype, in one kernel."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, coefs: torch.Tensor, *ks: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(coefs)
        ctx.dtypes = [k.dtype for k in ks]
        return combine(y, ks, coefs)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (coefs,) = ctx.saved_tensors
        dtypes = ctx.dtypes
        grads = _run(_scaled_copies, _kind(g, coefs, constants=tuple(dtypes)), g, coefs, dtypes)
        return (g, None, *grads)


def combine_graph(y: torch.Tensor, ks: Sequence[torch.Tensor], coefs: torch.Tensor) -> torch.Tensor:
    """``combine`` that autograd can differentiate with respect to ``y`` and ``ks`` (``coefs`` are
    constants): one fused kernel forward, one backward."""
    return _Combine.apply(y, coefs, *ks)


def combine_into(out: torch.Tensor, y: torch.Tensor, ks: Sequence[torch.Tensor], coefs: torch.Tensor) -> None:
    """``out = y + sum_l coefs[l] * ks[l]``, written in place, as one fused kernel (no autograd)."""
    ks = list(ks)
    _run(_weighted_sum_into, _kind(out, y, *ks, coefs), out, y, ks, coefs)
