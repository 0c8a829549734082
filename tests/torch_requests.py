"""A dispatch mode that feeds the storages ops create (malloc) and release (free) to the
planned allocator's library, the way a process-wide CUDA allocator would see them: the tests
drive the host-built allocator with a CPU run's real request stream."""

from __future__ import annotations

import weakref

import torch
from torch.utils import _pytree as pytree


class TorchRequests:
    """Feeds ``lib`` (the allocator's ctypes library) a malloc for each storage an op creates
    and a free when its last tensor dies, inside ``mode`` (a TorchDispatchMode). Storages of
    parameters and inputs (``external``), and host copies (``empty``: pinned host memory on a
    GPU), are not device requests. A collective's pending result (a tensor subclass) is not
    one either. ``on_malloc(ptr, nbytes)``, if given, sees each request."""

    def __init__(self, lib, external: set[int], on_malloc=None) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in pytree.tree_leaves(out):
                    if type(t) is torch.Tensor:
                        outer.seen(func, t)
                return out

        self.lib, self.external, self.on_malloc, self.mode = lib, external, on_malloc, Mode()
        self.count: dict[int, int] = {}
        self.ptr: dict[int, int] = {}
        self.host: dict[int, int] = {}

    def seen(self, func, t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        if func is torch.ops.aten.empty.memory_format:  # host memory on a GPU: its address
            self.host[key] = self.host.get(key, 0) + 1  # may come back as a device tensor's
            weakref.finalize(t, self.host_dead, key)
        if key in self.external or key in self.host:
            return
        if key not in self.count:
            nbytes = t.untyped_storage().nbytes()
            self.count[key] = 0
            self.ptr[key] = self.lib.mp_malloc(nbytes, 0, 0)
            if nbytes and self.on_malloc is not None:
                self.on_malloc(self.ptr[key], nbytes)
        self.count[key] += 1
        weakref.finalize(t, self.dead, key)

    def host_dead(self, key: int) -> None:
        self.host[key] -= 1
        if not self.host[key]:
            del self.host[key]

    def dead(self, key: int) -> None:
        self.count[key] -= 1
        if not self.count[key]:
            del self.count[key]
            self.lib.mp_free(self.ptr.pop(key), 0, 0, 0)
