"""Eviction policies for capacity tiers, picked by name. Pure Python.

A policy tracks keys with their sizes and chooses what to evict; the tier owns the bytes
and the capacity check. `pinned` keys (being read or loaded) are never chosen.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Container
from typing import Protocol

from kvmesh.hashing import BlockKey


class EvictionPolicy(Protocol):
    name: str

    def insert(self, key: BlockKey, size_bytes: int, cost: float = 1.0) -> None: ...
    def touch(self, key: BlockKey) -> None: ...
    def remove(self, key: BlockKey) -> None: ...
    def evict_one(self, pinned: Container[BlockKey] = ()) -> BlockKey | None: ...
    def __contains__(self, key: object) -> bool: ...
    def check_integrity(self) -> None: ...


POLICIES: dict[str, Callable[[int], EvictionPolicy]] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        POLICIES[name] = cls
        return cls

    return wrap


def make_eviction_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name](capacity_bytes)


@register("lru")
class LRUPolicy:
    """Least recently used first."""

    name = "lru"

    def __init__(self, capacity_bytes: int):
        self._order: OrderedDict[BlockKey, int] = OrderedDict()

    def insert(self, key: BlockKey, size_bytes: int, cost: float = 1.0) -> None:
        self._order[key] = size_bytes
        self._order.move_to_end(key)

    def touch(self, key: BlockKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: BlockKey) -> None:
        self._order.pop(key, None)

    def evict_one(self, pinned: Container[BlockKey] = ()) -> BlockKey | None:
        for key in self._order:
            if key not in pinned:
                del self._order[key]
                return key
        return None

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def check_integrity(self) -> None:
        assert all(size >= 0 for size in self._order.values())


@register("s3fifo")
class S3FIFOPolicy:
    """S3-FIFO: a small probationary FIFO (10%), a main FIFO, and a ghost list of recent
    small-queue evictions. One-hit wonders leave quickly; re-referenced keys are kept."""

    name = "s3fifo"

    def __init__(self, capacity_bytes: int):
        self.small_limit = max(1, capacity_bytes // 10)
        self._small: OrderedDict[BlockKey, int] = OrderedDict()
        self._main: OrderedDict[BlockKey, int] = OrderedDict()
        self._ghost: OrderedDict[BlockKey, None] = OrderedDict()
        self._freq: dict[BlockKey, int] = {}
        self._small_bytes = 0
        self._ghost_limit = 4096

    def insert(self, key: BlockKey, size_bytes: int, cost: float = 1.0) -> None:
        self.remove(key)
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = size_bytes
        else:
            self._small[key] = size_bytes
            self._small_bytes += size_bytes
        self._freq[key] = 0

    def touch(self, key: BlockKey) -> None:
        if key in self._freq:
            self._freq[key] = min(3, self._freq[key] + 1)

    def remove(self, key: BlockKey) -> None:
        if key in self._small:
            self._small_bytes -= self._small.pop(key)
        self._main.pop(key, None)
        self._freq.pop(key, None)

    def _evict_small(self, pinned: Container[BlockKey]) -> BlockKey | None:
        for _ in range(len(self._small)):
            key, size = self._small.popitem(last=False)
            self._small_bytes -= size
            if key in pinned:
                self._small[key] = size
                self._small_bytes += size
            elif self._freq[key] > 0:
                self._freq[key] = 0
                self._main[key] = size
            else:
                del self._freq[key]
                self._ghost[key] = None
                if len(self._ghost) > self._ghost_limit:
                    self._ghost.popitem(last=False)
                return key
        return None

    def _evict_main(self, pinned: Container[BlockKey]) -> BlockKey | None:
        for _ in range(4 * len(self._main) + 1):
            if not self._main:
                return None
            key, size = self._main.popitem(last=False)
            if key in pinned or self._freq[key] > 0:
                if key not in pinned:
                    self._freq[key] -= 1
                self._main[key] = size
                continue
            del self._freq[key]
            return key
        return None

    def evict_one(self, pinned: Container[BlockKey] = ()) -> BlockKey | None:
        if self._small_bytes >= self.small_limit or not self._main:
            return self._evict_small(pinned) or self._evict_main(pinned)
        return self._evict_main(pinned) or self._evict_small(pinned)

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def check_integrity(self) -> None:
        assert not (set(self._small) & set(self._main)), "key in both FIFOs"
        assert set(self._freq) == set(self._small) | set(self._main)
        assert self._small_bytes == sum(self._small.values())
        assert all(0 <= f <= 3 for f in self._freq.values())


@register("cost")
class CostAwarePolicy:
    """GreedyDual-Size-Frequency: value = clock + hits * recompute_cost / size.

    `cost` is the recompute work a block saves (tokens x depth, say); cheap, large, cold
    blocks go first, and the clock ages everything that is not re-referenced.
    """

    name = "cost"

    def __init__(self, capacity_bytes: int):
        self._clock = 0.0
        self._entries: dict[BlockKey, tuple[float, int, float, int]] = {}  # prio, size, cost, hits
        self._heap: list[tuple[float, int, BlockKey]] = []
        self._seq = itertools.count()

    def _push(self, key: BlockKey, size: int, cost: float, hits: int) -> None:
        prio = self._clock + hits * cost / max(1, size)
        self._entries[key] = (prio, size, cost, hits)
        heapq.heappush(self._heap, (prio, next(self._seq), key))

    def insert(self, key: BlockKey, size_bytes: int, cost: float = 1.0) -> None:
        self._push(key, size_bytes, max(cost, 1e-9), 1)

    def touch(self, key: BlockKey) -> None:
        if key in self._entries:
            _, size, cost, hits = self._entries[key]
            self._push(key, size, cost, hits + 1)

    def remove(self, key: BlockKey) -> None:
        self._entries.pop(key, None)

    def evict_one(self, pinned: Container[BlockKey] = ()) -> BlockKey | None:
        skipped = []
        victim = None
        while self._heap:
            prio, seq, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is None or entry[0] != prio:
                continue  # stale heap item
            if key in pinned:
                skipped.append((prio, seq, key))
                continue
            del self._entries[key]
            self._clock = prio
            victim = key
            break
        for item in skipped:
            heapq.heappush(self._heap, item)
        return victim

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def check_integrity(self) -> None:
        live = {(p, k) for p, _, k in self._heap}
        for key, (prio, size, _, hits) in self._entries.items():
            assert (prio, key) in live, "entry missing from heap"
            assert size >= 0 and hits >= 1
