"""edf, fair, admission control and preemption by cost: pure scheduler tests, exact choices."""

from __future__ import annotations

import math

import pytest

from kvmesh.config import SchedulerConfig
from kvmesh.engine.admission import PrefillRate, QueueFullError, check_slo
from kvmesh.engine.block_pool import BlockPool
from kvmesh.engine.kv_cache_manager import KVCacheManager
from kvmesh.engine.scheduler import Scheduler
from kvmesh.types import TenantClass
from tests.builders import make_request

CHAT = TenantClass("chat", ttft_slo_s=1.0)
BATCH = TenantClass("batch")


def _sched(policy: str, num_blocks: int = 256, budget: int = 64, max_seqs: int = 1,
           admission: bool = True) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks), block_size=4)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, policy=policy,
                          admission_control=admission, default_ttft_slo_s=60.0,
                          slo_step_fraction=0.25)
    return Scheduler(cfg, kv, max_model_len=4000)


_BASES: dict[str, int] = {}


def _base(rid: str) -> int:
    """A distinct first token per request id, the same in every process (`hash` of a str
    is salted per process, and two ids that met mod 400 shared a cached prefix block and
    changed the order a test expects, now and then)."""
    return _BASES.setdefault(rid, len(_BASES) * 7 % 500)


def _req(rid: str, n: int, tenant: TenantClass | None, arrival: float, max_tokens: int = 4):
    r = make_request(rid, n, max_tokens=max_tokens, arrival=arrival, base=_base(rid))
    r.tenant = tenant
    return r


def _drain(s: Scheduler, limit: int = 500) -> list[str]:
    """Request ids in the order they first ran."""
    order: list[str] = []
    for _ in range(limit):
        if not s.has_unfinished():
            break
        out = s.schedule()
        for q in out.seqs:
            if q.request_id not in order:
                order.append(q.request_id)
        s.update_from_output(out, {q.request_id: 7 for q in out.seqs if q.is_sampling})
        s.check_integrity()
    assert not s.has_unfinished()
    return order


def test_edf_runs_the_earliest_deadline_and_ages_work_without_slo():
    s = _sched("edf")
    s.add_request(_req("b0", 8, BATCH, arrival=0.0))  # deadline 60
    s.add_request(_req("c0", 8, CHAT, arrival=5.0))  # deadline 6
    s.add_request(_req("c1", 8, CHAT, arrival=3.0))  # deadline 4
    s.add_request(_req("b1", 8, BATCH, arrival=-58.0))  # deadline 2: it waited long enough
    assert _drain(s) == ["b1", "c1", "c0", "b0"]


def test_fair_shares_tokens_across_tenants_despite_a_burst():
    s = _sched("fair", max_seqs=1)
    for i in range(4):
        s.add_request(_req(f"a{i}", 16, TenantClass("a"), arrival=i))
    s.add_request(_req("b0", 16, TenantClass("b"), arrival=10))
    s.add_request(_req("b1", 16, TenantClass("b"), arrival=11))
    # fcfs would run a0..a3 first; fair alternates once a has been served
    assert _drain(s) == ["a0", "b0", "a1", "b1", "a2", "a3"]


def test_fair_weights_and_no_banked_credit():
    s = _sched("fair", max_seqs=1)
    heavy = TenantClass("heavy", weight=3.0)
    for i in range(6):
        s.add_request(_req(f"h{i}", 16, heavy, arrival=i))
    s.add_request(_req("l0", 16, TenantClass("light"), arrival=10))
    s.add_request(_req("l1", 16, TenantClass("light"), arrival=11))
    order = _drain(s)
    # weight 3 gets about three requests per light one
    assert order.index("l0") < order.index("h3") and order.index("l1") > order.index("h2")
    # a tenant idle while another used 400 tokens starts just below it, not 400 behind
    s2 = _sched("fair", max_seqs=1)
    s2.add_request(_req("x0", 16, TenantClass("x"), arrival=0, max_tokens=380))
    _drain(s2)
    for i in range(3):
        s2.add_request(_req(f"x{i + 1}", 16, TenantClass("x"), arrival=1 + i))
    s2.add_request(_req("late", 16, TenantClass("y"), arrival=9))
    assert _drain(s2).index("late") == 0


