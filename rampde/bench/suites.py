"""Named sweeps, sized for the device: ``quick`` (minutes), ``paper`` (the paper's grid, hours) and
``perf`` (exactly the cells of the performance targets, ``rampde.bench.targets``).

A suite names its competitors, its workloads with their widths and batch sizes, its step counts
and its repeat settings; ``sizes`` also holds sizes for the workloads it leaves out, used when the
command line picks one of those. Every command-line option overrides the suite's choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .competitors import list_competitors

SUITE_NAMES = ("quick", "paper", "perf")
CPU_QUICK_COMPETITORS = ["torchdiffeq-fp32", "autocast-bf16", "rampde-fp32", "rampde-bf16", "checkpoint-step",
                         "reversible"]
# The competitors the performance targets compare (rampde.bench.targets), the fast variants included.
PERF_COMPETITORS = ["torchdiffeq-fp32", "torchdiffeq-tf32", "autocast-fp16", "autocast-bf16", "rampde-fp16",
                    "rampde-bf16", "rampde-fp16-fast", "rampde-bf16-fast", "rampde-fp16-graph", "rampde-bf16-graph"]

Sizes = dict[str, list[int]]  # {"widths": [...], "batches": [...]}


@dataclass(frozen=True)
class Suite:
    """A grid: competitors x workloads (widths x batches) x steps, measured ``repeats`` times after
    ``warmup`` untimed runs."""

    name: str
    competitors: list[str]
    workloads: dict[str, Sizes]
    steps: list[int]
    repeats: int = 5
    warmup: int = 2
    notes: str = field(default="", compare=False)
    sizes: dict[str, Sizes] = field(default_factory=dict, compare=False)

    def sizes_of(self, workload: str) -> Sizes:
        """Widths and batches of ``workload``: the suite's, else its fallback sizes for the device."""
        found = self.workloads.get(workload) or self.sizes.get(workload)
        if found is None:
            raise KeyError(f"suite {self.name!r} has no sizes for workload {workload!r}")
        return {"widths": list(found["widths"]), "batches": list(found["batches"])}


def _all_competitors() -> list[str]:
    return [c.name for c in list_competitors()]


_PAPER = {"mlp": {"widths": [256, 512, 1024, 2048, 4096], "batches": [2048]},
          "conv": {"widths": [32, 64, 128, 256], "batches": [64]},
          "cnf": {"widths": [64, 128, 256], "batches": [1024]}}
_GPU_QUICK = {"mlp": {"widths": [256, 1024, 2048], "batches": [2048]},
              "conv": {"widths": [64], "batches": [64]},
              "cnf": {"widths": [64], "batches": [1024]}}
_GPU_PERF = {"mlp": {"widths": [256, 1024, 2048], "batches": [2048]},
             "conv": {"widths": [128], "batches": [64]},
             "cnf": {"widths": [64], "batches": [1024]}}
_CPU_PERF = {"mlp": {"widths": [16, 32, 64], "batches": [16]},
             "conv": {"widths": [8], "batches": [8]},
             "cnf": {"widths": [16], "batches": [64]}}
_CPU_QUICK = {"mlp": {"widths": [16, 32], "batches": [16]},
              "conv": {"widths": [8], "batches": [8]},
              "cnf": {"widths": [16], "batches": [64]}}


def get_suite(name: str, device_type: str) -> Suite:
    """The suite ``name`` for a ``cuda`` or ``cpu`` device; ``ValueError`` listing the known ones."""
    if name == "quick":
        if device_type == "cuda":
            return Suite("quick", _all_competitors(), {w: _GPU_QUICK[w] for w in ("mlp", "conv")}, [16, 64],
                         repeats=5, warmup=2, sizes=_GPU_QUICK)
        return Suite("quick", list(CPU_QUICK_COMPETITORS), {"mlp": _CPU_QUICK["mlp"]}, [4, 8], repeats=5,
                     warmup=1, notes="CPU-sized: it checks the pipeline, its timings say nothing about a GPU",
                     sizes=_CPU_QUICK)
    if name == "paper":
        return Suite("paper", _all_competitors(), dict(_PAPER), [8, 16, 32, 64, 128, 256], repeats=5, warmup=2,
                     notes="" if device_type == "cuda" else "the GPU grid on the CPU: this takes days",
                     sizes=_PAPER)
    if name == "perf":
        if device_type == "cuda":
            return Suite("perf", list(PERF_COMPETITORS), {w: _GPU_PERF[w] for w in ("mlp", "conv")}, [8, 64],
                         repeats=5, warmup=2, sizes=_GPU_PERF,
                         notes="the cells of the performance targets: 'rampde-bench targets' judges them")
        return Suite("perf", list(PERF_COMPETITORS), {w: _CPU_PERF[w] for w in ("mlp", "conv")}, [2, 8],
                     repeats=3, warmup=1, notes="CPU-sized: it checks the pipeline; its timings and memory mean "
                     "nothing, and the targets' GPU cells read 'not measured'", sizes=_CPU_PERF)
    raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITE_NAMES)}")
