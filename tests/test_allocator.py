"""The planned allocator's replay logic, built with its CPU backend (malloc instead of CUDA) and
driven through ctypes: a real plan's requests land at their planned addresses with every other
block of the iteration held, and no request stream, however far from the plan, gets an address
range that overlaps a live one. It fails safe: phases are keyed on (device, stream), a second
device is refused, record_stream keeps a block until its streams pass, a request it cannot
serve (out of memory, graph capture) gets null and a message, and it keeps memory statistics
torch.cuda cannot. Its CUDA calls fail safe too (stand-ins for CUDA's errors and contexts): an
event whose query fails is not passed, errors are cleared and counted, a thread without CUDA
gets no context on GPU 0, and its state outlives static destruction. The CUDA variant links
the CUDA runtime torch uses."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES
from memoplan.errors import MemoplanError
from memoplan.hardware import get_hardware
from memoplan.ir import Steps
from memoplan.runtime import allocator
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model
from strategies import request_traces
from torch_requests import TorchRequests

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
COMPUTE, OTHER = 1, 2  # stream handles


@pytest.fixture(scope="module")
def alloc():
    return allocator.PlanAllocator(allocator.build(host_backend=True))


@pytest.fixture
def fresh(tmp_path):
    """A host-built allocator with a state of its own (a copy of the library, loaded anew)."""
    path = tmp_path / "plan_allocator_host.so"
    shutil.copy(allocator.build(host_backend=True), path)
    return allocator.PlanAllocator(path)


class Replay:
    """Drives the allocator like torch does and checks every arena address it hands out."""

    def __init__(self, alloc: allocator.PlanAllocator, nbytes: int) -> None:
        self.alloc, self.lib = alloc, alloc.lib
        self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        self.base = self.buffer.data_ptr()
        assert alloc.set_arena(self.base, nbytes), "the last arena still holds something"
        self.live: dict[object, tuple[int, int, int]] = {}  # id -> (ptr, start, end) in arena
        self.reserved: list[tuple[int, int]] = []

    def malloc(self, key: object, size: int, stream: int = COMPUTE,
               device: int = 0) -> int | None:
        ptr = self.lib.mp_malloc(size, device, stream)
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
    # alpha 0.5: split tensors grow (every second layer down) and the kept layer's have blocks
    # of their own, where its forward script puts them
    plan = solve_plan(prof, SolveConfig(seq=128, hardware=get_hardware("h200"), time_limit=2.0,
                                        alpha=0.5))
    assert plan.levels["iteration"].grows_down
    return prof, plan


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_plan_replays_at_its_addresses_beside_the_rest_of_the_iteration(alloc, solved, phase):
    prof, plan = solved
    n = len(plan.layers)
    it = plan.levels["iteration"]
    step = {"forward": Steps(n).forward, "backward": Steps(n).backward}[phase]
    exact = prof.layer.requests_forward if phase == "forward" else prof.layer.requests_backward
    for i in range(n):
        r = Replay(alloc, plan.arena_bytes)
        # every other block live at this step is held (as the runtime and earlier layers would)
        own = {f"fwd[{i}]", f"round[{i}]", f"hidden[{i + 1}]",
               *(k for k in it.offsets if k.startswith(f"kept[{i}]:"))} if phase == "forward" \
            else {f"bwd[{i}]", f"grad[{i}]"}
        for name, (start, end) in it.lifetimes.items():
            if start <= step(i) < end and name not in own:  # the bytes it holds then
                grow, grow_at = it.grows.get(name, (0, end))
                grown, down = step(i) >= grow_at, name in it.grows_down
                r.reserve(it.offsets[name] + (grow if down and not grown else 0),
                          it.sizes[name] + (grow if grown else 0))
        slots = list(plan.layer.script(phase, i).slots)
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
    n = 0
    try:  # from the first reserve on: a draw may end the example (hypothesis's StopTest when its
        # data runs out), and what it left reserved made the next tests' arenas refused
        mallocs = [(tid, size) for op, tid, size in trace if op == "malloc"]
        slots = [(-(-size // 512) * 512,
                  data.draw(st.sampled_from([-1, 0, 512, 4096, 8192, 30000])))
                 for _, size in mallocs]
        for _ in range(data.draw(st.integers(0, 3))):
            offset = data.draw(st.integers(0, arena // 512 - 1)) * 512
            if alloc.reserve(offset, 1024):
                r.reserved.append((offset, offset + 1024))
        block = data.draw(st.sampled_from([None, (0, 4096), (8192, 20000), (28672, 4096)]))
        alloc.begin(COMPUTE, slots, block=block)
        before = alloc.stats()
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
    assert alloc.stats()["unplanned_bytes"] - before["unplanned_bytes"] == 2048  # "d"
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


def test_the_allocator_is_built_through_cpp_extension(monkeypatch):
    from torch.utils import cpp_extension

    calls = []
    real = cpp_extension.load

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(cpp_extension, "load", spy)
    path = allocator.build(host_backend=True)
    assert len(calls) == 1 and calls[0]["is_python_module"] is False
    assert "-DMEMOPLAN_HOST_BACKEND" in calls[0]["extra_cflags"]
    assert path.exists() and allocator.cache_dir() in path.parents


def _cuda_headers() -> bool:
    try:
        return bool(allocator.cuda_dirs()[0])
    except MemoplanError:  # only a CUDA runtime of another major version than torch's
        return False


@pytest.mark.skipif(not _cuda_headers(), reason="needs the CUDA runtime headers (and libcudart "
                                                 "of torch's CUDA version)")
def test_the_cuda_variant_compiles_and_loads():
    """The CUDA build (torch's and CUDA's headers, libcudart) compiles here too; without a
    device, a request gets null and CUDA's reason instead of stopping the process."""
    alloc = allocator.PlanAllocator(allocator.build())
    assert alloc.address("mp_torch_malloc") and alloc.address("mp_record_stream")
    if not torch.cuda.is_available():
        assert alloc.lib.mp_malloc(1024, 0, None) is None
        assert "could not allocate 1024 bytes on device 0 (cuda" in alloc.last_error()
        assert alloc.stats()["refused"] == 1
        errors = alloc.stats()["cuda_errors"]
        alloc.lib.mp_free(0x1000, 0, 0, None)  # the free fails here: counted
        assert alloc.stats()["cuda_errors"] > errors


