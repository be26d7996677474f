"""Named sweeps: ``quick`` (minutes) and ``paper`` (the paper's grid), sized for the device."""

from __future__ import annotations

from dataclasses import dataclass, field

from .competitors import list_competitors

ALL = [c.name for c in list_competitors()]
CPU_QUICK_COMPETITORS = [
    "torchdiffeq-fp32", "autocast-bf16", "autocast-nocache-bf16", "checkpoint-step", "checkpoint-revolve",
    "reversible", "rampde-fp32", "rampde-bf16", "rampde-bf16-fast",
]


@dataclass(frozen=True)
class Suite:
    name: str
    competitors: list[str]
    workloads: dict[str, dict[str, list[int]]]
    steps: list[int]
    repeats: int = 5
    warmup: int = 2
    notes: str = field(default="", compare=False)


def get_suite(name: str, device_type: str) -> Suite:
    """The suite ``name`` for a ``cuda`` or ``cpu`` device; ``ValueError`` listing the known ones."""
    if name == "quick":
        if device_type == "cuda":
            return Suite("quick", ALL, {"mlp": {"widths": [256, 2048], "batches": [2048]},
                                        "conv": {"widths": [64], "batches": [64]},
                                        "cnf": {"widths": [64], "batches": [1024]}}, [16, 64])
        return Suite("quick", CPU_QUICK_COMPETITORS,
                     {"mlp": {"widths": [32], "batches": [32]}, "cnf": {"widths": [16], "batches": [64]}},
                     [8], repeats=3, warmup=1, notes="CPU-sized: timings say nothing about tensor cores")
    if name == "paper":
        return Suite("paper", ALL, {"mlp": {"widths": [256, 512, 1024, 2048, 4096], "batches": [2048]},
                                    "conv": {"widths": [32, 64, 128, 256], "batches": [64]},
                                    "cnf": {"widths": [64, 256], "batches": [1024]}},
                     [8, 16, 32, 64, 128, 256])
    raise ValueError(f"unknown suite {name!r}; known: quick, paper")
