"""The runtime's live memory on a CPU: replaying a layer drops every value after its last use,
so a layer's forward and backward hold about what the profile's request trace (the plan's
input) says, not every intermediate of the layer at once."""

from __future__ import annotations

import importlib.util
import weakref
from collections import Counter

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import EXAMPLES
from memoplan.errors import MemoplanError
from memoplan.hardware import get_hardware
from memoplan.runtime import apply, stats
from memoplan.runtime.arena import Arena
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.head import LiveBytes
from memoplan.trace.requests import peak_live_bytes

SEQ = 128


def _one_layer(name: str):
    """A model under a plan (offload, alpha 0.5), its first layer and that layer's arguments."""
    spec = importlib.util.spec_from_file_location(f"mem_{name}", EXAMPLES / name / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    prof = profile_model(ProfileConfig(model_file=EXAMPLES / name / "model.py", seq=SEQ))
    plan = solve_plan(prof, SolveConfig(seq=SEQ, hardware=get_hardware("h200"), time_limit=2.0,
                                        alpha=0.5))
    model = mod.build_model()
    layer = next(m for m in model.modules() if type(m).__name__ == plan.layer_class)
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, a, k: seen.update(a=a, k=k), with_kwargs=True)
    with torch.no_grad():
        inputs = mod.example_inputs(SEQ)
        model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    hook.remove()
    apply(model, plan)
    args = (seen["a"][0].detach().requires_grad_(), *seen["a"][1:])  # the hidden states
    return prof, plan, model, layer, args, seen["k"]


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_a_layer_holds_what_the_trace_says(name):
    prof, plan, model, layer, args, kwargs = _one_layer(name)
    assert plan.layers[0].mode == "offload" and plan.layers[0].alpha == 0.5
    out = layer(*args, **kwargs)  # the first call traces the layer and makes the arena
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones_like(out))
    runner = model._memoplan_runner
    arena = runner.arena
    hits = arena.hits
    before = runner.host_bytes
    slab = runner.copier._slab.base  # noqa: SLF001  the host memory, reserved once
    fwd = LiveBytes()  # (the host slab was made before: not counted)
    with fwd:
        out = layer(*args, **kwargs)
    host = runner.host_bytes - before
    out = out[0] if isinstance(out, tuple) else out
    bwd = LiveBytes()  # the arena (the plan's memory, reserved once) and the slab were made before
    with bwd:
        out.backward(torch.ones_like(out))
    trace_fwd = peak_live_bytes(list(prof.layer.requests_forward))
    trace_bwd = peak_live_bytes(list(prof.layer.requests_backward))
    # forward: the trace's peak; backward: the host copies, the trace's
    # backward peak and the recomputation's temporaries (the rebuilt skeletal tensors are in the
    # arena). 20% for the layer's output and the temporaries of copying token ranges.
    assert host > 0
    # the host copies live in the slab reserved at the first call
    assert fwd.peak <= 1.2 * trace_fwd, (fwd.peak, trace_fwd)
    assert bwd.peak <= 1.2 * (host + trace_bwd), (bwd.peak, host, trace_bwd)
    # everything that came back for backward was placed in the plan's arena
    assert arena.misses == 0 and arena.hits > hits
    assert not arena.leases  # and every block was given back


