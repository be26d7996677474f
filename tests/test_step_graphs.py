"""``options['cuda_graph']``: each step on fixed buffers, replayed as a CUDA graph.

On the CPU the steps run eagerly on the same buffers: they must give bitwise the numbers of the
plain steps. A stand-in for the graph (``_RerunBody``) replays the body captured on the first
step for every later one, as a real graph does, so that a body that reads anything but its fixed
buffers (a host number of the captured step, a tensor of one step) gives wrong numbers and fails;
the retries are checked the same way. On a CUDA machine the real capture is checked too.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rampde
from helpers import StiffLinear, assert_same, case, rel_err, solve_grads
from rampde import step_graphs

DTYPES = [None, torch.bfloat16, torch.float16]


class _RerunBody(step_graphs.StepReplay):
    """``StepReplay`` as on CUDA, with a stand-in graph that calls the first step's body again."""

    made: list["_RerunBody"] = []

    def __init__(self, device):
        super().__init__(device)
        self.capture = True
        self.replays = 0
        _RerunBody.made.append(self)

    def _warm_and_capture(self, body):
        body()

        def replay():
            self.replays += 1
            body()

        return replay


@pytest.fixture
def rerun(monkeypatch):
    _RerunBody.made = []
    monkeypatch.setattr(rampde.stepper, "StepReplay", _RerunBody)
    return _RerunBody.made


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_buffer_steps_are_bitwise_the_plain_steps(kind, dtype):
    field, y0 = case(kind)
    t = torch.linspace(0, 1, 7)
    plain = solve_grads(field, y0, t, dtype)
    replayed = solve_grads(field, y0, t, dtype, cuda_graph=True)
    assert replayed["params"].abs().sum() > 0
    assert_same(plain, replayed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", ["uniform", "step_size", "uneven"])
def test_one_capture_replayed_gives_the_plain_numbers(rerun, dtype, grid):
    field, y0 = case("mlp")
    t = torch.tensor([0.0, 0.1, 0.3, 0.35, 0.6, 0.8, 1.0]) if grid == "uneven" else torch.linspace(0, 1, 7)
    # step_size 0.15 on [0, 1]: six steps of 0.15 (equal up to rounding) and a last one of 0.1.
    options = {"step_size": 0.15} if grid == "step_size" else {}
    plain = solve_grads(field, y0, t, dtype, **options)
    replayed = solve_grads(field, y0, t, dtype, cuda_graph=True, **options)
    assert_same(plain, replayed)
    # forward, backward; in fp32 the parameters are used directly and the backward runs without graphs
    assert len(rerun) == (1 if dtype is None else 2)
    steps = 7 if grid == "step_size" else 6
    for replay in rerun:
        assert replay.eager_steps == 1 and replay.replays == steps - 1


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun3", "rk4", "rk4_classic"])
def test_gradcheck_of_replayed_steps(rerun, method):
    torch.manual_seed(0)
    w0 = torch.randn(3, 3, dtype=torch.float64) * 0.5

    def solve(y0, w, b):
        def field(t, y):
            return torch.tanh(y @ w + b * torch.sin(2 * t))

        t = torch.tensor([0.0, 0.2, 0.5, 0.6, 0.9], dtype=torch.float64)
        return rampde.odeint(field, y0, t, method=method, params=(w, b), options={"cuda_graph": True})

    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(solve, (y0, w0.clone().requires_grad_(), b))
    # the forwards only: the backward of a params= callable uses the parameters directly
    assert rerun and all(r.replays == 3 for r in rerun)


def test_replayed_steps_with_a_low_state_dtype(rerun):
    field, y0 = case("conv")
    t = torch.linspace(0, 1, 5)
    plain = solve_grads(field, y0, t, torch.bfloat16, state_dtype="low")
    replayed = solve_grads(field, y0, t, torch.bfloat16, cuda_graph=True, state_dtype="low")
    assert_same(plain, replayed)
    assert [r.replays for r in rerun] == [3, 3]


class _Scaled(torch.nn.Module):
    """A Linear field with a gain outside any Linear layer: a parameter the field uses directly."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, _ = case("mlp")
        self.gain = torch.nn.Parameter(torch.tensor(0.9))

    def forward(self, t, y):
        return self.gain * self.inner(t, y)


@pytest.mark.parametrize("dtype, options, field", [
    (None, {}, "mlp"), (torch.bfloat16, {"cast_weights": "per-use"}, "mlp"), (torch.bfloat16, {}, "gain")])
def test_a_parameter_used_directly_keeps_the_backward_off_graphs(rerun, dtype, options, field):
    """Its gradient node comes from the forward, tied to the caller's stream, which a capture on
    the side stream must not wait on (on CUDA that invalidates the capture): the forward is
    replayed, the backward runs eagerly, and the numbers are the plain ones."""
    field, y0 = (case("mlp") if field == "mlp" else (_Scaled(), case("mlp")[1]))
    t = torch.linspace(0, 1, 5)
    plain = solve_grads(field, y0, t, dtype, **options)
    replayed = solve_grads(field, y0, t, dtype, cuda_graph=True, **options)
    assert_same(plain, replayed)
    assert replayed["params"].abs().sum() > 0
    assert [r.replays for r in rerun] == [3], "the forward's steps only"


def test_time_gradient_is_taken_without_graphs(rerun):
    field, y0 = case("mlp")
    t = torch.linspace(0, 1, 6).requires_grad_()
    plain = solve_grads(field, y0, t, torch.bfloat16)
    replayed = solve_grads(field, y0, t, torch.bfloat16, cuda_graph=True)
    assert replayed["t"].abs().sum() > 0
    assert_same(plain, replayed)
    assert len(rerun) == 1  # the forward's only


def test_fp16_retry_captures_again_at_the_lower_scale(rerun):
    """An overflowed fp16 backward is redone; its steps are captured anew with the lower target."""
    field = StiffLinear()
    y0 = torch.randn(8, 16) * 0.01
    t = torch.linspace(0, 0.004, 4)
    results, scalers = [], []
    for cuda_graph in (False, True):
        scaler = rampde.DynamicScaler(target_log2=14)
        y = y0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            sol = rampde.odeint(field, y, t, options={"cuda_graph": cuda_graph}, loss_scaler=scaler)
        results.append(torch.autograd.grad(sol[-1].double().pow(2).sum(), [y, field.lin.weight]))
        scalers.append(scaler)
    assert scalers[0].retries > 0 and scalers[0].stats() == scalers[1].stats()
    for plain, replayed in zip(*results):
        assert torch.equal(plain, replayed) and torch.isfinite(replayed).all()
    assert len(rerun) == 1 + 1 + scalers[1].retries  # the forward, then one sweep per attempt
    assert all(r.eager_steps == 1 and r.replays == 2 for r in rerun)


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a device value on the host."""

    SYNCING = {torch.ops.aten._local_scalar_dense, torch.ops.aten.item, torch.ops.aten.nonzero,
               torch.ops.aten.is_nonzero, torch.ops.aten.equal}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func.overloadpacket not in self.SYNCING, f"{func} synchronises inside a captured step"
        return func(*args, **(kwargs or {}))


class _CheckedBody(_RerunBody):
    def _warm_and_capture(self, body):
        with _NoHostSync():
            body()
        return super()._warm_and_capture(body)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_captured_step_never_synchronises(monkeypatch, dtype):
    monkeypatch.setattr(rampde.stepper, "StepReplay", _CheckedBody)
    field, y0 = case("mlp")
    out = solve_grads(field, y0, torch.linspace(0, 1, 4), dtype, cuda_graph=True)
    assert torch.isfinite(out["params"]).all()


def test_cuda_graph_option_is_checked():
    field, y0 = case("mlp")
    t = torch.linspace(0, 1, 3)
    with pytest.raises(TypeError, match=r"options\['cuda_graph'\] must be True or False"):
        rampde.odeint(field, y0, t, options={"cuda_graph": "yes"})
    for clash in ({"storage": "activations"}, {"fuse": True}):
        with pytest.raises(ValueError, match=r"options\['cuda_graph'\] applies to storage='states' without 'fuse'"):
            rampde.odeint(field, y0, t, options={"cuda_graph": True, **clash})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, None])
