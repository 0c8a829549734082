"""Find the repeated transformer layer and capture one real call of it.

Detection: the children of every ``nn.ModuleList``/``nn.Sequential`` that hold parameters are
grouped by class and their parameters' and buffers' names, shapes and dtypes (instances that
differ, such as T5's first block with its relative attention bias, are never grouped); groups
of two or more are candidates. With a probe (what the profile does), the model runs once (on
fake tensors where it can), and the candidates whose instances ran an attention op are
preferred, of those the ones not inside an instance of another's class (T5Block, not the
T5LayerSelfAttention in it); then the group with the most instances wins, then the first in
the model (T5's encoder blocks, not its decoder blocks). Without attention seen, the group
with the most instances wins, then the one with the most parameters. ``LAYER``/``--layer``
names the class instead; its largest group of identical instances is taken, the first on
ties. Notes say which instances were left out, and why. The call is captured with a forward
pre-hook while the model runs on its example inputs; the run stops right after the first
layer's call is captured, so later layers cost nothing.
"""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from memoplan.errors import MemoplanError
from memoplan.trace.loader import ModelFile, _user_error_summary, make_inputs
from memoplan.trace.meta import fake_weights, has_meta


@dataclass(frozen=True, kw_only=True)
class RepeatedLayer:
    class_name: str
    path: str                     # qualified name of the first instance, e.g. "model.layers.0"
    instances: tuple[nn.Module, ...]
    notes: tuple[str, ...] = ()   # how the choice was made where it was not obvious

    @property
    def first(self) -> nn.Module:
        return self.instances[0]


def _signature(m: nn.Module) -> tuple:
    """What ``memoplan.signature.layer_signature`` hashes, less the class name."""
    return tuple((n, tuple(t.shape), t.dtype)
                 for n, t in [*m.named_parameters(), *m.named_buffers()])


def _group(modules: Iterable[nn.Module]) -> list[list[nn.Module]]:
    """``modules`` grouped by class and signature, groups in the order of their first member."""
    groups: dict[tuple, list[nn.Module]] = defaultdict(list)
    for m in modules:
        groups[(type(m).__name__, _signature(m))].append(m)
    return list(groups.values())


def _rank(group: list[nn.Module]) -> tuple[int, int]:
    return len(group), sum(p.numel() for p in group[0].parameters())


def find_repeated_layer(model: nn.Module, override: str | None = None, *,
                        probe: Callable[[], set[int] | None] | None = None) -> RepeatedLayer:
    """The repeated layer (see the module docstring); ``override`` picks its class by name.
    ``probe()`` returns the ids of the modules that ran an attention op (``attention_modules``),
    or None where it could not tell; it is called only when there is a choice to make."""
    names = {id(m): n for n, m in model.named_modules()}

    def paths(ms: list[nn.Module]) -> str:
        shown = ", ".join(names[id(m)] for m in ms[:4])
        return shown + (f", ... ({len(ms)} in all)" if len(ms) > 4 else "")

    notes: list[str] = []
    if override is not None:
        same_class = [m for m in model.modules() if type(m).__name__ == override]
        if not same_class:
            classes = sorted({type(m).__name__ for m in model.modules()})
            raise MemoplanError(f"The model has no module of class '{override}' (from --layer or "
                                f"LAYER). Its classes are: {', '.join(classes)}.")
        chosen = max(_group(same_class), key=len)  # the first of the largest
    else:
        children = [child for c in model.modules() if isinstance(c, (nn.ModuleList, nn.Sequential))
                    for child in c.children() if any(True for _ in child.parameters())]
        groups = [g for g in _group(children) if len(g) >= 2]
        if not groups:
            raise MemoplanError(
                "No repeated layer found: the model has no nn.ModuleList or nn.Sequential with two "
                "or more identical children that hold parameters. Name the transformer layer's "
                "class with --layer CLASSNAME (or LAYER = 'CLASSNAME' in the model file).")
        ran = probe() if probe is not None and len(groups) > 1 else None
        mixing = [g for g in groups if ran and any(id(m) in ran for m in g)]
        # what lies inside an instance of such a group's class (T5's first block too, whose
        # parameters differ) is a part of a bigger layer
        classes = {type(g[0]) for g in mixing}
        inside = {id(sub) for m in children if type(m) in classes for sub in m.modules()
                  if sub is not m}
        outer = [g for g in mixing if not any(id(m) in inside for m in g)] or mixing or groups
        chosen = max(outer, key=len if mixing else _rank)  # the first of the largest
        if len(outer) > 1:
            why = ("it runs attention, is not part of another repeated module and, of those, has "
                   "the most identical instances and comes first in the model" if mixing else
                   "it has the most identical instances, then the most parameters")
            others = "; ".join(f"{type(g[0]).__name__} x{len(g)} ({paths(g)})"
                               for g in outer if g is not chosen)
            notes.append(f"planning {type(chosen[0]).__name__} x{len(chosen)} ({paths(chosen)}) "
                         f"because {why}; not planned (they run as usual): {others}. Name "
                         f"another layer class with --layer.")
    cls = type(chosen[0]).__name__
    planned = {id(m) for m in chosen}
    left = [m for m in model.modules() if type(m).__name__ == cls and id(m) not in planned]
    sig = _signature(chosen[0])
    for ms, why in (([m for m in left if _signature(m) != sig],
                     "differ from the planned ones in their parameters or buffers (names, "
                     "shapes or dtypes)"),
                    ([m for m in left if _signature(m) == sig],
                     "are held in no nn.ModuleList or nn.Sequential")):
        if ms:
            notes.append(f"{len(ms)} other {cls} instance(s) {why} and are not planned: "
                         f"{paths(ms)}")
    return RepeatedLayer(class_name=cls, path=names[id(chosen[0])], instances=tuple(chosen),
                         notes=tuple(notes))


