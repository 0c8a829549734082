"""The profile stage: model file -> :class:`memoplan.ir.Profile`.

It loads the file, finds the repeated layer, traces that layer forward and backward at four
small lengths derived from ``seq`` (seq/4, seq/2, 3seq/4, seq), classifies its tensors at those
lengths, and fits every size and FLOP count as a polynomial in the sequence length.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from memoplan.errors import MemoplanError
from memoplan.hardware import get_hardware
from memoplan.ir import (FlopSplit, GraphNode, LayerProfile, ModelInfo, Profile, SavedTensor, Segment,
                         TensorSpan)
from memoplan.signature import layer_signature
from memoplan.trace.encode import encode_call
from memoplan.trace.classify import (check_aligned, classify_forward, saved_storages, seq_axes,
                                     token_segments, tensors_of)
from memoplan.trace.graph import LayerTrace, pick_primary, trace_layer
from memoplan.trace.cache import without_cache
from memoplan.trace.laws import fit_law
from memoplan.trace.layers import (RepeatedLayer, capture_layer_call, find_repeated_layer,
                                   model_attention_modules)
from memoplan.trace.head import head_phase_bytes
from memoplan.trace.loader import ModelFile, _user_error_summary, build, load_model_file
from memoplan.trace.meta import has_meta, materialise, parameters_on_meta, read_before
from memoplan.trace.recompute import tokens_outermost
from memoplan.trace.requests import allocation_requests, peak_live_bytes

MIN_SEQ = 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """Options of ``memoplan profile``."""

    model_file: Path
    seq: int = 512            # largest profiled length; also seq/4, seq/2, 3seq/4 are traced
    layer: str | None = None  # layer class name overriding detection and LAYER
    dtype: str | None = None  # cast the model to this dtype first ("float32", "bfloat16", ...)
    hardware: str = "h200"    # preset for the time estimate on a CPU
    device: str = "cpu"       # "cuda" measures times with CUDA events
    autocast: str | None = None  # trace under torch.autocast to this dtype, as training runs
    meta: bool = True         # build with parameters on the meta device (trace.meta); False: real

    def __post_init__(self) -> None:
        if self.seq < MIN_SEQ or self.seq % 4:
            raise MemoplanError(f"--seq {self.seq} is too small to fit size laws: memoplan traces "
                                f"the layer at seq/4, seq/2, 3*seq/4 and seq, so --seq must be a "
                                f"multiple of 4 and at least {MIN_SEQ} (the default is 512).")
        for opt, value in (("--dtype", self.dtype), ("--autocast", self.autocast)):
            if value is not None and value not in DTYPES:
                raise MemoplanError(f"{opt} {value!r} is not one of {', '.join(DTYPES)}.")
        if self.device not in ("cpu", "cuda"):
            raise MemoplanError(f"--device must be 'cpu' or 'cuda', not {self.device!r}.")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise MemoplanError("--device cuda was given but no CUDA device is available.")

    @property
    def seq_lens(self) -> tuple[int, ...]:
        return (self.seq // 4, self.seq // 2, 3 * self.seq // 4, self.seq)


def profile_model(cfg: ProfileConfig, *, progress: Callable[[str], None] = lambda m: None) -> Profile:
    """Profile the repeated layer of ``cfg.model_file``; see the module docstring."""
    hw = get_hardware(cfg.hardware)
    progress("loading model file")
    mf = load_model_file(cfg.model_file)
    model, found, build_notes = _build(cfg, mf, progress)
    layer = found.first
    traces: list[LayerTrace] = []
    cast = (torch.autocast(device_type=cfg.device, dtype=DTYPES[cfg.autocast]) if cfg.autocast
            else contextlib.nullcontext())
    with cast:
        for seq_len in cfg.seq_lens:
            progress(f"tracing {found.class_name} at {seq_len} tokens")
            call = capture_layer_call(mf, model, layer, seq_len)
            # real values only at the first length: only its trace is probed (classify_forward)
            traces.append(trace_layer(layer, *call, seq_len=seq_len, layer_name=found.class_name,
                                      real=seq_len == cfg.seq_lens[0]))
    check_aligned(traces)
    progress("classifying tensors")
    axes = seq_axes(traces)
    classes = classify_forward(traces[0], axes)
    segments, member = token_segments(traces[0], classes)
    main = traces[-1]
    lens = cfg.seq_lens

    saved_per_trace = [{s.creator.name: s for s in saved_storages(tr, classes)} for tr in traces]
    saved_main = saved_storages(main, classes)
    storages, req_fwd, req_bwd = allocation_requests(main)
    storages_all = [allocation_requests(tr)[0] for tr in traces]
    sid_by_name = {s.name: s.id for s in storages}
    saved = []
    for s in saved_main:
        name = s.creator.name
        sizes = [st[name].nbytes if name in st else 0 for st in saved_per_trace]
        law = fit_law(lens, sizes)
        value = tensors_of(main.values[name])[0] if tensors_of(main.values[name]) else None
        ax = axes[name][0] if axes.get(name) else ()
        saved.append(SavedTensor(
            name=name, tensor_id=sid_by_name.get(name, -1), kind=s.kind, token_wise=s.token_wise,
            producer=_producer(s.creator),
            shape=tuple(value.shape) if value is not None else (),
            dtype=str(value.dtype).removeprefix("torch.") if value is not None else "",
            seq_axis=ax[0] if len(ax) == 1 else None, bytes=s.nbytes,
            token_outer=value is not None and len(ax) == 1 and tokens_outermost(value, ax[0]),
            bytes_per_token=law.per_token, law=law, segment=member.get(name),
            autograd_saved=s.autograd_saved))
    tensors = []
    for s in storages:
        sizes = [next((x.nbytes for x in sa if x.id == s.id and x.name == s.name), 0)
                 for sa in storages_all]
        tensors.append(TensorSpan(id=s.id, name=s.name, phase=s.phase, role=s.role,
                                  bytes=s.nbytes, law=fit_law(lens, sizes)))
    skeletal_bytes = sum(s.nbytes for s in storages if s.role == "skeletal")

    progress("counting FLOPs")
    flops_fwd, flops_bwd = _flop_splits(traces, classes)
    time_fwd, time_bwd, source = _layer_times(cfg, layer, call, flops_fwd.total, flops_bwd.total,
                                              hw.flops_per_s)
    notes = [*build_notes, *found.notes]
    if without_cache(*call)[2]:
        notes.append(f"the model passes a key/value cache to its {found.class_name} layers "
                     f"(transformers' use_cache, on by default): memoplan traces them without it, "
                     f"and under a plan they train without it, as under gradient checkpointing; "
                     f"under torch.no_grad() or eval() they run as before")
    notes += [f"size law of '{t.name}' is not an exact polynomial (max rel. error "
              f"{t.law.max_rel_error:.2e})" for t in saved if not t.law.exact]
    mixing_ops = tuple(sorted({str(n.target) for n in traces[0].forward_nodes
                               if classes[n.name] == "mixing" and n.op == "call_function"
                               and str(n.target) != "<built-in function getitem>"}))
    if not mixing_ops:
        notes.append(f"the layer {found.class_name} has no token-mixing op (no attention): it is "
                     f"likely a part of the transformer layer, not all of it; name the layer's "
                     f"class with --layer CLASSNAME (or LAYER in the model file)")
    primary = next(n for n, r in main.roles.items() if r == "primary")
    progress("measuring the head phase")
    head_per_token, head_fixed, head_note = _head_bytes_law(mf, model, found.instances, lens[-2:],
                                                            cast, cfg.device)
    if head_note:
        notes.append(head_note)
    model_info = ModelInfo(
        file=str(mf.path), layer_class=found.class_name, layer_path=found.path,
        num_layers=len(found.instances),
        param_bytes_per_layer=_state_bytes(layer),
        param_bytes_total=_state_bytes(model),
        dtype=str(next(layer.parameters()).dtype).removeprefix("torch."),
        hidden_size=int(main.values[primary].shape[-1]),
        head_bytes_per_token=head_per_token, head_bytes_fixed=head_fixed)
    layer_profile = LayerProfile(
        saved=tuple(saved), tensors=tuple(tensors),
        requests_forward=tuple(req_fwd), requests_backward=tuple(req_bwd),
        peak_forward=peak_live_bytes(req_fwd),
        peak_backward=peak_live_bytes(req_bwd, live_at_start=skeletal_bytes),
        segments=tuple(Segment(id=s.id, nodes=s.nodes, inputs=s.inputs, outputs=s.outputs)
                       for s in segments),
        mixing_ops=mixing_ops, flops_forward=flops_fwd, flops_backward=flops_bwd,
        time_forward_s=time_fwd, time_backward_s=time_bwd,
        graph_nodes=len(main.forward_nodes) + len(main.backward_nodes),
        nodes=_graph_nodes(traces[0], classes, axes))
    return Profile(model=model_info, layer=layer_profile, seq_len=cfg.seq, seq_lens=lens,
                   time_source=source, hardware=hw.name, device=cfg.device, notes=tuple(notes),
                   hash=layer_signature(layer))


class _NotOnMeta(Exception):
    """Why the model cannot be profiled with its parameters on the meta device."""


def _build(cfg: ProfileConfig, mf: ModelFile, progress: Callable[[str], None]
           ) -> tuple[torch.nn.Module, RepeatedLayer, list[str]]:
    """The model, cast and on its device, and its repeated layer. Built with its parameters on
    the meta device, the layer and what runs before it materialised (``trace.meta``); where
    the file's code cannot run so (or ``cfg.meta`` is off), built with real weights, with a note
    and a progress message that say why."""
    notes = []
    if cfg.meta:
        try:
            return *_build_on_meta(cfg, mf), notes
        except _NotOnMeta as e:
            notes.append(f"the model was built with real weights, which takes the memory and "
                         f"time of the whole model: {e}")
            progress(notes[-1])
    with torch.device(cfg.device) if cfg.device == "cuda" else contextlib.nullcontext():
        model = build(mf)
    if cfg.dtype:
        model = model.to(DTYPES[cfg.dtype])
    model = model.to(cfg.device).train()
    found = find_repeated_layer(model, cfg.layer or mf.layer,
                                probe=lambda: model_attention_modules(mf, model, cfg.seq_lens))
    return model, found, notes


def _build_on_meta(cfg: ProfileConfig, mf: ModelFile) -> tuple[torch.nn.Module, RepeatedLayer]:
    try:
        with (torch.device(cfg.device) if cfg.device == "cuda" else contextlib.nullcontext(),
              parameters_on_meta()):
            model = mf.build_model()
    except Exception as e:  # noqa: BLE001  (the model's own code; a real build reports its errors)
        raise _NotOnMeta(f"build_model() cannot run with its parameters on the meta device "
                         f"({_user_error_summary(mf.path, e)})") from e
    if not isinstance(model, torch.nn.Module):
        raise _NotOnMeta(f"build_model() returned {type(model).__name__}")
    if cfg.dtype:
        model = model.to(DTYPES[cfg.dtype])
    model = model._apply(lambda t: t if t.is_meta else t.to(cfg.device)).train()

    def probe() -> set[int] | None:
        ran = model_attention_modules(mf, model, cfg.seq_lens, cfg.device)
        if ran is None and has_meta(model):
            raise _NotOnMeta("the model does not run on fake tensors, which finding its layer "
                             "among several repeated ones takes")
        return ran

    found = find_repeated_layer(model, cfg.layer or mf.layer, probe=probe)
    if not has_meta(model):
        return model, found
    materialise(found.first, cfg.device)
    seq_len = cfg.seq_lens[0]
    with torch.random.fork_rng(devices=[]):
        try:
            reads = read_before(mf, model, found.first, seq_len, cfg.device)
        except Exception as e:  # noqa: BLE001  (the model's own code)
            raise _NotOnMeta(f"the model's code before its first {found.class_name} does not run "
                             f"on fake tensors ({_user_error_summary(mf.path, e)}), which "
                             f"finding the parameters it reads takes") from e
        materialise(model, cfg.device, reads)
        try:  # nothing meta may reach the layer (a model that reads a parameter's device)
            call = capture_layer_call(mf, model, found.first, seq_len)
        except MemoplanError as e:
            raise _NotOnMeta(str(e)) from e
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in pytree.tree_leaves(call)):
        raise _NotOnMeta(f"the model passes a tensor on the meta device to its "
                         f"{found.class_name} layer")
    return model, found


def _graph_nodes(trace: LayerTrace, classes: dict[str, str],
                 axes: dict[str, list[tuple[int, ...]]]) -> tuple[GraphNode, ...]:
    """The forward graph as data: placeholders, then call nodes, with classes and arguments."""
    out_node = next(n for n in trace.gm.graph.nodes if n.op == "output")
    outputs = {n.name for n in pytree.tree_leaves(out_node.args[0])[: trace.num_outputs]
               if isinstance(n, torch.fx.Node)}
    nodes = []
    for n in trace.gm.graph.nodes:
        if n.op == "placeholder":
            nodes.append(GraphNode(name=n.name, target="placeholder", cls="placeholder",
                                   axes=tuple(axes[n.name]), role=trace.roles[n.name]))
        elif n in trace.forward_nodes_set:
            args, kwargs = encode_call(n)
            nodes.append(GraphNode(name=n.name, target=str(n.target), cls=classes[n.name],
                                   axes=tuple(axes[n.name]), args=args, kwargs=kwargs,
                                   output=n.name in outputs))
    return tuple(nodes)


HEAD_LENGTHS = (16384, 65536, 1 << 20)  # tokens per GPU: the head phase is also measured here


def _head_bytes_law(mf, model: torch.nn.Module, layers: tuple[torch.nn.Module, ...],
                    lens: tuple[int, ...], cast: Any,
                    device: str) -> tuple[float, float, str | None]:
    """The bytes the model's code outside the layers holds (inputs, embedding, and after the
    last layer the final norm, head, loss and their gradients) as ``per_token * S + fixed``,
    measured on fake tensors (``trace.head``, no memory, no compute) at the profiled lengths
    and at `HEAD_LENGTHS`: a loss computed a chunk at a time holds a chunk's temporaries
    whatever the length, and only lengths longer than the chunk show it. The peak over the
    phase is a maximum of sums of per-token and fixed bytes, so it is convex in the length and
    its slope only grows: the slope is taken between the two longest lengths the model runs at
    (up to 1M tokens, the longest a GPU holds), and ``fixed`` is what the line must add to
    cover every measured length; with the largest slope, that covers every length from the
    shortest measured on. A model that refuses the long lengths (a maximum length) is measured
    up to the longest it takes. Where the slope grows like the length (an S x S tensor outside
    the layers, seen on fake tensors only: see the note it gets), the profiled lengths alone,
    as the largest bytes per token among them. Where the model cannot run on fake tensors, an
    estimate from the widest Linear outside the layers (logits, their fp32 copy for the loss
    and their gradient), with a note saying so."""
    try:
        with cast:
            measured = {n: head_phase_bytes(mf, model, layers, n, device) for n in lens}
    except Exception as e:  # noqa: BLE001  (the model's own code; the estimate still serves)
        inside = {id(m) for layer in layers for m in layer.modules()}
        heads = [m for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and id(m) not in inside]
        head = max(heads, key=lambda m: m.out_features, default=None)
        est = float(head.out_features * (2 * head.weight.element_size() + 4)) if head else 0.0
        return est, 0.0, (f"the head phase (after the last layer) could not be measured on "
                          f"fake tensors ({type(e).__name__}); its memory is estimated from the "
                          f"widest Linear outside the layers ({est:,.0f} bytes/token)")
    for n in HEAD_LENGTHS:
        if n <= max(measured):
            continue
        try:
            with cast:
                measured[n] = head_phase_bytes(mf, model, layers, n, device)
        except Exception:  # noqa: BLE001  (longer than the model takes: the profiled lengths)
            break
    points = sorted(measured.items())
    slopes = [(b1 - b0) / (n1 - n0) for (n0, b0), (n1, b1) in zip(points, points[1:])]
    long = [s for (n, _), s in zip(points[1:], slopes) if n > max(lens)]
    if any(later > 1.5 * earlier + 1 for earlier, later in zip(long, long[1:])):
        # more than linear in the tokens (a maximum of lines, as a chunked loss gives, grows
        # its slope a little; an S x S tensor in proportion to the length): on fake tensors
        # transformers cannot read position ids and builds an S x S mask it skips on real ones;
        # budget the profiled lengths
        short = {n: nbytes for n, nbytes in measured.items() if n in lens}
        per_token = max(nbytes / n for n, nbytes in short.items())
        (n0, b0), (n1, b1) = points[0], points[-1]
        return per_token, 0.0, (
            f"the head phase grows faster than the tokens on fake tensors ({b0 / n0:,.0f} "
            f"bytes/token at {n0}, {b1 / n1:,.0f} at {n1}), as when transformers builds an S x S "
            f"mask it skips on real tensors: budgeted at {per_token:,.0f} bytes/token, from the "
            f"profiled lengths")
    per_token = max(0.0, slopes[-1])
    fixed = max(0.0, max(nbytes - per_token * n for n, nbytes in points))
    return per_token, fixed, None


def _producer(node: torch.fx.Node) -> str:
    """The op that made a node's value (a multi-output op for its getitem)."""
    if node.op != "call_function":
        return "input"
    if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        return f"{node.args[0].target}[{node.args[1]}]"
    return str(node.target)


