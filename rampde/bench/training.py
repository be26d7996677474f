"""Training parity: does mixed precision keep accuracy over a whole training run?

The same training run (same seed, same initial weights, same data order, Adam) is repeated once
per *training recipe*: how the ODE block is solved (torchdiffeq, rampde, per-step checkpointing),
in which autocast precision, and with which loss scaling. Per epoch it records the training loss,
the test metric, the cumulative training wall time, the CUDA allocator peak and the number of
skipped optimiser steps (``torch.amp.GradScaler`` found inf) and retried fp16 adjoint solves
(``rampde.DynamicScaler``) in ``<out>/training.csv``; a checkpoint per (task, competitor, seed) in
``<out>/checkpoints/`` makes a rerun skip finished runs and resume an interrupted one, with the
same curves (bitwise on the CPU).

What the columns mean: epoch 0 is the evaluation of the common initial weights; ``wall_s`` counts
training only (not evaluation, not checkpoints), synchronised on CUDA; ``peak_mem_bytes`` is
``torch.cuda.max_memory_allocated`` over one epoch's training, resident model and data included
(NaN on the CPU); ``test_metric`` is computed with the recipe's own solver and precision (the
model as it would be deployed), accuracy for ``digits``, NLL in nats for ``cnf``.

Public API: ``run_training``, ``TASKS``, ``TRAINING_RECIPES``, ``training_figures``,
``parity_table``, and ``add_train_arguments`` / ``main_train`` for ``rampde-bench train``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
import torchdiffeq
from torch import nn
from torch.utils.checkpoint import checkpoint

import rampde

from .training_tasks import TASKS, Batch, TaskData, TaskSize, TrainingTask

from . import measure
from .competitors import REVERSIBLE_COUPLING, tf32
from .reversible import reversible_solve
from .results import atomic_write, write_csv_atomic

log = logging.getLogger(__name__)

__all__ = [
    "TASKS",
    "TRAINING_RECIPES",
    "DEFAULT_COMPETITORS",
    "COLUMNS",
    "TrainingRecipe",
    "TrainingEvent",
    "UnknownNameError",
    "run_training",
    "read_training",
    "training_figures",
    "parity_table",
    "add_train_arguments",
    "main_train",
]

COLUMNS = [
    "task", "competitor", "precision", "epoch", "train_loss", "test_metric", "metric_name",
    "wall_s", "peak_mem_bytes", "skipped_steps", "scaler_retries", "seed", "device", "gpu",
    "torch", "commit", "timestamp",
]
_STRING_COLUMNS = ("task", "competitor", "precision", "metric_name", "device", "gpu", "torch", "commit", "timestamp")
CSV_NAME = "training.csv"
BASELINE = "torchdiffeq-fp32"
SIZES = ("full", "tiny")
_EVAL_BATCH = 1024
_CHECKPOINT_FORMAT = 1


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


# ----------------------------------------------------------------------------- environment


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ValueError otherwise."""
    try:
        return measure.resolve_device(device)
    except ValueError as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N': {exc}") from None


def _environment(dev: torch.device) -> dict[str, str]:
    return {"device": dev.type, "gpu": measure.gpu_name(dev), "torch": str(torch.__version__),
            "commit": measure.project_commit() or "unknown"}


# ----------------------------------------------------------------------------- results store


def read_training(out: Path | str) -> pd.DataFrame:
    """The training results in ``<out>/training.csv`` (an empty table with ``COLUMNS`` if none)."""
    path = Path(out) / CSV_NAME
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=object if c in _STRING_COLUMNS else float) for c in COLUMNS})
    return pd.read_csv(path, dtype={c: str for c in _STRING_COLUMNS}, keep_default_na=False,
                       na_values={c: ["", "nan", "NaN"] for c in COLUMNS if c not in _STRING_COLUMNS})


def _store_rows(out: Path, task: str, competitor: str, seed: int, rows: list[dict]) -> None:
    """Replaces the rows of one run in ``<out>/training.csv``, atomically."""
    df = read_training(out)
    keep = ~((df["task"] == task) & (df["competitor"] == competitor) & (df["seed"] == seed))
    new = pd.DataFrame(rows, columns=COLUMNS)
    merged = new if not keep.any() else pd.concat([df[keep], new], ignore_index=True)
    merged = merged.sort_values(["task", "competitor", "seed", "epoch"], kind="stable")
    write_csv_atomic(merged[COLUMNS], Path(out) / CSV_NAME)


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle), binary=True)


