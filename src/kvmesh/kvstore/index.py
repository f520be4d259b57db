"""A tier's index, apart from its bytes: which keys it holds in which slot, pins, eviction
order and counters. Pure Python (no torch, no I/O, no clock).

A byte backend (the host tier's slab, the disk tier's files; in the simulator, nothing)
owns the bytes behind each slot. The index decides; the backend copies. Every key that
enters or leaves is an event in the outbox, when one is given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from kvmesh.engine.events import AllCleared, BlockRemoved, BlockStored, EventOutbox
from kvmesh.hashing import BlockKey
from kvmesh.kvstore.eviction import make_eviction_policy
from kvmesh.kvstore.tier import TierStats

Evicted = tuple[BlockKey, int]  # (key, the slot it left)


class TierIndex:
    def __init__(self, name: str, num_slots: int, slot_bytes: int, policy: str = "lru",
                 outbox: EventOutbox | None = None):
        if num_slots < 0 or slot_bytes < 1:
            raise ValueError(f"bad tier geometry: {num_slots} slots of {slot_bytes} bytes")
        self.name = name
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.policy = make_eviction_policy(policy, num_slots * slot_bytes)
        self.stats = TierStats(name, capacity_bytes=num_slots * slot_bytes)
        self.outbox = outbox
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[BlockKey, int] = {}
        self._lent: set[int] = set()  # reserved for a block being written in place
        self._pins: Counter[BlockKey] = Counter()

    def __contains__(self, key: object) -> bool:
        return key in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def items(self) -> Iterator[tuple[BlockKey, int]]:
        """(key, slot) pairs, a snapshot (safe to mutate the index while iterating)."""
        return iter(list(self._slot_of.items()))

    def slot(self, key: BlockKey) -> int | None:
        return self._slot_of.get(key)

    def touch(self, key: BlockKey) -> None:
        if key in self._slot_of:
            self.policy.touch(key)

    def insert(self, key: BlockKey, cost: float = 1.0) -> tuple[int | None, Evicted | None]:
        """A slot for `key`, and what was evicted to free it (the caller saves its bytes
        before reusing the slot). (None, None) when every slot is pinned. A key already
        held keeps its slot and is touched."""
        held = self._slot_of.get(key)
        if held is not None:
            self.policy.touch(key)
            return held, None
        slot, evicted = self._take()
        if slot is not None:
            self._place(key, slot, cost)
        return slot, evicted

    def reserve(self) -> tuple[int | None, Evicted | None]:
        """A slot lent out with no key yet, for a block that is written into it in place
        (a peer fetch received straight into host memory); `commit` or `release` it. What
        was evicted to free it is returned as by `insert`."""
        slot, evicted = self._take()
        if slot is not None:
            self._lent.add(slot)
        return slot, evicted

    def commit(self, key: BlockKey, slot: int, cost: float = 1.0) -> bool:
        """Index `key` at the lent `slot`. False (and the slot is freed) if `key` was
        stored meanwhile: its held copy stays."""
        self._lent.remove(slot)
        if key in self._slot_of:
            self._free.append(slot)
            self.policy.touch(key)
            return False
        self._place(key, slot, cost)
        return True

    def release(self, slot: int) -> None:
        """A lent slot back to the free list (its write failed or was abandoned)."""
        self._lent.remove(slot)
        self._free.append(slot)

    @property
    def num_lent(self) -> int:
        return len(self._lent)

    def _take(self) -> tuple[int | None, Evicted | None]:
        if self._free:
            return self._free.pop(), None
        victim = self.policy.evict_one(self._pins)
        if victim is None:
            return None, None
        slot = self._slot_of.pop(victim)
        self.stats.evictions += 1
        self._account(-1)
        self._emit(BlockRemoved, victim)
        return slot, (victim, slot)

    def _place(self, key: BlockKey, slot: int, cost: float) -> None:
        self._slot_of[key] = slot
        self.policy.insert(key, self.slot_bytes, cost)
        self._account(+1)
        self._emit(BlockStored, key)

    def remove(self, key: BlockKey) -> int | None:
        """Forget `key`; returns the slot it freed."""
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return None
        self.policy.remove(key)
        self._free.append(slot)
        self._account(-1)
        self._emit(BlockRemoved, key)
        return slot

    def clear(self) -> None:
        for key in list(self._slot_of):
            self.policy.remove(key)
            self._free.append(self._slot_of.pop(key))
            self._account(-1)
        self._emit(AllCleared)

    def _account(self, sign: int) -> None:
        self.stats.num_blocks += sign
        self.stats.used_bytes += sign * self.slot_bytes

    def _emit(self, kind: type[BlockStored | BlockRemoved | AllCleared], *args: Any) -> None:
        if self.outbox is not None:  # no event is built when nobody listens
            self.outbox.append(kind(self.name, *args))

    # pins: a pinned key is never evicted (it is being read or is about to be loaded) ------

    @property
    def num_pinned(self) -> int:
        return len(self._pins)

    def pin(self, key: BlockKey) -> None:
        self._pins[key] += 1

    def unpin(self, key: BlockKey) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def check_integrity(self) -> None:
        slots = list(self._slot_of.values())
        assert len(slots) == len(set(slots)), f"{self.name}: two keys share a slot"
        assert not set(slots) & set(self._free), f"{self.name}: a used slot is also free"
        assert not self._lent & (set(slots) | set(self._free)), f"{self.name}: a lent slot is used"
        assert len(slots) + len(self._free) + len(self._lent) == self.num_slots
        assert all(k in self.policy for k in self._slot_of)
        assert self.stats.num_blocks == len(slots)
        assert self.stats.used_bytes == len(slots) * self.slot_bytes
        assert all(n > 0 for n in self._pins.values()), f"{self.name}: a pin count is <= 0"
        self.policy.check_integrity()
