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

Memory: the captures of one thread replayed on one stream of one device share one graph memory
pool (``shared_pool``). A pool of its own per capture stays cached after its graph is gone, so
reserved memory grew with every graph solve of a training run.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

log = logging.getLogger(__name__)

_streams = threading.local()  # per thread: {device index: the side stream captures run on}
_pools = threading.local()  # per thread: {(device index, replay stream handle): SharedPool}


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


class SharedPool:
    """A graph memory pool and the graph captured into it last.

    The allocator forgets a pool once every graph captured into it is destroyed, and a later
    ``capture_begin`` with its handle then fails an internal assert; holding the last graph keeps
    the pool in use until the next capture into it replaces that graph.
    """

    def __init__(self, handle: tuple, last: "torch.cuda.CUDAGraph") -> None:
        self.handle = handle
        self.last = last


def shared_pool(device: torch.device, stream: "torch.cuda.Stream") -> SharedPool | None:
    """This thread's pool for graphs of ``device`` replayed on ``stream``; None before the first capture.

    Sharing is safe because these graphs never run concurrently: each solve replays its graph on
    ``stream`` and is done with it before the thread captures the next one, so the next graph's
    replays queue behind the last one's. Graphs replayed on another stream get another pool.
    """
    return getattr(_pools, "by_key", {}).get(_pool_key(device, stream))


def keep_pool(device: torch.device, stream: "torch.cuda.Stream", handle: tuple,
              graph: "torch.cuda.CUDAGraph") -> None:
    """Records ``graph``, just captured into ``handle``, as the last of this thread's pool for ``stream``."""
    mine = getattr(_pools, "by_key", None)
    if mine is None:
        mine = _pools.by_key = {}
    mine[_pool_key(device, stream)] = SharedPool(handle, graph)


def _pool_key(device: torch.device, stream: "torch.cuda.Stream") -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, int(stream.cuda_stream)


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
        pool = shared_pool(self.device, current)
        # A new handle only where no capture into this thread's pool for `current` has succeeded:
        # a handle whose only graph failed its capture has no live graph and cannot be reused.
        handle = pool.handle if pool is not None else torch.cuda.graph_pool_handle()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            body()
            graph = torch.cuda.CUDAGraph()
            # capture_begin/end rather than torch.cuda.graph(): that one synchronises the device
            # and empties the allocator's cache at every capture, twice per solve here.
            graph.capture_begin(pool=handle)
            try:
                body()
            finally:
                graph.capture_end()
        keep_pool(self.device, current, handle, graph)
        current.wait_stream(side)
        log.debug("captured one solver step as a CUDA graph")
        return graph.replay
