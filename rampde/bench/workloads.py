"""The workloads every competitor is measured on: MLP, conv and CNF vector fields with inputs and losses.

A :class:`Workload` bundles a vector field ``f(t, y)`` (an ``nn.Module``), an initial state, a loss
of the final state and the seed that made them. Builders create everything on the CPU from the
seed, then move it to the requested device, so the same seed gives the same numbers on every device.
Losses are computed in fp32 (or in the state's dtype when that is wider, for the fp64 reference).

- ``mlp``: state ``(batch, width)``; ``Linear(width+1, width)`` on ``[y, t]``, tanh,
  ``Linear(width, width)``. Loss ``mean(y(T)**2)``.
- ``conv``: state ``(batch, width, 32, 32)``; 3x3 conv, tanh, 3x3 conv, padding 1, ``width``
  channels in and out, no time input. Loss ``mean(y(T)**2)``. With ``channels_last=True`` the
  conv weights and ``y0`` are in ``torch.channels_last`` memory format (same values, NHWC strides:
  what cuDNN's tensor-core kernels read without a transposition).
- ``cnf``: a continuous normalizing flow on two-moons samples; state ``(batch, 3)`` = 2-D point
  and log-density change; the trace of the field's Jacobian is exact and in closed form (no
  autograd inside the field). Loss: mean negative log-likelihood under a standard normal base.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "Workload",
    "MLPField",
    "ConvField",
    "CNFField",
    "WORKLOADS",
    "DEFAULT_BATCH",
    "build_workload",
    "mean_square_loss",
    "cnf_nll_loss",
    "two_moons",
]

IMAGE_SIZE = 32  # conv workload images are IMAGE_SIZE x IMAGE_SIZE
_ALIGN = 8  # widths and batches are multiples of this, so that tensor cores engage
DEFAULT_BATCH: dict[str, int] = {"mlp": 2048, "conv": 64, "cnf": 1024}


def _loss_dtype(y: torch.Tensor) -> torch.dtype:
    """fp32, or the state's dtype when that is wider (fp64 reference runs)."""
    return torch.promote_types(y.dtype, torch.float32)


def mean_square_loss(y: torch.Tensor) -> torch.Tensor:
    """``mean(y**2)`` computed in fp32 (or wider): the MLP and conv loss."""
    y = y.to(_loss_dtype(y))
    return (y * y).mean()


