from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.engine.block_pool import BlockPool, NoFreeBlocksError
from kvmesh.engine.events import BlockRemoved, BlockStored, EventOutbox
from kvmesh.hashing import BlockKey


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def test_freed_cached_blocks_are_reused_until_reallocated():
    pool = BlockPool(4)
    a = pool.allocate(2)
    assert a == [0, 1]
    pool.cache(a[0], key(1))
    pool.free(reversed(a))
    assert pool.num_free_blocks == 4 and pool.lookup(key(1)) == 0
    pool.touch([0])  # revive the cached block
    assert pool.ref_counts[0] == 1 and pool.num_free_blocks == 3
    # LRU order: 2, 3 were never used, then 1 (freed first, as the tail), then...
    assert pool.allocate(3) == [2, 3, 1]
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    pool.free([0])
    assert pool.allocate(1) == [0]
    assert pool.lookup(key(1)) is None  # reallocation evicted the key
    pool.check_integrity()


def test_double_free_is_an_error():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(ValueError, match="freed more often"):
        pool.free([b])


def test_outbox_sees_every_registered_and_dropped_key_in_order():
    outbox = EventOutbox()
    seen: list = []
    outbox.subscribe(seen.extend)
    pool = BlockPool(2, outbox)
    (b,) = pool.allocate(1)
    pool.cache(b, key(7))
    assert not pool.evict(b)  # still referenced
    pool.free([b])
    assert pool.evict(b)
    assert seen == [] and outbox.drain() == 2
    assert seen == [BlockStored("device", key(7), b), BlockRemoved("device", key(7), b)]


ops = st.lists(
    st.tuples(
        st.sampled_from(["alloc", "free", "touch", "cache", "evict", "evict_all"]),
        st.integers(0, 7),
        st.integers(0, 5),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_random_operations_keep_integrity(sequence):
    pool = BlockPool(8)
    held: list[int] = []  # one entry per reference we own
    for op, a, b in sequence:
        if op == "alloc":
            n = b % 4
            if n <= pool.num_free_blocks:
                held += pool.allocate(n)
            else:
                with pytest.raises(NoFreeBlocksError):
                    pool.allocate(n)
        elif op == "free" and held:
            pool.free([held.pop(a % len(held))])
        elif op == "touch":
            block = pool.lookup(key(b))
            if block is not None:
                pool.touch([block])
                held.append(block)
        elif op == "cache" and held:
            pool.cache(held[a % len(held)], key(b))
        elif op == "evict":
            pool.evict(a)
        elif op == "evict_all":
            pool.evict_all()
        pool.check_integrity()
        assert sorted(held) == sorted(i for i, n in enumerate(pool.ref_counts) for _ in range(n))
