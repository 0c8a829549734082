"""Ring attention's buffers under the planned allocator (context parallelism).

Level 1 budgets the ring's buffers as ``ring:*`` blocks inside each layer's ``fwd[i]`` and
``bwd[i]`` blocks; the forward and backward scripts name their span (``PhaseScript.ring``), and
each ring call runs as a detour of the allocator: the script waits while the ring's requests go
first-fit into that span, then the call's results are copied into the slots planned for them.
Checked here: the spans of a cp plan (and none without cp; old plans still load), the span
around a gap, the allocator's detour (host backend), the refusal of memory-efficient attention
at a length whose padded logsumexp the ring cannot merge, and a training step over 2 gloo
processes under the host-built allocator in which every ring request lands in its span and
every planned request at its address, with the gradients of the same step without it.
``apply``'s planned phase (``_Runner._planned``) enters the ring's placement
(``RingAttention.placed(planner, script)``) around the phase.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import time
import types
from pathlib import Path

import pytest
import torch
import torch.fx as fx

from conftest import EXAMPLES
from torch_requests import TorchRequests
from memoplan.errors import MemoplanError
from memoplan.hardware import get_hardware
from memoplan.ir import LevelPlan, PhaseScript, Plan
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model

MODEL = EXAMPLES / "llama" / "model.py"
WORLD = 2
SEQ = 256  # global tokens: 128 per rank, the length the layer is profiled at
COMPUTE = 1  # a stream handle
aten = torch.ops.aten
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture(scope="module")
def profile():
    return profile_model(ProfileConfig(model_file=MODEL, seq=128))


def _ring_bytes(plan: Plan, phase: str) -> int:
    return sum(s for k, s in plan.levels[phase].sizes.items() if k.startswith("ring:"))


@pytest.mark.parametrize("rotate", ["allgather", "alltoall"])
def test_cp_plan_scripts_give_the_ring_buffers_a_place(profile, rotate):
    """Every forward and backward script of a cp plan names the span of its layer's block that
    level 1 gives the ring (every ``ring:*`` block inside it); recompute scripts have none."""
    plan = solve_plan(profile, SolveConfig(seq=4096, gpus=2, cp=2, hardware=get_hardware("h200"),
                                           time_limit=2.0, keep_last=0, alpha=0.5,
                                           rotate_method=rotate))
    it = plan.levels["iteration"]
    for ph, block in (("forward", "fwd"), ("backward", "bwd")):
        level = plan.levels[ph]
        ring = _ring_bytes(plan, ph)
        assert ring > 0
        for i in range(len(plan.layers)):
            sc = plan.layer.script(ph, i)
            assert sc.ring is not None and sc.ring[1] >= ring, (ph, i, sc.ring, ring)
            base, size = it.offsets[f"{block}[{i}]"], it.sizes[f"{block}[{i}]"]
            start, end = sc.ring[0], sc.ring[0] + sc.ring[1]
            assert base <= start and end <= base + size, (ph, i, sc.ring, base, size)
            for k in level.offsets:
                if k.startswith("ring:"):
                    at = base + level.offsets[k]
                    assert start <= at and at + level.sizes[k] <= end, (ph, i, k)
            # nothing else the plan makes while the ring runs lies in the span
            ring_time = [level.lifetimes[k] for k in level.offsets if k.startswith("ring:")]
            first, last = min(a for a, _ in ring_time), max(b for _, b in ring_time)
            for k, (a, b) in level.lifetimes.items():
                if not k.startswith("ring:") and a < last and first < b:
                    at = base + level.offsets[k]
                    assert at + level.sizes[k] <= start or end <= at, (ph, i, k)
    assert all(sc.ring is None for sc in plan.layer.scripts["recompute"])
    # the span survives the plan's JSON
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.layer.scripts == plan.layer.scripts


def test_plans_without_cp_have_no_span_and_old_plans_load(profile):
    plan = solve_plan(profile, SolveConfig(seq=128, hardware=get_hardware("h200"),
                                           time_limit=2.0, alpha=0.5))
    assert all(sc.ring is None for scs in plan.layer.scripts.values() for sc in scs)
    data = plan.to_json()
    assert all("ring" not in sc for scs in data["layer"]["scripts"].values() for sc in scs)
    assert Plan.from_json(json.loads(json.dumps(data))).layer.scripts == plan.layer.scripts
    # a script written before the span: read as none
    assert PhaseScript.from_json({"slots": [[512, 0]], "region": None}, "forward") == \
        PhaseScript(slots=((512, 0),))
    with pytest.raises(ValueError, match="ring span"):
        PhaseScript.from_json({"slots": [], "region": None, "ring": [1, 2, 3]}, "forward")


def _level(blocks: dict[str, tuple[int, int, tuple[int, int]]]) -> LevelPlan:
    return LevelPlan(offsets={k: v[0] for k, v in blocks.items()},
                     sizes={k: v[1] for k, v in blocks.items()},
                     lifetimes={k: v[2] for k, v in blocks.items()}, grows={},
                     kinds={k: "ring" if k.startswith("ring:") else "transient" for k in blocks},
                     peak=0, lower_bound=0, greedy_peak=0, caching_reserved_peak=0,
                     caching_allocated_peak=0, status="optimal", gap=0.0, seconds=0.0)


def test_the_span_covers_a_gap_only_where_nothing_made_meanwhile_lies():
    from memoplan.solve.scripts import ring_span

    ring = {"ring:kv": (0, 1024, (2, 5)), "ring:merge": (2048, 4096, (3, 6))}
    # the gap holds a block that is gone before the ring starts: covered
    assert ring_span(_level({**ring, "a": (1024, 1024, (0, 2))})) == (0, 6144)
    # the gap holds the op's output, made while the ring runs: the widest run alone
    assert ring_span(_level({**ring, "out": (1024, 1024, (4, 9))})) == (2048, 4096)
    assert ring_span(_level({"a": (0, 512, (0, 1))})) is None


# --- the allocator's detour (host backend) -------------------------------------------------

@pytest.fixture
def fresh(tmp_path):
    """A host-built allocator with a state of its own (a copy of the library, loaded anew)."""
    from memoplan.runtime import allocator

    path = tmp_path / "plan_allocator_host.so"
    shutil.copy(allocator.build(host_backend=True), path)
    return allocator.PlanAllocator(path)


def _counts(alloc, before):
    after = alloc.stats()
    return {k: after[k] - before[k] for k in ("planned", "shifted", "unplanned", "in_block")}


@needs_gxx
def test_a_detour_holds_the_script_and_places_first_fit_in_its_span(fresh):
    """During a detour no request takes (or skips) a slot, however well it matches one: each
    goes first-fit into the detour's span, or to the pool; after it the script goes on where it
    waited, and the phase's own block is back. Outside a phase a detour does nothing."""
    detour, detour_end = fresh.detour, fresh.detour_end
    buf = torch.empty(1 << 16, dtype=torch.uint8)
    base = buf.data_ptr()
    fresh.set_arena(base, buf.numel())
    lib = fresh.lib

    def malloc(size):
        ptr = lib.mp_malloc(size, 0, COMPUTE)
        return ptr - base if 0 <= ptr - base < buf.numel() else None

    fresh.begin(COMPUTE, [(1024, 0), (2048, 1024)], block=(32768, 4096))
    before = fresh.stats()
    detour(8192, 4096)
    assert malloc(1024) == 8192        # the size of the next slot, yet not its address
    assert malloc(2048) == 8192 + 1024  # nor the one after
    assert malloc(2048) is None        # the span is full: the pool
    detour_end()
    assert malloc(1000) == 0           # the script resumes at its first slot
    assert malloc(512) == 32768        # the phase's own block is back
    assert malloc(2048) == 1024
    detour(0, 0)                       # no span: the phase's own block
    assert malloc(512) == 32768 + 512
    detour_end()
    fresh.end()
    assert _counts(fresh, before) == {"planned": 2, "shifted": 0, "unplanned": 1, "in_block": 4}
    detour(8192, 4096)                 # outside a phase: nothing
    assert malloc(512) is None
    detour_end()
    assert fresh.stats()["missed"] == 0