def cnf_nll_loss(state: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the data under a CNF with a standard normal base, in fp32.

    ``state[:, :2]`` is the point ``z(T)`` and ``state[:, 2]`` is ``c(T) = -integral of trace(df/dz)``,
    so ``log p(x) = log N(z(T); 0, I) - c(T)``.
    """
    state = state.to(_loss_dtype(state))
    z, c = state[:, :2], state[:, 2]
    log_base = -0.5 * (z * z).sum(dim=1) - math.log(2.0 * math.pi)
    return -(log_base - c).mean()


# ----------------------------------------------------------------------------- vector fields


class MLPField(nn.Module):
    """``Linear(width+1, width)`` on ``[y, t]``, tanh, ``Linear(width, width)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.lin1 = nn.Linear(width + 1, width)
        self.lin2 = nn.Linear(width, width)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.to(y.dtype).expand(*y.shape[:-1], 1)
        return self.lin2(torch.tanh(self.lin1(torch.cat([y, tt], dim=-1))))

    def flops(self, batch: int) -> int:
        """Matmul FLOPs of one evaluation on ``batch`` states (2*m*n*k per matmul)."""
        w = self.width
        return 2 * batch * (w + 1) * w + 2 * batch * w * w


class ConvField(nn.Module):
    """3x3 conv, tanh, 3x3 conv, padding 1, ``width`` channels in and out; no time input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(y)))

    def flops(self, batch: int, height: int = IMAGE_SIZE, width_px: int = IMAGE_SIZE) -> int:
        """Convolution FLOPs of one evaluation (2 * outputs * kernel volume per conv)."""
        per_conv = 2 * batch * height * width_px * self.width * self.width * 9
        return 2 * per_conv


class CNFField(nn.Module):
    """A 2-D continuous normalizing flow: ``dz/dt = W2 tanh(W1 [z, t] + b1) + b2``, ``dc/dt = -tr(df/dz)``.

    The trace is exact and in closed form: ``tr(df/dz) = sum_k tanh'(a_k) * sum_i W2[i, k] W1[k, i]``
    with ``a = W1 [z, t] + b1`` and ``i`` over the two spatial inputs; no autograd inside the field.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.lin1 = nn.Linear(3, width)
        self.lin2 = nn.Linear(width, 2)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = y[:, :2]
        tt = t.to(y.dtype).expand(y.shape[0], 1)
        h = torch.tanh(self.lin1(torch.cat([z, tt], dim=1)))
        dz = self.lin2(h)
        # v_k = sum_i W2[i, k] W1[k, i]: the Jacobian's trace weights, one per hidden unit.
        v = (self.lin2.weight.t() * self.lin1.weight[:, :2]).sum(dim=1)
        trace = torch.matmul(1.0 - h * h, v.to(h.dtype))
        return torch.cat([dz, -trace.unsqueeze(1).to(dz.dtype)], dim=1)

    def exact_trace(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The trace of ``d(dz/dt)/dz`` per sample (what ``forward`` negates as the last column)."""
        return -self.forward(t, y)[:, 2]

    def flops(self, batch: int) -> int:
        """Matmul FLOPs of one evaluation: the two layers and the trace's matrix-vector product."""
        w = self.width
        return 2 * batch * 3 * w + 2 * batch * w * 2 + 2 * batch * w


# ----------------------------------------------------------------------------- the workload


@dataclass
class Workload:
    """A vector field, its initial state and loss: one forward solve + backward is one measurement.

    ``y0`` never requires grad; competitors take a copy that does. Nothing here is mutated by a run.
    """

    name: str
    width: int
    batch: int
    field: nn.Module
    y0: torch.Tensor
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    t_end: float = 1.0
    seed: int = 0
    info: dict = field(default_factory=dict)
    channels_last: bool = False  # conv only: weights and y0 in torch.channels_last memory format

    @property
    def device(self) -> torch.device:
        return self.y0.device

    @property
    def dtype(self) -> torch.dtype:
        return self.y0.dtype

    def time_grid(self, steps: int) -> torch.Tensor:
        """``linspace(0, t_end, steps + 1)`` on ``y0``'s device, in ``y0``'s dtype."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        return torch.linspace(0.0, self.t_end, steps + 1, dtype=self.y0.dtype, device=self.y0.device)

    def to(self, dtype: torch.dtype) -> "Workload":
        """A deep copy in another floating dtype (``torch.float64`` for the reference runs)."""
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        return replace(
            self,
            field=copy.deepcopy(self.field).to(dtype),
            y0=self.y0.detach().clone().to(dtype),
            info=copy.deepcopy(self.info),
        )

    def flops_per_eval(self) -> int:
        """Matmul/conv FLOPs of one evaluation of the field on the whole batch (2*m*n*k per matmul)."""
        return int(self.field.flops(self.batch))

    def describe(self) -> str:
        layout = ", channels_last" if self.channels_last else ""
        return f"{self.name}(width={self.width}, batch={self.batch}, device={self.device}, seed={self.seed}{layout})"


# ----------------------------------------------------------------------------- data


def two_moons(
    n: int, *, noise: float = 0.1, seed: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` points of the two-moons data set, standardised per coordinate, shape ``(n, 2)``, fp32.

    Drawn from ``generator``, or from a fresh one seeded with ``seed`` (the global RNG is untouched).
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    n_upper = n // 2
    n_lower = n - n_upper
    angle_u = torch.rand(n_upper, generator=generator, dtype=torch.float64) * math.pi
    angle_l = torch.rand(n_lower, generator=generator, dtype=torch.float64) * math.pi
    upper = torch.stack([torch.cos(angle_u), torch.sin(angle_u)], dim=1)
    lower = torch.stack([1.0 - torch.cos(angle_l), 0.5 - torch.sin(angle_l)], dim=1)
    x = torch.cat([upper, lower])
    x = x + noise * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    x = (x - x.mean(dim=0)) / x.std(dim=0)
    return x.float()


# ----------------------------------------------------------------------------- builders


def _seeded_module(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Builds a module under ``seed`` without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _generator(seed: int) -> torch.Generator:
    # A different stream from the parameters', so data and weights are independent.
    return torch.Generator().manual_seed(seed + 1_000_003)


def _build_mlp(width: int, batch: int, device: torch.device, seed: int) -> Workload:
    fld = _seeded_module(lambda: MLPField(width), seed)
    y0 = torch.randn(batch, width, generator=_generator(seed))
    return Workload("mlp", width, batch, fld.to(device), y0.to(device), mean_square_loss, seed=seed)


def _build_conv(width: int, batch: int, device: torch.device, seed: int) -> Workload:
    fld = _seeded_module(lambda: ConvField(width), seed)
    y0 = torch.randn(batch, width, IMAGE_SIZE, IMAGE_SIZE, generator=_generator(seed))
    return Workload("conv", width, batch, fld.to(device), y0.to(device), mean_square_loss, seed=seed)


def _build_cnf(width: int, batch: int, device: torch.device, seed: int) -> Workload:
    fld = _seeded_module(lambda: CNFField(width), seed)
    x = two_moons(batch, generator=_generator(seed))
    y0 = torch.cat([x, torch.zeros(batch, 1)], dim=1)
    return Workload("cnf", width, batch, fld.to(device), y0.to(device), cnf_nll_loss, seed=seed)


def _to_channels_last(workload: Workload) -> Workload:
    """The conv workload with its 4-D weights and ``y0`` in ``torch.channels_last`` (same values)."""
    fld = workload.field.to(memory_format=torch.channels_last)  # converts the 4-D parameters only
    y0 = workload.y0.contiguous(memory_format=torch.channels_last)
    return replace(workload, field=fld, y0=y0, channels_last=True)


Builder = Callable[[int, int, torch.device, int], Workload]
WORKLOADS: dict[str, Builder] = {"mlp": _build_mlp, "conv": _build_conv, "cnf": _build_cnf}


def _check_size(arg: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{arg} must be a positive integer multiple of {_ALIGN}, got {value!r}")
    if value < _ALIGN or value % _ALIGN:
        raise ValueError(f"{arg} must be a positive multiple of {_ALIGN} (tensor cores), got {value}")
    return value


def build_workload(
    name: str,
    *,
    width: int,
    batch: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    channels_last: bool = False,
) -> Workload:
    """Builds workload ``name`` (``mlp``, ``conv`` or ``cnf``) in fp32 on ``device``.

    ``batch`` defaults to :data:`DEFAULT_BATCH` (2048 for the MLP, 64 for conv, 1024 for the CNF).
    Widths and batches must be multiples of 8; a bad argument raises ``ValueError`` naming it.
    ``channels_last`` (conv only) puts the conv weights and ``y0`` in ``torch.channels_last``
    memory format: the same numbers, another layout.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    if not isinstance(channels_last, bool):
        raise ValueError(f"channels_last must be True or False, got {channels_last!r}")
    if channels_last and name != "conv":
        raise ValueError(f"channels_last applies to the conv workload only, not {name!r}")
    width = _check_size("width", width)
    batch = _check_size("batch", DEFAULT_BATCH[name] if batch is None else batch)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device: {exc}") from None
    workload = WORKLOADS[name](width, batch, dev, seed)
    if channels_last:
        workload = _to_channels_last(workload)
    log.debug("built workload %s", workload.describe())
    return workload