def test_prefill_rate_and_slo_check():
    rate = PrefillRate()
    check_slo(10_000, 100, 0.5, rate)  # nothing measured yet: admitted
    rate.observe(1000, 0.5)
    rate.observe(0, 0.1)  # a pure decode step says nothing about prefill
    assert rate.tokens_per_s == pytest.approx(2000.0)
    check_slo(900, 100, 0.5, rate)  # (900 + 100) / 2000 = 0.5 s: just in time
    with pytest.raises(QueueFullError, match="exceeds the tenant's TTFT SLO") as err:
        check_slo(3900, 100, 0.5, rate)  # 2 s predicted: 1.5 s late -> retry after 2 s
    assert err.value.retry_after_s == 2
    check_slo(0, 100_000, 0.5, rate)  # nothing ahead: waiting would not help, admitted
    check_slo(10_000, 100, None, rate)  # no SLO: admitted


def test_scheduler_refuses_what_its_queue_would_make_late():
    s = _sched("edf", budget=64, max_seqs=1)
    s.budget.rate.observe(100, 1.0)  # 100 prefill tokens/s
    s.add_request(_req("b0", 80, BATCH, arrival=0.0))
    s.add_request(_req("c0", 40, CHAT, arrival=0.1))  # 40 ahead of nothing edf-wise: ok
    assert s.num_prefill_tokens_ahead(_req("probe", 4, CHAT, arrival=0.2)) == 40
    with pytest.raises(QueueFullError) as err:
        s.add_request(_req("c1", 80, CHAT, arrival=0.2))  # (40 + 80) / 100 > 1 s
    assert err.value.retry_after_s == 1
    s.add_request(_req("b1", 80, BATCH, arrival=0.3))  # no SLO: queued
    assert "c1" not in s.requests and s.num_waiting == 3
    off = _sched("edf", admission=False)
    off.budget.rate.observe(100, 1.0)
    off.add_request(_req("b0", 800, CHAT, arrival=0.0))
    off.add_request(_req("c1", 800, CHAT, arrival=0.1))  # admission off: queued
    assert off.num_waiting == 2


def test_preemption_takes_the_cheapest_to_bring_back():
    # 10 blocks of 4 tokens. When the pool runs dry, "late" (arrived last) has about 28
    # tokens computed and "early" about 7: ranking by arrival would preempt "late"; by
    # cost, "early" goes back to the queue.
    s = _sched("fcfs", num_blocks=10, budget=64, max_seqs=4)
    early = _req("early", 3, None, arrival=0.0, max_tokens=12)
    late = _req("late", 24, None, arrival=1.0, max_tokens=12)
    s.add_request(early)
    s.add_request(late)
    victims = []
    for _ in range(400):
        if not s.has_unfinished():
            break
        out = s.schedule()
        victims += out.preempted_ids
        s.update_from_output(out, {q.request_id: 7 for q in out.seqs if q.is_sampling})
        s.check_integrity()
    assert victims[0] == "early"
    assert early.num_output_tokens == late.num_output_tokens == 12
    assert s.restore_cost_tokens(_req("x", 4, None, 0.0)) == 0.0


def test_restore_cost_counts_partial_blocks_and_host_loads():
    s = _sched("fcfs")
    r = _req("r", 23, None, arrival=0.0)
    r.num_computed_tokens = 22  # 5 full blocks of 4, 2 tokens in a partial one
    assert s.restore_cost_tokens(r) == 22.0  # no host tier: everything is recomputed
    s.kv.external = object()  # type: ignore[assignment]  # a host tier exists
    assert s.restore_cost_tokens(r) == pytest.approx(2 + 20 * 0.1)


@pytest.mark.parametrize("policy", ["edf", "priority", "fcfs"])
def test_an_urgent_arrival_goes_before_a_running_partial_prefill(policy):
    s = _sched(policy, budget=32, max_seqs=4)
    long = _req("long", 200, BATCH, arrival=0.0)
    long.priority = 5
    s.add_request(long)
    out = s.schedule()  # the first 32-token chunk
    s.update_from_output(out, {})
    urgent = _req("urgent", 24, CHAT, arrival=1.0)
    s.add_request(urgent)
    out = s.schedule()
    first = [(q.request_id, q.num_new_tokens) for q in out.seqs]
    if policy == "fcfs":  # arrival order: the running prefill keeps its chunk
        assert first == [("long", 32)]
    else:  # the urgent request's whole prompt, then what budget is left
        assert first == [("urgent", 24), ("long", 8)]
    s.check_integrity()


