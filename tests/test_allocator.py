"""The planned allocator's replay logic, built with its CPU backend (malloc instead of CUDA) and
driven through ctypes: a real plan's requests land at their planned addresses with every other
block of the iteration held, and no request stream, however far from the plan, gets an address
range that overlaps a live one."""

from __future__ import annotations

import importlib.util
import shutil
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES
from memoplan.errors import MemoplanError
from memoplan.hardware import get_hardware
from memoplan.runtime import allocator
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model
from strategies import request_traces

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
COMPUTE, OTHER = 1, 2  # stream handles


@pytest.fixture(scope="module")
def alloc():
    return allocator.PlanAllocator(allocator.build(host_backend=True))


class Replay:
    """Drives the allocator like torch does and checks every arena address it hands out."""

    def __init__(self, alloc: allocator.PlanAllocator, nbytes: int) -> None:
        self.alloc, self.lib = alloc, alloc.lib
        self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        self.base = self.buffer.data_ptr()
        alloc.set_arena(self.base, nbytes)
        self.live: dict[object, tuple[int, int, int]] = {}  # id -> (ptr, start, end) in arena
        self.reserved: list[tuple[int, int]] = []

    def malloc(self, key: object, size: int, stream: int = COMPUTE) -> int | None:
        ptr = self.lib.mp_malloc(size, 0, stream)
        assert ptr
        offset = ptr - self.base
        if 0 <= offset < self.buffer.numel():
            start, end = offset, offset + size
            assert end <= self.buffer.numel()
            for _, s, e in self.live.values():
                assert not (start < e and s < end), "overlaps a live allocation"
            for s, e in self.reserved:
                assert not (start < e and s < end), "overlaps a reserved range"
            self.live[key] = (ptr, start, end)
            return offset
        self.live[key] = (ptr, -1, -1)
        return None

    def free(self, key: object, stream: int = COMPUTE) -> None:
        ptr, _, _ = self.live.pop(key)
        self.lib.mp_free(ptr, 0, 0, stream)

    def reserve(self, offset: int, size: int) -> None:
        assert self.alloc.reserve(offset, size)
        self.reserved.append((offset, offset + size))

    def clear(self) -> None:
        for key in list(self.live):
            self.free(key)
        for offset, _ in self.reserved:
            self.alloc.unreserve(offset)
        self.reserved = []


def _delta(alloc, before):
    after = alloc.stats()
    return {k: after[k] - before[k]
            for k in ("planned", "shifted", "unplanned", "outside", "missed", "in_block")}


@pytest.fixture(scope="module")
def solved():
    prof = profile_model(ProfileConfig(model_file=EXAMPLES / "llama" / "model.py", seq=128))
    plan = solve_plan(prof, SolveConfig(seq=128, hardware=get_hardware("h200"), time_limit=2.0))
    return prof, plan


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_plan_replays_at_its_addresses_beside_the_rest_of_the_iteration(alloc, solved, phase):
    prof, plan = solved
    n = len(plan.layers)
    it = plan.levels["iteration"]
    step = {"forward": lambda i: 1 + i, "backward": lambda i: n + 2 + (n - 1 - i)}[phase]
    exact = prof.layer.requests_forward if phase == "forward" else prof.layer.requests_backward
    for i in range(n):
        r = Replay(alloc, plan.arena_bytes)
        # every other block live at this step is held (as the runtime and earlier layers would)
        own = {f"fwd[{i}]", f"round[{i}]", f"hidden[{i + 1}]"} if phase == "forward" \
            else {f"bwd[{i}]"}
        for name, (start, end) in it.lifetimes.items():
            if start <= step(i) < end and name not in own:
                r.reserve(it.offsets[name], it.sizes[name])
        slots = allocator.phase_slots(plan, phase, i)
        before = alloc.stats()
        alloc.begin(COMPUTE, slots)
        mallocs = 0
        for op, tid, nbytes in exact:  # the request stream torch makes: exact byte counts
            if op == "malloc":
                size, planned = slots[mallocs]
                got = r.malloc(tid, nbytes)
                assert got == (planned if planned >= 0 else None), (tid, got, planned)
                mallocs += 1
            elif tid in r.live:
                r.free(tid)
        alloc.end()
        assert _delta(alloc, before) == {"planned": mallocs, "shifted": 0, "unplanned": 0,
                                         "outside": 0, "missed": 0, "in_block": 0}
        placed = sum(o >= 0 for _, o in slots)
        assert placed > 0.5 * mallocs  # most requests have planned addresses
        r.clear()


