"""EngineCore: the step loop, pure (no torch, no threads, no sockets; an injected clock).

It owns the scheduler, the KV cache manager, the block events and the tier bookkeeping,
and runs `step(executor)`: drain block events (device blocks leaving the device become
stores), land finished fetches, schedule, build a self-contained `ExecuteBatch`, let the
executor run it, and apply the sampled tokens. The engine runs it with the torch executor
and the system clock; the simulator runs the same code with a cost-model executor and a
virtual clock. Detokenizing, stop strings and output assembly live above it.

Requests come in groups: `n > 1` sequences of one request share a prompt, and the
siblings wait until the first has its prompt computed, so they start from its cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvmesh.config import CacheConfig, SchedulerConfig
from kvmesh.engine.batch import BlockCopy, ExecuteBatch, Executor, RunExecutor, SeqWork
from kvmesh.engine.block_pool import BlockPool
from kvmesh.engine.clock import Clock, SystemClock
from kvmesh.engine.drafter import Drafter
from kvmesh.engine.events import DEVICE, BlockEvent, BlockRemoved, BlockStored, EventOutbox
from kvmesh.engine.kv_cache_manager import KVCacheManager, num_reusable_blocks
from kvmesh.engine.request import Request
from kvmesh.engine.scheduler import ALLOCATE, ScheduledSeq, Scheduler, SchedulerOutput
from kvmesh.engine.speculation import Speculator
from kvmesh.hashing import Namespace, make_namespace
from kvmesh.kvstore.store import TieredStore
from kvmesh.types import FinishReason, SamplingParams, TenantClass

IDLE_WAIT_S = 0.0005  # nothing to run but fetches in flight: wait this long for them


@dataclass(frozen=True)
class ModelIdentity:
    """What names a model's KV blocks (their keys), and the limits requests live under."""

    model_id: str
    kv_dtype_name: str
    max_model_len: int
    eos_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class SeqUpdate:
    """One sequence's step: its new token (None on error) and whether it finished."""

    seq_id: str
    token_id: int | None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: Any = None
    queue_time_s: float | None = None
    error: str | None = None
    accepted_ids: tuple[int, ...] = ()  # an accepted draft, ahead of `token_id`


@dataclass(frozen=True, slots=True)
class DecodeRun:
    """A decode run's outcome: each sequence's tokens (one per step, none finished before
    the last step), and the last step's updates (which carry any finish)."""

    num_steps: int
    tokens: dict[str, list[int]]
    last: list[SeqUpdate]