# --- memory-efficient attention under cp ------------------------------------------------------

def _efficient_node(tokens: int | None, causal: bool = True) -> tuple[fx.Node, tuple]:
    g = fx.Graph()
    q, k, v = (g.placeholder(x) for x in "qkv")
    val = torch.empty(1, 2, tokens or 1, 16)
    for p in (q, k, v):
        p.meta["val"] = val
    n = g.call_function(aten._scaled_dot_product_efficient_attention.default,
                        (q, k, v, None, True), {"is_causal": causal})
    n.meta["val"] = (val, torch.empty(1, 2, tokens or 1))
    return n, (val, val, val, None, True)


def test_memory_efficient_attention_at_an_unmergeable_length_is_refused(monkeypatch):
    """The kernel pads its logsumexp to a multiple of 32 tokens: under cp the tokens per rank
    must be a multiple of 64 (load-balanced, causal) or 32; refused, naming the node, before
    any collective, both when the layer's program is built and at the call."""
    from memoplan.runtime.ring import RingAttention

    ring = RingAttention(group=object(), load_balance=True)
    calls = []
    fake = types.SimpleNamespace(
        _cp_options=types.SimpleNamespace(enable_load_balance=False, rotate_method=None,
                                          convert_to_f32=False),
        _RotateMethod=types.SimpleNamespace(ALL_GATHER="ag", ALL_TO_ALL="a2a"),
        _templated_ring_attention=lambda *a, **kw: calls.append(a) or (a[4], a[4][..., 0]))
    ring.engine = fake
    n, args = _efficient_node(96)
    with pytest.raises(MemoplanError, match=r"'_scaled_dot_product_efficient_attention\w*'.*"
                                             r"96 tokens per rank.*multiple of 64"):
        ring.check([n], "Block")
    with pytest.raises(MemoplanError, match="multiple of 64"):
        ring(n, args, {"is_causal": True})
    assert not calls  # no collective started
    n, args = _efficient_node(128)
    ring.check([n], "Block")
    ring(n, args, {"is_causal": True})
    assert len(calls) == 1
    n, args = _efficient_node(96, causal=False)  # no load balancing: 32 | tokens is enough
    ring.check([n], "Block")
    n, args = _efficient_node(80, causal=False)
    with pytest.raises(MemoplanError, match="multiple of 32"):
        ring.check([n], "Block")
    # flash attention returns its logsumexp unpadded: any length
    n, _ = _efficient_node(96)
    n.target = aten._scaled_dot_product_flash_attention.default
    ring.check([n], "Block")


