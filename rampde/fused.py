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
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

_compiled: dict[str, Callable] = {}


def _weighted_sum(y: torch.Tensor, ks: list[torch.Tensor], coefs: torch.Tensor) -> torch.Tensor:
    out = y
    for l, k in enumerate(ks):
        out = out + coefs[l] * k.to(y.dtype)
    return out


def _weighted_sum_into(out: torch.Tensor, y: torch.Tensor, ks: list[torch.Tensor], coefs: torch.Tensor) -> None:
    out.copy_(_weighted_sum(y, ks, coefs))


def _get(name: str, fn: Callable) -> Callable:
    if name not in _compiled:
        log.debug("rampde.fused: compiling %s", name)
        _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[name]


def combine(y: torch.Tensor, ks: Sequence[torch.Tensor], coefs: torch.Tensor) -> torch.Tensor:
    """``y + sum_l coefs[l] * ks[l]`` in ``y``'s dtype, as one fused kernel (no autograd)."""
    return _get("combine", _weighted_sum)(y, list(ks), coefs)


def combine_into(out: torch.Tensor, y: torch.Tensor, ks: Sequence[torch.Tensor], coefs: torch.Tensor) -> None:
    """``out = y + sum_l coefs[l] * ks[l]``, written in place, as one fused kernel (no autograd)."""
    _get("combine_into", _weighted_sum_into)(out, y, list(ks), coefs)
