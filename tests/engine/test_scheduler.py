from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.config import SchedulerConfig
from kvmesh.engine.block_pool import BlockPool
from kvmesh.engine.kv_cache_manager import KVCacheManager
from kvmesh.engine.request import RequestStatus
from kvmesh.engine.scheduler import QueueFullError, Scheduler
from tests.builders import make_request


def make_scheduler(num_blocks=64, budget=16, max_seqs=8, policy="fcfs", max_waiting=100):
    kv = KVCacheManager(BlockPool(num_blocks), block_size=4)
    cfg = SchedulerConfig(
        max_num_seqs=max_seqs, max_num_batched_tokens=budget, policy=policy, max_waiting=max_waiting
    )
    return Scheduler(cfg, kv, max_model_len=1000)


def run_step(s: Scheduler, token: int = 7):
    out = s.schedule()
    sampled = {q.request_id: token for q in out.seqs if q.is_sampling}
    s.update_from_output(out, sampled)
    s.check_integrity()
    return out


def test_decodes_share_a_step_with_a_chunked_prefill():
    s = make_scheduler(budget=16)
    for i in range(3):
        s.add_request(make_request(f"d{i}", 4, max_tokens=50, arrival=i))
    assert s.num_prefill_tokens == 12  # three waiting prompts
    run_step(s)  # three 4-token prefills
    assert s.num_prefill_tokens == 0  # decoding only
    s.add_request(make_request("long", 100, arrival=10, base=200))
    assert s.num_prefill_tokens == 100
    out = run_step(s)
    by_id = {q.request_id: q.num_new_tokens for q in out.seqs}
    assert by_id == {"d0": 1, "d1": 1, "d2": 1, "long": 13}
    assert s.num_prefill_tokens == 87  # what the partial prefill has left
    out = run_step(s)  # the partial prefill continues, decodes go first again
    assert [q.request_id for q in out.seqs] == ["d0", "d1", "d2", "long"]
    assert out.seqs[-1].num_computed_tokens == 13 and not out.seqs[-1].is_sampling


def test_max_num_seqs_caps_running():
    s = make_scheduler(max_seqs=2, budget=100)
    for i in range(4):
        s.add_request(make_request(f"r{i}", 4, arrival=i))
    out = run_step(s)
    assert [q.request_id for q in out.seqs] == ["r0", "r1"]
    assert s.num_running == 2 and s.num_waiting == 2


def test_priority_policy_admits_urgent_first():
    s = make_scheduler(policy="priority", max_seqs=1)
    s.add_request(make_request("low", 4, priority=5, arrival=0))
    s.add_request(make_request("high", 4, priority=0, arrival=1))
    assert [q.request_id for q in run_step(s).seqs] == ["high"]


def test_preemption_picks_latest_arrival_and_everything_finishes():
    s = make_scheduler(num_blocks=6, budget=64)
    reqs = [make_request(f"r{i}", 8, max_tokens=8, arrival=i, base=i * 50) for i in range(3)]
    for r in reqs:
        s.add_request(r)
    first_preempted = None
    for _ in range(200):
        if not s.has_unfinished():
            break
        out = run_step(s)
        if out.preempted_ids and first_preempted is None:
            first_preempted = out.preempted_ids[0]
            victim = next(r for r in reqs if r.request_id == first_preempted)
            # its prompt and the tokens it made are prefilled again (no cache left for it
            # in 6 blocks: the hint is what the pool still held when it was preempted)
            assert victim.num_pending_tokens > 8
            assert s.num_prefill_tokens >= victim.num_pending_tokens - victim.num_cached_hint
    assert not s.has_unfinished()
    assert first_preempted == "r2"
    assert all(r.finish_reason == "length" and r.num_output_tokens == 8 for r in reqs)
    assert s.num_preemptions >= 1
    assert s.kv.pool.num_free_blocks == 6


def test_abort_frees_blocks_and_queue_full_refuses():
    s = make_scheduler(max_waiting=1, max_seqs=1)
    s.add_request(make_request("a", 8))
    run_step(s)
    s.add_request(make_request("b", 8))
    with pytest.raises(QueueFullError):
        s.add_request(make_request("c", 8))
    assert s.abort_request("a").finish_reason == "abort"
    assert s.abort_request("missing") is None
    assert s.kv.pool.num_free_blocks == 64
    s.check_integrity()


def test_stop_conditions():
    s = make_scheduler()
    r = make_request("r", 4, max_tokens=10)
    s.add_request(r)
    run_step(s, token=2)  # EOS
    assert r.status is RequestStatus.FINISHED and r.finish_reason == "stop" and r.stop_reason == 2


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 3)),
        min_size=1,
        max_size=12,
    ),
    st.integers(4, 24),
    st.sampled_from(["fcfs", "priority"]),
)
def test_random_workloads_finish_with_integrity(spec, num_blocks, policy):
    s = make_scheduler(num_blocks=num_blocks, budget=12, max_seqs=4, policy=policy)
    reqs = []
    for i, (n, out, prio) in enumerate(spec):
        if n + out > num_blocks * 4:
            continue  # could never fit, even alone
        reqs.append(make_request(f"r{i}", n, max_tokens=out, priority=prio, arrival=i, base=i))
        s.add_request(reqs[-1])
    for _ in range(2000):
        if not s.has_unfinished():
            break
        run_step(s, token=9)
    assert not s.has_unfinished()
    assert all(r.num_output_tokens == r.params.max_tokens for r in reqs)
    assert s.kv.pool.num_free_blocks == num_blocks
