"""Reads that land in place: a source writes a block straight into the host slot the store
reserved for it. The slot is indexed only when the read succeeds, is freed when it fails,
and is never reused while an abandoned read may still write into it."""

from __future__ import annotations

import os
from concurrent.futures import Future

import pytest
import torch

from kvmesh.config import TierConfig
from kvmesh.hashing import BlockKey
from kvmesh.kvstore import store as store_module
from kvmesh.kvstore.host import HostTier
from kvmesh.kvstore.index import TierIndex
from kvmesh.kvstore.store import TieredStore
from kvmesh.kvstore.virtual import VirtualSource

BLOCK = 4096


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


class InPlaceSource(VirtualSource):
    """Holds `blocks`; each read waits until the test finishes it with `land`, `hand`
    (other bytes: copied in) or `lose`."""

    def __init__(self, blocks: dict[BlockKey, bytes], clock: Clock):
        super().__init__("peer", blocks, clock.now)
        self.lands_in_place = True
        self.blocks = blocks
        self.pending: dict[BlockKey, tuple[Future, object]] = {}

    def read_into(self, key: BlockKey, into: object) -> Future:  # type: ignore[override]
        fut: Future = Future()
        self.pending[key] = (fut, into)
        return fut

    def land(self, key: BlockKey) -> None:
        fut, into = self.pending.pop(key)
        assert isinstance(into, memoryview) and len(into) == BLOCK and not into.readonly
        into[:] = self.blocks[key]
        fut.set_result(into)

    def hand(self, key: BlockKey) -> None:
        fut, _ = self.pending.pop(key)
        fut.set_result(self.blocks[key])

    def lose(self, key: BlockKey) -> None:
        fut, _ = self.pending.pop(key)
        fut.set_result(None)


def _address(view: memoryview) -> int:
    import numpy as np

    return np.frombuffer(view, np.uint8).ctypes.data


def _setup(num_slots: int = 8, num_blocks: int = 6):
    clock = Clock()
    keys = [BlockKey(os.urandom(16)) for _ in range(num_blocks)]
    blocks = {k: os.urandom(BLOCK) for k in keys}
    source = InPlaceSource(blocks, clock)
    host = HostTier(num_slots * BLOCK, BLOCK)
    store = TieredStore(TierConfig(host_bytes=num_slots * BLOCK), host, [source], 4,
                        clock.now)
    return store, host, source, keys, blocks, clock


def test_a_block_written_in_place_is_indexed_without_a_copy():
    store, host, source, keys, blocks, _ = _setup()
    match = store.lookup(keys[:3])
    assert match.origins == ("peer",) * 3 and match.num_started == 3
    assert host.num_lent == 3 and len(host.list_keys()) == 0  # reserved, not yet held
    store.check_integrity()
    lent = {host._np[slot].ctypes.data for slot in host.index._lent}
    addresses = set()
    for key in keys[:3]:
        into = source.pending[key][1]
        assert isinstance(into, memoryview)
        addresses.add(_address(into))
        source.land(key)
    assert addresses == lent and len(lent) == 3  # each block has a reserved slab row
    store.poll()
    assert host.num_lent == 0
    assert [host.payload(k) for k in keys[:3]] == [blocks[k] for k in keys[:3]]
    assert store.lookup(keys[:3], fetch=False).num_ready == 3
    store.check_integrity()


def test_other_bytes_are_copied_in_and_a_lost_read_frees_its_slot():
    store, host, source, keys, blocks, _ = _setup()
    store.lookup(keys[:3])
    source.hand(keys[0])
    source.lose(keys[1])
    source.land(keys[2])
    store.poll()
    assert host.payload(keys[0]) == blocks[keys[0]]
    assert keys[1] not in host and host.payload(keys[2]) == blocks[keys[2]]
    assert host.num_lent == 0 and host.index.num_slots - len(host.list_keys()) == 6
    store.check_integrity()
    # the lost block is not asked of that source again: the prefix now stops before it
    assert store.lookup(keys[:3]).origins == ("host",)


