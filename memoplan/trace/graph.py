"""Trace one layer's forward and backward into a torch.fx graph and run it once.

The layer is traced at the dispatch level with ``make_fx`` on a joint function (the layer's
forward, then ``torch.autograd.grad`` of its outputs), so the graph holds exactly the aten ops
that eager training runs, and every forward value that a backward node reads is a tensor that
autograd saved. The forward/backward boundary is the graph's length when the forward returns.

Tracing and the recorded run use fake tensors (shapes, dtypes and storages without data), so a
bf16 7B layer profiles in seconds on a CPU that has no fast bf16 kernels. The recorded run keeps
every value alive and notes its storage and FLOPs: storages tell which values alias, FLOPs feed
the cost model. Real values, needed only to probe which ops are token-wise, come from a
*shadow* run of the forward graph in float32 (low-precision tensors and dtype arguments are
upcast: whether an op mixes tokens does not depend on precision). An op that refuses float32
(CUDA's flash and cuDNN attention kernels) runs in the dtypes the traced graph gives its
arguments instead, and its result is upcast again (``shadow_call``).
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.nn.utils.stateless import _reparametrize_module
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from memoplan.errors import MemoplanError
from memoplan.trace.cache import without_cache
from memoplan.trace.inplace import functionalize_forward
from memoplan.trace.kernels import register_fake_kernels
from memoplan.trace.replay import Replay, where

Role = str  # "param" | "buffer" | "primary" | "shared" | "grad_out"


@dataclass(kw_only=True)
class LayerTrace:
    """A joint forward+backward graph of one layer at one sequence length, with its values."""

    gm: fx.GraphModule
    seq_len: int
    forward_nodes: list[fx.Node]
    backward_nodes: list[fx.Node]
    roles: dict[str, Role]                 # placeholder name -> role
    values: dict[str, Any]                 # node name -> fake value of the recorded run
    flops: dict[str, int]                  # node name -> FLOPs
    num_outputs: int                       # the graph returns num_outputs outputs, then grads
    flat_inputs: list[Any] = field(repr=False)

    _real: dict[str, Any] | None = field(default=None, repr=False)

    def storage(self, name: str) -> tuple[int, int] | None:
        """(storage identity, storage bytes) of a node's tensor value, or None."""
        v = self.values.get(name)
        if not isinstance(v, torch.Tensor) or v.layout != torch.strided:
            return None
        s = v.untyped_storage()
        return (StorageWeakRef(s).cdata, s.nbytes()) if s.nbytes() > 0 else None

    def creators(self) -> dict[str, fx.Node]:
        """Node name -> the first node (placeholder or forward) whose value shares its storage."""
        first: dict[int, fx.Node] = {}
        out: dict[str, fx.Node] = {}
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for n in placeholders + self.forward_nodes:
            st = self.storage(n.name)
            if st is not None:
                out[n.name] = first.setdefault(st[0], n)
        return out

    @property
    def forward_nodes_set(self) -> set[fx.Node]:
        return set(self.forward_nodes)

    @property
    def real(self) -> dict[str, Any]:
        """Real float32 values of the placeholders and forward nodes (the shadow run)."""
        if not self.flat_inputs:
            raise MemoplanError("Internal: this trace was made on fake tensors only "
                                "(trace_layer(real=False)) and has no real values.")
        if self._real is None:
            self._real = _shadow_run(self.gm, self.forward_nodes, self.flat_inputs, self.values)
        return self._real


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def pick_primary(leaves: list[Any]) -> int:
    """Index of the hidden-state input: the first floating tensor that needs grad (else the first
    floating tensor with two or more dims)."""
    floats = [i for i, x in enumerate(leaves)
              if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2]
    needs_grad = [i for i in floats if leaves[i].requires_grad]
    if needs_grad:
        return needs_grad[0]
    if floats:
        return floats[0]
    raise MemoplanError("The layer received no floating-point tensor argument with two or more "
                        "dimensions, so memoplan cannot find its hidden-state input.")


