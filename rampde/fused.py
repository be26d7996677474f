"""Fused stage combinations for the no-grad forward: ``y + sum_l c_l k_l`` in one kernel.

An explicit Runge-Kutta step forms ``s - 1`` stage inputs and one update, each a weighted sum of
the state (fp32) and earlier stages (16-bit). Done as a chain of ``addcmul``, every term rereads
and rewrites the whole fp32 state: for rk4 (3/8 rule) 10 passes over the state per step, where
one pass per combination (4) reads each operand once. ``torch.compile`` fuses the chain into one
kernel per combination; the coefficients come in as a tensor, so a new step size needs no
recompilation, and shapes are compiled dynamically, so neither does a new width.

Used by ``stepper`` with ``options={"fuse": True}``, only where no graph is built (the forward
of the default storage, and every update). The arithmetic is the same as the chain's up to the
order of fp32 roundings.
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


def _weighted_sum_into(out: torch.Tensor, y: torch.Tensor, ks: list[torch.Tensor], coefs: torch.Tensor) -> None:
    out.copy_(_weighted_sum(y, ks, coefs))


def _own_copy(fn: Callable, tag: str) -> Callable:
    """``fn`` with a code object of its own: dynamo keeps its compiled versions (and its limit of
    recompilations) per code object, so each kind of call gets its own."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}__{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _run(fn: Callable, y: torch.Tensor, ks: list[torch.Tensor], *args):
    """``fn`` compiled for this kind of call (device, dtypes, number of terms); a failure of the
    first call (no compiler, unsupported platform) becomes an error naming the option."""
    key = (fn.__name__, y.device.type, y.dtype, tuple(k.dtype for k in ks))
    if key not in _compiled:
        tag = "_".join(str(x).replace("torch.", "") for x in key[1:2] + (key[2], *key[3]))
        log.debug("rampde.fused: compiling %s for %s", fn.__name__, tag)
        _compiled[key] = torch.compile(_own_copy(fn, tag), dynamic=True, fullgraph=True)
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


def combine(y: torch.Tensor, ks: Sequence[torch.Tensor], coefs: torch.Tensor) -> torch.Tensor:
    """``y + sum_l coefs[l] * ks[l]`` in ``y``'s dtype, as one fused kernel (no autograd)."""
    ks = list(ks)
    return _run(_weighted_sum, y, ks, y, ks, coefs)


def combine_into(out: torch.Tensor, y: torch.Tensor, ks: Sequence[torch.Tensor], coefs: torch.Tensor) -> None:
    """``out = y + sum_l coefs[l] * ks[l]``, written in place, as one fused kernel (no autograd)."""
    ks = list(ks)
    _run(_weighted_sum_into, y, ks, out, y, ks, coefs)
