"""Find the repeated transformer layer and capture one real call of it.

Detection: among the children of every ``nn.ModuleList``/``nn.Sequential``, the class with the
most instances that have identical parameter shapes (at least two). ``LAYER``/``--layer``
overrides it. The call is captured with a forward pre-hook while the model runs on its example
inputs; the run stops right after the first layer's call is captured, so later layers cost
nothing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memoplan.errors import MemoplanError
from memoplan.trace.loader import ModelFile, _user_error_summary, make_inputs


@dataclass(frozen=True, kw_only=True)
class RepeatedLayer:
    class_name: str
    path: str                     # qualified name of the first instance, e.g. "model.layers.0"
    instances: tuple[nn.Module, ...]

    @property
    def first(self) -> nn.Module:
        return self.instances[0]


def _signature(m: nn.Module) -> tuple:
    return tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters())


def find_repeated_layer(model: nn.Module, override: str | None = None) -> RepeatedLayer:
    """The layer class that repeats (most identical instances); ``override`` picks one by name."""
    names = {id(m): n for n, m in model.named_modules()}
    if override is not None:
        found = [m for m in model.modules() if type(m).__name__ == override]
        if not found:
            classes = sorted({type(m).__name__ for m in model.modules()})
            raise MemoplanError(f"The model has no module of class '{override}' (from --layer or "
                                f"LAYER). Its classes are: {', '.join(classes)}.")
        return RepeatedLayer(class_name=override, path=names[id(found[0])], instances=tuple(found))
    groups: dict[tuple, list[nn.Module]] = defaultdict(list)
    for container in model.modules():
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            for child in container.children():
                if any(True for _ in child.parameters()):
                    groups[(type(child).__name__, _signature(child))].append(child)
    candidates = [(len(v), sum(p.numel() for p in v[0].parameters()), k[0], v)
                  for k, v in groups.items() if len(v) >= 2]
    if not candidates:
        raise MemoplanError(
            "No repeated layer found: the model has no nn.ModuleList or nn.Sequential with two or "
            "more identical children that hold parameters. Name the transformer layer's class "
            "with --layer CLASSNAME (or LAYER = 'CLASSNAME' in the model file)."
        )
    count, _, cls, instances = max(candidates, key=lambda c: (c[0], c[1]))
    return RepeatedLayer(class_name=cls, path=names[id(instances[0])], instances=tuple(instances))


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
