"""A small cache of values derived from volume tensors (permuted copies, pyramid levels, support boxes)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["DerivedCache", "tensor_identity"]


def tensor_identity(t: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The tensor owning ``t``'s memory and a key describing the view (equal for all equal views).

    The key includes the version counter, which PyTorch bumps on every in-place edit of the memory.
    """
    base = t._base if t._base is not None else t
    return base, (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


class DerivedCache:
    """Remembers ``make()`` results per (volume, tag) while the volume is unchanged.

    Entries hold the owning tensor weakly, so a cache never keeps a volume alive, and the oldest entries are
    dropped beyond ``capacity``. Tensors that require grad are never cached (they change every step).
    Edits through ``.data`` bypass PyTorch's version counter and are not seen.
    """

    def __init__(self, capacity: int) -> None:
        self._entries: list[tuple[weakref.ref, tuple, Hashable, Any]] = []
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, tensor: torch.Tensor, tag: Hashable, make: Callable[[], Any]) -> Any:
        if tensor.requires_grad:
            return make()
        base, key = tensor_identity(tensor)
        with self._lock:
            for ref, k, t, value in self._entries:
                if ref() is base and k == key and t == tag:
                    return value
        value = make()
        with self._lock:
            self._entries = [e for e in self._entries if e[0]() is not None]
            self._entries.append((weakref.ref(base), key, tag, value))
            if len(self._entries) > self._capacity:
                self._entries.pop(0)
        return value