def trace_layer(layer: torch.nn.Module, args: tuple, kwargs: dict, *, seq_len: int,
                layer_name: str, real: bool = True) -> LayerTrace:
    """Trace ``layer(*args, **kwargs)`` forward and backward; run the graph once on fake tensors.

    ``real``: keep the real parameters, copies of the inputs and a random output gradient for
    the shadow run (``LayerTrace.real``: profiling's token-wise probes, at a short length). With
    ``real=False`` (the runtime, at the full training length) everything is fake from the start:
    nothing is computed or copied, and the trace holds no real tensor.

    A key/value cache among the arguments is dropped (:mod:`memoplan.trace.cache`).
    """
    register_fake_kernels()
    args, kwargs, _ = without_cache(args, kwargs)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    primary = pick_primary(leaves)
    tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    params = dict(layer.named_parameters())
    buffers = dict(layer.named_buffers())
    pnames, bnames = list(params), list(buffers)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    copy = (lambda t: t.detach().clone()) if real else (lambda t: fake.from_tensor(t.detach()))
    # the weights as they are (nothing writes into them; a copy of a 70B layer's is 1.7 GB)
    share = (lambda t: t.detach()) if real else copy

    def prep(i: int) -> torch.Tensor:
        x = copy(leaves[i])
        wants_grad = i == primary or (leaves[i].requires_grad and x.is_floating_point())
        return x.requires_grad_(wants_grad)

    inputs = [prep(i) for i in tensor_pos]
    pvals = [share(p).requires_grad_(p.requires_grad) for p in params.values()]
    bvals = [share(b) for b in buffers.values()]

    def call(pv: list, bv: list, xs: list) -> Any:
        flat = list(leaves)
        for pos, x in zip(tensor_pos, xs):
            flat[pos] = x
        a, kw = pytree.tree_unflatten(flat, spec)
        # the layer's forward without Module.__call__'s hooks: FSDP2's would all-gather and
        # reshard (on fake tensors) inside the trace
        with _reparametrize_module(layer, {**dict(zip(pnames, pv)), **dict(zip(bnames, bv))}):
            return layer.forward(*a, **kw)

    try:  # the outputs' shapes, from a run on fake tensors (no compute)
        with fake, torch.enable_grad():
            sample = [(tuple(t.shape), t.dtype) for t in _tensor_leaves(call(pvals, bvals, inputs))
                      if t.requires_grad]
    except Exception as e:
        raise MemoplanError(_data_dependent(layer, layer_name, e)
                            or f"Running layer '{layer_name}' on its captured arguments failed: "
                               f"{type(e).__name__}: {e}.") from e
    if not sample:
        raise MemoplanError(f"Layer '{layer_name}' returned no tensor that needs a gradient, so "
                            f"it has no backward to profile.")
    device = leaves[primary].device
    if real:
        gen = torch.Generator().manual_seed(0)
        grad_outs = [torch.randn(shape, generator=gen, dtype=dtype).to(device)
                     for shape, dtype in sample]
    else:
        with fake:
            grad_outs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in sample]
    boundary: list[int] = []

    def joint(pv: list, bv: list, xs: list, gouts: list) -> tuple:
        outs = [t for t in _tensor_leaves(call(pv, bv, xs)) if t.requires_grad]
        mode = get_proxy_mode()
        boundary.append(len(mode.tracer.graph.nodes) if mode is not None else -1)
        wrt = [x for x in xs if x.requires_grad] + [p for p in pv if p.requires_grad]
        grads = torch.autograd.grad(outs, wrt, gouts, allow_unused=True)
        return outs, grads

    try:
        with torch.enable_grad():
            gm = make_fx(joint, tracing_mode="fake", record_stack_traces=True)(
                pvals, bvals, inputs, grad_outs)
    except Exception as e:
        raise MemoplanError(_data_dependent(layer, layer_name, e)
                            or _trace_failure(layer_name, e)) from e
    if not boundary or boundary[0] < 0:
        raise MemoplanError("Internal: could not find the forward/backward boundary while tracing "
                            f"'{layer_name}' (torch's proxy mode API changed?).")
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    roles = _placeholder_roles(placeholders, len(pvals), len(bvals), tensor_pos, primary,
                               len(grad_outs))
    calls_fwd = [n for n in nodes[: boundary[0]] if n.op == "call_function"]
    calls_bwd = [n for n in nodes[boundary[0]:] if n.op == "call_function"]
    names = ([f"the parameter '{n}'" for n in pnames] + [f"the buffer '{n}'" for n in bnames]
             + ["the layer's input" if pos == primary else "an argument of the layer"
                for pos in tensor_pos] + ["an output gradient"] * len(grad_outs))
    functionalize_forward(gm, calls_fwd, {p.name: w for p, w in zip(placeholders, names)},
                          layer_name)
    flat_inputs = [pvals, bvals, [x.detach().requires_grad_(x.requires_grad) for x in inputs],
                   grad_outs]
    interp = _RecordingInterpreter(gm)
    try:
        with fake, torch.no_grad():
            interp.run(*pytree.tree_map_only(torch.Tensor, fake.from_tensor, flat_inputs))
    except Exception as e:
        raise MemoplanError(_trace_failure(layer_name, e)) from e
    return LayerTrace(gm=gm, seq_len=seq_len, forward_nodes=calls_fwd, backward_nodes=calls_bwd,
                      roles=roles, values=interp.values, flops=interp.flops,
                      num_outputs=len(grad_outs),
                      flat_inputs=flat_inputs if real else [])