def _state_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _flop_splits(traces: list[LayerTrace], classes: dict[str, str]) -> tuple[FlopSplit, FlopSplit]:
    """Forward FLOPs split by the node classes; a backward node counts as mixing when its FLOPs
    grow faster than linearly with the length (attention backward), else as token-wise."""
    lens = [tr.seq_len for tr in traces]
    fwd_names = [n.name for n in traces[0].forward_nodes]
    bwd_names = [n.name for n in traces[0].backward_nodes]

    def per_trace(names: list[str], pick: Callable[[str], bool]) -> list[int]:
        return [sum(tr.flops.get(nm, 0) for nm in names if pick(nm)) for tr in traces]

    fwd_mix = per_trace(fwd_names, lambda nm: classes[nm] == "mixing")
    fwd_tok = per_trace(fwd_names, lambda nm: classes[nm] != "mixing")
    bwd_mixing = {nm for nm in bwd_names
                  if fit_law(lens, [tr.flops.get(nm, 0) for tr in traces]).degree >= 2}
    bwd_mix = per_trace(bwd_names, lambda nm: nm in bwd_mixing)
    bwd_tok = per_trace(bwd_names, lambda nm: nm not in bwd_mixing)

    def split(tok: list[int], mix: list[int]) -> FlopSplit:
        return FlopSplit(token_wise=tok[-1], mixing=mix[-1], token_wise_law=fit_law(lens, tok),
                         mixing_law=fit_law(lens, mix))

    return split(fwd_tok, fwd_mix), split(bwd_tok, bwd_mix)


def _layer_times(cfg: ProfileConfig, layer: torch.nn.Module, call: tuple[tuple, dict],
                 flops_fwd: int, flops_bwd: int, flops_per_s: float) -> tuple[float, float, str]:
    """Forward/backward seconds: CUDA events on a GPU, else FLOPs over the preset's rate."""
    if cfg.device != "cuda":
        return flops_fwd / flops_per_s, flops_bwd / flops_per_s, "estimated"
    leaves, spec = pytree.tree_flatten(call)
    hidden = pick_primary(leaves)
    leaves[hidden] = leaves[hidden].detach().clone().requires_grad_()
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    for _ in range(3):  # two warm-ups, then the timed run
        torch.cuda.synchronize()
        start.record()
        outs = [t for t in pytree.tree_leaves(layer(*args, **kwargs))
                if isinstance(t, torch.Tensor) and t.requires_grad]
        mid.record()
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(mid) / 1e3, mid.elapsed_time(end) / 1e3, "measured"
