"""The copy schedule under asynchronous copies, on a CPU: a stand-in for CUDA's streams runs the
device-to-host and host-to-device copies as late as the runtime's waits allow (the compute
stream is the CPU itself). A wait the schedule lacks then shows as wrong gradients: a copy out
that runs after its source was poisoned, a prefetch read before its copy ran, a host buffer read
back before the copy into it ran. The controls below remove one wait each and check that the
gradients do go wrong. (The copy back also waits for the copy out into the same host buffer;
the compute stream's waits already order those two, so no control can isolate that wait.)"""

from __future__ import annotations

import copy
import gc
import importlib.util
import math
import threading

import pytest
import torch

from conftest import EXAMPLES
from memoplan.hardware import get_hardware
from memoplan.runtime import apply, stats
from memoplan.runtime.streams import Copier, CudaStreams
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model


class Queue:
    """A copy stream: its work waits until something waits for it."""

    def __init__(self) -> None:
        self.items: list[tuple] = []
        self.ran = 0
        self.after_compute = False  # waited for the compute stream since the last work

    def wait_stream(self, other) -> None:
        if isinstance(other, Queue):  # later work here runs after other's work queued so far
            self.items.append(("wait", other, len(other.items)))
        else:  # the compute stream is the CPU: what it queued has run; note that it was asked
            self.after_compute = True

    def run_to(self, n: int) -> None:
        while self.ran < n:
            item = self.items[self.ran]
            self.ran += 1
            if item[0] == "work":
                item[1]()
            else:
                item[1].run_to(item[2])


class Event:
    def record(self, stream: Queue) -> None:
        self.stream, self.at = stream, len(stream.items)

    def synchronize(self) -> None:  # the host waits: the work before it has run
        self.stream.run_to(self.at)


class Compute:
    def wait_event(self, event: Event) -> None:
        event.stream.run_to(event.at)


class Elsewhere:
    def wait_event(self, event: Event) -> None:
        pass


class Deferred(CudaStreams):
    def __init__(self) -> None:
        self.compute = Compute()
        self.queues: list[Queue] = []
        self.unordered = 0  # copies queued without waiting for the compute stream first
        self.most_pending = 0

    def stream(self, device):
        self.queues.append(Queue())
        return self.queues[-1]

    def current(self, device):
        # another thread's current stream: a wait there orders nothing the CPU-side compute
        # stream (the main thread) does, and runs no copy
        return self.compute if threading.current_thread() is threading.main_thread() \
            else Elsewhere()

    def event(self):
        return Event()

    def launch(self, stream: Queue, work) -> None:
        # on a GPU a copy must wait for the compute work before it: the kernels that wrote its
        # source, or the last readers of its destination
        self.unordered += not stream.after_compute
        stream.after_compute = False
        stream.items.append(("work", work))
        self.most_pending = max(self.most_pending, self.pending())

    def pending(self) -> int:
        return sum(len(q.items) - q.ran for q in self.queues)


@pytest.fixture(scope="module")
def plans():
    out = {}
    for name in ("llama", "gpt"):
        prof = profile_model(ProfileConfig(model_file=EXAMPLES / name / "model.py", seq=128))
        out[name] = solve_plan(prof, SolveConfig(seq=8192, hardware=get_hardware("h200"),
                                                 time_limit=2.0))
    return out


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"st_{name}", EXAMPLES / name / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(plans, name: str, alpha: float,
           poison: bool = True) -> tuple[float, Deferred, torch.nn.Module]:
    """Three steps on different tokens (shorter each time: the host buffers are reused) with
    deferred copies and poisoning; the largest relative
    gradient difference to plain training."""
    import dataclasses

    mod = _module(name)
    model = mod.build_model()
    ref = copy.deepcopy(model)
    plan = plans[name]
    plan = dataclasses.replace(plan, layers=tuple(dataclasses.replace(l, alpha=alpha)
                                                  for l in plan.layers))
    apply(model, plan, debug_poison=poison)
    streams = Deferred()
    model._memoplan_runner.copier = Copier([l.alpha for l in plan.layers if l.mode == "offload"],
                                           streams=streams)
    worst = 0.0
    for step in range(3):
        tokens = torch.randint(mod.config().vocab_size, (1, 110 - 7 * step),
                               generator=torch.Generator().manual_seed(step))
        for m in (model, ref):
            m.zero_grad()
            m(tokens).float().pow(2).mean().backward()
        for a, b in zip(model.parameters(), ref.parameters()):
            diff = ((a.grad - b.grad).abs().max() / b.grad.abs().max()).item()
            worst = math.nan if math.isnan(diff) or math.isnan(worst) else max(worst, diff)
    return worst, streams, model


