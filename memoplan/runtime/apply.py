"""``apply(model, plan)``: run the model's repeated layers under a plan.

The user's training loop stays as it is::

    plan = memoplan.load_plan("plan.json")
    model = memoplan.runtime.apply(model, plan)
    loss = loss_fn(model(batch)); loss.backward(); optimizer.step()

Each instance of the plan's layer class gets a forward that, while autograd records, runs the
layer through :mod:`memoplan.runtime.execute` with its planned mode and swap fraction. Without
grad (``torch.no_grad()``) or in ``eval()`` the original forward runs untouched; a training
call gets no key/value cache (:mod:`memoplan.trace.cache`). The plan's token
split is re-derived for the length each call actually sees: alpha of its tokens are copied, so
any sequence length runs, also one that the GPUs do not split evenly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from memoplan.errors import MemoplanError
from memoplan.ir import PLAN_SCHEMA, Plan
from memoplan import jsonio
from memoplan.runtime import allocator
from memoplan.runtime.arena import Arena
from memoplan.runtime.execute import LayerState, backward_layer, forward_layer, prefetch_layer
from memoplan.runtime.ring import RingAttention, cp_group
from memoplan.runtime.program import OUTPUT, LayerProgram, PassedThrough, build_program
from memoplan.runtime.streams import ALIGN, Copier, modified_in_place, nccl_device
from memoplan.signature import layer_class_name, layer_signature
from memoplan.trace.cache import without_cache

PROGRAMS_KEPT = 8  # layer programs (one per input signature) kept per model; see _program


def load_plan(path: str | Path) -> Plan:
    """Read a plan written by ``memoplan solve`` (clear errors for missing or corrupt files)."""
    return jsonio.load_plan(path)


def plan_from_text(text: str) -> Plan:
    """A plan from its JSON text (what a generated runtime module embeds)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MemoplanError(f"The embedded plan is not valid JSON ({e}); emit it again.") from e
    if not isinstance(data, dict) or data.get("schema") != PLAN_SCHEMA:
        raise MemoplanError(f"The embedded plan is not a '{PLAN_SCHEMA}' plan; emit it again.")
    return Plan.from_json(data)


class _Runner:
    """Shared by the wrapped layers of one model: the plan, programs, host copier and arena."""

    def __init__(self, plan: Plan, use_arena: bool | None) -> None:
        self.plan = plan
        self.copier = Copier([l.alpha for l in plan.layers if l.mode == "offload"])
        self.use_arena = use_arena
        self.arena: Arena | None = None
        self.programs: OrderedDict[tuple, LayerProgram] = OrderedDict()  # see _program
        self.calls = 0
        self.tracing = False  # while True, wrapped layers run their original forward
        self.poison = False   # debug: NaN-fill every dropped or copied-out device tensor
        self.recomputed_tokens = 0
        # layer index -> its latest forward's state, weakly: a graph that is dropped without a
        # backward (evaluation under grad) must not keep its tensors alive here
        self.pending: dict[int, weakref.ref[LayerState]] = {}
        self.prefetched_ahead = 0  # layers whose data was prefetched during the next backward
        self.host_bytes = 0   # host copies made so far (summed over layer calls)
        self.warmed: set[tuple[int, int, int]] = set()  # (thread, device, stream): see phase
        self.said_cache = False  # the key/value cache warning is given once
        self.said_eval = False   # and the one for eval() calls under grad
        self.ring: RingAttention | None = None  # attention under context parallelism

    def arena_on(self, device: torch.device) -> Arena:
        """The plan's arena on ``device`` (an empty one, every buffer allocated normally, when
        the arena is off)."""
        if self.arena is None:
            planner = allocator.installed() if device.type == "cuda" else None
            use = self.use_arena
            if use is None:  # see apply()
                use = device.type != "cuda" or planner is not None
            self.arena = Arena.for_plan(self.plan, device) if use else Arena({}, 0, device)
            self.arena.planner = planner if use else None
        return self.arena

    @contextlib.contextmanager
    def phase(self, phase: str, index: int, device: torch.device,
              prog: LayerProgram) -> Iterator[None]:
        """Layer ``index``'s ``phase`` ("forward", "backward", or "recompute": rebuilding its
        dropped tokens), named ``memoplan:PHASE[i]`` in profiler traces, replays the plan's
        addresses (with the planned allocator installed)."""
        with torch.profiler.record_function(f"memoplan:{phase}[{index}]"):
            with self._planned(phase, index, device, prog):
                yield

    @contextlib.contextmanager
    def _planned(self, phase: str, index: int, device: torch.device,
                 prog: LayerProgram) -> Iterator[None]:
        arena = self.arena_on(device)
        if arena.planner is not None:
            arena.start()  # may find another model's arena in use and drop the planner
        planner = arena.planner
        if planner is None:
            yield
            return
        script = self.plan.layer.script(phase, index)  # what the plan places where
        # a phase is keyed on (device, stream): the default stream is 0 on every device (a CPU
        # run, the tests' host-built allocator, is device 0, stream 0)
        stream, where = 0, 0
        if device.type == "cuda":
            current = torch.cuda.current_stream(device)
            stream, where = current.cuda_stream, current.device_index
        key = (threading.get_ident(), where, stream)
        if key not in self.warmed:  # before this thread's first phase on this stream
            self.warmed.add(key)
            warm_libraries(device)
        planner.begin(stream, list(script.slots), align=int(self.plan.config.get("align", 512)),
                      block=script.region, device=where)
        try:
            # ring attention (cp > 1): its requests go first-fit into the span the script
            # gives them, its results into their slots (runtime/ring.py)
            with prog.ring.placed(planner, script) if prog.ring is not None \
                    else contextlib.nullcontext():
                yield
        finally:
            planner.end()


