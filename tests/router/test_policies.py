"""Routing policies, the cost function and the indexes: pure, no sockets, exact choices."""

from __future__ import annotations

import pytest

from kvmesh.engine.kv_events import BlocksRemoved, BlocksStored, KVEventBatch, KVSnapshot
from kvmesh.router.index import CHUNK_CHARS, KVIndex, PrefixIndex, text_chunk_hashes
from kvmesh.router.policies import (
    InstanceLoad,
    RouteRequest,
    RouterState,
    RouteWeights,
    cheapest,
    make_route_policy,
)


def _loads(*queues: int) -> list[InstanceLoad]:
    return [InstanceLoad(q, 0, 0.1, instance=i) for i, q in enumerate(queues)]


def test_round_robin_least_load_and_unknown_name():
    loads = [InstanceLoad(3, 1, 0.5, 0), InstanceLoad(1, 0, 0.9, 1), InstanceLoad(1, 0, 0.2, 2)]
    req = RouteRequest("s1", [1, 2, 3])
    rr = make_route_policy("round_robin")
    assert [rr.choose(req, loads) for _ in range(4)] == [0, 1, 2, 0]
    assert make_route_policy("least_load").choose(req, loads) == 2  # kv usage breaks the tie
    in_flight = [InstanceLoad(0, 0, 0.0, 0, num_in_flight=3), InstanceLoad(1, 1, 0.0, 1)]
    assert make_route_policy("least_load").choose(req, in_flight) == 1  # 3 vs 2
    assert InstanceLoad(1, 2, 0.0, num_in_flight=3).load == 6
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_route_policy("kv-magic")


def test_cost_trades_saved_prefill_against_queue():
    w = RouteWeights(load_cost_tokens=100)
    loads = _loads(0, 3)
    # 1000-token prompt; instance 1 holds 800 of it but has 3 requests queued:
    # cost0 = 1000, cost1 = 200 + 300 = 500 -> 1
    assert cheapest(1000, [0, 800], loads, w) == 1
    # with 9 queued: cost1 = 200 + 900 = 1100 > 1000 -> 0
    assert cheapest(1000, [0, 800], _loads(0, 9), w) == 0
    # weight 0 always follows the cache; equal costs go to the lower load, then position
    assert cheapest(1000, [0, 800], _loads(0, 50), RouteWeights(load_cost_tokens=0)) == 1
    assert cheapest(100, [0, 0], _loads(2, 1), RouteWeights(load_cost_tokens=0)) == 1
    with pytest.raises(ValueError):
        RouteWeights(load_cost_tokens=-1)


def test_default_request_cost_follows_how_exact_the_hits_are():
    w = RouteWeights()
    assert w.load_cost(exact_hits=True) == 256 and w.load_cost(exact_hits=False) == 512
    assert RouteWeights(load_cost_tokens=300).load_cost(exact_hits=False) == 300
    # 1000-token prompt, 800 held by instance 0, which has 2 requests in flight:
    # exact (kv): 200 + 2*256 = 712 < 1000 -> 0; guessed (prefix): 200 + 1024 > 1000 -> 1
    loads = _loads(2, 0)
    assert cheapest(1000, [800, 0], loads, w) == 0
    assert cheapest(1000, [800, 0], loads, w, exact_hits=False) == 1


def test_prefix_guesses_hits_with_its_own_request_cost_and_says_what_it_guessed():
    state = RouterState()
    prefix = make_route_policy("prefix", state)
    text = "x" * (CHUNK_CHARS * 8)  # 8 chunks: 128 tokens at 4 characters a token
    req = RouteRequest(None, (), 200, text_hashes=text_chunk_hashes(text))
    assert prefix.choose(req, _loads(0, 0)) == 0 and prefix.last_hit_tokens == 0
    # instance 0 is believed to hold 128 of 200 tokens; one request in flight there:
    # 72 + 512 = 584 > 200 -> 1 (kv's 256 would keep it: 72 + 256 = 328, still > 200)
    busy = [InstanceLoad(0, 0, 0.1, 0, num_in_flight=1), InstanceLoad(0, 0, 0.1, 1)]
    assert prefix.choose(req, busy) == 1 and prefix.last_hit_tokens == 0
    long_req = RouteRequest(None, (), 1000, text_hashes=text_chunk_hashes(text))
    # 1000 tokens, 128 held by both now: instance 1 costs 872, instance 0 872 + 512
    assert prefix.choose(long_req, busy) == 1 and prefix.last_hit_tokens == 128


def test_cost_counts_the_prefill_queued_ahead():
    w = RouteWeights(load_cost_tokens=0, queue_weight=1)
    busy = [InstanceLoad(0, 1, 0.1, 0, num_prefill_tokens=900), InstanceLoad(0, 1, 0.1, 1)]
    # instance 0 holds 800 of 1000 tokens but 900 prefill tokens wait there:
    # cost0 = 200 + 900 = 1100, cost1 = 1000 -> 1
    assert cheapest(1000, [800, 0], busy, w) == 1
    # 700 waiting: cost0 = 900 < 1000 -> 0; weight 0 ignores the queue
    short = [InstanceLoad(0, 1, 0.1, 0, num_prefill_tokens=700), busy[1]]
    assert cheapest(1000, [800, 0], short, w) == 0
    assert cheapest(1000, [800, 0], busy, RouteWeights(load_cost_tokens=0, queue_weight=0)) == 0
    # half weight: 200 + 450 = 650 < 1000 -> 0
    assert cheapest(1000, [800, 0], busy, RouteWeights(0, queue_weight=0.5)) == 0
    with pytest.raises(ValueError):
        RouteWeights(queue_weight=-0.1)


