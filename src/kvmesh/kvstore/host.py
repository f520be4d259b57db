"""Host DRAM tier: a pure `TierIndex` over a slab of block-sized slots (pinned on CUDA).

Engine thread only. Evicting a slot first hands its bytes to `on_evict` (the store spills
it down in write-back mode), then reuses the slot. This is the staging tier: blocks from
every slower source land here before they are copied to the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvmesh.engine.events import EventOutbox
from kvmesh.hashing import BlockKey
from kvmesh.kvstore.index import TierIndex

SpillHook = Callable[[BlockKey, Callable[[], bytes | None]], None]  # key, its bytes on demand


class HostTier:
    def __init__(self, capacity_bytes: int, block_bytes: int, policy: str = "lru",
                 pin_memory: bool | None = None, on_evict: SpillHook | None = None,
                 outbox: EventOutbox | None = None):
        num_slots = capacity_bytes // block_bytes
        if num_slots < 1:
            raise ValueError(f"host tier of {capacity_bytes} bytes holds no {block_bytes}-byte "
                             "block")
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.block_bytes = block_bytes
        self.index = TierIndex("host", num_slots, block_bytes, policy, outbox)
        self.stats = self.index.stats
        self.slab = torch.empty((num_slots, block_bytes), dtype=torch.uint8, pin_memory=pin)
        self.slab.zero_()  # fault every page in now, not on the serving path
        self.is_pinned = pin
        self.on_evict = on_evict

    @property
    def num_slots(self) -> int:
        return self.index.num_slots

    @property
    def num_pinned(self) -> int:
        return self.index.num_pinned

    def __contains__(self, key: object) -> bool:
        return key in self.index

    def get(self, key: BlockKey) -> torch.Tensor | None:
        """The slot holding `key` (a view: copy out before the slot can be reused)."""
        slot = self.index.slot(key)
        if slot is None:
            return None
        self.index.touch(key)
        return self.slab[slot]

    def payload(self, key: BlockKey) -> bytes | None:
        """A copy of the block's bytes (for a disk write)."""
        view = self.get(key)
        return None if view is None else view.numpy().tobytes()

    def list_keys(self) -> list[BlockKey]:
        return [key for key, _ in self.index.items()]

    def put(self, key: BlockKey, data: torch.Tensor | bytes, cost: float = 1.0) -> bool:
        """Store a block (copying it in). False if every slot is pinned."""
        if key in self.index:
            self.index.touch(key)
            return True
        slot, evicted = self.index.insert(key, cost)
        if slot is None:
            self.stats.dropped_writes += 1
            return False
        if evicted is not None and self.on_evict is not None:
            victim = self.slab[slot]
            self.on_evict(evicted[0], lambda: victim.numpy().tobytes())
        dst = self.slab[slot]
        if isinstance(data, bytes | bytearray | memoryview):
            dst.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        else:
            # Synchronous: the slot may be read by the CPU (disk writes) right after.
            dst.copy_(data.reshape(-1).view(torch.uint8))
        self.stats.bytes_in += self.block_bytes
        return True

    def copy_out(self, key: BlockKey, dst: torch.Tensor) -> bool:
        """Copy the block into `dst` (a device block; asynchronous from pinned memory)."""
        src = self.get(key)
        if src is None:
            return False
        dst.reshape(-1).view(torch.uint8).copy_(src, non_blocking=self.is_pinned)
        self.stats.bytes_out += self.block_bytes
        return True

    def remove(self, key: BlockKey) -> None:
        self.index.remove(key)

    def pin(self, key: BlockKey) -> None:
        self.index.pin(key)

    def unpin(self, key: BlockKey) -> None:
        self.index.unpin(key)

    def check_integrity(self) -> None:
        assert self.slab.shape[0] == self.index.num_slots
        self.index.check_integrity()