def _placeholder_roles(placeholders: list[fx.Node], n_params: int, n_buffers: int,
                       tensor_pos: list[int], primary: int, n_gouts: int) -> dict[str, Role]:
    roles: list[Role] = (["param"] * n_params + ["buffer"] * n_buffers
                         + ["primary" if pos == primary else "shared" for pos in tensor_pos]
                         + ["grad_out"] * n_gouts)
    if len(roles) != len(placeholders):
        raise MemoplanError(f"Internal: traced graph has {len(placeholders)} inputs, expected "
                            f"{len(roles)}.")
    return {p.name: r for p, r in zip(placeholders, roles)}


def _user_frame(e: BaseException) -> str:
    """The innermost frame of ``e``'s traceback outside torch and memoplan, as 'file, line'."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and "/memoplan/" not in f.filename]
    return f" at {frames[-1].filename}, line {frames[-1].lineno} ({frames[-1].line})" if frames else ""


def _data_dependent(layer: torch.nn.Module, layer_name: str, e: Exception) -> str | None:
    """A message for a layer whose shapes depend on tensor values (``nonzero``, ``.item()``),
    naming the transformers setting that avoids them where there is one; None for others."""
    kinds = ("DynamicOutputShapeException", "DataDependentOutputException",
             "GuardOnDataDependentSymNode")
    if type(e).__name__ not in kinds:
        return None
    text = (f"Layer '{layer_name}' has shapes that depend on tensor values ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}){_user_frame(e)}. memoplan traces a "
            f"layer with static shapes, so it cannot plan this code path.")
    impls = {getattr(getattr(m, "config", None), "_experts_implementation", None)
             for m in layer.modules()}
    if "eager" in impls:
        text += (" It is transformers' 'eager' experts implementation (a Python loop over the "
                 "experts that tokens were routed to): use transformers' default, "
                 "model.set_experts_implementation('grouped_mm') (or experts_implementation="
                 "'grouped_mm' in from_pretrained/from_config), which memoplan traces.")
    else:
        text += (" Write the layer without data-dependent shapes (masks and gathers of fixed "
                 "size instead of nonzero() or boolean indexing), or pass another class with "
                 "--layer.")
    return text


def _trace_failure(layer_name: str, e: Exception) -> str:
    return (f"Layer '{layer_name}' could not be traced with torch.fx (make_fx): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. memoplan traces the "
            f"layer's forward and backward at the aten level; data-dependent Python control flow "
            f"on tensor values, .item() calls and custom autograd functions without aten "
            f"equivalents are the usual causes. Pass another class with --layer if this is not "
            f"the transformer layer.")


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def upcast(x: Any) -> Any:
    """float32 for low-precision tensors and dtypes (the shadow run's precision)."""
    if isinstance(x, torch.Tensor) and x.dtype in _LOW_PRECISION:
        return x.float()
    if isinstance(x, torch.dtype) and x in _LOW_PRECISION:
        return torch.float32
    return x


def shadow_call(n: fx.Node, value: Any, native: dict[str, Any]) -> Any:
    """Run ``n``'s op on shadow values: ``value(arg_node)`` gives each argument's float32 value.

    Float32 first; an op that refuses it (flash attention accepts only fp16 and bf16) runs again
    with each argument cast to the dtype of its traced value in ``native`` (node name -> fake
    value of the recorded run), and its result is upcast. Raises the float32 error if both fail.
    """
    def load(cast: bool) -> tuple[tuple, dict]:
        def one(a: Any) -> Any:
            if not isinstance(a, fx.Node):
                return a if cast else upcast(a)
            v, t = value(a), native.get(a.name)
            if cast and isinstance(v, torch.Tensor) and isinstance(t, torch.Tensor):
                return v.to(t.dtype)
            return v
        return pytree.tree_map(one, (n.args, n.kwargs), is_leaf=lambda a: isinstance(a, fx.Node))

    with torch.no_grad():
        args, kwargs = load(False)
        try:
            return n.target(*args, **kwargs)
        except Exception as first:
            args, kwargs = load(True)
            try:
                result = n.target(*args, **kwargs)
            except Exception:
                raise first from None
            return pytree.tree_map(upcast, result)


class _Shadow(Replay):
    """The forward on real values in float32, each op through ``shadow_call``."""

    def __init__(self, gm: fx.GraphModule, native: dict[str, Any]) -> None:
        super().__init__(gm)
        self.native = native

    def run_node(self, n: fx.Node) -> Any:
        return shadow_call(n, self.value, self.native)


def _shadow_run(gm: fx.GraphModule, forward_nodes: list[fx.Node], flat_inputs: list,
                native: dict[str, Any]) -> dict[str, Any]:
    """Run the forward part of ``gm`` on real inputs in float32; node name -> value."""
    shadow = _Shadow(gm, native)
    flat = pytree.tree_leaves(flat_inputs)
    for n, x in zip((n for n in gm.graph.nodes if n.op == "placeholder"), flat):
        shadow.values[n.name] = upcast(x.detach())
    try:
        return shadow.run_nodes(forward_nodes)
    except Exception as e:
        n = next(n for n in forward_nodes if n.name not in shadow.values)
        raise MemoplanError(
            f"Running the layer's op {where(n)} on real values failed: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. memoplan runs the forward once on small "
            f"real inputs to find which ops are token-wise.") from e


class _RecordingInterpreter(fx.Interpreter):
    """Runs a graph, keeping every value (so storages are not reused) and its FLOPs."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[str, Any] = {}
        self.flops: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function":
            result = super().run_node(n)
            self.values[n.name] = result
            return result
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        self.values[n.name] = result
        flops = attention_flops(n, self.env)
        self.flops[n.name] = flops if flops is not None else int(counter.get_total_flops())
        return result


def _bound_args(n: fx.Node, env: dict) -> dict[str, Any]:
    """The node's arguments by schema name, with fx nodes replaced by their values."""
    schema = getattr(n.target, "_schema", None)
    if schema is None:
        return {}
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(n.args):
            v = n.args[i]
        elif a.name in n.kwargs:
            v = n.kwargs[a.name]
        else:
            continue
        out[a.name] = env[v] if isinstance(v, fx.Node) else v
    return out


def attention_flops(n: fx.Node, env: dict) -> int | None:
    """FLOPs of a fused attention op (forward or backward), halved for causal attention.

    torch's FlopCounter knows only some attention kernels and never halves for causal masks;
    MFU in our baselines counts causal attention as 2*S^2*h per layer forward, as this does.
    """
    name = str(n.target)
    if "attention" not in name or not name.startswith("aten."):
        return None
    a = _bound_args(n, env)
    q, k, v = a.get("query"), a.get("key"), a.get("value")
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 3 for t in (q, k, v)):
        return None
    batch_heads = math.prod(q.shape[:-2])
    sq, d = q.shape[-2], q.shape[-1]
    sk, dv = k.shape[-2], v.shape[-1]
    fwd = 2 * batch_heads * sq * sk * (d + dv)
    if a.get("is_causal"):
        fwd //= 2
    return 2 * fwd if "backward" in name else fwd


def release_after(nodes: list[fx.Node], keep: set[str]) -> dict[str, list[str]]:
    """For each node, the values (other than ``keep``) whose last use among ``nodes`` it is.

    Replaying a graph while holding every value until its end would keep a layer's whole
    forward alive at once; dropping each value after its last use gives the live set that the
    profile's request trace (and so the plan) assumes.
    """
    last: dict[str, str] = {}
    for n in nodes:
        for a in pytree.tree_leaves((n.args, n.kwargs)):
            if isinstance(a, fx.Node):
                last[a.name] = n.name
        last.setdefault(n.name, n.name)  # a value nobody reads goes right away
    drops: dict[str, list[str]] = {}
    for name, at in last.items():
        if name not in keep:
            drops.setdefault(at, []).append(name)
    return drops