def test_arena_leases_views_and_fallbacks():
    arena = Arena({"a": (0, 4096), "b": (2048, 4096), "c": (8192, 1024)}, 16384,
                  torch.device("cpu"))
    a = arena.lease("a")
    x = a.empty((4, 8, 2), torch.float32, order=[1, 0, 2])  # dims in memory: 8, 4, 2
    assert arena.holds(x) and x.stride() == (2, 8, 1)
    assert x.data_ptr() - arena.buffer.data_ptr() == 512  # plan offset 0 is 512 bytes in
    y = a.empty((100,), torch.float32)   # 512-byte aligned after x
    assert y.data_ptr() - x.data_ptr() == 512
    big = a.empty((2000,), torch.float32)  # 8000 bytes: does not fit what is left of the block
    assert not arena.holds(big) and arena.misses == 1 and arena.hits == 2
    # "b" overlaps the live "a": refused, its views are ordinary tensors; "c" does not
    b = arena.lease("b")
    assert not arena.holds(b.empty((4,), torch.float32))
    assert arena.holds(arena.lease("c").empty((4,), torch.float32))
    b.release()
    assert "a" in arena.leases  # releasing the refused lease leaves "a" alone
    x.fill_(1.0)
    a.release(poison=True)
    assert torch.isnan(x).all()  # a view read after its release shows NaN
    assert arena.holds(arena.lease("b").empty((4,), torch.float32))  # free to lease now


def test_a_lease_growing_down_ends_its_view_at_its_claimed_bytes():
    """A split tensor whose copied tokens are its last (``split[i]:NAME`` with a negative
    growth): its view ends where the claimed bytes end, 16-byte aligned where its copied bytes
    still lie in them; extend() claims the bytes below, unless a live lease holds them."""
    arena = Arena({"d": (4096, 1024), "u": (0, 1024)}, 8192, torch.device("cpu"),
                  grows={"d": -3072, "u": 1024})
    base = arena.lease("u").tensor((10,), torch.float32, [0])  # "u" holds [0, 1024) now
    d = arena.lease("d")
    # 300 float32 (1200 bytes), its last 100 copied: aligned, the copied 400 bytes stay in
    full = d.tensor((300,), torch.float32, [0], last=400)
    start = full.data_ptr() - base.data_ptr()
    assert start % 16 == 0 and 4096 <= start + 1200 - 400 and start + 1200 <= 4096 + 1024
    # 257 float32 whose last 1024 bytes are copied: no room to align, the view ends exactly
    # at the end of the claimed bytes
    exact = d.tensor((257,), torch.float32, [0], last=1024)
    assert exact.data_ptr() - base.data_ptr() + 257 * 4 == 4096 + 1024
    assert d.extend() and (d.start, d.size, d.grow) == (1024, 4096, 0)
    # a live lease below: extend() claims nothing
    blocker = Arena({"d": (4096, 1024), "x": (2048, 512)}, 8192, torch.device("cpu"),
                    grows={"d": -3072})
    blocker.lease("x")
    held = blocker.lease("d")
    assert not held.extend() and (held.start, held.size, held.grow) == (4096, 1024, -3072)


