"""Continuous-batching scheduler with chunked prefill. Pure Python: no torch, no I/O.

Each step shares a token budget between decodes and prefill chunks:

1. Running requests that are decoding go first (one token each), then running requests
   whose prefill is partly done take what budget is left. Decodes never wait for a
   long prefill: a prefill is cut into chunks that fit the budget.
2. When the block pool runs dry, the scheduler preempts: among the running requests of
   the class the policy ranks last (all of them for fcfs and edf, the least urgent
   priority, the most-served tenant for fair) it picks the one cheapest to bring back
   (`restore_cost_tokens`) and sends it back to the queue. Its full blocks stay in the
   prefix index and, when a host tier exists, are offloaded there as they are evicted,
   so resuming it is a load rather than a recompute.
3. If nothing was preempted, waiting requests are admitted in policy order while the
   budget, `max_num_seqs` and free blocks allow, each starting after its cached prefix
   (one still fetching its prefix is passed over for those behind it; one that the spent
   cap of rule 4 holds back ends the step's prefill, except under edf, where
   tightest-SLO requests behind it still go).
   A waiting request the policy ranks before a running partial prefill (an urgent
   request under priority, edf or fair; under fcfs, only a preempted request, which
   arrived earlier) is admitted before that prefill's next chunk, so a long
   low-priority prompt never holds the budget against it.
4. Once a tenant with a TTFT SLO has sent a request, the prefill tokens of a step are
   capped (`prefill_cap`) so that a step lasts about `slo_step_fraction` of the tightest
   SLO (`step_budget.py`). Decodes are never capped, and neither is the prefill of a
   request whose own SLO is the tightest: the cap is there so that such a request
   waits little for a step to end, and holding back one of them only delays it. Under
   edf their pending prefill tokens are set aside from the cap first (`_room`), so a
   capped chunk ranked before them (a loose-SLO request whose deadline has come) cannot
   lengthen their step; the capped prefills share the rest, at least one block.

A request is refused on arrival (QueueFullError, HTTP 429) when the queue is full, or
when admission control predicts it would miss its tenant's TTFT SLO (`admission.py`).
"""

from __future__ import annotations

import bisect
import itertools

from kvmesh.config import SchedulerConfig
from kvmesh.engine.admission import QueueFullError, check_slo
from kvmesh.engine.decode_run import ALLOCATE, FILL, DecodeRuns
from kvmesh.engine.kv_cache_manager import KVCacheManager, PrefixPlan
from kvmesh.engine.policies import UsageAware, make_policy
from kvmesh.engine.preemption import restore_cost_tokens
from kvmesh.engine.request import Request, RequestStatus
from kvmesh.engine.schedule import ScheduledSeq, SchedulerOutput
from kvmesh.engine.step_budget import StepBudget, StepRoom
from kvmesh.engine.step_results import StepResults
from kvmesh.types import FinishReason

__all__ = ["ALLOCATE", "FILL", "QueueFullError", "Scheduler", "SchedulerOutput", "ScheduledSeq"]