def test_an_abandoned_read_keeps_its_slot_until_it_ends():
    store, host, source, keys, blocks, clock = _setup(num_slots=4)
    store.lookup(keys[:2])
    source.land(keys[0])
    clock.t += store_module.READ_CAP_S + 1  # keys[1] is given up on, still pending
    store.poll()
    assert keys[1] not in host and host.num_lent == 1  # its source may still write there
    store.check_integrity()
    # The lent slot is not handed out: three free slots for four reads.
    others = [BlockKey(os.urandom(16)) for _ in range(4)]
    source.blocks.update({k: os.urandom(BLOCK) for k in others})
    for k in others:
        source.keys.add(k)
    match = store.lookup(others)
    assert match.num_started == 2  # one slot holds keys[0] (staged), one is lent
    assert host.num_lent == 3
    source.land(keys[1])  # the late write lands in its own (abandoned) slot: not indexed
    store.poll()
    assert keys[1] not in host and host.num_lent == 2
    store.check_integrity()
    for k in others[:2]:
        source.land(k)
    store.poll()
    assert host.num_lent == 0 and all(host.payload(k) == source.blocks[k] for k in others[:2])
    store.check_integrity()


def test_a_read_never_evicts_the_head_it_follows():
    """Admission lookup (the head is not held: the caller pins it right after). A full host
    tier holds the head (keys 0, 1) and an unrelated block; keys 2, 3 are on a peer. The
    read of key 2 takes the unrelated block's slot; key 3 finds no slot (the head stays) and
    is recomputed."""
    store, host, source, keys, blocks, _ = _setup(num_slots=3, num_blocks=4)
    for key in keys[:2]:
        source.keys.discard(key)
        store.offload(key, blocks[key])
    store.offload(BlockKey(os.urandom(16)), os.urandom(BLOCK))  # the most recently used
    match = store.lookup(keys, hold_head=False)
    assert match.origins == ("host", "host", "peer") and match.num_ready == 2
    assert match.num_started == 1 and host.num_lent == 1 and host.num_pinned == 0
    assert all(key in host for key in keys[:2])
    store.check_integrity()
    store.pin(keys[:2])  # what the KV cache manager does with the head
    dst = bytearray(BLOCK)
    for key in keys[:2]:
        assert store.load(key, torch.frombuffer(dst, dtype=torch.uint8))
        assert bytes(dst) == blocks[key]
    source.land(keys[2])
    store.poll()
    assert host.payload(keys[2]) == blocks[keys[2]] and host.num_lent == 0
    store.check_integrity()


def test_a_read_never_evicts_a_host_block_that_follows_it():
    """Key 0 is on a peer, key 1 in a full host tier as its least recently used block. The
    read of key 0 takes another slot, never key 1's: key 1 stays, staged behind the read."""
    store, host, source, keys, blocks, _ = _setup(num_slots=3, num_blocks=2)
    source.keys.discard(keys[1])
    store.offload(keys[1], blocks[keys[1]])  # the least recently used: the first victim
    for _ in range(2):
        store.offload(BlockKey(os.urandom(16)), os.urandom(BLOCK))
    match = store.lookup(keys, hold_head=False)
    assert match.origins == ("peer", "host") and match.num_started == 1
    assert keys[1] in host and host.num_lent == 1
    assert host.num_pinned == 1  # key 1, staged until the read of key 0 lands
    source.land(keys[0])
    store.poll()
    assert host.payload(keys[0]) == blocks[keys[0]]
    assert host.payload(keys[1]) == blocks[keys[1]]
    store.check_integrity()


def test_a_block_stored_meanwhile_keeps_its_copy_and_frees_the_slot():
    store, host, source, keys, blocks, _ = _setup()
    store.lookup(keys[:1])
    store.offload(keys[0], blocks[keys[0]])  # computed locally while the read was in flight
    source.land(keys[0])
    store.poll()
    assert host.num_lent == 0 and host.payload(keys[0]) == blocks[keys[0]]
    assert len(host.list_keys()) == 1
    assert store.lookup(keys[:1], fetch=False).num_ready == 1
    store.check_integrity()


def test_index_reserve_commit_release():
    index = TierIndex("host", 2, 1)
    a, b, c = (BlockKey(bytes([i]) * 16) for i in range(3))
    s1, evicted = index.reserve()
    assert s1 is not None and evicted is None and index.num_lent == 1 and len(index) == 0
    index.insert(b)
    s2, evicted = index.reserve()  # no free slot: b is evicted for it
    assert evicted == (b, s2) and b not in index and index.num_lent == 2
    assert index.reserve() == (None, None)  # everything is lent
    index.check_integrity()
    assert index.commit(a, s1) and index.slot(a) == s1 and index.num_lent == 1
    index.insert(c)  # evicts a, the only held key
    assert index.commit(c, s2) is False  # c was stored meanwhile: the lent slot is freed
    assert index.num_lent == 0 and index.slot(c) == s1
    index.check_integrity()
    with pytest.raises(KeyError):
        index.release(s2)  # not lent
