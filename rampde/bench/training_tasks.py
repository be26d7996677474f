"""The training tasks of the train suite: data, models and their losses.

Two small neural-ODE training problems, each with a "full" and a "tiny" size:

- ``digits``: an ODE classifier (conv stem, a conv ODE block solved over [0, 1] on a fixed grid,
  linear head) on scikit-learn's 8x8 handwritten digits (no download), fixed 1437/360 split;
  metric: test accuracy.
- ``cnf``: a continuous normalizing flow on two moons generated in code, trained by maximum
  likelihood with the exact (closed-form) trace of a one-hidden-layer MLP field; metric: test
  negative log-likelihood in nats.

The data is the same for every seed (fixed generators); the seed only sets the initial weights
and the data order (see ``rampde.bench.training``). Every model solves its ODE through a
``solve(field, y0, t) -> y(t[-1])`` callable handed in by the training recipe, so the same
model is trained with torchdiffeq, rampde, a checkpointed or a reversible solver, in any precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import torch
from torch import nn

from .workloads import CNFField, two_moons

Solve = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (field, y0, t) -> y(t[-1])
Batch = tuple[torch.Tensor, ...]

SPLIT_SEED = 0  # the digits train/test permutation, the same for every training seed
MOONS_TRAIN_SEED, MOONS_TEST_SEED = 1, 2
MOONS_NOISE = 0.1


@dataclass(frozen=True)
class TaskSize:
    """The knobs of one task size: data, model width, solver steps, optimiser."""

    n_train: int
    n_test: int
    width: int  # conv channels (digits) or hidden width (cnf)
    steps: int  # rk4 steps over [0, 1]
    batch: int
    lr: float
    default_epochs: int


@dataclass(frozen=True)
class TaskData:
    """Train and test tensors on the training device; a batch is a tuple of rows of these."""

    train: Batch
    test: Batch

    @property
    def n_train(self) -> int:
        return self.train[0].shape[0]

    @property
    def n_test(self) -> int:
        return self.test[0].shape[0]


class TrainableODE(Protocol):
    """What the training loop needs from a task's model."""

    def loss(self, batch: Batch, solve: Solve) -> torch.Tensor:
        """Mean training loss of ``batch``, a 0-dim fp32 tensor."""

    def metric_sum(self, batch: Batch, solve: Solve) -> torch.Tensor:
        """Sum over ``batch`` of the test metric (correct predictions, or negative log-likelihood)."""


@dataclass(frozen=True)
class TrainingTask:
    """A named training problem: its sizes, how to build its data and its model."""

    name: str
    metric_name: str  # "accuracy" | "nll"
    higher_is_better: bool
    description: str
    sizes: Mapping[str, TaskSize]
    make_data: Callable[[TaskSize, torch.device], TaskData]
    make_model: Callable[[TaskSize], nn.Module]


# ----------------------------------------------------------------------------- digits