def test_extra_requests_shift_the_replay_and_taken_slots_go_to_the_pool(alloc):
    r = Replay(alloc, 1 << 16)
    alloc.begin(COMPUTE, [(1024, 0), (2048, 1024), (512, -1), (4096, 4096)])
    before = alloc.stats()
    assert r.malloc("a", 1000) == 0        # 1000 B rounds up to the 1024-byte slot
    assert r.malloc("workspace", 77) is None  # not in the plan: the pool
    assert r.malloc("b", 2048) == 1024     # the replay goes on where it was
    assert r.malloc("c", 512) is None      # the plan leaves it to the pool
    r.reserve(4096, 100)                   # the runtime holds part of the next slot
    assert r.malloc("d", 4096) is None     # so it cannot be placed: pool, counted
    assert r.malloc("e", 64, stream=OTHER) is None
    alloc.end()
    assert _delta(alloc, before) == {"planned": 3, "shifted": 0, "unplanned": 2, "outside": 1,
                                     "missed": 0, "in_block": 0}
    # a second arena is refused while this one holds planned tensors, taken once it is empty
    alloc.begin(COMPUTE, [(1024, 8192)])
    assert r.malloc("planned", 1024) == 8192
    alloc.end()
    other = torch.empty(4096, dtype=torch.uint8)
    assert not alloc.set_arena(other.data_ptr(), 4096)
    r.clear()
    assert alloc.set_arena(other.data_ptr(), 4096)
    alloc.set_arena(r.base, r.buffer.numel())
    before = alloc.stats()
    assert r.malloc("after", 1024) is None  # no phase: the pool
    assert _delta(alloc, before)["outside"] == 1
    r.clear()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trace=request_traces(max_tensors=24, size=st.integers(1, 3000)),
       data=st.data())
