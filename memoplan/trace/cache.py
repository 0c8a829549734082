"""Key/value caches passed to a layer (Hugging Face's ``use_cache``, on by default).

Decoder LMs in transformers pass a ``Cache`` object to every layer, also in training, and each
layer appends its K and V to it: under a plan that would keep every layer's K and V alive for
the whole step behind the plan's back, and the object (mutable, holding tensors) cannot be
traced. Training needs no cache, so a layer that memoplan traces or runs under a plan gets
none, as transformers itself does under gradient checkpointing: cache arguments become
``None`` and ``use_cache`` becomes ``False``. Calls without grad, or in ``eval()``, are not
touched (``memoplan.runtime.apply`` runs the original forward for them).
"""

from __future__ import annotations

from typing import Any

from torch.utils import _pytree as pytree


def is_cache(x: Any) -> bool:
    """Whether ``x`` is a transformers ``Cache`` (found by its class, without importing
    transformers)."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers")
               for c in type(x).__mro__)


def without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
    """``(args, kwargs)`` with every cache replaced by None and ``use_cache`` set to False, and
    whether anything was changed."""
    changed = False

    def drop(x: Any) -> Any:
        nonlocal changed
        if is_cache(x):
            changed = True
            return None
        return x

    args, kwargs = pytree.tree_map(drop, (args, kwargs), is_leaf=is_cache)
    if kwargs.get("use_cache"):
        kwargs = {**kwargs, "use_cache": False}
        changed = True
    return args, kwargs, changed