@pytest.mark.parametrize("name", ["llama", "gpt"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("poison", [True, False])
def test_gradients_are_exact_with_copies_as_late_as_the_waits_allow(plans, name, alpha, poison):
    """With poisoning, forward waits for its copies out before it NaN-fills their sources;
    without, the copies out run only when layer i+2's forward or the backward waits."""
    worst, streams, model = _train(plans, name, alpha, poison)
    assert worst < 1e-6
    s = stats(model)
    assert s["prefetched_ahead"] > 0 and s["host_extra_bytes"] == 0
    assert streams.unordered == 0
    assert streams.most_pending > 1  # copies did wait, and gradients are still exact


@pytest.mark.parametrize("missing", ["ready", "wait_copies"])
def test_a_missing_wait_shows_as_wrong_gradients(plans, monkeypatch, missing):
    """Controls: without the model above, each of these bugs would pass on a CPU."""
    if missing == "ready":  # backward reads what was prefetched without waiting for the copy
        monkeypatch.setattr(Copier, "ready", lambda self, fetched: fetched[0])
    else:  # poison (and release) the sources before their copies out have run
        monkeypatch.setattr(Copier, "wait_copies", lambda self, index: None)
    worst, _, _ = _train(plans, "llama", 0.5)
    assert not worst < 1e-6  # NaN or a real difference


def test_two_forwards_then_two_backwards_with_late_copies(plans):
    """Two micro-batches forward before either backward: each layer call keeps its own host
    buffers and copy events, whatever order the copies run in."""
    mod = _module("gpt")
    model = mod.build_model()
    ref = copy.deepcopy(model)
    plan = plans["gpt"]
    apply(model, plan, debug_poison=True)
    model._memoplan_runner.copier = Copier(
        [l.alpha for l in plan.layers if l.mode == "offload"], streams=Deferred())
    for m in (model, ref):
        a, b = (m(torch.randint(mod.config().vocab_size, (1, n),
                                generator=torch.Generator().manual_seed(n)))
                .float().pow(2).mean() for n in (101, 90))
        a.backward()
        b.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9, msg=name)
    assert stats(model)["host_extra_bytes"] > 0  # the second call's buffers: its own


def test_a_copy_source_written_before_its_copy_ran_is_refused():
    """Autograd does not watch the tensors a layer copies out: an in-place write to one while
    its copy may still be pending is refused when the compute stream waits for the copy."""
    from memoplan.errors import MemoplanError
    from memoplan.trace.recompute import dim_order

    copier = Copier([1.0], streams=Deferred())
    t = torch.randn(4, 8)
    copier.to_host("0/t", t, dim_order(t))
    copier.finish_forward(0)
    t.mul_(2.0)
    with pytest.raises(MemoplanError, match="modified in place"):
        copier.release_copied()
    copier.release_copied()  # said once
    u = torch.randn(4, 8)
    slot, host = copier.to_host("0/u", u, dim_order(u))
    copier.finish_forward(0)
    copier.wait_copies(0)
    u.fill_(float("nan"))  # after the wait (debug poisoning): the copy is made
    copier.release_copied()
    assert not host.isnan().any()


def test_a_backward_that_stops_early_settles_the_prefetches_it_started(plans):
    """autograd.grad down to a middle layer's input: the layers below never run their backward,
    but the layer above them already started prefetching their copies. When their state goes,
    the copies are waited for on the host (the thread that lets go of the graph need not be on
    the compute stream) before their memory is given back."""
    import dataclasses

    mod = _module("llama")
    model = mod.build_model()
    plan = plans["llama"]
    plan = dataclasses.replace(plan, layers=tuple(dataclasses.replace(l, alpha=0.5)
                                                  for l in plan.layers))
    apply(model, plan)
    streams = Deferred()
    runner = model._memoplan_runner
    runner.copier = Copier([l.alpha for l in plan.layers if l.mode == "offload"], streams=streams)
    seen = {}
    hook = model.layers[2].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    loss = model(torch.randint(mod.config().vocab_size, (1, 96))).float().pow(2).mean()
    hook.remove()
    torch.autograd.grad(loss, seen["x"])  # layers 2 and 3 run their backward; 0 and 1 do not
    assert runner.prefetched_ahead >= 1 and streams.pending() > 0  # layer 1's copies pending
    box = [loss, seen]
    del loss, seen
    other = threading.Thread(target=lambda: (box.clear(), gc.collect()))  # let go elsewhere
    other.start()
    other.join()
    assert streams.pending() == 0  # settled before the memory went back
    assert not runner.arena.leases  # and every arena block was given back