# --- a training step under the host-built allocator, 2 gloo processes --------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head_tail(seq: int, cp: int, rank: int) -> torch.Tensor:
    chunks = torch.arange(seq).view(2 * cp, seq // (2 * cp))
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])


def _log_phases(runner) -> list:
    """The log of the planned phases the run enters ((phase, layer); None: left). ``apply``'s
    planned phase enters the ring's placement itself (``RingAttention.placed``); on code
    without it the ring runs unplaced and the checks below fail."""
    phases = []
    phase = runner.phase

    @contextlib.contextmanager
    def logged_phase(name, index, device, prog):
        with phase(name, index, device, prog):
            phases.append((name, index))
            yield
            phases.append(None)

    runner.phase = logged_phase
    return phases


def _ring_step_worker(rank: int, port: int, plan: Plan, lib_path: str, spill: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import memoplan.runtime as runtime
    from memoplan.runtime import allocator
    from memoplan.runtime.arena import Arena
    from memoplan.runtime.ring import RingAttention, engine
    from memoplan.trace.loader import load_model_file

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("cp",))
        mf = load_model_file(MODEL)
        model = mf.build_model()
        runtime.apply(model, plan, cp_mesh=mesh)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(mf.module.config().vocab_size, (1, SEQ), generator=g)
        mine = _head_tail(SEQ, WORLD, rank)

        def step():
            model.zero_grad()
            loss = model(tokens[:, mine], mine).float().pow(2).mean()
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

        want_loss, want = step()  # traces the layer; the allocator is not in it yet
        alloc = allocator.PlanAllocator(Path(lib_path))
        runner = model._memoplan_runner
        runner.arena = Arena.for_plan(plan, torch.device("cpu"))
        runner.arena.planner = alloc
        phases = _log_phases(runner)
        cp = engine()
        ring_mallocs: list[tuple[tuple[str, int], int | None, int]] = []  # offset None: pool
        in_ring = []

        def watched(fn):
            def run(*args, **kwargs):
                in_ring.append(True)
                try:
                    return fn(*args, **kwargs)
                finally:
                    in_ring.pop()
            return run

        for name in ("_templated_ring_attention", "_templated_ring_attention_backward"):
            setattr(cp, name, watched(getattr(cp, name)))
        call_ptrs: list[int] = []  # the current ring call's requests
        ring_call = RingAttention.__call__

        def settled(self, n, args, kwargs):
            """A ring call, and then the moment gloo takes to let go of its buffers (forward
            and backward: the call's results are copied out of the span). gloo
            drops a collective's input on its own thread a little after the wait that
            completes it (NCCL with its tensor stashing: at that wait, on this thread), so a
            send buffer may outlive the call by a few microseconds, and a later planned
            request over its addresses would fall back to the pool, by timing. None may
            outlive it for long."""
            call_ptrs.clear()
            out = ring_call(self, n, args, kwargs)
            if phases[-1][0] == "recompute" or not hasattr(self, "placed"):
                return out  # results not copied out: they stay where they were made
            deadline = time.monotonic() + 10
            while set(call_ptrs) & set(requests.ptr.values()) and time.monotonic() < deadline:
                time.sleep(0.001)
            assert not set(call_ptrs) & set(requests.ptr.values()), "a ring buffer outlives it"
            return out

        RingAttention.__call__ = settled  # this process only
        runner.arena.start()
        base = runner.arena.buffer.data_ptr() + (runner.arena.buffer.numel() - plan.arena_bytes)

        def on_malloc(ptr: int, nbytes: int) -> None:
            if in_ring:
                call_ptrs.append(ptr)
                at = ptr - base if 0 <= ptr - base < plan.arena_bytes else None
                current = next(p for p in reversed(phases) if p is not None)
                ring_mallocs.append((current, at, nbytes))

        external = {t.untyped_storage().data_ptr() for t in model.parameters()}
        external |= {b.untyped_storage().data_ptr()
                     for bufs in runner.copier._free.values() for b in bufs}
        requests = TorchRequests(alloc.lib, external, on_malloc)
        before = alloc.stats()
        with requests.mode:
            loss, got = step()
        after = alloc.stats()
        counts = {k: after[k] - before[k] for k in
                  ("planned", "shifted", "unplanned", "unplanned_bytes", "missed", "in_block")}
        requests.mode = None
        # every request a script lists came where it planned: no ring request took a slot
        n = len(plan.layers)
        slots = sum(len(plan.layer.script(ph, i).slots) for ph in ("forward", "backward")
                    for i in range(n))
        assert counts["planned"] == slots, counts
        assert counts["shifted"] == counts["missed"] == 0, counts
        # every request of a ring call went into the span its phase names (a re-run: the
        # recompute block), or, past what the span holds, to the pool: never elsewhere
        assert ring_mallocs
        pool: dict[tuple[str, int], int] = {}
        for (ph, i), at, nbytes in ring_mallocs:
            sc = plan.layer.script(ph, i)
            span = sc.ring if ph != "recompute" else sc.region
            assert span is not None, (ph, i)
            if at is None:
                pool[ph, i] = pool.get((ph, i), 0) + nbytes
            else:
                assert span[0] <= at and at + nbytes <= span[0] + span[1], \
                    (ph, i, at, nbytes, span)
        calls = {ph for (ph, _), _, _ in ring_mallocs}
        modes = {l.mode for l in plan.layers}
        assert {"forward", "backward"} <= calls, calls
        assert ("recompute" in modes) == ("recompute" in calls), (modes, calls)
        # nothing else left the plan; the ring spilled only where the test allows it
        assert counts["unplanned_bytes"] == sum(pool.values()), (counts, pool)
        assert all(ph == "backward" and b <= spill for (ph, _), b in pool.items()), (pool, spill)
        if not spill:
            assert counts["unplanned"] == 0, counts
        assert counts["in_block"] >= len(ring_mallocs) - counts["unplanned"]
        # the results copied out of the span are the ring's: the same step as without it
        torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9,
                                       msg=lambda t: f"rank {rank} {name}: {t}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def host_allocator():
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    from memoplan.runtime import allocator

    return str(allocator.build(host_backend=True))  # built once, before the processes start


