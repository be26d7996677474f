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
``parity_table``; ``rampde.bench.training_cli`` holds ``rampde-bench train``.

This module holds the results store and the runner; it re-exports the recipes and the name
look-ups (``training_recipes``) and the parity table and figures (``training_report``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

import rampde

from .training_tasks import TASKS, Batch, TaskData, TaskSize, TrainingTask

from . import measure
from .competitors import tf32
from .results import atomic_write, write_csv_atomic
from .training_recipes import (
    DEFAULT_COMPETITORS,
    TRAINING_RECIPES,
    TrainingRecipe,
    UnknownNameError,
    get_recipe,
    get_task,
)
from .training_recipes import SolveFn as SolveFn  # re-exported (defined here before), like BASELINE
from .training_report import BASELINE as BASELINE
from .training_report import parity_table, training_figures

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
]

COLUMNS = [
    "task", "competitor", "precision", "epoch", "train_loss", "test_metric", "metric_name",
    "wall_s", "peak_mem_bytes", "skipped_steps", "scaler_retries", "seed", "device", "gpu",
    "torch", "commit", "timestamp",
]
_STRING_COLUMNS = ("task", "competitor", "precision", "metric_name", "device", "gpu", "torch", "commit", "timestamp")
CSV_NAME = "training.csv"
SIZES = ("full", "tiny")
_EVAL_BATCH = 1024
_CHECKPOINT_FORMAT = 1


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