# ----------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class TrainingEvent:
    """What ``progress`` is told: ``kind`` is ``"start"`` (``epoch`` = epochs already done, > 0 when
    resumed), ``"epoch"`` (a finished epoch, with its CSV ``row``; epoch 0 is the evaluation before
    training) or ``"skipped"`` (the run had already finished)."""

    task: str
    competitor: str
    epoch: int
    epochs: int
    kind: str
    row: dict | None = None


Progress = Callable[[TrainingEvent], None]


@dataclass
class _RunState:
    """Everything that a resumed run needs besides the model and optimiser."""

    epoch: int = 0
    wall_s: float = 0.0
    skipped_steps: int = 0
    rows: list[dict] = field(default_factory=list)


@dataclass
class _Trainer:
    """One (task, competitor, seed) training run and the objects that evolve with it."""

    task: TrainingTask
    recipe: TrainingRecipe
    size: TaskSize
    size_name: str
    seed: int
    dev: torch.device
    data: TaskData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    grad_scaler: torch.amp.GradScaler
    adjoint_scaler: rampde.DynamicScaler | None
    order: torch.Generator  # the data order, on the CPU
    state: _RunState

    @classmethod
    def fresh(cls, task: TrainingTask, recipe: TrainingRecipe, size_name: str, seed: int,
              dev: torch.device) -> "_Trainer":
        """Initial weights from ``seed`` (the same for every recipe), Adam, fresh scalers."""
        size = task.sizes[size_name]
        data = task.make_data(size, dev)
        torch.manual_seed(seed)
        model = task.make_model(size).to(dev)
        return cls(
            task=task, recipe=recipe, size=size, size_name=size_name, seed=seed, dev=dev, data=data, model=model,
            optimizer=torch.optim.Adam(model.parameters(), lr=size.lr),
            grad_scaler=torch.amp.GradScaler(dev.type, enabled=recipe.grad_scaler),
            adjoint_scaler=rampde.DynamicScaler() if recipe.adjoint_scaler else None,
            order=torch.Generator().manual_seed(seed),
            state=_RunState(),
        )

    # -- the solve handed to the model
    def solve(self, field_: nn.Module, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.recipe.solve(field_, y0, t, loss_scaler=self.adjoint_scaler)

    # -- checkpoints
    def config(self) -> dict[str, Any]:
        return _run_config(self.task.name, self.recipe.name, self.seed, self.size_name, self.dev)

    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": _CHECKPOINT_FORMAT,
            "config": self.config(),
            "epoch": self.state.epoch,
            "wall_s": self.state.wall_s,
            "skipped_steps": self.state.skipped_steps,
            "rows": self.state.rows,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict(),
            "adjoint_scaler": None if self.adjoint_scaler is None else self.adjoint_scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None,
            "order_rng": self.order.get_state(),
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.grad_scaler.is_enabled():
            self.grad_scaler.load_state_dict(ckpt["grad_scaler"])
        if self.adjoint_scaler is not None:
            self.adjoint_scaler.load_state_dict(ckpt["adjoint_scaler"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] is not None and self.dev.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.dev)
        self.order.set_state(ckpt["order_rng"])
        self.state = _RunState(epoch=int(ckpt["epoch"]), wall_s=float(ckpt["wall_s"]),
                               skipped_steps=int(ckpt["skipped_steps"]), rows=list(ckpt["rows"]))

    # -- training and evaluation
    def train_epoch(self) -> tuple[float, float]:
        """One pass over the shuffled training set; returns (mean loss, allocator peak or NaN).

        Cost: ``n_train / batch`` optimiser steps, each one forward solve and its backward.
        """
        model, scaler, dev = self.model, self.grad_scaler, self.dev
        model.train()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        perm = torch.randperm(self.data.n_train, generator=self.order).to(dev)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for idx in perm.split(self.size.batch):
            batch: Batch = tuple(x[idx] for x in self.data.train)
            self.optimizer.zero_grad(set_to_none=True)
            with self.recipe.autocast(dev.type):
                loss = model.loss(batch, self.solve)
            scaler.scale(loss).backward()
            scale_before = scaler.get_scale() if scaler.is_enabled() else 0.0
            scaler.step(self.optimizer)
            scaler.update()
            if scaler.is_enabled() and scaler.get_scale() < scale_before:
                self.state.skipped_steps += 1  # GradScaler found inf/NaN and skipped the step
            loss_sum += loss.detach().double() * idx.numel()
        peak = float(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else math.nan
        return float(loss_sum) / self.data.n_train, peak

    @torch.no_grad()
    def evaluate(self) -> float:
        """The test metric (accuracy, or NLL in nats) in the recipe's own precision and solver."""
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.dev)
        n = self.data.n_test
        for start in range(0, n, _EVAL_BATCH):
            batch = tuple(x[start : start + _EVAL_BATCH] for x in self.data.test)
            with self.recipe.autocast(self.dev.type):
                total += self.model.metric_sum(batch, self.solve).double()
        return float(total) / n

    def row(self, train_loss: float, metric: float, peak: float, env: Mapping[str, str]) -> dict:
        retries = self.adjoint_scaler.stats()["retries"] if self.adjoint_scaler is not None else 0
        return {
            "task": self.task.name, "competitor": self.recipe.name, "precision": self.recipe.precision,
            "epoch": self.state.epoch, "train_loss": train_loss, "test_metric": metric,
            "metric_name": self.task.metric_name, "wall_s": self.state.wall_s, "peak_mem_bytes": peak,
            "skipped_steps": self.state.skipped_steps, "scaler_retries": retries, "seed": self.seed,
            **env, "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }


def _run_config(task: str, competitor: str, seed: int, size: str, dev: torch.device) -> dict[str, Any]:
    """What identifies a run: a checkpoint with another config is refused, never mixed in."""
    return {"task": task, "competitor": competitor, "seed": seed, "size": size, "device": dev.type}


def _checkpoint_path(out: Path, task: str, competitor: str, seed: int) -> Path:
    return out / "checkpoints" / f"{task}--{competitor}--seed{seed}.pt"


def _load_checkpoint(path: Path, config: Mapping[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read the checkpoint {path} ({reason}); delete it to train that run again") from exc
    if ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {ckpt.get('format')}, expected {_CHECKPOINT_FORMAT}; "
                         f"use another --out folder or delete it")
    saved = ckpt["config"]
    if saved != dict(config):
        diff = ", ".join(f"{k}={saved.get(k)!r} there, {v!r} now" for k, v in config.items() if saved.get(k) != v)
        raise ValueError(f"{path} belongs to a different run ({diff}); use another out folder, or the same settings")
    return ckpt


def rng_devices(dev: torch.device) -> list[int]:
    """The CUDA device indices whose RNG a run on ``dev`` forks: ``cuda`` without an index is the
    current device (``torch.random.fork_rng`` wants indices and fails on ``None``); none on the CPU."""
    if dev.type != "cuda":
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


def _run_one(task: TrainingTask, recipe: TrainingRecipe, ckpt: dict[str, Any] | None, *, epochs: int, out: Path,
             dev: torch.device, seed: int, size: str, env: Mapping[str, str], progress: Progress | None) -> None:
    """Trains one competitor up to ``epochs``, resuming from ``ckpt``; skips it when done."""
    notify = progress or (lambda event: None)
    path = _checkpoint_path(out, task.name, recipe.name, seed)
    if ckpt is not None and ckpt["epoch"] >= epochs:
        _store_rows(out, task.name, recipe.name, seed, ckpt["rows"])  # the CSV may lag the checkpoint
        log.info("%s / %s: finished earlier (%d epochs), skipped", task.name, recipe.name, ckpt["epoch"])
        notify(TrainingEvent(task.name, recipe.name, epochs, epochs, "skipped"))
        return

    with torch.random.fork_rng(devices=rng_devices(dev), device_type=dev.type), tf32(False):
        trainer = _Trainer.fresh(task, recipe, size, seed, dev)
        if ckpt is not None:
            trainer.restore(ckpt)
            log.info("%s / %s: resuming after epoch %d", task.name, recipe.name, trainer.state.epoch)
        notify(TrainingEvent(task.name, recipe.name, trainer.state.epoch, epochs, "start"))
        if not trainer.state.rows:  # epoch 0: the common starting point
            _finish_epoch(trainer, math.nan, math.nan, out, path, env, epochs, notify)
        while trainer.state.epoch < epochs:
            measure.synchronize(dev)
            started = time.perf_counter()
            train_loss, peak = trainer.train_epoch()
            measure.synchronize(dev)
            trainer.state.wall_s += time.perf_counter() - started
            trainer.state.epoch += 1
            _finish_epoch(trainer, train_loss, peak, out, path, env, epochs, notify)


def _finish_epoch(trainer: _Trainer, train_loss: float, peak: float, out: Path, path: Path,
                  env: Mapping[str, str], epochs: int, notify: Progress) -> None:
    """Evaluates, then persists (checkpoint first, CSV second) before telling ``progress``."""
    row = trainer.row(train_loss, trainer.evaluate(), peak, env)
    trainer.state.rows.append(row)
    _atomic_save(trainer.checkpoint(), path)
    _store_rows(out, row["task"], row["competitor"], row["seed"], trainer.state.rows)
    log.info("%s / %s epoch %d: loss %.4g, test %s %.4g, %.1f s, skipped %d, retries %d", row["task"],
             row["competitor"], row["epoch"], train_loss, row["metric_name"], row["test_metric"], row["wall_s"],
             row["skipped_steps"], row["scaler_retries"])
    notify(TrainingEvent(row["task"], row["competitor"], row["epoch"], epochs, "epoch", row))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def run_training(
    task: str,
    competitors: Sequence[str],
    *,
    epochs: int,
    out: Path | str,
    device: str = "auto",
    seed: int = 0,
    size: str = "full",
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Trains ``task`` once per competitor (same seed, initial weights, data order, Adam) and
    returns the per-epoch rows of these runs from ``<out>/training.csv``.

    Resumable: a run whose checkpoint has reached ``epochs`` is skipped, an interrupted one goes on
    from its last finished epoch (the same curves, bitwise on the CPU). TF32 is off throughout.
    Cost: ``epochs * n_train / batch`` optimiser steps per competitor; 16-bit autocast is slow on
    CPUs without native fp16/bf16 arithmetic (measure precision there, speed on the GPU).

    Raises ``UnknownNameError`` (a ``ValueError``) for unknown names, ``ValueError`` for bad values.
    """
    task_obj = get_task(task)
    if isinstance(competitors, str):
        competitors = [competitors]
    recipes = [get_recipe(name) for name in competitors]
    if not recipes:
        raise ValueError(f"competitors is empty; known: {', '.join(TRAINING_RECIPES)}")
    if len(set(competitors)) != len(competitors):
        raise ValueError(f"competitors has duplicates: {list(competitors)}")
    epochs = _check_int("epochs", epochs, 1)
    seed = _check_int("seed", seed, 0)
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    dev = resolve_device(device)
    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    env = _environment(dev)
    # read (and check) every checkpoint before training anything
    ckpts = [_load_checkpoint(_checkpoint_path(out, task, r.name, seed), _run_config(task, r.name, seed, size, dev))
             for r in recipes]
    for recipe, ckpt in zip(recipes, ckpts):
        _run_one(task_obj, recipe, ckpt, epochs=epochs, out=out, dev=dev, seed=seed, size=size, env=env,
                 progress=progress)
    df = read_training(out)
    mine = (df["task"] == task) & df["competitor"].isin(list(competitors)) & (df["seed"] == seed)
    return df[mine & (df["epoch"] <= epochs)].reset_index(drop=True)


# ----------------------------------------------------------------------------- reporting


def _default_colors() -> dict[str, str]:
    import plotly.colors

    palette = plotly.colors.qualitative.D3 + plotly.colors.qualitative.Set2
    return {name: palette[i % len(palette)] for i, name in enumerate(TRAINING_RECIPES)}


def _final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The last epoch of every (task, competitor, seed) run."""
    last = df.groupby(["task", "competitor", "seed"])["epoch"].transform("max")
    return df[df["epoch"] == last]


def training_figures(df: pd.DataFrame, colors: Mapping[str, str] | None = None) -> list[tuple[str, Any]]:
    """Per task: the test metric against epoch and against training wall time, one line per
    competitor (the mean over seeds when several), a fixed colour per competitor.

    Returns ``[(title, plotly.graph_objects.Figure), ...]``.
    """
    import plotly.graph_objects as go

    palette = {**_default_colors(), **(colors or {})}
    figures: list[tuple[str, Any]] = []
    tasks = df["task"].unique()
    for task in [*[t for t in TASKS if t in tasks], *sorted(t for t in tasks if t not in TASKS)]:
        part = df[df["task"] == task]
        metric = part["metric_name"].iloc[0]
        label = "test accuracy" if metric == "accuracy" else "test NLL (nats)"
        curves = (part.groupby(["competitor", "epoch"], as_index=False)[["test_metric", "wall_s"]].mean()
                  .sort_values(["competitor", "epoch"]))
        for x, x_label, what in (("epoch", "epoch", "epoch"), ("wall_s", "training wall time (s)", "wall time")):
            fig = go.Figure()
            for name in _ordered(curves["competitor"].unique()):
                c = curves[curves["competitor"] == name]
                fig.add_trace(go.Scatter(x=c[x], y=c["test_metric"], mode="lines+markers", name=name,
                                         line={"color": palette.get(name)}))
            title = f"{task}: {label} against {what}"
            fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=label, legend_title="competitor",
                              template="plotly_white")
            figures.append((title, fig))
    return figures


def _ordered(names: Sequence[str]) -> list[str]:
    known = list(TRAINING_RECIPES)
    return sorted(names, key=lambda n: (known.index(n) if n in known else len(known), n))


def parity_table(df: pd.DataFrame) -> pd.DataFrame:
    """Final test metric per task and competitor (mean over seeds) and its difference to
    ``torchdiffeq-fp32`` at the same epoch (``delta_vs_fp32``: competitor minus baseline, NaN
    without a baseline at that epoch; ``epochs`` says where each run ended),
    with the final epoch's wall time and allocator peak (means over seeds) and its cumulative
    skipped steps and adjoint retries (sums over seeds)."""
    cols = ["task", "competitor", "precision", "metric_name", "epochs", "final_metric", "delta_vs_fp32",
            "wall_s", "peak_mem_bytes", "skipped_steps", "scaler_retries", "seeds"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    final = _final_rows(df)
    table = final.groupby(["task", "competitor"], as_index=False).agg(
        precision=("precision", "first"), metric_name=("metric_name", "first"), epochs=("epoch", "max"),
        final_metric=("test_metric", "mean"), wall_s=("wall_s", "mean"), peak_mem_bytes=("peak_mem_bytes", "mean"),
        skipped_steps=("skipped_steps", "sum"), scaler_retries=("scaler_retries", "sum"), seeds=("seed", "nunique"),
    )
    # the baseline at the same epoch, so that a run cut short is not compared with a finished one
    base = df[df["competitor"] == BASELINE].groupby(["task", "epoch"])["test_metric"].mean()
    table["delta_vs_fp32"] = [metric - base.get((task, epoch), math.nan) for task, epoch, metric
                              in zip(table["task"], table["epochs"], table["final_metric"])]
    rank = {n: i for i, n in enumerate([*TASKS, *_ordered(table["competitor"].unique())])}
    table = table.sort_values(["task", "competitor"], key=lambda s: s.map(lambda n: (rank.get(n, len(rank)), n)))
    return table[cols].reset_index(drop=True)


# ----------------------------------------------------------------------------- CLI


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the options of ``rampde-bench train`` to ``parser``."""
    parser.add_argument("--task", default="digits",
                        help=f"task name(s), comma-separated, or 'all'; known: {', '.join(TASKS)} (default: digits)")
    parser.add_argument("--competitors", nargs="+", default=list(DEFAULT_COMPETITORS), metavar="NAME",
                        help=f"training recipes (space- or comma-separated, or 'all'); known: "
                             f"{', '.join(TRAINING_RECIPES)} (default: {' '.join(DEFAULT_COMPETITORS)})")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per run (default: the task's default for --size)")
    parser.add_argument("--out", type=Path, default=Path("reports/training"),
                        help="results folder: training.csv and checkpoints/ (default: reports/training); "
                             "rerun with the same folder to resume")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and data order (default: 0)")
    parser.add_argument("--size", choices=SIZES, default="full", help="problem size (default: full)")
    return parser


def _split_names(values: Sequence[str] | str, known: Mapping[str, Any], what: str) -> list[str]:
    items = [values] if isinstance(values, str) else list(values)
    names = [n.strip() for v in items for n in v.split(",") if n.strip()]
    if names == ["all"]:
        return list(known)
    if not names:
        raise ValueError(f"no {what} given; known: {', '.join(known)}")
    for n in names:
        if n not in known:
            raise UnknownNameError(f"unknown {what} {n!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(names))


def _format_tables(table: pd.DataFrame) -> list:
    """One compact rich table per task (fits 80 columns)."""
    from rich import box
    from rich.table import Table

    tables = []
    for task, part in table.groupby("task", sort=False):
        metric = part["metric_name"].iloc[0]
        epochs = int(part["epochs"].max())
        out = Table(title=f"{task}: test {metric} after {epochs} epoch{'s' if epochs != 1 else ''}",
                    box=box.SIMPLE_HEAD, collapse_padding=True)
        out.add_column("competitor", no_wrap=True)
        for col in ("final", "Δ vs fp32", "wall s", "peak MiB", "skipped", "retries"):
            out.add_column(col, justify="right", no_wrap=True)
        for r in part.itertuples():
            delta = "—" if math.isnan(r.delta_vs_fp32) else f"{r.delta_vs_fp32:+.4f}"
            peak = "—" if math.isnan(r.peak_mem_bytes) else f"{r.peak_mem_bytes / 2**20:.1f}"
            out.add_row(r.competitor, f"{r.final_metric:.4f}", delta, f"{r.wall_s:.1f}", peak,
                        str(int(r.skipped_steps)), str(int(r.scaler_retries)))
        tables.append(out)
    return tables


def main_train(args: argparse.Namespace) -> int:
    """Runs ``rampde-bench train`` with a progress bar and prints the parity table; returns the exit code."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console, err = Console(), Console(stderr=True)
    try:
        tasks = _split_names(args.task, TASKS, "task")
        competitors = _split_names(args.competitors, TRAINING_RECIPES, "competitor")
        if args.epochs is not None:
            _check_int("--epochs", args.epochs, 1)
        _check_int("--seed", args.seed, 0)
        if args.size not in SIZES:
            raise ValueError(f"--size must be one of {list(SIZES)}, got {args.size!r}")
        resolve_device(args.device)
    except ValueError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2

    frames = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as bar:
            for task in tasks:
                epochs = args.epochs or TASKS[task].sizes[args.size].default_epochs
                bar_id = bar.add_task(task, total=len(competitors) * epochs)
                done: dict[str, int] = {}

                def on_event(ev: TrainingEvent, bar_id=bar_id, done=done) -> None:
                    done[ev.competitor] = ev.epoch
                    bar.update(bar_id, completed=sum(done.values()),
                               description=f"{ev.task} · {ev.competitor} · epoch {ev.epoch}/{ev.epochs}")

                frames.append(run_training(task, competitors, epochs=epochs, out=args.out, device=args.device,
                                           seed=args.seed, size=args.size, progress=on_event))
        for table in _format_tables(parity_table(pd.concat(frames, ignore_index=True))):
            console.print(table)
    except KeyboardInterrupt:  # in a run or after them: every epoch written so far is whole
        err.print(f"interrupted; rerun the same command to resume from {args.out}")
        return 130
    except ValueError as exc:  # e.g. an out folder holding a run with other settings
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    console.print(f"results: {Path(args.out) / CSV_NAME}")
    return 0


if __name__ == "__main__":  # pragma: no cover - the CLI proper is rampde-bench train
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main_train(add_train_arguments(argparse.ArgumentParser(prog="rampde-bench train")).parse_args()))
