"""Training recipes: how each competitor of the train suite (``rampde.bench.training``) trains.

The same training run (same seed, same initial weights, same data order, Adam) is repeated once
per *training recipe*: how the ODE block is solved (torchdiffeq, rampde, per-step checkpointing),
in which autocast precision, and with which loss scaling.

Public API: ``TRAINING_RECIPES``, ``DEFAULT_COMPETITORS``, ``TrainingRecipe``, ``get_recipe``,
``get_task`` and ``UnknownNameError``; ``rampde.bench.training`` re-exports them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torchdiffeq
from torch import nn
from torch.utils.checkpoint import checkpoint

import rampde

from .training_tasks import TASKS, TrainingTask

from .competitors import REVERSIBLE_COUPLING
from .reversible import reversible_solve

__all__ = [
    "TRAINING_RECIPES",
    "DEFAULT_COMPETITORS",
    "SolveFn",
    "TrainingRecipe",
    "UnknownNameError",
    "get_recipe",
    "get_task",
]


class UnknownNameError(ValueError, KeyError):
    """An unknown task or competitor name; a ``ValueError`` and a ``KeyError`` both."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------- recipes

SolveFn = Callable[..., torch.Tensor]  # (field, y0, t, *, loss_scaler=None) -> y(t[-1])


@dataclass(frozen=True)
class TrainingRecipe:
    """How one competitor trains: the ODE solve, the autocast precision and the loss scaling.

    ``solve(field, y0, t, loss_scaler=None)`` returns the state at ``t[-1]`` (rk4 or a scheme
    built on it, on the fixed grid ``t``: the tasks need the end state only, and a reversible
    solver keeps no other);
    the whole forward (stem, ODE block, head, loss) runs under ``torch.autocast`` with
    ``autocast_dtype`` (None: fp32, autocast explicitly off), its weight cache as
    ``autocast_cache`` says. ``grad_scaler``: a ``torch.amp.GradScaler`` on the loss;
    ``adjoint_scaler``: one persistent ``rampde.DynamicScaler`` for every solve of the run.
    """

    name: str
    precision: str  # "fp32" | "fp16" | "bf16"
    solve: SolveFn
    autocast_dtype: torch.dtype | None = None
    grad_scaler: bool = False
    adjoint_scaler: bool = False
    autocast_cache: bool = True
    description: str = ""

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The precision context of the forward pass (autocast off for fp32 recipes)."""
        if self.autocast_dtype is None:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=self.autocast_dtype, cache_enabled=self.autocast_cache)


def _torchdiffeq_solve(field: nn.Module, y0: torch.Tensor, t: torch.Tensor, loss_scaler: Any = None) -> torch.Tensor:
    """Backprop through torchdiffeq's rk4 (3/8 rule): 3s evaluation units per step, every stage's
    activations stored in the autocast precision (fp32 without autocast)."""
    return torchdiffeq.odeint(field, y0, t, method="rk4")[-1]


def _rampde_solver(storage: str) -> SolveFn:
    def solve(field: nn.Module, y0: torch.Tensor, t: torch.Tensor, loss_scaler: Any = None) -> torch.Tensor:
        return rampde.odeint(field, y0, t, method="rk4", options={"storage": storage}, loss_scaler=loss_scaler)[-1]

    solve.__doc__ = f"rampde.odeint, rk4, storage={storage!r}: discrete adjoint accumulated in fp32."
    solve.__name__ = f"rampde_{storage}"
    return solve


def _one_rk4_step(field: nn.Module, y: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    return torchdiffeq.odeint(field, y, pair, method="rk4")[-1]


def _checkpoint_step_solve(field: nn.Module, y0: torch.Tensor, t: torch.Tensor,
                           loss_scaler: Any = None) -> torch.Tensor:
    """torchdiffeq rk4 with ``torch.utils.checkpoint`` around each step (ANODE style): the N+1
    states are stored, each step is recomputed in the backward (4s evaluation units per step)."""
    y = y0
    for i in range(t.shape[0] - 1):
        y = checkpoint(_one_rk4_step, field, y, t[i : i + 2], use_reentrant=False)
    return y


def _reversible_solve(field: nn.Module, y0: torch.Tensor, t: torch.Tensor, loss_scaler: Any = None) -> torch.Tensor:
    """The McCallum-Foster reversible scheme over rk4 (``rampde.bench.reversible``, the registry's
    coupling): O(1) memory, the backward rebuilds each state by exact inversion, fp32."""
    return reversible_solve(field, y0, t, REVERSIBLE_COUPLING)


def _recipes() -> dict[str, TrainingRecipe]:
    fp16, bf16 = torch.float16, torch.bfloat16
    lean, fast = _rampde_solver("states"), _rampde_solver("activations")
    recipes = [
        TrainingRecipe("torchdiffeq-fp32", "fp32", _torchdiffeq_solve,
                       description="torchdiffeq.odeint, backprop through the solver, fp32, TF32 off"),
        TrainingRecipe("checkpoint-step", "fp32", _checkpoint_step_solve,
                       description="torchdiffeq rk4 steps under per-step torch.utils.checkpoint, fp32"),
        TrainingRecipe("reversible", "fp32", _reversible_solve,
                       description="McCallum-Foster reversible rk4, O(1)-memory backward by inversion, fp32"),
        TrainingRecipe("autocast-fp16", "fp16", _torchdiffeq_solve, fp16, grad_scaler=True,
                       description="torchdiffeq inside torch.autocast fp16 with a GradScaler: the naive recipe"),
        TrainingRecipe("autocast-bf16", "bf16", _torchdiffeq_solve, bf16,
                       description="torchdiffeq inside torch.autocast bf16: the naive recipe"),
        TrainingRecipe("autocast-nocache-fp16", "fp16", _torchdiffeq_solve, fp16, grad_scaler=True,
                       autocast_cache=False, description="the naive fp16 recipe with the autocast weight cache off"),
        TrainingRecipe("autocast-nocache-bf16", "bf16", _torchdiffeq_solve, bf16, autocast_cache=False,
                       description="the naive bf16 recipe with the autocast weight cache off"),
        TrainingRecipe("rampde-fp32", "fp32", lean, description="rampde.odeint without autocast (fp32)"),
        TrainingRecipe("rampde-fp16", "fp16", lean, fp16, grad_scaler=True, adjoint_scaler=True,
                       description="rampde.odeint (recompute) in autocast fp16, persistent DynamicScaler, "
                                   "GradScaler for the layers outside the ODE block"),
        TrainingRecipe("rampde-bf16", "bf16", lean, bf16, description="rampde.odeint (recompute) in autocast bf16"),
        TrainingRecipe("rampde-fp16-fast", "fp16", fast, fp16, grad_scaler=True, adjoint_scaler=True,
                       description="rampde.odeint keeping 16-bit stage activations, autocast fp16"),
        TrainingRecipe("rampde-bf16-fast", "bf16", fast, bf16,
                       description="rampde.odeint keeping 16-bit stage activations, autocast bf16"),
    ]
    return {r.name: r for r in recipes}


TRAINING_RECIPES: dict[str, TrainingRecipe] = _recipes()
DEFAULT_COMPETITORS: tuple[str, ...] = (
    "torchdiffeq-fp32", "autocast-fp16", "autocast-bf16", "rampde-fp16", "rampde-bf16",
)


def get_recipe(name: str) -> TrainingRecipe:
    """The recipe called ``name``; ``UnknownNameError`` listing the known names otherwise."""
    try:
        return TRAINING_RECIPES[name]
    except (KeyError, TypeError):
        raise UnknownNameError(
            f"unknown competitor {name!r}; known training competitors: {', '.join(TRAINING_RECIPES)}"
        ) from None


def get_task(name: str) -> TrainingTask:
    """The task called ``name``; ``UnknownNameError`` listing the known names otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise UnknownNameError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