class EngineCore:
    def __init__(self, scheduler: SchedulerConfig, cache: CacheConfig, model: ModelIdentity,
                 num_blocks: int, store: TieredStore | None = None, write_through: bool = False,
                 outbox: EventOutbox | None = None, clock: Clock | None = None,
                 drafter: Drafter | None = None):
        self.model = model
        self.block_size = cache.block_size
        self.clock: Clock = clock or SystemClock()
        self.outbox = outbox if outbox is not None else EventOutbox()
        self.pool = BlockPool(num_blocks, self.outbox)
        self.store = store if cache.enable_prefix_caching else None
        self.kv = KVCacheManager(self.pool, cache.block_size, cache.enable_prefix_caching,
                                 external=self.store)
        self.scheduler = Scheduler(scheduler, self.kv, model.max_model_len)
        self.speculator = (Speculator(scheduler, model.max_model_len, drafter)
                           if scheduler.speculative_method else None)
        self._write_through = write_through
        self._stores: list[BlockCopy] = []
        if self.store is not None:
            self.outbox.subscribe(self._collect_stores)
        self._groups: dict[str, list[str]] = {}  # request id -> its live sequence ids
        self._group_of: dict[str, str] = {}
        self._held: dict[str, list[Request]] = {}  # first sequence -> siblings not started
        self._namespaces: dict[str | None, Namespace] = {}
        self.num_steps = 0
        self.last_error: BaseException | None = None  # the executor's, for the caller to log

    # requests --------------------------------------------------------------------------

    def key_scheme(self) -> tuple[str, str, str]:
        """What `make_namespace` folds in besides the salt: model, KV dtype, layout."""
        return (self.model.model_id, self.model.kv_dtype_name,
                f"block-major-v1:bs{self.block_size}")

    def namespace(self, cache_salt: str | None) -> Namespace:
        if cache_salt not in self._namespaces:
            self._namespaces[cache_salt] = make_namespace(*self.key_scheme(), cache_salt)
        return self._namespaces[cache_salt]

    def add(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
            priority: int = 0, cache_salt: str | None = None,
            arrival_time: float | None = None, tenant: TenantClass | None = None) -> list[str]:
        """Queue a request's `params.n` sequences (validated token ids); returns their ids.

        Raises ValueError (id in use) or QueueFullError (the waiting queue is full, or
        admission control predicts a missed TTFT SLO).
        """
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = self.clock.now() if arrival_time is None else arrival_time
        seqs = [self._make_seq(request_id, i, prompt_ids, params, priority, cache_salt, arrival)
                for i in range(params.n)]
        for seq in seqs:
            seq.tenant = tenant
        cached = len(self.kv.find_cached_prefix(seqs[0])) * self.block_size
        self.scheduler.add_request(seqs[0], num_cached_tokens=cached)
        if self.store is not None:
            self.kv.lookup(seqs[0], on_arrival=True)  # start fetching its prefix now
        self._groups[request_id] = [s.request_id for s in seqs]
        self._group_of.update((s.request_id, request_id) for s in seqs)
        if len(seqs) > 1:
            self._held[seqs[0].request_id] = seqs[1:]
        return [s.request_id for s in seqs]

    def _make_seq(self, request_id: str, index: int, ids: Sequence[int],
                  params: SamplingParams, priority: int, salt: str | None,
                  arrival: float) -> Request:
        return Request(
            request_id if params.n == 1 else f"{request_id}#{index}", list(ids), params,
            self.namespace(salt), arrival_time=arrival, priority=priority,
            eos_token_ids=self.model.eos_token_ids,
            seed=None if params.seed is None else params.seed + index)

    def abort(self, request_id: str) -> list[str]:
        """Abort every live sequence of a request; returns their ids."""
        seq_ids = self._groups.pop(request_id, [])
        if self.speculator is not None:
            self.speculator.forget(seq_ids)
        for seq_id in seq_ids:
            self._held.pop(seq_id, None)
            self._group_of.pop(seq_id, None)
            self.scheduler.abort_request(seq_id)
        return seq_ids

    def finish(self, seq_id: str, reason: FinishReason, stop: str | int | None = None) -> None:
        """End a sequence from above (a stop string matched)."""
        req = self.scheduler.requests.get(seq_id)
        if req is not None:
            self.scheduler.finish_request(req, reason, stop)
        self._forget(seq_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _forget(self, seq_id: str) -> None:
        request_id = self._group_of.pop(seq_id, None)
        self._held.pop(seq_id, None)
        if self.speculator is not None:
            self.speculator.forget((seq_id,))
        live = self._groups.get(request_id) if request_id is not None else None
        if live is None:
            return
        if seq_id in live:
            live.remove(seq_id)
        if not live:
            del self._groups[request_id]  # type: ignore[arg-type]

    # stepping --------------------------------------------------------------------------

    def step(self, executor: Executor) -> list[SeqUpdate]:
        if self.store is not None:
            self._flush(executor)  # blocks evicted since the last step become findable
            self.store.poll()
        if self.speculator is not None:
            self.speculator.draft(self.scheduler.running)
            if self.speculator.last_error is not None:
                self.last_error, self.speculator.last_error = self.speculator.last_error, None
        out = self.scheduler.schedule()
        self._drain()
        if out.is_empty:
            if self.store is not None and self.store.has_reads_in_flight():
                self.clock.sleep(IDLE_WAIT_S)
            return []
        self.num_steps += 1
        self._mark_started(out.seqs)
        batch = ExecuteBatch(tuple(self._work(s) for s in out.seqs), self._take_stores(),
                             out.loads, self._take_finished())
        start = self.clock.now()
        try:
            result = executor.execute(batch)
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep the engine
            self.last_error = exc
            return self._fail(out, f"internal error: {type(exc).__name__}: {exc}")
        self.scheduler.observe_step(out, self.clock.now() - start)
        before = {s.request_id: self.scheduler.requests[s.request_id].num_tokens
                  for s in out.seqs if s.num_spec}
        updated = self.scheduler.update_from_output(out, result.sampled, result.verified)
        self._observe_spec(out, result.verified)
        self._release_held(updated)
        self._drain()  # the blocks this step filled: announced now, not at the next step
        return [self._update(req, result.logprobs.get(req.request_id),
                             before.get(req.request_id)) for req in updated]

    def _observe_spec(self, out: SchedulerOutput, verified: dict[str, list[int]]) -> None:
        if self.speculator is None:
            return
        for seq in out.seqs:
            if seq.num_spec and seq.request_id in verified:
                self.speculator.observe(seq.request_id, seq.num_spec,
                                        len(verified[seq.request_id]) - 1)

    def step_decode_run(self, executor: RunExecutor, max_steps: int,
                        until_s: float = float("inf")) -> DecodeRun | None:
        """Up to `max_steps` plain decode steps at once, all starting before `until_s`, or
        None: the simulator's fast path. Only when `Scheduler.decode_run_length` finds the
        coming steps decided in advance (each running request decodes one token; nothing
        waits, stops early or runs out of blocks) and the executor agrees (`plan_run`).
        Step by step and in `schedule()`'s order, blocks are allocated (what a step evicts
        is that step's stores) and filled blocks published, so the state after the run is
        that of as many `step` calls."""
        if self._held or (self.store is not None and (self._write_through
                                                      or self.store.has_reads_in_flight())):
            return None
        k = self.scheduler.decode_run_length(max_steps)
        if k < 2:
            return None
        out = self.scheduler.scheduled_decodes()
        events = self.scheduler.decode_run_events(k)
        growth = [0] * k
        for j, phase, _ in events:
            growth[j] += phase == ALLOCATE
        if self.store is not None:  # a staged block's timeout would change a step's poll
            until_s = min(until_s, self.store.next_expiry_s())
        probe = ExecuteBatch(tuple(self._work(s) for s in out.seqs))
        n = min(k, executor.plan_run(probe, k, growth, until_s))
        if n < 2:
            return None
        if self.store is not None:
            self._flush(executor)
            self.store.poll()
        tokens = executor.sample_run(probe, n)
        stores = self._replay_run(events, n, tokens)
        self.num_steps += n
        batch = ExecuteBatch(probe.seqs, stores.pop(0, ()), (), self._take_finished())
        executor.execute_run(batch, n, stores)
        updated = self.scheduler.finish_decode_run(out, tokens, n)
        return DecodeRun(n, tokens, [self._update(req, None) for req in updated])

    def _replay_run(self, events: list[tuple[int, int, Request]], n: int,
                    tokens: dict[str, list[int]]) -> dict[int, tuple[BlockCopy, ...]]:
        """A run's block allocations and publications in step order; each step's stores."""
        base = {r.request_id: (r.num_computed_tokens, r.num_tokens)
                for r in self.scheduler.running}
        stores: dict[int, tuple[BlockCopy, ...]] = {}
        for j, phase, req in events:
            if j >= n:
                break
            computed, length = base[req.request_id]
            if phase == ALLOCATE:  # what step j's `schedule()` allocates
                ok = self.kv.allocate(req, computed + j + 1 - req.num_computed_tokens)
                assert ok, "decode_run_length promised the blocks"
                self._drain()
                if self._stores:
                    stores[j] = stores.get(j, ()) + self._take_stores()
            else:  # step j's `update_from_output` fills a block: publish it
                self.scheduler.advance_decode(req, tokens[req.request_id], computed, length,
                                              j + 1)
        self._drain()
        return stores

    def _flush(self, executor: Executor) -> None:
        """Save blocks that left the device between steps (a reset): a failure loses
        only those copies, never a request."""
        self._drain()
        if self._stores:
            try:
                executor.execute(ExecuteBatch(stores=self._take_stores()))
            except Exception as exc:  # noqa: BLE001 - the caller logs it
                self.last_error = exc

    def _drain(self) -> None:
        self.outbox.drain()
        if self.outbox.last_error is not None:
            self.last_error, self.outbox.last_error = self.outbox.last_error, None

    def _collect_stores(self, events: Sequence[BlockEvent]) -> None:
        """Device blocks to copy down: evicted ones (write-back) or new ones (write-through)."""
        wanted = BlockStored if self._write_through else BlockRemoved
        for ev in events:
            if isinstance(ev, wanted) and ev.medium == DEVICE and ev.block_id is not None:
                self._stores.append((ev.block_id, ev.key))

    def _take_stores(self) -> tuple[BlockCopy, ...]:
        stores, self._stores = tuple(self._stores), []
        return stores

    def _take_finished(self) -> tuple[str, ...]:
        done, self.scheduler.finished_ids = tuple(self.scheduler.finished_ids), []
        return done

    def _mark_started(self, seqs: Sequence[ScheduledSeq]) -> None:
        now = self.clock.now()
        for seq in seqs:
            req = self.scheduler.requests[seq.request_id]
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
                self._account_tiers(req)

    def _account_tiers(self, req: Request) -> None:
        if self.store is None:
            return
        bs = self.block_size
        device = ((req.num_cached_tokens or 0) - req.num_external_cached_tokens) // bs
        external = req.num_external_cached_tokens // bs
        wanted = num_reusable_blocks(req.num_prompt_tokens, bs) - device
        self.store.account(wanted, req.block_keys[device : device + external])

    def _work(self, seq: ScheduledSeq) -> SeqWork:
        req = self.scheduler.requests[seq.request_id]
        start = seq.num_computed_tokens
        ids = req.token_ids[start : start + seq.num_new_tokens]
        if seq.num_spec:  # the pending token, then the draft
            ids = ids + req.spec_token_ids
        return SeqWork(seq.request_id, ids, start, self.kv.block_table(seq.request_id),
                       seq.is_sampling, req.params, req.seed, req.prompt_token_ids,
                       req.token_ids, seq.num_spec)

    def _release_held(self, updated: list[Request]) -> None:
        """Siblings of an n > 1 request start once the first has its prompt computed."""
        for req in updated:
            for sibling in self._held.pop(req.request_id, ()):
                self.scheduler.add_request(sibling, check_capacity=False)

    def _update(self, req: Request, logprobs: Any, length_before: int | None = None) -> SeqUpdate:
        """`length_before`: the sequence's length before a verifying step, whose new
        tokens (accepted draft, then the sampled one) all go out in this update."""
        if req.finish_reason is not None:
            self._forget(req.request_id)
        first = req.num_output_tokens == 1
        accepted = tuple(req.token_ids[length_before:-1]) if length_before is not None else ()
        return SeqUpdate(
            req.request_id, req.token_ids[-1], req.finish_reason, req.stop_reason,
            req.num_prompt_tokens, req.num_cached_tokens or 0, logprobs,
            (req.first_scheduled_time or req.arrival_time) - req.arrival_time if first else None,
            accepted_ids=accepted)

    def _fail(self, out: SchedulerOutput, message: str) -> list[SeqUpdate]:
        updates = []
        for seq in out.seqs:
            req = self.scheduler.requests.get(seq.request_id)
            if req is None:
                continue
            self.scheduler.finish_request(req, "error")
            for failed in [req, *self._held.get(req.request_id, [])]:
                self._forget(failed.request_id)
                updates.append(SeqUpdate(failed.request_id, None, "error",
                                         num_prompt_tokens=failed.num_prompt_tokens,
                                         error=message))
        return updates

    def close(self, executor: Executor) -> None:
        """Hand every cached device block down the tiers, then persist them (warm restart)."""
        if self.store is None:
            return
        self._drain()
        stores = [*self._take_stores(), *self.pool.cached_blocks()]
        try:
            executor.execute(ExecuteBatch(stores=tuple(stores)))
        finally:
            self.store.close()

    # introspection ---------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
        if self.store is not None:
            self.store.check_integrity()
        for request_id, seq_ids in self._groups.items():
            assert seq_ids, f"request {request_id} has no live sequence"
            assert all(self._group_of.get(s) == request_id for s in seq_ids)