def _step(s: Scheduler) -> list[tuple[str, int]]:
    out = s.schedule()
    s.update_from_output(out, {q.request_id: 7 for q in out.seqs if q.is_sampling})
    s.check_integrity()
    return [(q.request_id, q.num_new_tokens) for q in out.seqs]


def test_prefill_cap_follows_the_tightest_slo_and_never_holds_back_decodes():
    s = _sched("edf", num_blocks=1024, budget=512, max_seqs=8)
    s.budget.rate.observe(1600, 1.0)  # 1600 prefill tokens/s
    s.add_request(_req("b0", 12, BATCH, arrival=0.0, max_tokens=50))
    assert s.prefill_cap() == 512  # no tenant with a TTFT SLO yet: the whole budget
    assert _step(s) == [("b0", 12)]
    s.add_request(_req("c0", 100, CHAT, arrival=0.1, max_tokens=50))  # SLO 1 s
    assert s.prefill_cap() == 400  # 1600 tok/s x 1 s x 0.25
    s.add_request(_req("c1", 100, TenantClass("tight", ttft_slo_s=0.4), arrival=0.2,
                       max_tokens=50))
    assert s.prefill_cap() == 160  # the tightest SLO counts: 1600 x 0.4 x 0.25
    s.add_request(_req("long", 2000, BATCH, arrival=0.3))
    # b0 decodes (uncapped); then 160 prefill tokens: c1 (deadline 0.6) before c0 (1.1)
    assert _step(s) == [("b0", 1), ("c1", 100), ("c0", 60)]
    assert sorted(_step(s)) == [("b0", 1), ("c0", 40), ("c1", 1), ("long", 120)]
    s.budget.rate = PrefillRate()
    s.budget.rate.observe(1, 1.0)  # 1 tok/s: the cap stops at a quarter of the budget
    assert s.prefill_cap() == 128
    s.add_request(_req("inf", 4, TenantClass("inf", ttft_slo_s=math.inf), arrival=0.4))
    assert s.prefill_cap() == 128  # an infinite SLO is no constraint (and no overflow)
    off = Scheduler(SchedulerConfig(max_num_batched_tokens=64, policy="edf",
                                    slo_step_fraction=0.0), s.kv, max_model_len=4000)
    off.budget.rate.observe(160, 1.0)
    off.add_request(_req("c9", 8, CHAT, arrival=0.0))
    assert off.prefill_cap() == 64  # turned off
    with pytest.raises(ValueError, match="slo_step_fraction"):
        SchedulerConfig(slo_step_fraction=1.5)


def test_the_tightest_slo_prefills_past_the_cap_and_the_rest_share_what_is_left():
    s = _sched("edf", num_blocks=1024, budget=512, max_seqs=8)
    s.budget.rate.observe(1600, 1.0)
    loose = TenantClass("loose", ttft_slo_s=4.0)
    s.add_request(_req("long", 2000, BATCH, arrival=0.0))
    s.add_request(_req("c0", 300, CHAT, arrival=0.1, max_tokens=50))  # SLO 1 s: cap 400
    s.add_request(_req("l0", 300, loose, arrival=0.2, max_tokens=50))
    assert s.prefill_cap() == 400
    # c0 (the tightest SLO) takes its whole prompt; l0 and long share the 100 of the cap
    # that c0 left, l0 first (deadline 4.2 before long's 60)
    assert _step(s) == [("c0", 300), ("l0", 100)]
    assert _step(s) == [("c0", 1), ("l0", 200), ("long", 200)]
    big = _req("c1", 480, CHAT, arrival=0.5, max_tokens=50)
    s.add_request(big)  # over the cap but within the budget: one step, and admitted
    # before long's next chunk, which gets only the one-block floor: c1's 480 tokens were
    # set aside from the cap
    assert sorted(_step(s)) == [("c0", 1), ("c1", 480), ("l0", 1), ("long", 4)]
    due = _sched("edf", num_blocks=1024, budget=512, max_seqs=8)
    due.budget.rate.observe(1600, 1.0)
    due.add_request(_req("old", 2000, BATCH, arrival=-100.0))  # deadline -40: ranked first
    due.add_request(_req("c", 300, CHAT, arrival=0.0))  # deadline 1
    # edf sets c's 300 tokens aside from the 400-token cap: old, ranked first, gets the
    # other 100, so c's step is no longer than a capped one
    assert _step(due) == [("old", 100), ("c", 300)]
    assert s.budget.is_tightest(1.0) and not s.budget.is_tightest(4.0)
    assert not s.budget.is_tightest(None)
    fcfs = _sched("fcfs", num_blocks=1024, budget=512, max_seqs=8, admission=False)
    fcfs.budget.rate.observe(1600, 1.0)
    fcfs.add_request(_req("long", 2000, BATCH, arrival=0.0))
    fcfs.add_request(_req("c0", 600, CHAT, arrival=0.1))
    # fcfs keeps arrival order: the capped request ahead takes the cap, and the tightest
    # one behind it what is left of the budget
    assert _step(fcfs) == [("long", 400), ("c0", 112)]


