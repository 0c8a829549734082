"""Render a plan as a Python module (``memoplan emit``, ``memoplan solve --emit``).

The output is deterministic (the same plan gives the same bytes; a golden-file test holds it)
and imports only ``torch`` and ``memoplan.runtime``. Nothing taken from the user's model is
written as code: class names, paths and hashes appear only inside string literals made by
``repr``; node names and op names must be plain identifiers and dotted op paths, else the
plan is refused; constant arguments are rendered from a closed set of JSON shapes.
"""

from __future__ import annotations

import json
import keyword
import re
from typing import Any

import torch

from memoplan import __version__
from memoplan.errors import MemoplanError
from memoplan.ir import Plan

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OP = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){2}")


def _ident(name: str) -> str:
    if not isinstance(name, str) or not _IDENT.fullmatch(name) or keyword.iskeyword(name):
        raise MemoplanError(f"The plan names a graph value {name!r}, which is not a plain Python "
                            f"identifier; refusing to generate code from it (corrupt or "
                            f"hand-edited plan?). Solve the plan again.")
    return name


def _torch_attr(kind: str, name: str, cls: type) -> str:
    if not isinstance(name, str) or not _IDENT.fullmatch(name) or not isinstance(
            getattr(torch, name, None), cls):
        raise MemoplanError(f"The plan holds an unknown {kind} {name!r}; solve the plan again.")
    return f"torch.{name}"


def render_arg(a: Any) -> str:
    """Python source for one encoded argument (see ``memoplan.trace.encode``)."""
    if isinstance(a, list):
        return "[" + ", ".join(render_arg(x) for x in a) + "]"
    if a is None or isinstance(a, (bool, int, str)):
        return repr(a)
    if isinstance(a, float):
        return repr(a)
    if isinstance(a, dict) and len(a) == 1:
        (kind, value), = a.items()
        if kind == "node":
            return _ident(value)
        if kind == "dtype":
            return _torch_attr("dtype", value, torch.dtype)
        if kind == "layout":
            return _torch_attr("layout", value, torch.layout)
        if kind == "memory_format":
            return _torch_attr("memory format", value, torch.memory_format)
        if kind == "device" and isinstance(value, str):
            return f"torch.device({value!r})"
        if kind == "float" and value in ("inf", "-inf", "nan"):
            return f"float({value!r})"
    raise MemoplanError(f"The plan holds a graph argument memoplan cannot render as code "
                        f"({json.dumps(a)[:80]}); this op cannot be emitted.")


def render_call(node: dict, trace_seq: int | None = None) -> str:
    """``name = torch.ops.ns.op.overload(args)`` (or ``name = value[i]`` for getitem).

    A size list whose entry at the node's token axis is the traced length (``trace_seq``: view,
    reshape and expand sizes) gets the variable ``S`` there, so the code runs at any length.
    """
    name = _ident(node["name"])
    target = node["target"]
    axes = node["axes"]
    axis = axes[0][0] if len(axes) == 1 and len(axes[0]) == 1 else None
    args = [render_arg(a) for a in node["args"]]
    if axis is not None and trace_seq is not None:
        args = [_symbolic(raw, rendered, axis, trace_seq) for raw, rendered in zip(node["args"], args)]
    kwargs = [f"{_ident(k)}={render_arg(v)}" for k, v in node["kwargs"].items()]
    if target == "<built-in function getitem>" and len(args) == 2 and not kwargs:
        return f"{name} = {args[0]}[{args[1]}]"
    if not isinstance(target, str) or not _OP.fullmatch(target):
        raise MemoplanError(f"The plan's op {target!r} (node {name}) is not an op path of the "
                            f"form namespace.op.overload; refusing to generate code from it.")
    return f"{name} = torch.ops.{target}({', '.join(args + kwargs)})"


def _symbolic(raw: Any, rendered: str, axis: int, trace_seq: int) -> str:
    if isinstance(raw, list) and len(raw) > axis and raw[axis] == trace_seq and all(
            isinstance(x, int) and not isinstance(x, bool) for x in raw):
        return "[" + ", ".join("S" if i == axis else repr(x) for i, x in enumerate(raw)) + "]"
    return rendered


def _length_line(params: list[str], axes: dict[str, list], body: list[str]) -> list[str]:
    """``S = <first token-carrying input>.shape[axis]`` when ``body`` uses ``S``."""
    if not any(re.search(r"\bS\b", line) for line in body):
        return []
    for p in params:
        a = axes.get(p, [])
        if len(a) == 1 and len(a[0]) == 1:
            return [f"S = {p}.shape[{int(a[0][0])}]  # tokens"]
    return []