def prepare(model: torch.nn.Module, seq_len: int | None = None,
            device: torch.device | str | None = None) -> float:
    """Make (and on a GPU pin) the host slab now, for ``seq_len`` tokens per GPU (default: the
    plan's), so that no timed step pays for it; returns the seconds it took (also
    ``stats(model)["pin_seconds"]``). ``apply`` calls it for a model whose parameters are
    on a GPU, and under NCCL for one not on its GPU yet (on this rank's GPU); otherwise the
    slab is sized at the first offloaded layer call, for that call's length. Once made, the
    slab stays: a longer sequence later gets buffers of its own.

    Under torch.distributed every rank must call it (it is a collective): after pinning, the
    ranks agree that each could, and if one could not, every rank raises a MemoplanError
    naming it, instead of the others waiting for it in the next collective. The ranks also
    wait here for the slowest one's pinning (about 0.5 s per GiB): keep the process group's
    timeout above that."""
    runner = _runner_of(model)
    if not runner.copier.sized:
        plan = runner.plan
        planned = int(plan.config.get("tokens_per_gpu") or plan.config["seq"])
        seq = seq_len or planned
        copied = sum(t.kind != "shared" for t in plan.layer.saved)
        total = 0
        for l in plan.layers:
            if l.mode == "offload":  # host bytes scale with the tokens; each buffer aligned
                total += l.host_bytes if seq == planned else \
                    -(-l.host_bytes * seq // planned) + ALIGN * copied
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        runner.copier.reserve_bytes(total, torch.device(device))
    return runner.copier.pin_seconds


def _runner_of(model: torch.nn.Module) -> _Runner:
    runner = getattr(model, "_memoplan_runner", None)
    if runner is None:
        raise MemoplanError("This model was not wrapped by memoplan.runtime.apply().")
    return runner


def warm_libraries(device: torch.device) -> None:
    """Make the workspaces that libraries keep for the life of the process, outside any
    planned phase. cuBLAS and cuBLASLt allocate one per (thread's handle, stream) at their first
    matmul there, through the installed allocator, and never free it: made inside a phase it
    would take a planned slot or a recompute block for good, and every later phase over those
    addresses would fall back to the pool."""
    if device.type != "cuda":
        return
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            a = torch.ones(16, 16, device=device, dtype=dtype)
            torch.mm(a, a)
            torch.addmm(a[0], a, a)  # the Lt path (bias epilogue) has a workspace of its own


def stats(model: torch.nn.Module) -> dict[str, Any]:
    """What the runtime did so far for ``model`` (a model passed to :func:`apply`): layer calls,
    host bytes copied, tokens recomputed, layers prefetched ahead, host memory (the slab sized
    by the plan and pinned once on a GPU, the buffers carved from it, and those it could not
    hold), copies made in dense pieces or staged through a dense device tensor, saved tensors
    copied whole because they could not be recomputed by token at the run's shapes, arena
    views placed / fallen back, and the planned allocator's counters when it is installed
    (``planned``, ``shifted``, ``unplanned``: requests that left the plan, ``outside``)."""
    runner = _runner_of(model)
    out: dict[str, Any] = {
        "layer_calls": runner.calls, "host_bytes": runner.host_bytes,
        "recomputed_tokens": runner.recomputed_tokens, "prefetched_ahead": runner.prefetched_ahead,
        "host_slab_bytes": runner.copier.slab_bytes, "pin_seconds": runner.copier.pin_seconds,
        "host_buffer_bytes": runner.copier.host_buffer_bytes,
        "host_extra_bytes": runner.copier.extra_bytes,
        "pieced_copies": runner.copier.pieced,
        "staged_copies": runner.copier.staged,
        "copied_whole_instead": sorted({c for prog in runner.programs.values()
                                        for c in prog.whole_instead}),
        "arena_bytes": runner.arena.nbytes if runner.arena else 0,
        "arena_views": runner.arena.hits if runner.arena else 0,
        "arena_fallbacks": runner.arena.misses if runner.arena else 0}
    planner = runner.arena.planner if runner.arena else None
    if planner is not None:
        out["allocator"] = planner.stats()
    return out


def apply(model: torch.nn.Module, plan: Plan, *, debug_poison: bool = False,
          arena: bool | None = None, cp_mesh: Any = None) -> torch.nn.Module:
    """Wrap every instance of ``plan.layer_class`` in ``model`` (in place; returns ``model``).

    ``debug_poison`` overwrites every tensor the plan drops or copies out with NaN right after
    each layer's forward, and every arena block when it is given back: a schedule that reads
    one too early or too late shows as NaN gradients.

    ``cp_mesh``: under context parallelism (a plan solved with ``--cp`` > 1), the DeviceMesh
    (its "cp" dimension) or process group of the ranks that share a sequence; each holds its
    S/cp tokens in the load-balanced (head-tail) order, and the layers' attention runs through
    torch's ring (:mod:`memoplan.runtime.ring`).

    ``arena``: place the runtime's own buffers (what comes back for each layer's backward) in
    the plan's arena (``memoplan.runtime.arena``). By default on, except on a GPU without the
    planned allocator (``install_allocator()``): the arena reserves the plan's whole
    ``arena_bytes`` and pays off only when the layers' transients are planned into it too.
    """
    # the profile plans the instances a ModuleList or Sequential holds (trace/layers.py)
    held = {id(c) for m in model.modules() if isinstance(m, (torch.nn.ModuleList,
                                                           torch.nn.Sequential))
            for c in m.children()}
    same_class = [m for m in model.modules()
                  if layer_class_name(m) == plan.layer_class and id(m) in held]
    if not same_class:
        raise MemoplanError(f"The model has no layer of class '{plan.layer_class}', the class "
                            f"this plan was solved for.")
    # only the instances built like the profiled one (T5: the encoder's blocks 1.., not block 0
    # with its relative attention bias, nor the decoder's blocks with cross-attention)
    layers = [m for m in same_class if layer_signature(m) == plan.profile_hash]
    others = [layer_signature(m) for m in same_class if layer_signature(m) != plan.profile_hash]
    if len(layers) != len(plan.layers) and (not layers or len(same_class) == len(plan.layers)):
        raise MemoplanError(
            f"This plan was solved for another layer (profile hash {plan.profile_hash}; "
            f"{len(others)} of this model's {len(same_class)} '{plan.layer_class}' layers hash "
            f"to {others[0]}: their parameters' names, shapes or dtypes differ). Profile this "
            f"model and solve a new plan.")
    if len(layers) != len(plan.layers):
        raise MemoplanError(f"The plan is for {len(plan.layers)} layers of '{plan.layer_class}', "
                            f"the model has {len(layers)} built like the profiled one. Solve a "
                            f"plan for this model.")
    if int(plan.config.get("tp", 1)) > 1:
        raise MemoplanError(
            f"This plan assumes tensor parallelism (tp {plan.config['tp']}), which memoplan "
            f"plans but does not run. Solve with --tp 1 (FSDP2 and context parallelism: "
            f"--gpus N [--cp K]).")
    cp = int(plan.config.get("cp", 1))
    if cp > 1 and cp_mesh is None:
        raise MemoplanError(
            f"This plan is for context parallelism over {cp} GPUs (--cp {cp}): pass the cp "
            f"ranks' DeviceMesh, apply(model, plan, cp_mesh=mesh['cp']), and give each rank "
            f"its S/{cp} tokens in the load-balanced order.")
    _check_ranks_agree(plan)
    runner = _Runner(plan, arena)
    if cp > 1:
        runner.ring = RingAttention(cp_group(cp_mesh, cp),
                                    load_balance=bool(plan.config.get("load_balance", True)),
                                    rotate=str(plan.config.get("rotate_method", "allgather")))
    runner.poison = debug_poison
    for index, layer in enumerate(layers):
        _wrap(layer, index, runner)
    model._memoplan_runner = runner  # noqa: SLF001  (lets tests and benchmarks read counters)
    if any(l.mode == "offload" for l in plan.layers):
        if any(p.is_cuda for p in model.parameters()):
            prepare(model)  # pin the host slab now, not in the first step
        elif (gpu := nccl_device()) is not None:
            # a model not on its GPU yet (meta init, to_empty after fully_shard) in an NCCL
            # job: pin now too, where every rank is, and not inside the first forward, between
            # FSDP's and the ring's collectives
            prepare(model, device=gpu)
    return model


def plan_digest(plan: Plan) -> str:
    """A hash of the whole plan (what every rank must hold alike)."""
    text = json.dumps(plan.to_json(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_ranks_agree(plan: Plan) -> None:
    """Under torch.distributed, every rank must apply the same plan, to a job of the size the
    plan was solved for. The ranks exchange what they hold first, so that a difference raises
    on every rank alike instead of leaving some waiting in a collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    mine = (plan_digest(plan), int(plan.config.get("gpus", 1)))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) > 1:
        ranks = [r for r, x in enumerate(everyone) if x != everyone[0]]
        raise MemoplanError(
            f"The ranks hold different plans (rank 0: plan {everyone[0][0]} for "
            f"{everyone[0][1]} GPUs; rank {ranks[0]}: plan {everyone[ranks[0]][0]} for "
            f"{everyone[ranks[0]][1]} GPUs). Give every rank the same plan file.")
    if mine[1] != dist.get_world_size():
        raise MemoplanError(
            f"The plan was solved for {mine[1]} GPUs (--gpus), this job has "
            f"{dist.get_world_size()} ranks. Solve a plan with --gpus "
            f"{dist.get_world_size()}.")


def _wrap(layer: torch.nn.Module, index: int, runner: _Runner) -> None:
    original = layer.forward
    decision = runner.plan.layers[index]

    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or not self.training or runner.tracing:
            if torch.is_grad_enabled() and not self.training and not runner.tracing \
                    and not runner.said_eval:
                runner.said_eval = True
                warnings.warn(
                    f"memoplan: '{runner.plan.layer_class}' layers in eval() mode run their "
                    f"original forward, without the plan, also under grad: a backward through "
                    f"them keeps every activation, as plain training does. Train in train() "
                    f"mode (turn dropout off with its probability, not with eval()) for the "
                    f"plan to apply.", stacklevel=3)
            return original(*args, **kwargs)
        args, kwargs, dropped = without_cache(args, kwargs)
        if dropped and not runner.said_cache:
            runner.said_cache = True
            warnings.warn(
                f"memoplan: the model passes a key/value cache to its '{runner.plan.layer_class}' "
                f"layers (transformers' use_cache, on by default). While training under the plan "
                f"they run without it, as under gradient checkpointing (a cache would hold every "
                f"layer's keys and values for the whole step), so the cache the model returns "
                f"stays empty. Under torch.no_grad() or eval() the layers run as before, cache "
                f"included. Set use_cache=False in the model's config to silence this.",
                stacklevel=3)
        prog = _program(runner, self, args, kwargs)
        leaves = pytree.tree_leaves((args, kwargs))
        inputs = [x for x in leaves if isinstance(x, torch.Tensor)]
        states = [p for _, p in self.named_parameters()] + [b for _, b in self.named_buffers()]
        outs = _LayerFunction.apply(prog, decision.mode, decision.alpha, runner, index,
                                    len(inputs), *inputs, *states)
        runner.calls += 1
        it = iter(outs if isinstance(outs, tuple) else (outs,))
        filled = [next(it) if x is OUTPUT else leaves[x.index] if isinstance(x, PassedThrough)
                  else x for x in prog.out_template]
        return pytree.tree_unflatten(filled, prog.out_spec)

    layer.forward = types.MethodType(forward, layer)


def _program(runner: _Runner, layer: torch.nn.Module, args: tuple, kwargs: dict) -> LayerProgram:
    """The layer's program for these arguments: built at the first call with their shapes,
    dtypes, devices and autocast state (a trace on fake tensors: nothing real is kept), then
    reused. At most ``PROGRAMS_KEPT`` are kept per model, the least recently used going first,
    so training on ever new lengths does not grow memory."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    # the structure (keyword names, in their order) too: the program binds its placeholders to
    # the leaves by position; a tensor passed twice is told from two tensors alike
    key = (spec, *((tuple(x.shape), x.dtype, str(x.device), x.requires_grad)
                   if isinstance(x, torch.Tensor) else repr(x) for x in leaves))
    key += (tuple(next(j for j, y in enumerate(leaves) if y is x) for x in leaves),)
    device = next((x.device.type for x in leaves if isinstance(x, torch.Tensor)), "cpu")
    key += (torch.is_autocast_enabled(device), str(torch.get_autocast_dtype(device)))
    if key in runner.programs:
        runner.programs.move_to_end(key)
    else:
        runner.tracing = True
        try:
            with _local_attention(runner.ring is not None):
                prog = build_program(layer, args, kwargs, runner.plan.layer,
                                     runner.plan.layer_class)
        finally:
            runner.tracing = False
        if runner.ring is not None:
            runner.ring.check(prog.forward_nodes, runner.plan.layer_class)
            prog.ring = runner.ring
        runner.programs[key] = prog
        while len(runner.programs) > PROGRAMS_KEPT:
            runner.programs.popitem(last=False)
        if prog.whole_instead:
            shapes = [tuple(x.shape) for x in leaves if isinstance(x, torch.Tensor)]
            warnings.warn(
                f"memoplan: at input shapes {shapes}, {len(prog.whole_instead)} saved tensors of "
                f"'{runner.plan.layer_class}' that the profile found token-wise cannot be "
                f"recomputed by token (their ops merge the token axis with another one, as a "
                f"batch > 1 flattened for a matmul does); they are copied to host whole instead. "
                f"Gradients stay exact, but the plan's memory and time figures assume the "
                f"profiled shapes: profile and train with batch 1 per GPU.", stacklevel=4)
    return runner.programs[key]


@contextlib.contextmanager
def _local_attention(on: bool) -> Iterator[None]:
    """Trace attention as the local op: torch's ``context_parallel()`` replaces
    ``F.scaled_dot_product_attention`` with its DTensor dispatch while it is active; the
    runtime does the ring itself (runtime/ring.py)."""
    F = torch.nn.functional
    current, native = F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention
    if not on or current is native:
        yield
        return
    F.scaled_dot_product_attention = native
    try:
        yield
    finally:
        F.scaled_dot_product_attention = current


class _LayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, prog: LayerProgram, mode: str, alpha: float, runner: _Runner, index: int,
                n_inputs: int, *tensors: torch.Tensor) -> Any:
        inputs, states = list(tensors[:n_inputs]), list(tensors[n_inputs:])
        runner.copier.release_copied(before=index - 1)  # layer index-2's buffer is reused now
        grows = runner.arena_on(inputs[0].device).grows  # blocks growing down: last tokens
        copy_last = any(grows.get(f"split[{index}]:{c}", 0) < 0 for c in prog.handling)
        with runner.phase("forward", index, inputs[0].device, prog):
            outputs, state = forward_layer(prog, mode, alpha, runner.copier, index, states,
                                           [t.detach() for t in inputs], copy_last=copy_last,
                                           poison=runner.poison)
        runner.pending[index] = weakref.ref(state)
        # the inputs are kept (copied or on the device), not saved for autograd: watch them
        ctx.input_versions = [(weakref.ref(t), t._version) for t in inputs]
        ctx.index = index
        runner.host_bytes += sum(t.numel() * t.element_size() for t in state.host.values())
        ctx.prog, ctx.mode, ctx.runner, ctx.state = prog, mode, runner, state
        ctx.n_inputs = n_inputs
        ctx.states = states
        return tuple(outputs) if len(outputs) != 1 else outputs[0]

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Any:
        prog: LayerProgram = ctx.prog
        state: LayerState = ctx.state
        runner: _Runner = ctx.runner
        if any(t() is not None and t()._version != v for t, v in ctx.input_versions):
            raise modified_in_place(ctx.index)
        previous = runner.pending.pop(ctx.index - 1, lambda: None)()
        arena = runner.arena_on(grad_outputs[0].device)
        runner.copier.release_copied()  # forward's copy sources go before anything is leased
        if previous is not None and previous.host:  # its copies overlap this layer's backward
            with torch.profiler.record_function(f"memoplan:prefetch[{previous.index}]"):
                prefetch_layer(previous, runner.copier, arena, grad_outputs[0].device)
            runner.prefetched_ahead += 1
        runner.pending.pop(ctx.index, None)
        grads = backward_layer(prog, ctx.mode, state, runner.copier, arena, ctx.states,
                               [g.contiguous() for g in grad_outputs], poison=runner.poison,
                               planned=lambda phase: runner.phase(phase, ctx.index,
                                                                  arena.device, prog))
        ctx.runner.recomputed_tokens += state.recomputed_tokens
        ctx.state = None  # drop the host copies' references as soon as possible
        n_in = ctx.n_inputs
        it = iter(grads)
        input_grads = [next(it) if i in prog.grad_input_pos else None for i in range(n_in)]
        state_grads = [next(it) if t.requires_grad else None for t in ctx.states]
        return (None, None, None, None, None, None, *input_grads, *state_grads)