def test_a_spent_cap_ends_prefill_in_order_but_lets_edf_pass_to_tightest_work():
    twin = TenantClass("twin", ttft_slo_s=1.0)  # ties with CHAT for the tightest SLO
    for policy in ("fcfs", "priority", "fair", "edf"):
        s = _sched(policy, num_blocks=1024, budget=512, max_seqs=8, admission=False)
        s.budget.rate.observe(1600, 1.0)
        # a and b arrived long ago: under edf their deadlines (arrival + 60) came first too
        for r in (_req("a", 600, BATCH, arrival=-100.0), _req("b", 50, BATCH, arrival=-99.0),
                  _req("c", 60, CHAT, arrival=0.2), _req("d", 40, twin, arrival=0.3)):
            s.add_request(r)
        assert s.prefill_cap() == 400
        if policy == "edf":
            # c's and d's 100 tokens are set aside from the cap: a gets the other 300; b,
            # capped, is passed over; c and d go behind it
            assert _step(s) == [("a", 300), ("c", 60), ("d", 40)]
            assert [r.request_id for r in s.waiting] == ["b"]
        elif policy == "fair":  # a's 400 tokens lift its tenant's counter: c and d now
            # rank before b, and go (uncapped) in that order
            assert _step(s) == [("a", 400), ("c", 60), ("d", 40)]
            assert [r.request_id for r in s.waiting] == ["b"]
        else:  # a takes the cap and b, held back by it, keeps everyone behind it waiting
            assert _step(s) == [("a", 400)], policy
            assert [r.request_id for r in s.waiting] == ["b", "c", "d"], policy
        assert s.budget.is_tightest(1.0) and not s.budget.is_tightest(math.inf)


def test_a_verify_step_does_not_count_as_prefill():
    from kvmesh.engine.scheduler import ScheduledSeq, SchedulerOutput
    s = _sched("edf")
    s.observe_step(SchedulerOutput((ScheduledSeq("a", 10, 4, True, num_spec=3),), ()), 0.5)
    assert s.budget.rate.tokens_per_s is None
    s.observe_step(SchedulerOutput((ScheduledSeq("a", 10, 4, True, num_spec=3),
                                    ScheduledSeq("b", 0, 40, True)), ()), 0.5)
    assert s.budget.rate.tokens_per_s == pytest.approx(80.0)


def test_edf_admission_leaves_room_for_tighter_work_that_will_jump_ahead():
    rate = PrefillRate()
    rate.observe(100, 1.0, {1.0: 25, math.inf: 75})  # a quarter of prefill went to SLO 1 s
    assert rate.share_tighter_than(1.0) == 0.0
    assert rate.share_tighter_than(30.0) == pytest.approx(0.25)
    check_slo(2300, 100, 30.0, rate)  # 24 s at 100 tok/s: in time under fcfs
    with pytest.raises(QueueFullError):  # 32 s at the 75 tok/s edf leaves it: late
        check_slo(2300, 100, 30.0, rate, yield_to_tighter=True)
    check_slo(2000, 100, 30.0, rate, yield_to_tighter=True)  # 28 s: in time
    s = _sched("edf", budget=64, max_seqs=4)
    s.budget.rate = rate
    loose = TenantClass("loose", ttft_slo_s=28.0)
    s.add_request(_req("b0", 2000, loose, arrival=0.0))
    with pytest.raises(QueueFullError):  # (2000 ahead + 200 own) / 75 tok/s > 28 s
        s.add_request(_req("b1", 200, loose, arrival=1.0))
    f = _sched("fcfs", budget=64, max_seqs=4)  # fcfs: nobody jumps ahead, 22 s
    f.budget.rate = rate
    f.add_request(_req("b0", 2000, loose, arrival=0.0))
    f.add_request(_req("b1", 200, loose, arrival=1.0))