def _function(name: str, doc: str, params: list[str], body: list[str], returns: str) -> list[str]:
    lines = [f"def {name}({', '.join(params)}):", f'    """{doc}"""']
    lines += [f"    {line}" for line in body]
    lines.append(f"    return {returns}")
    return lines


def emit_module(plan: Plan) -> str:
    """The generated module's source text."""
    nodes = plan.layer.nodes
    if any("args" not in n for n in nodes):
        raise MemoplanError("This plan's profile predates code emission (its graph carries no "
                            "arguments). Run 'memoplan profile' and 'memoplan solve' again.")
    placeholders = [n for n in nodes if n["class"] == "placeholder" and n["role"] != "grad_out"]
    calls = [n for n in nodes if n["class"] != "placeholder"]
    segments = plan.layer.segments
    member = {name: s["id"] for s in segments for name in s["nodes"]}
    c = plan.config
    out: list[str] = [
        f'"""Runtime plan for the layer class named in LAYER_CLASS (generated by memoplan '
        f'{__version__}).',
        "",
        "Do not edit: regenerate with `memoplan emit PLAN.json -o FILE`. Contents: the schedule",
        "constants of the plan, the layer's forward graph as traced (aten ops; comments mark the",
        "token-wise segments and token-mixing ops), one function per token-wise segment (what the",
        "runtime re-runs for dropped tokens), and `apply(model)`, which runs the model's layers",
        "under this plan.",
        '"""',
        "",
        "import torch",
        "",
        "import memoplan.runtime",
        "",
        f"LAYER_CLASS = {plan.layer_class!r}",
        f"PROFILE_HASH = {plan.profile_hash!r}",
        f"SEQ = {int(c['seq'])!r}",
        f"TOKENS_PER_GPU = {int(c['tokens_per_gpu'])!r}",
        f"MODES = {tuple(str(l.mode) for l in plan.layers)!r}",
        f"ALPHAS = {tuple(float(l.alpha) for l in plan.layers)!r}",
        f"ARENA_BYTES = {int(plan.arena_bytes)!r}",
        f"LOWER_BOUND_BYTES = {int(plan.lower_bound_bytes)!r}",
        "# level-2 buffers of the iteration: name -> (offset, bytes) in the arena",
        "BUFFERS = {",
    ]
    it = plan.levels["iteration"]
    for k in it.offsets:
        out.append(f"    {k!r}: ({int(it.offsets[k])!r}, {int(it.sizes[k])!r}),")
    out.append("}")
    for level in ("forward", "backward"):
        lp = plan.levels[level]
        out.append(f"# level-1 {level}: request id -> offset inside the layer's {level} block")
        out.append(f"{level.upper()}_OFFSETS = {{"
                   + ", ".join(f"{k!r}: {int(v)!r}" for k, v in lp.offsets.items()) + "}")
    out += ["", ""]
    trace_seq = plan.layer.trace_seq
    axes = {n["name"]: n["axes"] for n in nodes}
    params = [_ident(p["name"]) for p in placeholders]
    body: list[str] = []
    current = None
    for n in calls:
        mark = ("segment", member[n["name"]]) if n["name"] in member else (n["class"], None)
        if mark != current:
            body.append(f"# token-wise segment {mark[1]}" if mark[0] == "segment"
                        else f"# {'token-mixing op' if mark[0] == 'mixing' else 'other op'}")
            current = mark
        body.append(render_call(n, trace_seq))
    body = _length_line(params, axes, body) + body
    values = ", ".join(f"{_ident(n['name'])!r}: {_ident(n['name'])}" for n in calls)
    out += _function("forward_graph", "The layer's forward, op for op as profiled; every value "
                     "by name.", params, body,
                     "{" + values + "}")
    by_name = {n["name"]: n for n in calls}
    for s in segments:
        inputs = [_ident(i) for i in s["inputs"]]
        seg_body = [render_call(by_name[name], trace_seq) for name in s["nodes"]]
        seg_body = _length_line(inputs, axes, seg_body) + seg_body
        outs = ", ".join(_ident(o) for o in s["outputs"])
        out += ["", ""]
        out += _function(f"segment_{int(s['id'])}",
                         f"Token-wise segment {int(s['id'])}: on a subset of tokens of its inputs "
                         f"it gives the same tokens of its outputs.",
                         inputs, seg_body, f"({outs},)")
    out += ["", ""]
    out += [
        "def apply(model, *, debug_poison=False):",
        '    """Run the model\'s layers of class LAYER_CLASS under this plan."""',
        "    return memoplan.runtime.apply(model, memoplan.runtime.plan_from_text(PLAN_JSON),",
        "                                  debug_poison=debug_poison)",
        "",
        "",
        f"PLAN_JSON = {json.dumps(plan.to_json(), sort_keys=True)!r}",
        "",
    ]
    return "\n".join(out)