def test_phases_are_keyed_on_device_and_a_second_device_is_refused(fresh):
    """The default stream is 0 on every device: a request from device 1 during a device-0
    phase goes to the pool and leaves the plan's slots alone; an arena or a phase on a
    second device is refused (with a warning for the arena)."""
    r = Replay(fresh, 1 << 16)
    assert fresh.begin(0, [(1024, 0), (2048, 1024)], device=0)
    before = fresh.stats()
    assert r.malloc("other device", 1024, stream=0, device=1) is None
    assert r.malloc("a", 1024, stream=0) == 0
    assert r.malloc("b", 2048, stream=0) == 1024
    fresh.end()
    assert _delta(fresh, before) == {"planned": 2, "shifted": 0, "unplanned": 0, "outside": 1,
                                     "missed": 0, "in_block": 0}
    r.clear()
    other = torch.empty(4096, dtype=torch.uint8)
    with pytest.warns(UserWarning, match="one device's plan per process"):
        assert not fresh.set_arena(other.data_ptr(), 4096, device=1)
    assert fresh.device == 0
    assert not fresh.begin(0, [(1024, 0)], device=1)  # no phase: device 1 gets the pool
    assert r.malloc("c", 1024, stream=0, device=1) is None
    fresh.end()
    r.clear()


