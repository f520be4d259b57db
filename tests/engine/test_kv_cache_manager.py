from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.engine.block_pool import BlockPool
from kvmesh.engine.kv_cache_manager import KVCacheManager, PrefixPlan
from tests.builders import make_request


def test_prefix_hit_leaves_last_token_and_publishes_full_blocks():
    kv = KVCacheManager(BlockPool(16), block_size=4)
    a = make_request("a", 10)
    assert kv.find_cached_prefix(a) == []
    assert kv.allocate(a, 10)
    assert kv.block_table("a") == [0, 1, 2]
    a.num_computed_tokens = 10
    kv.cache_blocks(a)
    b = make_request("b", 10)  # same tokens
    hits = kv.find_cached_prefix(b)
    assert hits == [0, 1]  # 2 full blocks = 8 tokens; never all 10
    assert kv.allocate(b, 2, PrefixPlan(hits, []))
    assert kv.block_table("b")[:2] == [0, 1] and kv.pool.ref_counts[:3] == [2, 2, 1]
    kv.check_integrity()
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_free_blocks == 16
    kv.check_integrity()


def test_allocate_is_all_or_nothing():
    kv = KVCacheManager(BlockPool(3), block_size=4)
    a = make_request("a", 8)
    assert kv.allocate(a, 8)
    big = make_request("b", 12, base=100)
    assert not kv.allocate(big, 12)
    assert kv.block_table("b") == [] and kv.pool.num_free_blocks == 1
    kv.check_integrity()


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(BlockPool(8), block_size=4, enable_prefix_caching=False)
    a = make_request("a", 9)
    kv.allocate(a, 9)
    a.num_computed_tokens = 9
    kv.cache_blocks(a)
    assert kv.find_cached_prefix(make_request("b", 9)) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 3), st.booleans()), max_size=25))
def test_random_requests_keep_integrity(spec):
    kv = KVCacheManager(BlockPool(12), block_size=4)
    live = []
    for i, (n, base, finish) in enumerate(spec):
        req = make_request(f"r{i}", n, base=base * 7)
        hits = kv.find_cached_prefix(req)
        if kv.allocate(req, n - len(hits) * 4, PrefixPlan(hits, [])):
            req.num_computed_tokens = n
            kv.cache_blocks(req)
            live.append(req)
        kv.check_integrity()
        if finish and live:
            kv.free(live.pop(0))
            kv.check_integrity()
