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
pool (``SharedPool``). A pool of its own per capture stays cached after its graph is gone, so
reserved memory grew with every graph solve of a training run. ``release_graph_pools()`` lets
``torch.cuda.empty_cache()`` hand the shared pools back.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

log = logging.getLogger(__name__)

_streams = threading.local()  # per thread: {device index: the side stream captures run on}
_pools_lock = threading.Lock()
_pools: dict[tuple[int, int, int], "SharedPool"] = {}  # (thread, device index, replay stream handle)


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream this thread captures on for ``device``, made once and reused by every solve.

    cuBLAS keeps a workspace per (thread, stream); a fresh stream per solve (the forward captures
    in the caller's thread, the backward in autograd's) would take a new one each time from the
    pool of streams that torch cycles through. One stream per thread and device keeps it to one
    each, and no two threads ever capture on the same stream.
    """
    index = _index(device)
    mine = getattr(_streams, "by_device", None)
    if mine is None:
        mine = _streams.by_device = {}
    if index not in mine:
        mine[index] = torch.cuda.Stream(device=index)
    return mine[index]


class SharedPool:
    """The graph memory pool that the captures of one thread replayed on one stream of one device share.

    Sharing is safe because these graphs never run concurrently: a solve replays its graph on that
    stream and is done with it before the thread captures the next one, whose replays queue behind
    it. No graph is replayed after a later capture into its pool (which may reuse its freed
    intermediates): ``StepReplay`` objects are not kept past their solve.

    Two graphs are held. ``last``, the graph captured last, keeps the pool in use: the allocator
    forgets a pool once no graph uses it, and ``capture_begin`` with its handle then fails an
    internal assert. ``retired``, the one before, is held until the next capture begins
    (``begin``): destroying a graph also frees the cuBLAS workspace of the stream it was captured
    on, which the graph captured after it on that stream uses in its replays; by the next
    capture's warm-up, which takes a fresh workspace, those replays are done.
    """

    def __init__(self, handle: tuple) -> None:
        self.handle = handle
        self.last: "torch.cuda.CUDAGraph | None" = None
        self.retired: "torch.cuda.CUDAGraph | None" = None

    def begin(self) -> tuple:
        """Before a capture's warm-up: drops the retired graph; returns the handle to capture into."""
        self.retired = None
        return self.handle

    def keep(self, graph: "torch.cuda.CUDAGraph") -> None:
        """After a capture into this pool succeeded."""
        self.retired, self.last = self.last, graph


def shared_pool(device: torch.device, stream: "torch.cuda.Stream") -> SharedPool:
    """This thread's pool for graphs of ``device`` replayed on ``stream`` (made on first use)."""
    key = _pool_key(device, stream)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = SharedPool(torch.cuda.graph_pool_handle())
    return pool


def forget_pool(device: torch.device, stream: "torch.cuda.Stream") -> None:
    """After a failed capture: the next one takes a new pool. A failed capture may leave its pool
    marked as being recorded (torch 2.11 clears that mark only in a successful ``capture_end``),
    and every later capture into it would then fail."""
    with _pools_lock:
        _pools.pop(_pool_key(device, stream), None)


def _end_failed_capture(device: torch.device, handle: tuple) -> None:
    """Takes a failed capture's pool off the allocator's list of captures underway: torch 2.11's
    ``capture_end`` does so only for a capture that succeeded, and ``torch.cuda.empty_cache()``
    then fails an assert that the list is empty. A no-op where torch took it off itself, where the
    capture never began, and in torch versions without the call (its name before torch 2.8:
    ``_cuda_endAllocateCurrentStreamToPool``).

    The failed graph keeps its hold on the pool (torch gives it back only for a capture that
    ended), so that pool's memory stays reserved for the process: a leak on this error path only,
    which is safer than releasing a hold that a newer torch may already have released.
    """
    end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(
        torch._C, "_cuda_endAllocateCurrentStreamToPool", None)
    if end is None:
        return
    try:
        end(_index(device), handle)
    except (RuntimeError, TypeError) as exc:  # "not currently recording to mempool_id"; another signature
        log.debug("no capture underway into pool %s: %s", handle, exc)


def release_graph_pools() -> int:
    """Drops every thread's shared pools and the graphs they hold, so that
    ``torch.cuda.empty_cache()`` can hand their memory back; returns how many there were.

    Call it only while no solve with ``cuda_graph`` runs. The next capture starts a new pool.
    """
    with _pools_lock:
        dropped = list(_pools.values())
        _pools.clear()
    count = len(dropped)
    del dropped  # the graphs go here, outside the lock
    return count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _pool_key(device: torch.device, stream: "torch.cuda.Stream") -> tuple[int, int, int]:
    return threading.get_ident(), _index(device), int(stream.cuda_stream)


class StepReplay:
    """Runs the steps of one solve direction, replaying the body as a CUDA graph after its first run.

    ``run(body)``: the first time, ``body()`` runs eagerly on a side stream (it is that step's own
    computation and the capture's warm-up, as CUDA asks), then is captured; each later step
    replays the graph without calling ``body``, so every call must pass a body that does the same
    work on the same buffers. A body must never synchronise with the host. Off CUDA ``body()``
    runs eagerly every time. One object serves one solve direction and must not replay after it:
    the graph's memory pool is shared with the captures that come later (``SharedPool``).
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
        handle = pool.begin()
        side.wait_stream(current)
        try:
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
        except BaseException:
            forget_pool(self.device, current)
            _end_failed_capture(self.device, handle)
            raise
        pool.keep(graph)
        current.wait_stream(side)
        log.debug("captured one solver step as a CUDA graph")
        return graph.replay