def test_no_request_stream_gets_overlapping_memory(alloc, trace, data):
    """A random plan (offsets may even overlap each other) and a request stream with extra
    requests, other sizes and reserved ranges: addresses never overlap anything live."""
    arena = 1 << 15
    assert alloc.stats()["arena_allocations"] == 0
    r = Replay(alloc, arena)
    mallocs = [(tid, size) for op, tid, size in trace if op == "malloc"]
    slots = [(-(-size // 512) * 512, data.draw(st.sampled_from([-1, 0, 512, 4096, 8192, 30000])))
             for _, size in mallocs]
    for _ in range(data.draw(st.integers(0, 3))):
        offset = data.draw(st.integers(0, arena // 512 - 1)) * 512
        if alloc.reserve(offset, 1024):
            r.reserved.append((offset, offset + 1024))
    block = data.draw(st.sampled_from([None, (0, 4096), (8192, 20000), (28672, 4096)]))
    alloc.begin(COMPUTE, slots, block=block)
    before = alloc.stats()
    n = 0
    try:
        for op, tid, size in trace:
            if op == "malloc":
                if data.draw(st.booleans()):
                    r.malloc(("extra", tid), data.draw(st.integers(1, 5000)))
                    n += 1
                r.malloc(tid, size if data.draw(st.booleans()) else size + 600)
                n += 1
            elif data.draw(st.integers(0, 3)):  # now and then a free comes late (never here)
                r.free(tid)
    finally:
        alloc.end()
        r.clear()
    counts = _delta(alloc, before)
    assert counts["planned"] + counts["shifted"] + counts["unplanned"] + counts["in_block"] == n
    assert alloc.stats()["arena_allocations"] == 0
    assert block is not None or counts["in_block"] == 0


def test_a_phase_block_takes_first_fit_what_the_script_does_not_place(alloc):
    """The recompute phase has no request trace: its requests go first-fit into the layer's
    ``recompute[i]`` block, around live and reserved ranges; what does not fit goes to the
    pool, counted."""
    r = Replay(alloc, 1 << 16)
    r.reserve(4096 + 1024, 1024)  # the runtime's view in the middle of the block
    alloc.begin(COMPUTE, [], block=(4096, 4096))
    before = alloc.stats()
    assert r.malloc("a", 1000) == 4096          # rounded up to 1024
    assert r.malloc("b", 1024) == 4096 + 2048   # past the reserved range
    r.free("a")
    assert r.malloc("c", 512) == 4096           # a freed range is taken again
    assert r.malloc("d", 2048) is None          # no 2048 left in the block: the pool
    assert r.malloc("e", 64, stream=OTHER) is None  # another stream: the pool
    alloc.end()
    assert _delta(alloc, before) == {"planned": 0, "shifted": 0, "unplanned": 1, "outside": 1,
                                     "missed": 0, "in_block": 3}
    alloc.begin(COMPUTE, [])  # the block is the phase's only
    assert r.malloc("f", 512) is None
    alloc.end()
    r.clear()


def test_build_and_install_errors_are_clear(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(MemoplanError, match="no C\\+\\+ compiler"):
        allocator.build(host_backend=True)
    monkeypatch.delenv("CXX")
    if not torch.cuda.is_available():
        with pytest.raises(MemoplanError, match="no CUDA device"):
            allocator.install_allocator()
        monkeypatch.setattr(allocator, "cuda_dirs", lambda: ([], []))
        with pytest.raises(MemoplanError, match="CUDA runtime headers"):
            allocator.build()


class TorchRequests:
    """A dispatch mode that feeds the storages ops create (malloc) and release (free) to the
    allocator, the way a process-wide CUDA allocator would see them. Storages of parameters
    and inputs, and host copies (``empty``: pinned host memory on a GPU), are not device
    requests."""

    def __init__(self, lib, external: set[int]) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        outer.seen(func, t)
                return out

        self.lib, self.external, self.mode = lib, external, Mode()
        self.count: dict[int, int] = {}
        self.ptr: dict[int, int] = {}
        self.host: dict[int, int] = {}

    def seen(self, func, t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        if func is torch.ops.aten.empty.memory_format:  # host memory on a GPU: its address
            self.host[key] = self.host.get(key, 0) + 1  # may come back as a device tensor's
            weakref.finalize(t, self.host_dead, key)
        if key in self.external or key in self.host:
            return
        if key not in self.count:
            self.count[key] = 0
            self.ptr[key] = self.lib.mp_malloc(t.untyped_storage().nbytes(), 0, 0)
        self.count[key] += 1
        weakref.finalize(t, self.dead, key)

    def host_dead(self, key: int) -> None:
        self.host[key] -= 1
        if not self.host[key]:
            del self.host[key]

    def dead(self, key: int) -> None:
        self.count[key] -= 1
        if not self.count[key]:
            del self.count[key]
            self.lib.mp_free(self.ptr.pop(key), 0, 0, 0)


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_the_runtimes_own_request_stream_follows_the_plan(alloc, name):
    """The whole model trains under a plan with the (CPU-built) planned allocator driven by the
    runtime itself: every request of every layer's forward and backward graph is one the plan
    placed, at its address, beside the runtime's arena views, and every request of the
    recomputation of dropped tokens fits in the layer's recompute block; gradients stay
    exact."""
    from memoplan.runtime import apply
    from memoplan.runtime.arena import Arena

    mod = _example(name)
    prof = profile_model(ProfileConfig(model_file=EXAMPLES / name / "model.py", seq=128))
    plan = solve_plan(prof, SolveConfig(seq=128, hardware=get_hardware("h200"), time_limit=2.0,
                                        alpha=0.5))
    model, ref = mod.build_model(), mod.build_model()
    apply(model, plan, debug_poison=True)
    inputs = mod.example_inputs(128)
    model(*inputs).float().pow(2).mean().backward()  # traces the layer once
    model.zero_grad()
    runner = model._memoplan_runner
    runner.arena = Arena.for_plan(plan, torch.device("cpu"))
    runner.arena.planner = alloc
    external = {t.untyped_storage().data_ptr() for t in model.parameters()}
    external |= {b.untyped_storage().data_ptr()  # host buffers kept from the first step
                 for bufs in runner.copier._free.values() for b in bufs}
    requests = TorchRequests(alloc.lib, external)
    before = alloc.stats()
    with requests.mode:
        loss = model(*inputs).float().pow(2).mean()
        loss.backward()
    counts = _delta(alloc, before)
    n = len(plan.layers)
    phase_mallocs = n * sum(sum(op == "malloc" for op, _, _ in plan.layer["requests"][ph])
                            for ph in ("forward", "backward"))
    assert counts["planned"] == phase_mallocs, counts
    assert counts["shifted"] == counts["unplanned"] == counts["missed"] == 0, counts
    assert counts["in_block"] > 0  # the recomputation of dropped tokens: in recompute[i]
    assert counts["outside"] > 0  # embedding, head, parameter gradients: the pool
    ref(*inputs).float().pow(2).mean().backward()
    for (pname, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9, msg=pname)
    del loss
    requests.mode = None


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"alloc_{name}", EXAMPLES / name / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