def test_fair_lets_a_returning_tenant_go_next_and_admission_agrees():
    s = _sched("fair", budget=64, max_seqs=1)
    s.budget.rate.observe(100, 1.0)
    for i in range(4):  # a batch tenant with a deep queue
        s.add_request(_req(f"b{i}", 60, BATCH, arrival=i, max_tokens=2))
    _step(s)
    _step(s)
    # the chat tenant was idle: it starts just below the busy tenant, so nothing of the
    # batch queue is ahead of it and admission (1 s SLO, 100 tok/s) lets it in
    c = _req("c0", 40, CHAT, arrival=10.0, max_tokens=2)
    assert s.num_prefill_tokens_ahead(c) == 0
    s.add_request(c)
    assert s.waiting[0].request_id == "c0"


def test_fair_admission_counts_another_tenant_only_until_its_counter_passes():
    s = _sched("fair", budget=64, max_seqs=1)
    batch = [_req(f"b{i}", 60, BATCH, arrival=i) for i in range(5)]
    for r in batch:  # the batch tenant: 5 x 60 tokens queued
        s.add_request(r)
    c0 = _req("c0", 8, CHAT, arrival=5.0)
    s.add_request(c0)
    s.policy.on_scheduled(batch[0], 100)  # type: ignore[attr-defined]  # counter 100
    s.policy.on_scheduled(c0, 130)  # type: ignore[attr-defined]  # chat: 130, 30 ahead
    probe = _req("c1", 40, CHAT, arrival=9.0)
    probe.arrival_seq = 99
    # chat's own earlier c0 (8 tokens: chat reaches 138), then batch only until its
    # counter passes 138: 38 tokens plus the crossing chunk (the cap: the whole 64-token
    # budget here) = 102 of its 300. Today's keys would count all 300: every batch
    # request shares the counter 100.
    assert s.prefill_cap() == 64
    assert s.num_prefill_tokens_ahead(probe) == 8 + 102
    s.policy.on_scheduled(batch[0], 40)  # type: ignore[attr-defined]  # batch 140
    # chat reaches 138 after c0: batch is above that and runs nothing first
    assert s.num_prefill_tokens_ahead(probe) == 8
    # more of chat's own work queued first raises the counter that batch must pass: after
    # c0 and c2 (8 + 50 tokens) chat is at 188, so batch runs 48 tokens + a chunk first
    s.add_request(_req("c2", 50, CHAT, arrival=6.0))
    assert s.num_prefill_tokens_ahead(probe) == 58 + 48 + 64
    heavy = _sched("fair", budget=64, max_seqs=1)  # weights: counter = tokens / weight
    w2 = TenantClass("w2", weight=2.0)
    for r in (_req("h0", 300, w2, arrival=0.0), _req("l0", 20, CHAT, arrival=1.0)):
        heavy.add_request(r)
    heavy.policy.on_scheduled(heavy.waiting[0], 100)  # type: ignore[attr-defined]  # w2: 50
    heavy.policy.on_scheduled(heavy.waiting[1], 60)  # type: ignore[attr-defined]  # chat: 60
    late = _req("l1", 10, CHAT, arrival=2.0)
    late.arrival_seq = 99
    # chat reaches 80 after l0; w2 runs (80 - 50) x 2 = 60 tokens + a 64-token chunk
    assert heavy.num_prefill_tokens_ahead(late) == 20 + 60 + 64


def test_under_priority_a_held_waiting_request_keeps_a_later_uncapped_one_back():
    s = _sched("priority", num_blocks=2048, budget=512, max_seqs=8, admission=False)
    s.budget.rate.observe(1600, 1.0)
    a = _req("a", 2000, BATCH, arrival=0.0)
    p = _req("p", 2000, CHAT, arrival=0.0)  # the tightest SLO (uncapped), but priority 9
    p.priority = 9
    for r in (a, p):
        s.add_request(r)
    assert _step(s) == [("a", 400), ("p", 112)]
    s.add_request(_req("w", 100, BATCH, arrival=1.0))  # priority 0: ranked before p
    # a takes the cap; w, held back by it, keeps p (ranked after w) from going first
    assert _step(s) == [("a", 400)]