def test_real_capture_on_cuda(monkeypatch, dtype):
    """Forward and backward captured in 16-bit; in fp32 the parameters are used directly, so
    only the forward is (a backward capture would be invalidated)."""
    made = []

    class Recorded(step_graphs.StepReplay):
        def __init__(self, device):
            super().__init__(device)
            made.append(self)

    monkeypatch.setattr(rampde.stepper, "StepReplay", Recorded)
    field, y0 = case("mlp")
    field, y0 = field.cuda(), y0.cuda()
    t = torch.linspace(0, 1, 17, device="cuda")
    results = []
    for cuda_graph in (False, True, True):  # the second graph solve captures again on the same stream and pool
        y = y0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
            sol = rampde.odeint(field, y, t, options={"cuda_graph": cuda_graph})
        grads = torch.autograd.grad(sol[-1].float().pow(2).mean(), [y, *field.parameters()])
        results.append((sol.detach(), grads))
    assert [r.replay is not None and r.eager_steps for r in made] == [1] * (2 if dtype is None else 4)
    assert step_graphs.shared_pool(torch.device("cuda"), torch.cuda.current_stream()).last is not None  # forward
    for graphed in results[1:]:
        assert rel_err(graphed[0], results[0][0]) < 1e-6
        for a, b in zip(graphed[1], results[0][1]):
            assert rel_err(a, b) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_repeated_graph_solves_keep_reserved_memory_bounded(record_property):
    """A training run solves with graphs thousands of times: the captures share one pool per thread
    and stream, so reserved memory stays where the first solves left it."""
    field, y0 = case("mlp")
    field, y0 = field.cuda(), y0.cuda()
    t = torch.linspace(0, 1, 9, device="cuda")

    def solve():
        y = y0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            sol = rampde.odeint(field, y, t, options={"cuda_graph": True})
        torch.autograd.grad(sol[-1].float().pow(2).mean(), [y, *field.parameters()])

    for _ in range(3):
        solve()
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    solves = 30
    for _ in range(solves):
        solve()
    torch.cuda.synchronize()
    grown = torch.cuda.memory_reserved() - before
    record_property("reserved_growth_mib", round(grown / 2**20, 1))  # kept in the JUnit report either way
    assert grown <= 8 * 2**20, f"reserved memory grew by {grown / 2**20:.1f} MiB over {solves} graph solves"


