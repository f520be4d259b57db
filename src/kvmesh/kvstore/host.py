"""Host DRAM tier: a fixed pool of block-sized slots (pinned when CUDA is present).

Engine thread only. Evicting a slot first hands its bytes to `on_evict` (the store spills
it to disk in write-back mode), then reuses the slot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

from kvmesh.hashing import BlockKey
from kvmesh.kvstore.eviction import make_eviction_policy
from kvmesh.kvstore.tier import TierStats

SpillHook = Callable[[BlockKey, torch.Tensor], None]


class HostTier:
    def __init__(self, capacity_bytes: int, block_bytes: int, policy: str = "lru",
                 pin_memory: bool | None = None, on_evict: SpillHook | None = None):
        num_slots = capacity_bytes // block_bytes
        if num_slots < 1:
            raise ValueError(f"host tier of {capacity_bytes} bytes holds no {block_bytes}-byte "
                             "block")
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.block_bytes = block_bytes
        self.slab = torch.empty((num_slots, block_bytes), dtype=torch.uint8, pin_memory=pin)
        self.slab.zero_()  # fault every page in now, not on the serving path
        self.is_pinned = pin
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[BlockKey, int] = {}
        self._pins: Counter[BlockKey] = Counter()
        self.policy = make_eviction_policy(policy, num_slots * block_bytes)
        self.on_evict = on_evict
        self.stats = TierStats("host", capacity_bytes=num_slots * block_bytes)

    @property
    def num_slots(self) -> int:
        return self.slab.shape[0]

    def __contains__(self, key: object) -> bool:
        return key in self._slot_of

    def get(self, key: BlockKey) -> torch.Tensor | None:
        """The slot holding `key` (a view: copy out before the slot can be reused)."""
        slot = self._slot_of.get(key)
        if slot is None:
            return None
        self.policy.touch(key)
        return self.slab[slot]

    def put(self, key: BlockKey, data: torch.Tensor | bytes, cost: float = 1.0) -> bool:
        """Store a block (copying it in). False if every slot is pinned."""
        if key in self._slot_of:
            self.policy.touch(key)
            return True
        slot = self._take_slot()
        if slot is None:
            self.stats.dropped_writes += 1
            return False
        dst = self.slab[slot]
        if isinstance(data, bytes | bytearray | memoryview):
            dst.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        else:
            # Synchronous: the slot may be read by the CPU (disk writes) right after.
            dst.copy_(data.reshape(-1).view(torch.uint8))
        self._slot_of[key] = slot
        self.policy.insert(key, self.block_bytes, cost)
        self._account(+1)
        self.stats.bytes_in += self.block_bytes
        return True

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        victim = self.policy.evict_one(self._pins)
        if victim is None:
            return None
        slot = self._slot_of.pop(victim)
        self.stats.evictions += 1
        self._account(-1)
        if self.on_evict is not None:
            self.on_evict(victim, self.slab[slot])
        return slot

    def _account(self, sign: int) -> None:
        self.stats.num_blocks += sign
        self.stats.used_bytes += sign * self.block_bytes

    def remove(self, key: BlockKey) -> None:
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            self.policy.remove(key)
            self._free.append(slot)
            self._account(-1)

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
        assert len(slots) == len(set(slots)), "two keys share a slot"
        assert not set(slots) & set(self._free), "a used slot is also free"
        assert len(slots) + len(self._free) == self.num_slots
        assert all(k in self.policy for k in self._slot_of)
        assert self.stats.num_blocks == len(slots)
        self.policy.check_integrity()