def attention_modules(run: Callable[[], Any], seq_len: int) -> set[int]:
    """Ids of the modules whose forward was running when an attention op ran during ``run()``:
    an op whose name says attention (SDPA's kernels, flash-attention ops), or one with an output
    with two axes of ``seq_len`` (eager attention's scores and softmax). Pick a ``seq_len`` that
    is no parameter's dimension, so no Linear's output has two such axes."""
    active: Counter[int] = Counter()
    found: set[int] = set()

    class Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if "attention" in str(func) or any(
                    isinstance(t, torch.Tensor) and list(t.shape).count(seq_len) >= 2
                    for t in pytree.tree_leaves(out)):
                found.update(i for i, n in active.items() if n > 0)
            return out

    def entered(module: nn.Module, args: tuple) -> None:
        active[id(module)] += 1

    def left(module: nn.Module, args: tuple, result: Any) -> None:
        active[id(module)] -= 1

    handles = [register_module_forward_pre_hook(entered),
               register_module_forward_hook(left, always_call=True)]
    try:
        with Probe():
            run()
    finally:
        for h in handles:
            h.remove()
    return found


def model_attention_modules(mf: ModelFile, model: nn.Module, lens: tuple[int, ...],
                            device: str | torch.device = "cpu") -> set[int] | None:
    """``attention_modules`` of the model on ``example_inputs``, at the first of ``lens`` that
    is no parameter's or buffer's dimension: on fake tensors (no compute; meta parameters as
    fake ones on ``device``), else, for a model without meta parameters, for real without
    grad; None where neither runs. The global RNG is left as it was."""
    dims = {d for t in [*model.parameters(), *model.buffers()] for d in t.shape}
    seq_len = next((n for n in lens if n not in dims), lens[0])

    def run() -> None:
        args, kwargs = make_inputs(mf, seq_len)
        model(*args, **kwargs)

    @contextlib.contextmanager
    def fake() -> Iterator[None]:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, fake_weights(model, mode, device):
            yield

    # a model with meta parameters runs on fake tensors only
    for mode in [fake] if has_meta(model) else [fake, contextlib.nullcontext]:
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad(), mode():
                return attention_modules(run, seq_len)
        except Exception:  # noqa: BLE001  (the model's own code; the capture reports its errors)
            pass
    return None


class _Captured(Exception):
    """Raised inside the pre-hook to stop the model's run once the layer call is captured."""


def capture_layer_call(mf: ModelFile, model: nn.Module, layer: nn.Module,
                       seq_len: int) -> tuple[tuple, dict]:
    """Run ``model`` on ``example_inputs(seq_len)`` and return the first call's (args, kwargs)."""
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["call"] = (args, kwargs)
        raise _Captured

    args, kwargs = make_inputs(mf, seq_len)
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.enable_grad():
            model(*args, **kwargs)
    except _Captured:
        pass
    except Exception as e:
        raise MemoplanError(f"Running the model on example_inputs({seq_len}) failed before it "
                            f"reached the layer: {_user_error_summary(mf.path, e)}.") from e
    finally:
        handle.remove()
    if "call" not in captured:
        raise MemoplanError(f"The model ran on example_inputs({seq_len}) without calling its "
                            f"layer '{type(layer).__name__}'; check --layer or the model's forward.")
    return captured["call"]