def test_two_forwards_then_two_backwards():
    """Two micro-batches forward, then the first one's backward: layer i+1 prefetches the
    pending (second) call of layer i, whose block the first call's layer i then finds leased:
    it falls back to ordinary buffers. Gradients stay exact, no lease is left behind."""
    prof, plan, model, layer, args, kwargs = _one_layer("gpt")
    spec = importlib.util.spec_from_file_location("mem_gpt2", EXAMPLES / "gpt" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref = mod.build_model()
    ref.load_state_dict(model.state_dict())
    model._memoplan_runner.poison = True
    losses = []
    for m in (model, ref):
        torch.manual_seed(0)
        first, second = (m(*mod.example_inputs(n)).float().pow(2).mean() for n in (SEQ, SEQ // 2))
        first.backward()
        second.backward()
        losses.append(first + second)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9, msg=name)
    assert model._memoplan_runner.arena.misses > 0
    assert not model._memoplan_runner.arena.leases
    # the slab holds one call per layer: the second call's host copies are extra buffers
    s = stats(model)
    assert s["host_extra_bytes"] > 0 and s["host_slab_bytes"] > 0


class FakePlanner:
    """Stands in for the planned allocator (which serves CUDA only): records what the runtime
    asks of it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.reserved: dict[int, int] = {}

    def set_arena(self, ptr, nbytes, keep=None):
        self.calls.append(("arena", ptr, nbytes))
        return True

    def let_go_idle_arena(self):
        self.calls.append(("let go",))

    def begin(self, stream, slots, align=512, block=None, device=0):
        self.calls.append(("begin", len(slots)) + ((block,) if block else ()))

    def end(self):
        self.calls.append(("end",))

    def reserve(self, offset, nbytes):
        self.reserved[offset] = nbytes
        return True

    def unreserve(self, offset):
        del self.reserved[offset]

    def stats(self):
        return {"planned": 0}


def test_the_runtime_drives_the_planned_allocator_phases(monkeypatch):
    from memoplan import runtime
    from memoplan.runtime import allocator
    apply_module = importlib.import_module("memoplan.runtime.apply")

    prof, plan, model, layer, args, kwargs = _one_layer("llama")
    runner = model._memoplan_runner
    runner.arena = Arena.for_plan(plan, torch.device("cpu"))
    fake = runner.arena.planner = FakePlanner()
    # library workspaces (cuBLAS) are made once per thread and stream, before its first phase
    monkeypatch.setattr(apply_module, "warm_libraries",
                        lambda device: fake.calls.append(("warm", device.type)))
    inputs = _llama_inputs()
    model(*inputs).float().pow(2).mean().backward()
    # before it makes its arena, the runtime lets go of an idle one (a gone model's)
    assert fake.calls[0] == ("let go",)
    fake.calls = fake.calls[1:]
    warm = [i for i, c in enumerate(fake.calls) if c[0] == "warm"]
    assert warm and warm[0] == 1 and all(fake.calls[i + 1][0] == "begin" for i in warm)
    assert len(warm) == len(runner.warmed) <= 2  # the main thread, maybe autograd's
    fake.calls = [c for c in fake.calls if c[0] != "warm"]
    n = len(plan.layers)
    mallocs = {ph: len(plan.layer.script(ph, 0).slots) for ph in ("forward", "backward")}
    assert mallocs["forward"] == sum(r[0] == "malloc" for r in prof.layer.requests_forward)
    assert fake.calls[0] == ("arena", runner.arena.buffer.data_ptr() + 512, plan.arena_bytes)
    phases = [c for c in fake.calls[1:]]
    # one forward phase per layer, then per layer a recompute phase (no script: first-fit in
    # its recompute[i] block, if it has one) and a backward phase, each begun and ended
    it = plan.levels["iteration"]
    blocks = [((it.offsets[f"recompute[{i}]"], it.sizes[f"recompute[{i}]"]),)
              if it.sizes.get(f"recompute[{i}]") else () for i in reversed(range(n))]
    assert sum(map(len, blocks)) == n - 1  # the last layer is kept: nothing to recompute
    assert phases == [("begin", mallocs["forward"]), ("end",)] * n + [
        c for b in blocks for c in (("begin", 0, *b), ("end",), ("begin", mallocs["backward"]),
                                    ("end",))]
    assert fake.reserved == {}  # every prefetch block reserved was given back
    for i in range(n):
        slots = plan.layer.script("forward", i).slots
        assert len(slots) == mallocs["forward"] and any(o >= 0 for _, o in slots)
    s = runtime.stats(model)
    assert s["layer_calls"] == n and s["arena_views"] > 0 and s["allocator"] == {"planned": 0}


def _llama_inputs():
    spec = importlib.util.spec_from_file_location("mem_llama_in", EXAMPLES / "llama" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.example_inputs(SEQ)


def test_host_memory_is_one_slab_sized_by_the_plan_and_reused_every_step():
    prof, plan, model, layer, args, kwargs = _one_layer("gpt")
    spec = importlib.util.spec_from_file_location("mem_gpt3", EXAMPLES / "gpt" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seen = []
    for seq in (SEQ, SEQ, SEQ // 2, 2 * SEQ, SEQ):
        model(*mod.example_inputs(seq)).float().pow(2).mean().backward()
        s = stats(model)
        seen.append((s["host_slab_bytes"], s["host_buffer_bytes"], s["host_extra_bytes"]))
    slab, buffers, extra = seen[0]
    # the first step made the slab: exactly the plan's host bytes (one iteration's copies at
    # the planned length, each buffer rounded up to 512 bytes, as the plan counts them); every
    # buffer came from it (their bytes, unrounded, are at most that)
    planned = sum(l.host_bytes for l in plan.layers)
    assert planned > 0 and slab == planned and planned - 512 * 64 < buffers <= planned
    assert extra == 0
    assert seen[1] == seen[0] and seen[2] == seen[0]  # the same length, then a shorter one
    assert seen[3][0] == slab and seen[3][2] > 0      # a longer one: extra buffers, counted
    assert seen[4] == seen[3]                         # and then reused


@pytest.mark.parametrize("max_pieces", [256, 1])
def test_copies_of_tokens_whose_axis_is_not_outermost(monkeypatch, max_pieces):
    """The first k tokens of a [batch, seq, hidden] tensor with batch 2 are not dense in
    memory: they go to the host and back as one copy per batch row (or, past MAX_PIECES rows,
    through a dense staging tensor), and the host buffer holds them densely in the device
    tensor's dim order."""
    from memoplan.runtime import streams
    from memoplan.trace.recompute import dim_order

    monkeypatch.setattr(streams, "MAX_PIECES", max_pieces)
    copier = streams.Copier([0.5])
    x = torch.randn(2, 10, 8)
    part = x.narrow(1, 0, 4)
    order = dim_order(x)
    slot, host = copier.to_host("0/x", part, order)
    assert host.permute(order).is_contiguous() and torch.equal(host, part)
    back = torch.full_like(x, float("nan"))
    copier.ready(copier.prefetch(host, back.narrow(1, 0, 4), order))
    assert torch.equal(back[:, :4], part) and back[:, 4:].isnan().all()
    assert (copier.pieced, copier.staged) == ((2, 0) if max_pieces > 1 else (0, 2))
    t = torch.randn(8, 6).t()  # a transposed tensor: its host copy keeps its memory order
    slot2, host2 = copier.to_host("0/t", t, dim_order(t))
    assert torch.equal(host2, t) and host2.stride() == t.stride()
    assert copier.pieced + copier.staged == 2  # one dense copy
    copier.give_back(slot, host)
    slot3, _ = copier.to_host("0/x", x.narrow(1, 0, 2), order)  # a smaller copy reuses it
    assert slot3[1] is slot[1] and copier.extra_bytes == copier.host_buffer_bytes  # no slab


def test_a_forward_without_backward_leaves_nothing_behind():
    """Evaluation under grad (no backward): once the output is dropped, no layer state stays."""
    import gc
    import weakref

    prof, plan, model, layer, args, kwargs = _one_layer("gpt")
    spec = importlib.util.spec_from_file_location("mem_gpt4", EXAMPLES / "gpt" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = model(*mod.example_inputs(SEQ))
    runner = model._memoplan_runner
    states = [ref() for ref in runner.pending.values()]
    assert states and all(s is not None for s in states)
    refs = [weakref.ref(s) for s in states]
    del out, states
    gc.collect()
    assert all(r() is None for r in refs)


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[str(func.overloadpacket)] += 1  # mm and its out= form alike
        return func(*args, **(kwargs or {}))


def test_dropped_tokens_are_rebuilt_in_one_pass():
    """The split tensors' ancestries overlap (llama's MLP: the gate matmul feeds silu, which
    feeds the product): backward re-runs each matmul of their union once, not once per
    tensor."""
    prof, plan, model, layer, args, kwargs = _one_layer("llama")
    out = layer(*args, **kwargs)
    prog = next(iter(model._memoplan_runner.programs.values()))
    union = set().union(*prog.recompute_order.values())
    assert sum(len(o) for o in prog.recompute_order.values()) > len(union)  # they overlap
    matmuls = {"aten.mm", "aten.addmm", "aten.bmm"}
    op = lambda n: str(getattr(n.target, "overloadpacket", n.target))  # noqa: E731
    expected = Counter(op(n) for n in prog.backward_nodes if op(n) in matmuls)
    expected += Counter(op(prog.node[n]) for n in union if op(prog.node[n]) in matmuls)
    count = CountOps()
    with count:
        out.backward(torch.ones_like(out))
    assert expected and {k: count.seen[k] for k in expected} == dict(expected)


def test_a_copied_tensor_written_in_place_after_its_forward_is_refused():
    """The layer input is copied to host, not saved for autograd: a later in-place write to it
    would race the copy on a GPU. It is refused with a message, as autograd would refuse it."""
    prof, plan, model, layer, args, kwargs = _one_layer("gpt")
    x = args[0] * 1.0
    out = layer(x, *args[1:], **kwargs)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(MemoplanError, match="modified in place"):
        out.backward(torch.ones_like(out))
    out = layer(args[0] * 1.0, *args[1:], **kwargs)  # written out of place: fine
    out.backward(torch.ones_like(out))


def test_a_call_whose_backward_never_runs_gives_back_its_block_and_host_buffers():
    """Evaluation under grad (no backward at all), and a backward that stops early
    (``autograd.grad`` to layer 1's input: layer 0's data was prefetched, its backward never
    runs): once their graphs go, the next steps reuse the same host buffers and arena blocks."""
    import gc

    prof, plan, model, layer, args, kwargs = _one_layer("gpt")
    spec = importlib.util.spec_from_file_location("mem_gpt5", EXAMPLES / "gpt" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    inputs = mod.example_inputs(SEQ)
    model(*inputs).float().pow(2).mean().backward()  # a normal step: buffers and blocks made
    runner = model._memoplan_runner
    made, misses = runner.copier.host_buffer_bytes, runner.arena.misses
    out = model(*inputs)  # no backward
    del out
    seen = {}
    hook = model.layers[1].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    loss = model(*inputs).float().pow(2).mean()
    hook.remove()
    torch.autograd.grad(loss, seen["x"])  # layers 3..1 run their backward, layer 0 does not
    assert runner.arena.leases  # layer 0's block, leased by its prefetch
    del loss, seen
    gc.collect()
    assert not runner.arena.leases
    model(*inputs).float().pow(2).mean().backward()
    assert runner.copier.host_buffer_bytes == made and runner.copier.extra_bytes == 0
    assert runner.arena.misses == misses


def test_prepare_makes_the_host_slab_before_the_first_step():
    """prepare(model, seq_len) sizes (on a GPU: pins) the host slab up front, so the first
    timed step pays nothing for it: steps at that length or shorter make no other buffer."""
    from memoplan import runtime

    prof, plan, model, layer, args, kwargs = _one_layer("gpt")
    spec = importlib.util.spec_from_file_location("mem_gpt4", EXAMPLES / "gpt" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seconds = runtime.prepare(model, 2 * SEQ)
    before = stats(model)
    assert before["host_slab_bytes"] > 0 and before["pin_seconds"] == seconds >= 0
    assert before["host_buffer_bytes"] == 0
    for seq in (2 * SEQ, SEQ, 2 * SEQ - 3):
        model(*mod.example_inputs(seq)).float().pow(2).mean().backward()
        s = stats(model)
        assert s["host_slab_bytes"] == before["host_slab_bytes"] and s["host_extra_bytes"] == 0
    assert runtime.prepare(model) == seconds  # once made, the slab stays
    # at the plan's own length it is exactly the plan's host bytes
    prof, plan, model, layer, args, kwargs = _one_layer("gpt")
    runtime.prepare(model)
    assert stats(model)["host_slab_bytes"] == sum(l.host_bytes for l in plan.layers)
