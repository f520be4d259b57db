"""Device block pool: reference counts, an O(1) LRU free queue, and the prefix index.

Pure Python. A block whose reference count drops to zero goes to the tail of the free
queue but keeps its key, so a later request with the same prefix can take it back
(`touch`). `allocate` takes blocks from the head, evicting whatever key they still hold.
Every key registered or dropped is an event in the outbox (`kvmesh.engine.events`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from kvmesh.engine.events import DEVICE, BlockRemoved, BlockStored, EventOutbox
from kvmesh.hashing import BlockKey


class NoFreeBlocksError(RuntimeError):
    """Raised by `allocate` when the pool cannot supply the blocks asked for."""


class BlockPool:
    def __init__(self, num_blocks: int, outbox: EventOutbox | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._key_of: dict[int, BlockKey] = {}
        self._block_of: dict[BlockKey, int] = {}
        self.outbox = outbox
        self.num_evictions = 0
        self.high_water = 0  # blocks [0, high_water) have been handed out at least once

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live requests."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks from the free queue's head; each gets ref count 1."""
        if num_blocks > len(self._free):
            raise NoFreeBlocksError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        taken = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            self._drop_key(block_id)
            self.ref_counts[block_id] = 1
            taken.append(block_id)
            if block_id >= self.high_water:
                self.high_water = block_id + 1
        return taken

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; unreferenced blocks join the free tail.

        Callers pass a sequence's blocks tail first, so its last blocks are evicted first.
        """
        for block_id in block_ids:
            count = self.ref_counts[block_id]
            if count <= 0:
                raise ValueError(f"block {block_id} freed more often than referenced")
            self.ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each block, taking it off the free queue if it was there."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._free[block_id]
            self.ref_counts[block_id] += 1

    def lookup(self, key: BlockKey) -> int | None:
        return self._block_of.get(key)

    def cache(self, block_id: int, key: BlockKey) -> bool:
        """Register a full, immutable block under `key`. False if the key is already held."""
        if key in self._block_of or block_id in self._key_of:
            return False
        self._block_of[key] = block_id
        self._key_of[block_id] = key
        if self.outbox is not None:
            self.outbox.append(BlockStored(DEVICE, key, block_id))
        return True

    def cached_blocks(self) -> list[tuple[int, BlockKey]]:
        """Every (block id, key) in the prefix index, oldest registration first."""
        return list(self._key_of.items())

    def evict(self, block_id: int) -> bool:
        """Forget an unreferenced block's key now. False if it is in use or holds none."""
        if self.ref_counts[block_id] or block_id not in self._key_of:
            return False
        self._drop_key(block_id)
        return True

    def evict_all(self) -> int:
        """Forget every unreferenced cached block (reset the prefix cache)."""
        victims = [b for b in self._key_of if self.ref_counts[b] == 0]
        for block_id in victims:
            self._drop_key(block_id)
        return len(victims)

    def _drop_key(self, block_id: int) -> None:
        key = self._key_of.pop(block_id, None)
        if key is not None:
            del self._block_of[key]
            self.num_evictions += 1
            if self.outbox is not None:
                self.outbox.append(BlockRemoved(DEVICE, key, block_id))

    def check_integrity(self) -> None:
        assert len(self.ref_counts) == self.num_blocks
        for block_id, count in enumerate(self.ref_counts):
            assert count >= 0, f"block {block_id} has negative ref count"
            assert (count == 0) == (block_id in self._free), f"block {block_id} free-queue mismatch"
        assert len(self._key_of) == len(self._block_of)
        for key, block_id in self._block_of.items():
            assert self._key_of.get(block_id) == key, f"index mismatch for block {block_id}"
