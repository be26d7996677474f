"""Adjoint scaling for fp16 vector-Jacobian products.

Adjoints grow and shrink across steps; in fp16 they underflow (gradients lost) or overflow (inf).
Before each step's low-precision vjp the fp32 adjoint is multiplied by a power of two chosen on
the device from the adjoint's own magnitude, so that ``max |h * adjoint| * scale ~ 2**target_log2``;
the vjp's results are unscaled in fp32 (exactly, since the scale is a power of two). Overflow is
never checked per step: non-finite values are sticky under the fp32 accumulation, so the solver
reads one flag on the host once per solve, and redoes the backward with a lower target when it
overflowed. The scaler keeps its target between calls: pass one ``DynamicScaler`` to every solve
of a training run and it settles on a target that rarely needs a retry.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# fp32 holds 2**±126; keep the per-step exponent well inside so that scale * adjoint stays finite.
_EXPONENT_CAP = 100.0


class DynamicScaler:
    """Chooses per-step power-of-two scales for the adjoint and adapts its target across solves.

    Args:
        target_log2: initial log2 of the largest scaled cotangent entering a stage's vjp.
            fp16 overflows at 2**16; the default 2**8 leaves room for the growth inside the
            vector field's backward (weight gradients sum over the batch).
        min_target_log2: below this the backward is given up with ``FloatingPointError``.
        max_target_log2: growth stops here.
        backoff_log2: how much the target drops after an overflowed backward.
        growth_interval: clean solves after which the target rises by one (2x).
        max_retries: backward attempts per solve beyond the first.
    """

    def __init__(
        self,
        target_log2: int = 8,
        *,
        min_target_log2: int = -24,
        max_target_log2: int = 14,
        backoff_log2: int = 4,
        growth_interval: int = 1000,
        max_retries: int = 8,
    ) -> None:
        if not min_target_log2 <= target_log2 <= max_target_log2:
            raise ValueError(
                f"target_log2={target_log2} must lie within [min_target_log2={min_target_log2}, "
                f"max_target_log2={max_target_log2}]"
            )
        if backoff_log2 < 1:
            raise ValueError(f"backoff_log2={backoff_log2} must be at least 1")
        if growth_interval < 1:
            raise ValueError(f"growth_interval={growth_interval} must be at least 1")
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries} must be non-negative")
        self.target_log2 = int(target_log2)
        self.min_target_log2 = int(min_target_log2)
        self.max_target_log2 = int(max_target_log2)
        self.backoff_log2 = int(backoff_log2)
        self.growth_interval = int(growth_interval)
        self.max_retries = int(max_retries)
        self.solves = 0
        self.retries = 0
        self._clean_since_change = 0

    def step_scale(self, adjoint: torch.Tensor, h_abs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and inverse scale (0-dim fp32 device tensors, powers of two) for one step's vjp.

        Runs entirely on the device: no host synchronisation.
        """
        amax = adjoint.detach().abs().amax().float() * h_abs.float()
        exponent = torch.floor(self.target_log2 - torch.log2(amax))
        # amax == 0 gives +inf (clamped: the scaled adjoint is 0 anyway); nan stays nan and is caught.
        exponent = exponent.clamp(-_EXPONENT_CAP, _EXPONENT_CAP)
        return torch.exp2(exponent), torch.exp2(-exponent)

    def record(self, overflowed: bool) -> None:
        """Account for one backward attempt: back off after an overflow, grow after clean runs."""
        if overflowed:
            self.retries += 1
            self._clean_since_change = 0
            self.target_log2 -= self.backoff_log2
            log.info("fp16 adjoint overflowed; retrying with target 2**%d", self.target_log2)
            return
        self.solves += 1
        self._clean_since_change += 1
        if self._clean_since_change >= self.growth_interval and self.target_log2 < self.max_target_log2:
            self.target_log2 += 1
            self._clean_since_change = 0

    def exhausted(self) -> bool:
        return self.target_log2 < self.min_target_log2

    def stats(self) -> dict[str, int]:
        """Counters for reports: clean solves, retried backwards, current target exponent."""
        return {"solves": self.solves, "retries": self.retries, "scale_log2": self.target_log2}

    def state_dict(self) -> dict[str, Any]:
        return {
            "target_log2": self.target_log2,
            "solves": self.solves,
            "retries": self.retries,
            "clean_since_change": self._clean_since_change,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target_log2 = int(state["target_log2"])
        self.solves = int(state["solves"])
        self.retries = int(state["retries"])
        self._clean_since_change = int(state["clean_since_change"])

    def __repr__(self) -> str:
        return (
            f"DynamicScaler(target_log2={self.target_log2}, solves={self.solves}, "
            f"retries={self.retries})"
        )