@pytest.mark.parametrize("case", ["offload", "checkpointed"])
def test_ring_requests_land_in_their_span_under_the_planned_allocator(profile, host_allocator,
                                                                      case):
    """Two cp ranks train a step with the host-built planned allocator fed every request:
    every scripted request at its planned address (none shifted or missed: no ring request
    takes a slot), every request of every ring call (forward, backward, a checkpointed layer's
    re-run) inside the span its phase gives the ring (the re-run: its recompute block), nothing
    to the pool, and the loss and gradients of the same step without the allocator.

    The backward's ``ring:dq`` budget includes the ring's final dq, dk and dv (3 O, O: the
    attention output's bytes): they are made in the span and copied into the op's own gradient
    slots after the call. Without those 3 O the backward spilled 2 O to the pool here."""
    import torch.multiprocessing as mp

    hw = get_hardware("h200", host_mem_gb=1.5e-4) if case == "checkpointed" \
        else get_hardware("h200")
    cfg = SolveConfig(seq=SEQ, gpus=WORLD, cp=WORLD, hardware=hw, time_limit=2.0,
                      alpha=None if case == "checkpointed" else 0.5)
    spill = 0
    plan = solve_plan(profile, cfg)
    assert plan.config["tokens_per_gpu"] == SEQ // WORLD
    modes = [l.mode for l in plan.layers]
    assert ("recompute" in modes) == (case == "checkpointed"), modes
    assert "offload" in modes, modes
    mp.spawn(_ring_step_worker, args=(_free_port(), plan, host_allocator, spill), nprocs=WORLD,
             join=True)