def test_record_stream_keeps_a_freed_block_until_its_streams_pass(fresh):
    """A block another stream used (record_stream) is not reused when it is freed, only once an
    event recorded on that stream at the free has passed (the host backend's stand-in: the
    test marks the stream busy, then idle); arena ranges and pool memory alike."""
    r, lib = Replay(fresh, 1 << 16), fresh.lib
    fresh.begin(COMPUTE, [(1024, 0)] * 3)
    assert r.malloc("a", 1024) == 0
    lib.mp_record_stream(r.live["a"][0], OTHER)
    lib.mp_test_set_busy(OTHER, 1)
    r.free("a")
    assert fresh.stats()["waiting"] == 1 and fresh.live_ranges() == [(0, 1024)]
    assert r.malloc("b", 1024) is None  # its planned range is still in use: the pool
    lib.mp_test_set_busy(OTHER, 0)
    assert r.malloc("c", 1024) == 0  # the event has passed: the range is free again
    fresh.end()
    assert fresh.stats()["waiting"] == 0
    # pool memory: given back only once the stream passed (here at empty_cache)
    ptr = lib.mp_malloc(4096, 0, COMPUTE)
    lib.mp_record_stream(ptr, COMPUTE)  # its own stream: nothing to wait for
    lib.mp_record_stream(ptr, OTHER)
    lib.mp_test_set_busy(OTHER, 1)
    held = fresh.memory_stats()["pool"]["allocated"]
    lib.mp_free(ptr, 0, 0, COMPUTE)
    fresh.empty_cache()
    assert fresh.memory_stats()["pool"]["allocated"] == held
    lib.mp_test_set_busy(OTHER, 0)
    fresh.empty_cache()
    assert fresh.memory_stats()["pool"]["allocated"] == held - 4096
    assert fresh.stats()["waiting"] == 0
    r.clear()


def test_out_of_memory_returns_null_with_the_planned_and_unplanned_bytes(fresh):
    """The pool cannot serve a request (the host backend's size cap stands in for a full
    device): null, counted, and a message with the bytes planned and unplanned in use and the
    arena's largest free range; the allocator goes on serving."""
    r, lib = Replay(fresh, 1 << 16), fresh.lib
    fresh.begin(COMPUTE, [(1024, 0)])
    assert r.malloc("planned", 1000) == 0
    fresh.end()
    r.reserve(4096, 1024)  # the arena: [0, 1024) and [4096, 5120) in use
    assert r.malloc("unplanned", 300) is None
    lib.mp_test_set_pool_cap(1 << 20)
    try:
        assert lib.mp_malloc(2 << 20, 0, COMPUTE) is None
        assert r.malloc("fits", 4096) is None  # served by the pool after the failure
    finally:
        lib.mp_test_set_pool_cap(-1)
    msg = fresh.last_error()
    assert "out of memory allocating 2097152 bytes on device 0" in msg
    assert "Planned memory (the arena): 1024 of 65536 bytes in use" in msg
    assert "largest free range 60416 bytes" in msg  # [5120, 65536)
    assert "Unplanned memory (the pool, outside the arena): 300 bytes in use" in msg
    assert "memory_stats()" in msg
    assert fresh.stats()["refused"] == 1
    r.clear()


def test_a_request_from_a_capturing_stream_is_refused(fresh):
    """While a stream captures a CUDA graph (the host backend's test hook), its requests get
    null and a message instead of planned or pool memory, and take no slot of the plan; other
    streams are served."""
    r, lib = Replay(fresh, 1 << 16), fresh.lib
    fresh.begin(COMPUTE, [(1024, 0)])
    lib.mp_test_set_capturing(COMPUTE, 1)
    try:
        assert lib.mp_malloc(1024, 0, COMPUTE) is None
        assert "does not serve CUDA graph capture" in fresh.last_error()
        assert r.malloc("other stream", 64, stream=OTHER) is None  # the pool
    finally:
        lib.mp_test_set_capturing(COMPUTE, 0)
    assert r.malloc("a", 1024) == 0
    fresh.end()
    assert fresh.stats()["refused"] == 1
    r.clear()


# CUDA's error codes (the host backend's stand-in returns them)
INVALID_HANDLE, ILLEGAL_ADDRESS = 400, 700
CAPTURE_ERRORS = {"StreamCaptureUnsupported": 900, "StreamCaptureInvalidated": 901,
                  "StreamCaptureImplicit": 906, "CapturedEvent": 907}


