"""Running chosen nodes of a traced layer graph: the one interpreter every replay goes through.

The runtime runs a layer's forward graph, its backward graph, the ops that rebuild dropped
tokens and the views backward reads; the profile runs the forward once on real values (the
float32 shadow run). All of them are a :class:`Replay`: an ``fx.Interpreter`` over values kept by
node name, that runs a list of nodes (not the whole graph), lets each value go after its last
use (``release_after``), and adds to every error the node, its op and, where the trace recorded
it, the line of the user's code it came from. The error keeps its type (``torch.OutOfMemoryError``
stays one), with that context as a note.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.fx as fx


def where(n: fx.Node) -> str:
    """The node, its op and, where the trace recorded it, the user's source line."""
    text = f"'{n.name}' ({n.target})"
    trace = n.meta.get("stack_trace") or ""
    lines = [l.strip() for l in trace.strip().splitlines() if l.strip()]
    files = [l for l in lines if l.startswith("File ")]
    if files:  # the innermost frame of the user's code: the last one outside torch and memoplan
        user = [l for l in files if "/torch/" not in l and "/memoplan/" not in l]
        text += f", from {(user or files)[-1]}"
    return text


class Replay(fx.Interpreter):
    """Runs nodes of ``gm`` over ``values`` (node name -> value), in the order given.

    ``load(name)`` gives a value that ``values`` lacks (a subclass may slice or cast it).
    """

    def __init__(self, gm: fx.GraphModule, values: dict[str, Any] | None = None, *,
                 load: Callable[[str], Any] | None = None) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[str, Any] = {} if values is None else values
        self._load = load

    def value(self, n: fx.Node) -> Any:
        if n.name not in self.values:
            if n.op == "get_attr":  # a constant the layer made (torch.tensor(...) in forward)
                return self.fetch_attr(n.target)
            if self._load is None:
                raise KeyError(f"no value for '{n.name}'")
            self.values[n.name] = self.outside(n, self._load(n.name))
        return self.values[n.name]

    def outside(self, n: fx.Node, v: Any) -> Any:
        """A value from outside, as this replay uses it (subclasses slice or cast)."""
        return v

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        return fx.node.map_arg(n.args, self.value), fx.node.map_arg(n.kwargs, self.value)

    def run_nodes(self, nodes: Iterable[fx.Node],
                  drops: dict[str, list[str]] | None = None) -> dict[str, Any]:
        """Run ``nodes``; after each, drop the values whose last use it was (``drops``)."""
        for n in nodes:
            try:
                self.values[n.name] = self.run_node(n)
            except Exception as e:
                if not getattr(e, "_memoplan_where", False) and hasattr(e, "add_note"):
                    e._memoplan_where = True  # the innermost node says where (Python >= 3.11)
                    e.add_note(f"(memoplan, replaying the layer's op {where(n)})")
                raise
            for name in (drops or {}).get(n.name, ()):
                self.values.pop(name, None)
        return self.values

    def ensure(self, name: str, node: dict[str, fx.Node]) -> Any:
        """The value of ``name``, running the ops it needs that have not run (the views of
        kept values that backward reads)."""
        if name not in self.values:
            for a in node[name].all_input_nodes:
                self.ensure(a.name, node)
            self.run_nodes([node[name]])
        return self.values[name]
