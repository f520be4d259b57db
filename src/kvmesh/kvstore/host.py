"""Host DRAM tier: the store's staging tier, a `TierIndex` over a slab of block-sized
slots (pinned when CUDA is present).

Engine thread only. The slot bookkeeping is `VirtualHostTier`'s (the simulator's host
tier); this class only adds the bytes. Evicting a slot first hands its bytes to
`on_evict` (the store spills it down in write-back mode), then reuses the slot.
"""

from __future__ import annotations

import numpy as np
import torch

from kvmesh.engine.events import EventOutbox
from kvmesh.hashing import BlockKey
from kvmesh.kvstore.store import SpillHook
from kvmesh.kvstore.virtual import VirtualHostTier


class HostTier(VirtualHostTier):
    def __init__(self, capacity_bytes: int, block_bytes: int, policy: str = "lru",
                 pin_memory: bool | None = None, on_evict: SpillHook | None = None,
                 outbox: EventOutbox | None = None):
        num_slots = capacity_bytes // block_bytes
        if num_slots < 1:
            raise ValueError(f"host tier of {capacity_bytes} bytes holds no {block_bytes}-byte "
                             "block")
        super().__init__(num_slots, block_bytes, policy, outbox)
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.block_bytes = block_bytes
        self.slab = torch.empty((num_slots, block_bytes), dtype=torch.uint8, pin_memory=pin)
        self.slab.zero_()  # fault every page in now, not on the serving path
        self._np = self.slab.numpy()  # the same bytes, for copies and in-place landing
        self.is_pinned = pin
        self.on_evict = on_evict

    def get(self, key: BlockKey) -> torch.Tensor | None:
        """The slot holding `key` (a view: copy out before the slot can be reused)."""
        slot = self.index.slot(key)
        if slot is None:
            return None
        self.index.touch(key)
        return self.slab[slot]

    def remove(self, key: BlockKey) -> None:
        self.index.remove(key)

    def landing(self, slot: int) -> memoryview:
        return memoryview(self._np[slot])

    def _read(self, slot: int) -> bytes:
        return self.slab[slot].numpy().tobytes()

    def _write(self, slot: int, data: object) -> None:
        dst = self.slab[slot]
        if isinstance(data, bytes | bytearray | memoryview):  # numpy: no thread-pool wake-up
            self._np[slot] = np.frombuffer(data, np.uint8)
        elif isinstance(data, torch.Tensor):
            # Synchronous: the slot may be read by the CPU (disk writes) right after.
            dst.copy_(data.reshape(-1).view(torch.uint8))
        else:
            raise TypeError(f"a host block is bytes or a tensor, not {type(data).__name__}")

    def _copy_to(self, slot: int, dst: object) -> None:
        assert isinstance(dst, torch.Tensor)
        dst.reshape(-1).view(torch.uint8).copy_(self.slab[slot], non_blocking=self.is_pinned)

    def check_integrity(self) -> None:
        assert self.slab.shape[0] == self.index.num_slots
        super().check_integrity()