@pytest.mark.parametrize("error", CAPTURE_ERRORS.values(), ids=CAPTURE_ERRORS.keys())
def test_an_event_query_that_fails_keeps_the_block_unless_the_context_is_dead(fresh, error):
    """cudaEventQuery fails while another thread captures a CUDA graph in global mode: the block
    stays held (only success means passed), the error is cleared and counted, and the block is
    released once the query succeeds. A sticky error (the context is dead) counts as passed."""
    lib = fresh.lib
    ptr = lib.mp_malloc(4096, 0, COMPUTE)
    lib.mp_record_stream(ptr, OTHER)
    lib.mp_free(ptr, 0, 0, COMPUTE)  # an event recorded on OTHER, whose work has finished
    lib.mp_test_set_stream_error(OTHER, error)  # but querying it is prohibited now
    errors = fresh.stats()["cuda_errors"]
    fresh.empty_cache()
    assert fresh.stats()["waiting"] == 1
    assert fresh.memory_stats()["pool"]["allocated"] == 4096
    assert lib.mp_test_pending_error() == 0  # nothing left for an unrelated kernel to report
    assert fresh.stats()["cuda_errors"] == errors + 1
    lib.mp_test_set_stream_error(OTHER, 0)  # the capture ended
    fresh.empty_cache()
    assert fresh.stats()["waiting"] == 0
    assert fresh.memory_stats()["pool"]["allocated"] == 0
    # a dead context: nothing will run again, the block is released (the error stays: sticky)
    ptr = lib.mp_malloc(4096, 0, COMPUTE)
    lib.mp_record_stream(ptr, OTHER)
    lib.mp_test_set_busy(OTHER, 1)
    lib.mp_free(ptr, 0, 0, COMPUTE)
    lib.mp_test_set_stream_error(OTHER, ILLEGAL_ADDRESS)
    fresh.empty_cache()
    assert fresh.stats()["waiting"] == 0
    assert fresh.memory_stats()["pool"]["allocated"] == 0
    assert lib.mp_test_pending_error() == ILLEGAL_ADDRESS


def test_failed_cuda_calls_are_cleared_and_counted_and_a_failed_free_leaks(fresh):
    """A free on a destroyed stream (cudaErrorInvalidResourceHandle) and an event that cannot be
    recorded: each error is cleared (it would otherwise surface on a later, unrelated kernel)
    and counted in ``cuda_errors``; the block whose free failed leaves the allocator's books
    (leaked, not freed on another stream), the one without an event stays held."""
    lib = fresh.lib
    ptr = lib.mp_malloc(4096, 0, OTHER)
    lib.mp_test_set_stream_error(OTHER, INVALID_HANDLE)
    lib.mp_free(ptr, 0, 0, OTHER)
    assert lib.mp_test_pending_error() == 0
    assert fresh.stats()["cuda_errors"] == 1
    assert fresh.memory_stats()["pool"]["allocated"] == 0
    ptr = lib.mp_malloc(4096, 0, COMPUTE)
    lib.mp_record_stream(ptr, OTHER)
    lib.mp_free(ptr, 0, 0, COMPUTE)  # no event on OTHER: held for good
    assert lib.mp_test_pending_error() == 0
    assert fresh.stats()["cuda_errors"] == 2
    lib.mp_test_set_stream_error(OTHER, 0)
    fresh.empty_cache()
    assert fresh.stats()["waiting"] == 1
    assert fresh.memory_stats()["pool"]["allocated"] == 4096


def _on_new_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_a_free_on_a_thread_without_cuda_creates_no_context_on_gpu_0(fresh):
    """Rank 1's process: NCCL's watchdog thread (which never chose a device: cudaGetDevice says
    0 there) frees a record_stream'ed block of device 1. Recording, querying and destroying its
    event and freeing it happen on device 1, which stays current there: no context is created
    on GPU 0 (restoring the 0 would create one). A thread that uses a device gets it back."""
    lib = fresh.lib
    lib.mp_test_set_device(1)
    ptr = lib.mp_malloc(4096, 1, COMPUTE)
    plain = lib.mp_malloc(64, 1, COMPUTE)
    lib.mp_record_stream(ptr, OTHER)
    lib.mp_test_set_busy(OTHER, 1)

    def watchdog_free():
        lib.mp_free(plain, 0, 1, COMPUTE)
        lib.mp_free(ptr, 0, 1, COMPUTE)
        return lib.mp_test_current_device()

    assert _on_new_thread(watchdog_free) == 1
    lib.mp_test_set_busy(OTHER, 0)
    _on_new_thread(fresh.empty_cache)  # the event has passed: released there
    assert fresh.stats()["waiting"] == 0 and fresh.memory_stats()["pool"]["allocated"] == 0
    assert lib.mp_test_contexts() == 1 << 1

    def user_thread():
        lib.mp_test_set_device(0)  # a thread of device 0 frees a block of device 1
        p = lib.mp_malloc(4096, 1, COMPUTE)
        lib.mp_record_stream(p, OTHER)
        lib.mp_free(p, 0, 1, COMPUTE)
        return lib.mp_test_current_device()

    assert _on_new_thread(user_thread) == 0