def test_each_thread_captures_on_one_side_stream_per_device(monkeypatch):
    """Every solve of a thread reuses its stream (cuBLAS keeps a workspace per thread and stream);
    threads never share one (two captures on one stream would record each other's kernels)."""
    import threading

    made = []

    class FakeStream:
        def __init__(self, device):
            self.device = device
            made.append(self)

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(step_graphs, "_streams", threading.local())
    here = step_graphs.side_stream(torch.device("cuda"))
    assert here.device == 1
    assert step_graphs.side_stream(torch.device("cuda", 1)) is here
    assert step_graphs.side_stream(torch.device("cuda")) is here
    other_device = step_graphs.side_stream(torch.device("cuda", 0))
    assert other_device is not here and other_device.device == 0
    elsewhere = []
    worker = threading.Thread(target=lambda: elsewhere.append(step_graphs.side_stream(torch.device("cuda"))))
    worker.start()
    worker.join()
    assert elsewhere[0] is not here and elsewhere[0].device == 1
    assert len(made) == 3


def test_captures_of_a_thread_on_one_stream_share_a_pool_that_keeps_a_live_graph(monkeypatch):
    """A pool per capture stayed reserved after its graph was gone. Captures of one thread replayed
    on one stream share one pool instead. The pool always holds a live graph (the allocator forgets
    a pool without one and asserts when its handle is used again); the graph before the last is
    destroyed only when the next capture begins (destroying a graph frees its capture stream's
    cuBLAS workspace, which the last graph's replays use); a failed capture forgets the pool (it
    may stay marked as being recorded)."""
    import contextlib
    import itertools
    import threading
    import weakref

    handles, graphs, failing = itertools.count(1), [], []

    class FakeGraph:
        def __init__(self):
            self.pool = None
            graphs.append(weakref.ref(self))

        def capture_begin(self, pool=None):
            self.pool = pool
            if failing:
                raise RuntimeError("operation not permitted when stream is capturing")

        def capture_end(self):
            pass

        def replay(self):
            pass

    class FakeStream:
        def __init__(self, device=None, handle=0):
            self.cuda_stream = handle

        def wait_stream(self, other):
            pass

    now = [FakeStream(handle=100)]
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", next(handles)))
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: now[0])
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(step_graphs, "_streams", threading.local())
    monkeypatch.setattr(step_graphs, "_pools", {})
    ended = []

    def end_allocate_to_pool(device, handle):  # torch 2.11's name; it raises when nothing is recorded
        ended.append((device, handle))
        if len(ended) > 1:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end_allocate_to_pool, raising=False)
    cuda = torch.device("cuda", 0)
    alive_at_warm_up = []

    def capture():
        replay = step_graphs.StepReplay(cuda)
        replay.run(lambda: alive_at_warm_up.append([g() is not None for g in graphs]))
        replay.run(lambda: None)  # replayed: no new capture
        return graphs[-1]()

    first, second = capture(), capture()
    assert len(graphs) == 2 and first.pool == second.pool == ("pool", 1)
    pool = step_graphs.shared_pool(torch.device("cuda"), now[0])
    assert pool.last is second and pool.retired is first
    del first, second
    third = capture()
    assert third.pool == ("pool", 1)
    assert alive_at_warm_up[-2:] == [[False, True], [False, True, True]], \
        "the retired graph goes before the warm-up; the last one stays through the capture"
    failing.append(True)
    for _ in range(2):  # the second time the allocator has nothing to end: the capture's own error still shows
        with pytest.raises(RuntimeError, match="capturing"):
            capture()
    assert ended == [(0, ("pool", 1)), (0, ("pool", 2))], "a failed capture is taken off the allocator's list"
    failing.clear()
    assert capture().pool == ("pool", 3), "a failed capture's pool is not captured into again"
    now[0] = FakeStream(handle=200)
    assert capture().pool == ("pool", 4), "graphs replayed on another stream get a pool of their own"
    elsewhere = []
    worker = threading.Thread(target=lambda: elsewhere.append(capture().pool))
    worker.start()
    worker.join()
    assert elsewhere == [("pool", 5)], "another thread, another pool"
    assert capture().pool == ("pool", 4)
    del pool, third
    assert step_graphs.release_graph_pools() == 3  # this thread's two streams, the worker's one
    assert step_graphs.release_graph_pools() == 0
    assert all(g() is None for g in graphs), "released pools hold no graph"
    assert capture().pool == ("pool", 6)


def test_a_failed_capture_is_ended_under_the_name_torch_before_2_8_gives_the_call(monkeypatch):
    ended = []
    monkeypatch.delattr(torch._C, "_cuda_endAllocateToPool", raising=False)
    monkeypatch.setattr(torch._C, "_cuda_endAllocateCurrentStreamToPool",
                        lambda device, handle: ended.append((device, handle)), raising=False)
    step_graphs._end_failed_capture(torch.device("cuda", 3), ("pool", 7))
    assert ended == [(3, ("pool", 7))]

    def other_signature(device):  # a torch whose call takes other arguments: nothing to end, no error
        raise AssertionError("not called with one argument")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateCurrentStreamToPool", other_signature)
    step_graphs._end_failed_capture(torch.device("cuda", 3), ("pool", 7))
