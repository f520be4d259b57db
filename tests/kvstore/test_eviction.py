from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.hashing import BlockKey
from kvmesh.kvstore.eviction import POLICIES, make_eviction_policy


def k(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def test_lru_order_and_pins():
    p = make_eviction_policy("lru", 100)
    for i in range(3):
        p.insert(k(i), 10)
    p.touch(k(0))
    assert p.evict_one(pinned={k(1)}) == k(2)
    assert p.evict_one() == k(1)
    assert p.evict_one() == k(0)
    assert p.evict_one() is None


def test_s3fifo_keeps_reused_keys_over_one_hit_wonders():
    p = make_eviction_policy("s3fifo", 100)
    p.insert(k(0), 10)
    p.touch(k(0))  # re-referenced while in the small queue
    for i in range(1, 5):
        p.insert(k(i), 10)
    victims = [p.evict_one() for _ in range(4)]
    assert k(0) not in victims
    p.check_integrity()


def test_cost_policy_evicts_cheap_blocks_first():
    p = make_eviction_policy("cost", 100)
    p.insert(k(0), 10, cost=100.0)
    p.insert(k(1), 10, cost=1.0)
    p.insert(k(2), 10, cost=50.0)
    assert p.evict_one() == k(1)
    assert p.evict_one(pinned={k(2)}) == k(0)
    p.check_integrity()


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="lru"):
        make_eviction_policy("mru", 10)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(POLICIES)),
       st.lists(st.tuples(st.sampled_from(["insert", "touch", "remove", "evict"]),
                          st.integers(0, 12), st.integers(1, 5)), max_size=80))
def test_random_operations_keep_integrity(name, ops):
    p = make_eviction_policy(name, 60)
    live: set[BlockKey] = set()
    for op, i, size in ops:
        if op == "insert":
            p.insert(k(i), size * 10, cost=float(size))
            live.add(k(i))
        elif op == "touch":
            p.touch(k(i))
        elif op == "remove":
            p.remove(k(i))
            live.discard(k(i))
        else:
            pinned = {k(i)}
            victim = p.evict_one(pinned)
            assert victim is None or (victim in live and victim not in pinned)
            if victim is None:
                assert live <= pinned
            live.discard(victim)
        p.check_integrity()
        assert all((key in p) == (key in live) for key in map(k, range(13)))
