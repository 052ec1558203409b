"""The cache of values derived from volumes (pyramid levels, kernel layouts): LRU order, budgets, invalidation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xraypose.render._cache import DerivedCache, nbytes


def _counting(cache: DerivedCache, made: list[str]):
    def get(volume: torch.Tensor, tag: str, size: int = 1) -> np.ndarray:
        def make() -> np.ndarray:
            made.append(tag)
            return np.zeros(size, dtype=np.uint8)

        return cache.get(volume, tag, make)

    return get


def test_hit_returns_the_same_value_without_rebuilding() -> None:
    made: list[str] = []
    get = _counting(DerivedCache(capacity=4), made)
    vol = torch.zeros(4, 4, 4)
    first = get(vol, "a")
    assert get(vol, "a") is first
    assert get(vol[:], "a") is first  # an equal view of the same memory
    assert made == ["a"]


def test_least_recently_used_entry_is_dropped_not_the_oldest_inserted() -> None:
    made: list[str] = []
    cache = DerivedCache(capacity=2)
    get = _counting(cache, made)
    vol = torch.zeros(4, 4, 4)
    get(vol, "a")
    get(vol, "b")
    get(vol, "a")  # used again: now the most recent
    get(vol, "c")  # evicts b, the least recently used (a FIFO cache would evict a)
    get(vol, "a")
    assert made == ["a", "b", "c"]
    get(vol, "b")
    assert made == ["a", "b", "c", "b"]
    assert len(cache) == 2


def test_byte_budget_evicts_least_recently_used_but_keeps_the_newest() -> None:
    made: list[str] = []
    cache = DerivedCache(capacity=10, max_bytes=100)
    get = _counting(cache, made)
    vol = torch.zeros(4, 4, 4)
    get(vol, "a", 40)
    get(vol, "b", 40)
    assert cache.bytes == 80
    get(vol, "a", 40)
    get(vol, "c", 40)  # 120 bytes: b (least recent) goes
    assert cache.bytes == 80 and len(cache) == 2
    get(vol, "a", 40)
    assert made == ["a", "b", "c"]
    get(vol, "huge", 1000)  # above the budget on its own: kept alone
    assert len(cache) == 1 and cache.bytes == 1000


def test_in_place_edit_and_freed_volume_invalidate() -> None:
    made: list[str] = []
    cache = DerivedCache(capacity=4)
    get = _counting(cache, made)
    vol = torch.zeros(4, 4, 4)
    get(vol, "a")
    vol.add_(1.0)  # bumps the version counter
    get(vol, "a")
    assert made == ["a", "a"]
    del vol
    get(torch.zeros(2, 2, 2), "b")  # the entries of the freed volume are dropped on insertion
    assert len(cache) == 1


def test_tensors_requiring_grad_are_never_cached() -> None:
    made: list[str] = []
    cache = DerivedCache(capacity=4)
    get = _counting(cache, made)
    vol = torch.zeros(2, 2, 2, requires_grad=True)
    get(vol, "a")
    get(vol, "a")
    assert made == ["a", "a"] and len(cache) == 0


def test_nbytes_counts_arrays_tensors_and_tuples() -> None:
    assert nbytes(np.zeros(10, dtype=np.float32)) == 40
    assert nbytes(torch.zeros(3, dtype=torch.float64)) == 24
    assert nbytes((np.zeros(2, dtype=np.int64), 5, torch.zeros(4, dtype=torch.uint8))) == 20
    assert nbytes(((0, 1), (2, 3))) == 0


def test_bad_budget_is_rejected() -> None:
    with pytest.raises(ValueError, match="capacity"):
        DerivedCache(capacity=0)