def test_a_free_at_exit_finds_the_allocator_alive(tmp_path):
    """A static destroyed at exit after the allocator's state was created (libtorch's, freeing
    a tensor) frees a block: the state is never destroyed, so the free works. glibc fills freed
    memory (MALLOC_PERTURB_, no thread cache), so a destroyed state's map would crash."""
    script = tmp_path / "at_exit.py"
    script.write_text(textwrap.dedent("""
        import ctypes, sys
        import torch  # the libraries the allocator links
        lib = ctypes.CDLL(sys.argv[1])
        lib.mp_malloc.restype = ctypes.c_void_p
        lib.mp_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
        lib.mp_test_free_at_exit.argtypes = [ctypes.c_void_p]
        lib.mp_test_free_at_exit(None)  # created first: destroyed after the state
        blocks = [lib.mp_malloc(1000, 0, None) for _ in range(64)]
        lib.mp_test_free_at_exit(blocks[0])
    """))
    env = {**os.environ, "MALLOC_PERTURB_": "165",
           "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
    done = subprocess.run([sys.executable, str(script), str(allocator.build(host_backend=True))],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"freed at exit; pool bytes {63 * 1000}\n"


def _fake_cuda(root, lib_names, links=None):
    """A CUDA runtime's folder: include/cuda_runtime_api.h and libcudart files under lib*/."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime_api.h").write_text("")
    for name in lib_names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    for link, target in (links or {}).items():
        (root / link).symlink_to(target)
    return root


def test_cuda_dirs_links_the_cuda_runtime_torch_uses(tmp_path, monkeypatch):
    """A cu12x torch with a CUDA 13 toolkit: pip's libcudart.so.12 is linked (with its headers),
    else a CUDA 12 toolkit's; only a CUDA 13 runtime: refused, naming both versions. A CPU-only
    torch links the toolkit's, as before."""
    site = tmp_path / "site"
    pip12 = _fake_cuda(site / "nvidia" / "cuda_runtime", ["lib/libcudart.so.12"])
    cu13 = _fake_cuda(tmp_path / "cuda-13.0", ["lib64/libcudart.so.13.0.48"],
                      {"lib64/libcudart.so.13": "libcudart.so.13.0.48",
                       "lib64/libcudart.so": "libcudart.so.13"})
    cu12 = _fake_cuda(tmp_path / "cuda-12.8", ["lib64/libcudart.so.12.8.90"],
                      {"lib64/libcudart.so.12": "libcudart.so.12.8.90"})
    empty = tmp_path / "empty"
    empty.mkdir()
    pip_inc, inc13, inc12 = (str(r / "include") for r in (pip12, cu13, cu12))

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    incs, libs = allocator.cuda_dirs(site, [str(cu13)])
    assert libs == [str(pip12 / "lib" / "libcudart.so.12")] and incs[0] == pip_inc
    incs, libs = allocator.cuda_dirs(empty, [str(cu13), str(cu12)])
    assert libs == [str(cu12 / "lib64" / "libcudart.so.12")] and incs[0] == inc12
    with pytest.raises(MemoplanError, match="runs CUDA 12.8.*found .* is CUDA 13 "):
        allocator.cuda_dirs(empty, [str(cu13)])
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    incs, libs = allocator.cuda_dirs(site, [str(cu13)])
    assert libs == [str(cu13 / "lib64" / "libcudart.so")] and incs[0] == inc13
    pip13 = _fake_cuda(tmp_path / "site13" / "nvidia" / "cu13", ["lib/libcudart.so.13"])
    incs, libs = allocator.cuda_dirs(tmp_path / "site13", [str(cu13)])
    assert libs == [str(pip13 / "lib" / "libcudart.so.13")]
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only torch: as before
    assert allocator.cuda_dirs(site, [str(cu13)]) == ([inc13], [str(cu13 / "lib64" /
                                                                    "libcudart.so")])
    assert allocator.cuda_dirs(site, [str(empty)]) == ([pip_inc], [str(pip12 / "lib" /
                                                                       "libcudart.so.12")])
    assert allocator.cuda_dirs(empty, [str(empty)]) == ([], [])


def test_memory_stats_and_resettable_peaks(fresh, monkeypatch):
    """The arena's buffer comes from the pool (as the runtime allocates it); two planned
    requests and an unplanned one, then frees: allocated, reserved and peaks of the arena, the
    pool and in total, and peaks that restart from now; memoplan.runtime's functions report
    the installed allocator's."""
    from memoplan import runtime

    lib = fresh.lib
    buffer = lib.mp_malloc(512 + 8192, 0, COMPUTE)
    assert fresh.set_arena(buffer + 512, 8192)
    fresh.begin(COMPUTE, [(1024, 0), (2048, 1024)])
    a = lib.mp_malloc(1000, 0, COMPUTE)  # 1024 bytes at offset 0
    b = lib.mp_malloc(2048, 0, COMPUTE)  # at 1024
    w = lib.mp_malloc(100, 0, COMPUTE)   # unplanned: the pool
    fresh.end()
    assert (a, b) == (buffer + 512, buffer + 512 + 1024)

    def stats(arena, pool, total):
        return {part: dict(zip(allocator.MEMORY, v))
                for part, v in (("arena", arena), ("pool", pool), ("total", total))}

    pool = 8704 + 100
    assert fresh.memory_stats() == stats((3072, 3072, 8192, 8192), (pool,) * 4,
                                         (3172, 3172, pool, pool))
    lib.mp_free(b, 0, 0, COMPUTE)
    lib.mp_free(w, 0, 0, COMPUTE)
    assert fresh.memory_stats() == stats((1024, 3072, 8192, 8192), (8704, pool, 8704, pool),
                                         (1024, 3172, 8704, pool))
    monkeypatch.setattr(allocator, "_installed", fresh)
    runtime.reset_peak_memory_stats()
    assert runtime.memory_stats() == stats((1024, 1024, 8192, 8192), (8704,) * 4,
                                           (1024, 1024, 8704, 8704))
    lib.mp_free(a, 0, 0, COMPUTE)
    monkeypatch.setattr(allocator, "_installed", None)
    with pytest.raises(MemoplanError, match="install_allocator\\(\\) has not run"):
        runtime.memory_stats()


def test_install_sets_the_record_stream_and_empty_cache_hooks(monkeypatch):
    """install_allocator() hands PyTorch the raising entry point and sets its record-stream and
    empty-cache hooks to the allocator's (a stand-in for PyTorch's CUDA classes here); a
    PyTorch without the hooks is refused with a message naming the NCCL setting."""
    seen = {}

    class Hooks:
        def set_record_stream_fn(self, fn):
            seen["record_stream"] = fn

        def set_reset_fn(self, fn):
            seen["empty_cache"] = fn

    class Pluggable:
        hooks = Hooks

        def __init__(self, path, malloc, free):
            seen.update(malloc=malloc, free=free)

        def allocator(self):
            return self.hooks()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    build = allocator.build
    monkeypatch.setattr(allocator, "build", lambda: build(host_backend=True))
    monkeypatch.setattr(torch.cuda.memory, "CUDAPluggableAllocator", Pluggable)
    monkeypatch.setattr(torch.cuda.memory, "change_current_allocator",
                        lambda a: seen.update(installed=a))
    monkeypatch.setattr(allocator, "_installed", None)
    planner = allocator.install_allocator()
    assert (seen["malloc"], seen["free"]) == ("mp_torch_malloc", "mp_free")
    assert seen["record_stream"] == planner.address("mp_record_stream")
    assert seen["empty_cache"] == planner.address("mp_empty_cache")
    assert isinstance(seen["installed"], Pluggable) and allocator.installed() is planner
    monkeypatch.setattr(allocator, "_installed", None)
    monkeypatch.setattr(Pluggable, "hooks", object)
    with pytest.raises(MemoplanError, match="TORCH_NCCL_AVOID_RECORD_STREAMS=1"):
        allocator.install_allocator()


def test_install_after_cuda_is_initialised_says_to_call_it_first(monkeypatch):
    """torchrun scripts call torch.cuda.set_device(local_rank) first, which initialises CUDA
    and PyTorch's allocator: install_allocator() then says to come before it (without building
    anything), and so does a failed swap."""
    too_late = "before torch.cuda.set_device\\(local_rank\\), torch.distributed.init_process_group"
    build = allocator.build
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(allocator, "_installed", None)
    monkeypatch.setattr(allocator, "build", lambda: pytest.fail("built after CUDA init"))
    with pytest.raises(MemoplanError, match=too_late):
        allocator.install_allocator()

    class Pluggable:  # PyTorch's, with its hooks
        def __init__(self, *args):
            pass

        def allocator(self):
            return self

        def set_record_stream_fn(self, fn):
            pass

        def set_reset_fn(self, fn):
            pass

    def swap(alloc):
        raise RuntimeError("Can't swap an already initialized allocator")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(allocator, "build", lambda: build(host_backend=True))
    monkeypatch.setattr(torch.cuda.memory, "CUDAPluggableAllocator", Pluggable)
    monkeypatch.setattr(torch.cuda.memory, "change_current_allocator", swap)
    with pytest.raises(MemoplanError, match=f"{too_late}.*Can't swap"):
        allocator.install_allocator()
    assert allocator.installed() is None


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
    phase_mallocs = n * sum(len(plan.layer.script(ph, 0).slots) for ph in ("forward", "backward"))
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


def test_a_replaced_arena_is_let_go(fresh):
    """Each apply() hands the allocator a new arena; the one it replaces (none of its planned
    tensors alive, or the switch is refused) must not be kept for the life of the process: on a
    GPU that is a whole arena (tens of GiB) per apply."""
    first = torch.empty(8192, dtype=torch.uint8)
    gone = weakref.ref(first)
    assert fresh.set_arena(first.data_ptr(), 8192, keep=first)
    second = torch.empty(8192, dtype=torch.uint8)
    assert fresh.set_arena(second.data_ptr(), 8192, keep=second)
    del first
    assert gone() is None
    assert len(fresh.arenas) == 1 and fresh.arenas[0] is second  # the one in use stays


def test_an_idle_arena_is_let_go_before_the_next_is_made(fresh):
    """A second apply() allocates its arena while the first one's buffer is still held: on a
    GPU both at once (2 x tens of GiB). With none of the old arena's planned tensors alive,
    the allocator lets it go first; with one alive, it keeps it (the switch is refused)."""
    first = torch.empty(8192, dtype=torch.uint8)
    gone = weakref.ref(first)
    assert fresh.set_arena(first.data_ptr(), 8192, keep=first)
    assert fresh.begin(0, [(1024, 0)])
    ptr = fresh.lib.mp_malloc(1024, 0, 0)  # a planned tensor in the arena, alive
    fresh.end()
    fresh.let_go_idle_arena()
    assert len(fresh.arenas) == 1  # kept: its tensor lives
    fresh.lib.mp_free(ptr, 0, 0, 0)
    del first
    fresh.let_go_idle_arena()
    assert gone() is None and fresh.arenas == []



def test_a_lock_left_by_a_killed_build_does_not_hang_the_next(tmp_path):
    """torch's extension builder waits without end while its build folder holds ``lock``; a
    killed build leaves it. An old one is removed, with a warning; a fresh one (a build
    running now in another process) is left alone."""
    lock = tmp_path / "lock"
    lock.touch()
    allocator._clear_stale_lock(lock)
    assert lock.exists()  # fresh: another build may hold it
    old = time.time() - 2 * allocator.STALE_LOCK_S
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="did not finish"):
        allocator._clear_stale_lock(lock)
    assert not lock.exists()
    allocator._clear_stale_lock(lock)  # none: nothing to do
