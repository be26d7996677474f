"""One solver step captured as a CUDA graph and replayed (``options['cuda_graph']``).

For a small vector field every kernel of a step is short, and the GPU waits on the host: Python,
the dispatcher and the launches cost more than the work (rk4 at MLP width 256: about 120 kernels
per step, forward and backward). A CUDA graph records one step's kernels once and launches them
all again with one call per step.

A captured step reads and writes fixed memory, so the stepper runs each step as a *body* that
works on fixed buffers only: the state (and in the backward the adjoint and the gradient
accumulators) and a small vector of the step's numbers (its stage times, ``|h|``, the ``h a_jl``
and ``h b_j``, as device values rather than host numbers); before each step it copies that
step's inputs into the buffers, after it copies the results out. One graph then serves every
step of any grid. Host numbers read while the body runs are frozen at capture: the fp16 scale
target is one of them, fixed for a backward attempt (a retried backward captures anew).

Off CUDA the same bodies run eagerly on the same buffers, with no capture.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

log = logging.getLogger(__name__)

_streams = threading.local()  # per thread: {device index: the side stream captures run on}


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream this thread captures on for ``device``, made once and reused by every solve.

    cuBLAS keeps a workspace per (thread, stream); a fresh stream per solve (the forward captures
    in the caller's thread, the backward in autograd's) would take a new one each time from the
    pool of streams that torch cycles through. One stream per thread and device keeps it to one
    each, and no two threads ever capture on the same stream.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    mine = getattr(_streams, "by_device", None)
    if mine is None:
        mine = _streams.by_device = {}
    if index not in mine:
        mine[index] = torch.cuda.Stream(device=index)
    return mine[index]


class StepReplay:
    """Runs the steps of one solve direction, replaying the body as a CUDA graph after its first run.

    ``run(body)``: the first time, ``body()`` runs eagerly on a side stream (it is that step's own
    computation and the capture's warm-up, as CUDA asks), then is captured; each later step
    replays the graph without calling ``body``, so every call must pass a body that does the same
    work on the same buffers. A body must never synchronise with the host. Off CUDA ``body()``
    runs eagerly every time.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.capture = device.type == "cuda"
        self.replay: Callable[[], None] | None = None
        self.eager_steps = 0  # steps run without a graph (the capture's warm-up included)

    def run(self, body: Callable[[], None]) -> None:
        if self.replay is not None:
            self.replay()
            return
        self.eager_steps += 1
        if not self.capture:
            body()
            return
        self.replay = self._warm_and_capture(body)

    def _warm_and_capture(self, body: Callable[[], None]) -> Callable[[], None]:
        """Runs ``body`` once for real on a side stream, then records it; returns the replay."""
        current = torch.cuda.current_stream(self.device)
        side = side_stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            body()
            graph = torch.cuda.CUDAGraph()
            # capture_begin/end rather than torch.cuda.graph(): that one synchronises the device
            # and empties the allocator's cache at every capture, twice per solve here.
            graph.capture_begin()
            try:
                body()
            finally:
                graph.capture_end()
        current.wait_stream(side)
        log.debug("captured one solver step as a CUDA graph")
        return graph.replay