class Scheduler(StepResults, DecodeRuns):  # StepResults first: its _check_stop is the one
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int):
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.policy = make_policy(config.policy, config)
        self._usage = self.policy if isinstance(self.policy, UsageAware) else None
        self.budget = StepBudget(config, kv.block_size)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._seq = itertools.count()
        self.num_preemptions = 0
        self.finished_ids: list[str] = []  # since the core last drained them

    # lifecycle -----------------------------------------------------------------------

    def add_request(self, req: Request, check_capacity: bool = True,
                    num_cached_tokens: int = 0) -> None:
        """Queue `req`. QueueFullError at `max_waiting`, or when admission control predicts
        a missed TTFT SLO (`num_cached_tokens` of its prompt need no prefill); neither
        applies with `check_capacity` off (the siblings of a request already admitted)."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if check_capacity and len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} requests)",
                                 retry_after_s=None)
        req.arrival_seq = next(self._seq)
        if req.tenant is not None:
            self.budget.note_tenant(req.tenant.name, req.tenant.ttft_slo_s)
        req.num_cached_hint = num_cached_tokens
        if self._usage is not None:  # first: an idle tenant's counter is lifted on arrival
            self._usage.on_arrival(req)
        if check_capacity and self.config.admission_control and req.tenant is not None:
            try:
                check_slo(self.num_prefill_tokens_ahead(req),
                          req.num_prompt_tokens - num_cached_tokens, req.tenant.ttft_slo_s,
                          self.budget.rate, getattr(self.policy, "yields_to_tighter_slos",
                                                     False))
            except QueueFullError:
                if self._usage is not None:
                    self._usage.on_finish(req)
                raise
        self.requests[req.request_id] = req
        self._enqueue(req)

    def num_prefill_tokens_ahead(self, req: Request) -> int:
        """Prefill tokens that run before `req` would start: the running prefills and the
        waiting requests the policy orders first (or, for a policy whose order moves as
        work is done, what its `prefill_ahead` says). Under edf, for a request with the
        tightest SLO, only the uncapped work among them: capped work ranked first runs
        beside it, in what the cap leaves (`_room`)."""
        work = self._prefill_work()
        ahead = getattr(self.policy, "prefill_ahead", None)
        if ahead is not None:
            return int(ahead(req, work, self.prefill_cap()))
        if self._uncapped(req) and getattr(self.policy, "yields_to_tighter_slos", False):
            # capped work ranked first yields its step share to this request (`_room`)
            work = [(r, n) for r, n in work if self._uncapped(r)]
        key = self._key(req)
        return sum(n for r, n in work if self._key(r) < key)

    def _prefill_work(self) -> list[tuple[Request, int]]:
        """Each request with tokens still to prefill, and how many: a running prefill's
        uncomputed tokens (a resumed request's output too), a waiting request's beyond its
        cache hit."""
        work = [(r, r.num_pending_tokens) for r in self.running if r.num_pending_tokens > 1]
        work += [(r, max(0, r.num_pending_tokens - r.num_cached_hint)) for r in self.waiting]
        return work

    @property
    def num_prefill_tokens(self) -> int:
        """Prefill tokens queued here (running prefills and waiting requests): what a new
        request's first token waits behind, whatever its place (a router reads it)."""
        return sum(n for _, n in self._prefill_work())

    def observe_step(self, out: SchedulerOutput, step_s: float) -> None:
        """A step's measured time: feeds the prefill rate that admission predicts with.
        Prefill chunks only (more than one new token, none of them drafted)."""
        prefills = []
        for seq in out.seqs:
            if seq.num_new_tokens > 1 and not seq.num_spec:
                req = self.requests.get(seq.request_id)
                tenant = req.tenant if req is not None else None
                prefills.append((seq.num_new_tokens, tenant.ttft_slo_s if tenant else None))
        self.budget.observe(prefills, step_s)

    def prefill_cap(self) -> int:
        """Most prefill tokens in one step (rule 4, `StepBudget.prefill_cap`)."""
        return self.budget.prefill_cap()

    def abort_request(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.finish_request(req, "abort")
        return req

    def finish_request(
        self, req: Request, reason: FinishReason, stop: str | int | None = None
    ) -> None:
        if req.is_finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            if reason != "error":  # a failed step may have left its blocks unwritten
                self.kv.cache_blocks(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        if self._usage is not None:
            self._usage.on_finish(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop
        self.requests.pop(req.request_id, None)
        self.finished_ids.append(req.request_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    # scheduling ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        preempted: list[str] = []
        self._resort()
        pending = sorted(self.running, key=lambda r: (r.num_pending_tokens > 1, self._key(r)))
        ran: list[ScheduledSeq] = []
        room = self._room(budget)
        held: list[Request] = []  # prefills the cap holds back this step
        while pending and room.tokens > 0:
            req = pending.pop(0)
            prefill = req.num_pending_tokens > 1  # the decodes came first
            if prefill and not preempted:
                # a partial prefill: waiting requests the policy ranks first go before it
                self._admit(room, seqs, before=self._key(req))
                if room.tokens <= 0:
                    break
            speculated = self._speculate(req, room.tokens, pending)
            if speculated is not None:
                ran.append(speculated)
                room.take(speculated.num_new_tokens, False, False)
                continue
            num_new = min(req.num_pending_tokens,
                          room.for_prefill(self._uncapped(req)) if prefill else room.tokens)
            if num_new <= 0:
                held.append(req)
                room.hold()
            elif self._allocate_or_preempt(req, num_new, pending, preempted, held):
                ran.append(self._scheduled(req, num_new))
                room.take(num_new, prefill, self._uncapped(req))
        seqs.extend(ran)
        self._charge(ran)
        if not preempted:
            self._admit(room, seqs)
        return SchedulerOutput(tuple(seqs), tuple(preempted), tuple(self.kv.take_loads()))

    def _room(self, budget: int) -> StepRoom:
        """The step's room (rule 4). Under a policy that runs tighter SLOs first (edf), the
        prefill tokens that requests with the tightest SLO have pending now are set aside
        from the cap first, so a capped chunk ranked before them (a loose-SLO request whose
        deadline has come) never lengthens their step; the capped prefills share the rest
        of the cap, and at least one block, so they always move. Other policies keep their
        order: a capped chunk ranked first takes its share of the cap before them."""
        urgent = [r for r in self.waiting if self._uncapped(r)]
        cap = self.prefill_cap()
        if not getattr(self.policy, "yields_to_tighter_slos", False):
            return StepRoom(budget, cap, len(urgent), shared=True)
        seats = max(0, self.config.max_num_seqs - len(self.running))  # who can start now
        reserved = sum(max(1, r.num_pending_tokens - r.num_cached_hint)
                       for r in urgent[:seats])
        reserved += sum(r.num_pending_tokens for r in self.running
                        if r.num_pending_tokens > 1 and self._uncapped(r))
        capped = cap if not reserved else max(self.kv.block_size,
                                              cap - min(budget, reserved))
        return StepRoom(budget, min(cap, capped), len(urgent), shared=False)

    def _uncapped(self, req: Request) -> bool:
        """Whether `req`'s prefill may take the whole budget (rule 4)."""
        return req.tenant is not None and self.budget.is_tightest(req.tenant.ttft_slo_s)

    def _speculate(self, req: Request, budget: int,
                   pending: list[Request]) -> ScheduledSeq | None:
        """A decode with a draft: its token and the draft in one step, if the budget and
        free blocks allow without making anyone else preempt (otherwise the draft is
        dropped)."""
        k = len(req.spec_token_ids)
        if not k:
            return None
        need = (self.kv.num_blocks_to_grow([req], 1 + k)
                + self.kv.num_blocks_to_grow(pending, 1))
        if (req.num_pending_tokens != 1 or 1 + k > budget
                or need > self.kv.pool.num_free_blocks or not self.kv.allocate(req, 1 + k)):
            req.spec_token_ids = []
            return None
        return ScheduledSeq(req.request_id, req.num_computed_tokens, 1 + k, True, k)

    def _charge(self, seqs: list[ScheduledSeq]) -> None:
        """Tell a usage-aware policy what this step runs, and re-sort the queue by it."""
        if self._usage is not None:
            for seq in seqs:
                self._usage.on_scheduled(self.requests[seq.request_id], seq.num_new_tokens)
            self._resort()

    def _resort(self) -> None:
        """A usage-aware policy's keys move as work is done: restore the queue's order."""
        if self._usage is not None:
            self.waiting.sort(key=self._key)

    def restore_cost_tokens(self, req: Request) -> float:
        return restore_cost_tokens(req, self.kv)

    def _victim_key(self, req: Request) -> tuple[object, ...]:
        return (self.policy.preempt_class(req), -restore_cost_tokens(req, self.kv), self._key(req))

    def _allocate_or_preempt(self, req: Request, num_new: int, pending: list[Request],
                             preempted: list[str], held: list[Request] | None = None) -> bool:
        """Allocate `num_new` tokens for `req`, preempting while the pool is short; the
        victims come from `pending`, `held` (running prefills the cap passed over this
        step) and `req` itself."""
        held = held if held is not None else []
        while not self.kv.allocate(req, num_new):
            victim = max([*pending, *held, req], key=self._victim_key)
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
            (pending if victim in pending else held).remove(victim)
        return True

    def _admit(self, room: StepRoom, seqs: list[ScheduledSeq],
               before: tuple[float, ...] | None = None) -> None:
        """Admit waiting requests in policy order (only those ranked before `before`, when
        given) while `room` lasts; one still fetching its prefix, or held back by the
        prefill cap, is passed over."""
        i = 0
        while (i < len(self.waiting) and room.tokens > 0
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[i]
            if before is not None and not self._key(req) < before:
                break
            if room.closed or (room.capped <= 0 and room.uncapped_waiting <= 0):
                room.hold()  # the cap is spent and nobody it spares is waiting
                break
            uncapped = self._uncapped(req)
            limit = room.for_prefill(uncapped)
            if limit <= 0:
                room.hold()
                if room.closed:
                    break
            plan = self.kv.lookup(req) if limit > 0 else None
            if plan is None:
                i += 1
                continue
            num_cached = plan.num_blocks * self.kv.block_size
            num_new = min(req.num_tokens - num_cached, limit)
            if not self.kv.allocate(req, num_new, plan):
                break
            self.waiting.pop(i)
            room.uncapped_waiting -= uncapped
            self._start(req, plan)
            seqs.append(self._scheduled(req, num_new))
            room.take(num_new, True, uncapped)
            if self._usage is not None:  # the admitted tenant's counter moves now
                self._usage.on_scheduled(req, num_new)
                self.waiting[i:] = sorted(self.waiting[i:], key=self._key)

    def _start(self, req: Request, plan: PrefixPlan) -> None:
        bs = self.kv.block_size
        req.num_computed_tokens = plan.num_blocks * bs
        if req.num_cached_tokens is None:
            req.num_cached_tokens = req.num_computed_tokens
            req.num_external_cached_tokens = len(plan.external_keys) * bs
            self.kv.record_query(req.num_prompt_tokens, len(plan.device_blocks) * bs)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _scheduled(self, req: Request, num_new: int) -> ScheduledSeq:
        is_sampling = req.num_computed_tokens + num_new == req.num_tokens
        return ScheduledSeq(req.request_id, req.num_computed_tokens, num_new, is_sampling)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        req.spec_token_ids = []
        self.kv.free(req)
        bs = self.kv.block_size  # its full blocks stay cached: admission counts them so
        req.num_cached_hint = req.num_computed_tokens // bs * bs
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        if req.status is not RequestStatus.PREEMPTED:
            req.status = RequestStatus.WAITING
        bisect.insort(self.waiting, req, key=self._key)

    def _key(self, req: Request) -> tuple[float, ...]:
        return self.policy.sort_key(req)

    # decode runs (the simulator's fast path) ---------------------------------------------

    def scheduled_decodes(self) -> SchedulerOutput:
        """Every running request for one decode token, in policy order (a run's batch)."""
        return SchedulerOutput(tuple(self._scheduled(req, 1)
                                     for req in sorted(self.running, key=self._key)), ())

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        ids = [r.request_id for r in self.running] + [r.request_id for r in self.waiting]
        assert len(ids) == len(set(ids)), "a request is both running and waiting"
        assert set(ids) == set(self.requests), "request map disagrees with queues"
        keys = [self._key(r) for r in self.waiting]
        assert self._usage is not None or keys == sorted(keys), (
            "waiting queue is out of policy order")
        for req in self.running:
            assert req.status is RequestStatus.RUNNING
            assert not req.spec_token_ids or req.num_pending_tokens == 1
            assert req.num_computed_tokens <= req.num_tokens
            assert len(self.kv.block_table(req.request_id)) * self.kv.block_size >= (
                req.num_computed_tokens
            )
        assert len(self.running) <= self.config.max_num_seqs
        getattr(self.policy, "check_integrity", lambda: None)()
