"""A small cache of values derived from volume tensors (permuted copies, pyramid levels, support boxes)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import torch

__all__ = ["DerivedCache", "nbytes", "tensor_identity"]


def tensor_identity(t: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The tensor owning ``t``'s memory and a key describing the view (equal for all equal views).

    The key includes the version counter, which PyTorch bumps on every in-place edit of the memory.
    """
    base = t._base if t._base is not None else t
    return base, (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


def nbytes(value: Any) -> int:
    """Memory held by a cached value: arrays and tensors, and tuples or lists of them (0 for anything else)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0


class DerivedCache:
    """Remembers ``make()`` results per (volume, tag) while the volume is unchanged.

    Least recently used entries are dropped beyond ``capacity`` entries or ``max_bytes`` of arrays and tensors
    (the newest entry always stays), so that a registration alternating between a few pyramid levels, physics
    models and ray orders keeps all of them instead of rebuilding a full-volume copy every few calls. Entries
    hold the owning tensor weakly, so a cache never keeps a volume alive. Tensors that require grad are never
    cached (they change every step). Edits through ``.data`` bypass PyTorch's version counter and are not seen.
    """

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        if capacity < 1 or (max_bytes is not None and max_bytes < 0):
            raise ValueError(
                f"DerivedCache: expected capacity ≥ 1 and max_bytes ≥ 0, got {capacity}, {max_bytes}"
            )
        # oldest use first: (weak owner, view key, tag, value, bytes)
        self._entries: list[tuple[weakref.ref, tuple, Hashable, Any, int]] = []
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Memory held by the cached values (see :func:`nbytes`)."""
        return sum(e[4] for e in self._entries)

    def get(self, tensor: torch.Tensor, tag: Hashable, make: Callable[[], Any]) -> Any:
        if tensor.requires_grad:
            return make()
        base, key = tensor_identity(tensor)
        with self._lock:
            for i, entry in enumerate(self._entries):
                ref, k, t, value, _ = entry
                if ref() is base and k == key and t == tag:
                    self._entries.append(self._entries.pop(i))  # now the most recently used
                    return value
        value = make()
        with self._lock:
            self._entries = [e for e in self._entries if e[0]() is not None]
            self._entries.append((weakref.ref(base), key, tag, value, nbytes(value)))
            while len(self._entries) > 1 and (
                len(self._entries) > self._capacity
                or (self._max_bytes is not None and self.bytes > self._max_bytes)
            ):
                self._entries.pop(0)
        return value