class ConvField(nn.Module):
    """``f(t, y) = conv(tanh(conv(y)))``, 3x3 convolutions, channels in = out; autonomous.

    Cost of one evaluation: two 3x3 convolutions, ``2 * 2 * 9 * C^2 * H * W`` FLOPs per image.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(y)))


class ODEClassifier(nn.Module):
    """Conv stem (1 -> C channels, ReLU), an ODE block over [0, 1] with ``steps`` fixed steps,
    2x2 average pooling and a linear head to 10 classes."""

    def __init__(self, channels: int, steps: int, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU())
        self.field = ConvField(channels)
        self.head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(channels * 16, classes))
        self.register_buffer("t", torch.linspace(0.0, 1.0, steps + 1), persistent=False)

    def logits(self, x: torch.Tensor, solve: Solve) -> torch.Tensor:
        y1 = solve(self.field, self.stem(x), self.t)
        return self.head(y1).float()

    def loss(self, batch: Batch, solve: Solve) -> torch.Tensor:
        x, labels = batch
        return nn.functional.cross_entropy(self.logits(x, solve), labels)

    def metric_sum(self, batch: Batch, solve: Solve) -> torch.Tensor:
        x, labels = batch
        return (self.logits(x, solve).argmax(dim=-1) == labels).sum().float()


def load_digits_split(n_train: int, n_test: int) -> tuple[Batch, Batch]:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` fp32 images in [-1, 1] and int64 labels.

    The fixed permutation (``SPLIT_SEED``) gives 1437 train and 360 test images; smaller sizes take
    the first ``n_train`` / ``n_test`` of each part.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits task needs scikit-learn (it ships the data): pip install scikit-learn"
        ) from exc
    images, labels = load_digits(return_X_y=True)
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.as_tensor(labels, dtype=torch.int64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx, test_idx = perm[:1437][:n_train], perm[1437:][:n_test]
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


def _digits_data(size: TaskSize, device: torch.device) -> TaskData:
    train, test = load_digits_split(size.n_train, size.n_test)
    return TaskData(tuple(t.to(device) for t in train), tuple(t.to(device) for t in test))


def _digits_model(size: TaskSize) -> nn.Module:
    return ODEClassifier(size.width, size.steps)


# ----------------------------------------------------------------------------- cnf


class CNF(nn.Module):
    """A continuous normalizing flow from data (t=0) to a standard normal (t=1)."""

    def __init__(self, hidden: int, steps: int) -> None:
        super().__init__()
        self.field = CNFField(hidden)
        self.register_buffer("t", torch.linspace(0.0, 1.0, steps + 1), persistent=False)

    def log_prob(self, x: torch.Tensor, solve: Solve) -> torch.Tensor:
        """``log p(x)`` per point, fp32: ``log N(z(1)) + integral of the trace``."""
        state0 = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=-1)
        end = solve(self.field, state0, self.t).float()
        z, a = end[:, :2], end[:, 2]
        log_base = -0.5 * (z * z).sum(dim=-1) - math.log(2.0 * math.pi)
        return log_base - a

    def loss(self, batch: Batch, solve: Solve) -> torch.Tensor:
        return -self.log_prob(batch[0], solve).mean()

    def metric_sum(self, batch: Batch, solve: Solve) -> torch.Tensor:
        return -self.log_prob(batch[0], solve).sum()


def _cnf_data(size: TaskSize, device: torch.device) -> TaskData:
    train = two_moons(size.n_train, noise=MOONS_NOISE, generator=torch.Generator().manual_seed(MOONS_TRAIN_SEED))
    test = two_moons(size.n_test, noise=MOONS_NOISE, generator=torch.Generator().manual_seed(MOONS_TEST_SEED))
    mean, std = train.mean(dim=0), train.std(dim=0)
    return TaskData(train=(((train - mean) / std).to(device),), test=(((test - mean) / std).to(device),))


def _cnf_model(size: TaskSize) -> nn.Module:
    return CNF(size.width, size.steps)


# ----------------------------------------------------------------------------- registry


TASKS: dict[str, TrainingTask] = {
    "digits": TrainingTask(
        name="digits",
        metric_name="accuracy",
        higher_is_better=True,
        description="ODE classifier (conv stem, conv ODE block, linear head) on sklearn's 8x8 digits",
        sizes={
            "full": TaskSize(n_train=1437, n_test=360, width=32, steps=8, batch=64, lr=3e-3, default_epochs=15),
            "tiny": TaskSize(n_train=256, n_test=120, width=8, steps=4, batch=64, lr=1e-2, default_epochs=2),
        },
        make_data=_digits_data,
        make_model=_digits_model,
    ),
    "cnf": TrainingTask(
        name="cnf",
        metric_name="nll",
        higher_is_better=False,
        description="continuous normalizing flow on two moons, exact trace, maximum likelihood",
        sizes={
            "full": TaskSize(n_train=8192, n_test=4096, width=64, steps=8, batch=128, lr=1e-2, default_epochs=20),
            "tiny": TaskSize(n_train=512, n_test=256, width=16, steps=4, batch=128, lr=1e-2, default_epochs=2),
        },
        make_data=_cnf_data,
        make_model=_cnf_model,
    ),
}