def _batch(iid: str, seq: int, *events) -> KVEventBatch:
    return KVEventBatch(iid, seq, 0.0, list(events))


def test_kv_index_sequences_gaps_and_incarnations():
    idx = KVIndex()
    a, b, c = b"a" * 16, b"b" * 16, b"c" * 16
    assert idx.needs_snapshot(0)
    assert not idx.apply(0, _batch("x", 3, BlocksStored("device", [a])))  # held, not synced
    assert idx.match(0, [a]) == 0
    # the snapshot at seq 2 plus the held batch 3
    assert not idx.reset(0, KVSnapshot("x", 2, {"host": [b]}))
    assert idx.match(0, [a, c, b]) == 1 and idx.match(0, [b, a, c]) == 2
    assert not idx.apply(0, _batch("x", 4, BlocksRemoved("device", [a])))
    assert idx.match(0, [b, a]) == 1
    assert not idx.apply(0, _batch("x", 4, BlocksStored("device", [c])))  # duplicate: ignored
    assert idx.match(0, [c]) == 0
    assert idx.apply(0, _batch("x", 6, BlocksStored("device", [c])))  # gap: resync
    assert idx.match(0, [b]) == 0 and idx.num_resyncs == 1
    assert not idx.reset(0, KVSnapshot("x", 5, {"device": [a]}))
    assert idx.match(0, [a, c]) == 2  # snapshot 5, then the held batch 6
    assert idx.apply(0, _batch("y", 1, BlocksStored("device", [b])))  # restarted instance
    assert idx.match(0, [a]) == 0
    idx.check_integrity()


def test_kv_policy_follows_exact_keys():
    state = RouterState(weights=RouteWeights(load_cost_tokens=10))
    keys = [bytes([i]) * 16 for i in range(8)]
    for i in range(3):
        state.kv.reset(i, KVSnapshot(f"i{i}", 0, {}))
    state.kv.apply(2, _batch("i2", 1, BlocksStored("device", keys[:6])))
    state.kv.apply(1, _batch("i1", 1, BlocksStored("host", keys[:2])))
    kv = make_route_policy("kv", state)
    req = RouteRequest(None, num_prompt_tokens=128, block_keys=keys, block_size=16)
    assert kv.choose(req, _loads(0, 0, 1)) == 2  # 96 hit tokens beat 10 tokens of queue
    assert kv.choose(req, _loads(0, 0, 9)) == 1  # 32 hit, idle: 96 vs 48+90


def test_prefix_policy_records_what_it_routed():
    state = RouterState(weights=RouteWeights(load_cost_tokens=10))
    prefix = make_route_policy("prefix", state)
    doc = "x" * (CHUNK_CHARS * 20)
    req = RouteRequest(None, num_prompt_tokens=len(doc) // 4, text_hashes=text_chunk_hashes(doc))
    first = prefix.choose(req, _loads(1, 0, 1))
    assert first == 1  # cold: least cost is the idle one
    assert prefix.choose(req, _loads(1, 2, 1)) == 1  # warm there now, despite its queue
    other = RouteRequest(None, 320, text_hashes=text_chunk_hashes("y" * CHUNK_CHARS * 20))
    assert prefix.choose(other, _loads(1, 2, 0)) == 2
    state.prefix.forget(1)
    assert prefix.choose(req, _loads(1, 2, 1)) == 0


def test_prefix_index_is_bounded_and_chained():
    idx = PrefixIndex(capacity_chunks=4)
    h = text_chunk_hashes("ab" * CHUNK_CHARS * 3)  # 6 chunks, all of equal text
    assert len(set(h)) == 6  # chained: equal chunks at other positions differ
    idx.insert(0, h)
    idx.check_integrity()
    assert idx.match(0, h) == 0  # the oldest two fell out: no leading match
    idx.insert(0, h[:2])
    assert idx.match(0, h) == 2
    assert text_chunk_hashes("short") == []


def test_session_sticks_then_moves_off_an_overloaded_home():
    sticky = make_route_policy("session", RouterState(weights=RouteWeights(
        session_max_imbalance=2)))
    req = RouteRequest("s1")
    assert sticky.choose(req, _loads(3, 1, 2)) == 1
    assert sticky.choose(req, _loads(0, 2, 0)) == 1  # 2 above the least: stays
    assert sticky.choose(req, _loads(0, 3, 1)) == 0  # 3 above: moves, and 0 is home now
    assert sticky.choose(req, _loads(1, 0, 0)) == 0
    # home left the candidates (unhealthy): placed again among the rest
    rest = [InstanceLoad(0, 0, 0.0, 1), InstanceLoad(0, 0, 0.0, 2)]
    assert sticky.choose(req, rest) == 0 and rest[0].instance == 1
    assert sticky.choose(RouteRequest(None), _loads(2, 0, 1)) == 1


def test_session_falls_back_to_kv_once_events_arrive():
    state = RouterState(weights=RouteWeights(load_cost_tokens=10))
    sticky = make_route_policy("session", state)  # built before any instance is probed
    keys = [bytes([i]) * 16 for i in range(4)]
    req = RouteRequest("s", num_prompt_tokens=64, block_keys=keys, block_size=16)
    assert sticky.choose(RouteRequest("first"), _loads(0, 0, 0)) == 0  # least load
    state.has_kv_events = True  # a probe found a KV-event port
    state.kv.reset(2, KVSnapshot("i2", 0, {"device": keys}))
    assert sticky.choose(req, _loads(0, 0, 0)) == 2  # new session: placed by kv
    assert sticky.choose(req, _loads(0, 0, 3)) == 2  # then sticks

