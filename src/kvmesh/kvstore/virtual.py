"""Byte-less tiers for the simulator and for pure tests: the real index, no bytes.

`VirtualHostTier` is host memory as the store sees it (a `TierIndex` of slots; `HostTier`
is the same with a slab behind the slots, through the `_read`/`_write` hooks); a
`VirtualSource` holds a set of keys and answers a read after a fixed latency on the
injected clock. The store, the KV cache manager and the core run on them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kvmesh.engine.events import EventOutbox
from kvmesh.hashing import BlockKey
from kvmesh.kvstore.index import Evicted, TierIndex
from kvmesh.kvstore.store import SpillHook
from kvmesh.kvstore.tier import TierStats


class VirtualHostTier:
    def __init__(self, num_slots: int, block_bytes: int, policy: str = "lru",
                 outbox: EventOutbox | None = None):
        self.index = TierIndex("host", num_slots, block_bytes, policy, outbox)
        self.stats = self.index.stats
        self.on_evict: SpillHook | None = None

    @property
    def num_slots(self) -> int:
        return self.index.num_slots

    @property
    def num_pinned(self) -> int:
        return self.index.num_pinned

    @property
    def num_lent(self) -> int:
        return self.index.num_lent

    def __contains__(self, key: object) -> bool:
        return key in self.index

    def put(self, key: BlockKey, data: object = None, cost: float = 1.0) -> bool:
        """Store a block (copying it in). False if every slot is pinned."""
        if key in self.index:
            self.index.touch(key)
            return True
        slot = self._spilled(*self.index.insert(key, cost))
        if slot is None:
            return False
        self._write(slot, data)
        self.stats.bytes_in += self.index.slot_bytes
        return True

    def reserve(self) -> int | None:
        """A slot for a block that a source writes in place (through `landing(slot)`), not
        yet indexed; `commit` or `release` it. None if every slot is pinned or lent."""
        return self._spilled(*self.index.reserve())

    def landing(self, slot: int) -> object:
        """The writable bytes of a reserved slot (None here: no bytes)."""
        return None

    def commit(self, key: BlockKey, slot: int, data: object = None, cost: float = 1.0) -> bool:
        """Index `key` at its reserved `slot`, copying `data` in first unless it was written
        in place (None). False if `key` was stored meanwhile (the slot is freed)."""
        if key not in self.index and data is not None:
            self._write(slot, data)
        if not self.index.commit(key, slot, cost):
            return False
        self.stats.bytes_in += self.index.slot_bytes
        return True

    def release(self, slot: int) -> None:
        self.index.release(slot)

    def _spilled(self, slot: int | None, evicted: Evicted | None) -> int | None:
        """A slot just taken, after its evicted block's bytes were handed on."""
        if slot is None:
            self.stats.dropped_writes += 1
            return None
        if evicted is not None and self.on_evict is not None:
            self.on_evict(evicted[0], lambda: self._read(slot))  # before the slot is reused
        return slot

    def payload(self, key: BlockKey) -> bytes | None:
        """A copy of the block's bytes (for a disk write)."""
        slot = self.index.slot(key)
        if slot is None:
            return None
        self.index.touch(key)
        return self._read(slot)

    def list_keys(self) -> list[BlockKey]:
        return [key for key, _ in self.index.items()]

    def copy_out(self, key: BlockKey, dst: object) -> bool:
        """Copy the block into `dst` (a device block); False if it is not held."""
        slot = self.index.slot(key)
        if slot is None:
            return False
        self.index.touch(key)
        self._copy_to(slot, dst)
        self.stats.bytes_out += self.index.slot_bytes
        return True

    # the bytes behind the slots: none here ---------------------------------------------

    def _read(self, slot: int) -> bytes:
        return b""

    def _write(self, slot: int, data: object) -> None:
        pass

    def _copy_to(self, slot: int, dst: object) -> None:
        pass

    def pin(self, key: BlockKey) -> None:
        self.index.pin(key)

    def unpin(self, key: BlockKey) -> None:
        self.index.unpin(key)

    def check_integrity(self) -> None:
        self.index.check_integrity()


class _Timed:
    def __init__(self, clock: Callable[[], float], ready_at: float):
        self._clock = clock
        self._ready_at = ready_at

    def done(self) -> bool:
        return self._clock() >= self._ready_at

    def result(self, timeout: float | None = None) -> bytes | None:
        return b""


class VirtualSource:
    """A source holding `keys`, each read taking `latency_s` on `clock` on one of
    `num_workers` workers (reads queue behind busy ones); writable ones keep what is
    spilled to them. With `num_slots`, a `TierIndex` bounds it (the disk tier's eviction,
    without the files)."""

    def __init__(self, name: str, keys: Iterable[BlockKey], clock: Callable[[], float],
                 latency_s: float = 0.001, writable: bool = False, num_slots: int | None = None,
                 policy: str = "lru", outbox: EventOutbox | None = None, num_workers: int = 1,
                 block_bytes: int = 1):
        self.name = name
        self.writable = writable
        self.lands_in_place = False
        self.index = (TierIndex(name, num_slots, block_bytes, policy, outbox)
                      if num_slots is not None else None)
        self.stats = self.index.stats if self.index is not None else TierStats(name)
        self.keys: set[BlockKey] = set()
        self.clock = clock
        self.latency_s = latency_s
        self.block_bytes = block_bytes
        self._workers = [0.0] * max(1, num_workers)  # when each is next free
        for key in keys:
            self._admit(key)

    @property
    def is_enabled(self) -> bool:
        return True

    def __contains__(self, key: object) -> bool:
        return key in (self.index if self.index is not None else self.keys)

    def read_into(self, key: BlockKey, into: object) -> _Timed:
        return self.read(key)  # its bytes are copied in

    def read(self, key: BlockKey) -> _Timed:
        if self.index is not None:
            self.index.touch(key)
        now = self.clock()
        i = min(range(len(self._workers)), key=self._workers.__getitem__)
        ready = max(now, self._workers[i]) + self.latency_s
        self._workers[i] = ready
        self.stats.bytes_out += self.block_bytes
        return _Timed(self.clock, ready)

    def write(self, key: BlockKey, payload: bytes) -> None:
        self._admit(key)

    def _admit(self, key: BlockKey) -> None:
        if self.index is None:
            self.keys.add(key)
        elif key not in self.index:
            self.index.insert(key)
            self.stats.bytes_in += self.block_bytes

    def submit(self) -> None:
        pass

    def poll(self) -> None:
        pass

    def drain(self, timeout: float = 30.0) -> None:
        pass

    def close(self) -> None:
        pass

    def check_integrity(self) -> None:
        if self.index is not None:
            self.index.check_integrity()
