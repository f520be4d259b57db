"""The discrete-event loop: sessions arrive, a routing policy picks an instance, and each
instance runs its engine core step by step on its own virtual clock.

Events are (time, order, kind, payload) in one heap. An instance steps as soon as it has
work; a step ends `cost_model.step_s` later, when its tokens reach the client (plus
`token_overhead_s`). A request reaches the engine `request_overhead_s` after it is sent.
Each finished turn sends the session's next one after its think time; under a concurrency
limit a new session starts when one ends. The run is deterministic: no wall clock, no
unseeded randomness, ties broken by event order.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvmesh.bench.records import RequestRecord
from kvmesh.engine.core import IDLE_WAIT_S, SeqUpdate
from kvmesh.engine.input_processor import check_lengths
from kvmesh.engine.scheduler import QueueFullError
from kvmesh.router.policies import InstanceLoad, RoutePolicy, RouteRequest, RouteWeights
from kvmesh.sim.cost_model import CostModel
from kvmesh.sim.instance import FILLER_TOKENS, InstanceSpec, SimInstance
from kvmesh.sim.routing import SimRouter
from kvmesh.sim.workload import SimSession
from kvmesh.types import SamplingParams

SEND, ENQUEUE, STEP = 0, 1, 2
MAX_RUN_STEPS = 4096


@dataclass
class _Live:
    """A request in flight: its record, session, turn and generated tokens."""

    record: RequestRecord
    session: int
    turn: int
    instance: int
    sent_s: float
    last_token_s: float | None = None
    output: list[int] = field(default_factory=list)


@dataclass
class SimRun:
    records: list[RequestRecord]
    duration_s: float
    instances: list[SimInstance]
    num_events: int


class _PlainRouter:
    """A policy object given as is: it sees sessions and prompts, no cache index."""

    reads_queue = True  # a policy object given as is: it may read anything

    def __init__(self, policy: RoutePolicy):
        self.policy = policy

    def choose(self, session: str, prompt: Sequence[int], loads: Sequence[InstanceLoad]) -> int:
        return self.policy.choose(RouteRequest(session, prompt, len(prompt)), loads)


class Simulator:
    def __init__(self, spec: InstanceSpec, cost: CostModel, num_instances: int,
                 router: RoutePolicy | str, max_duration_s: float | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 filler: tuple[int, ...] = FILLER_TOKENS, decode_runs: bool = True,
                 weights: RouteWeights | None = None):
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        self.cost = cost
        self.instances = [SimInstance(i, spec, cost, filler) for i in range(num_instances)]
        self.router = (SimRouter(router, self.instances, weights) if isinstance(router, str)
                       else _PlainRouter(router))
        self.max_duration_s = max_duration_s
        self.on_progress = on_progress
        self._events: list[tuple[float, int, int, Any]] = []
        self._order = itertools.count()
        self._external: list[float] = []  # times of pending SEND and ENQUEUE events
        self.decode_runs = decode_runs
        self._live: dict[str, _Live] = {}
        self._replies: dict[int, list[list[int]]] = {}
        self.records: list[RequestRecord] = []
        self._last_end = 0.0  # when the last request ended: the run's duration
        self.num_events = 0

    # events ----------------------------------------------------------------------------

    def _push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self._events, (t, next(self._order), kind, payload))
        if kind != STEP:
            heapq.heappush(self._external, t)

    def run(self, sessions: Sequence[SimSession], starts: Sequence[float],
            concurrency: int | None = None) -> SimRun:
        """Replay `sessions`, each first sent at `starts[i]` (seconds); at most
        `concurrency` sessions in flight (the rest start as others end)."""
        self._sessions = sessions
        order = sorted(range(len(sessions)), key=lambda i: (starts[i], i))
        limit = concurrency or len(sessions)
        self._pending = order[limit:]  # sessions waiting for a free slot
        self._chains = bool(self._pending) or any(s.num_turns > 1 for s in sessions)
        self._starts = starts
        for i in order[:limit]:
            self._push(starts[i], SEND, (i, 0))
        while self._events:
            t, _, kind, payload = heapq.heappop(self._events)
            if kind != STEP:
                heapq.heappop(self._external)  # the earliest: events come in time order
            if self.max_duration_s is not None and t > self.max_duration_s and kind == SEND:
                continue
            self.num_events += 1
            if kind == SEND:
                self._send(t, *payload)
            elif kind == ENQUEUE:
                self._enqueue(t, payload)
            else:
                self._step(t, payload)
        return SimRun(self.records, self._last_end, self.instances, self.num_events)

    # requests --------------------------------------------------------------------------

    def _send(self, t: float, session: int, turn: int) -> None:
        s = self._sessions[session]
        prompt = s.prompt(turn, self._replies.get(session, []))
        loads = [inst.load(self.router.reads_queue) for inst in self.instances]
        target = self.router.choose(str(session), prompt, loads)
        record = RequestRecord(session, turn, t)
        self.records.append(record)
        rid = f"s{session}t{turn}"
        self._live[rid] = _Live(record, session, turn, target, t)
        self._push(t + self.cost.tiers.request_overhead_s, ENQUEUE,
                   (rid, prompt, s.max_tokens[turn]))

    def _enqueue(self, t: float, payload: tuple[str, list[int], int]) -> None:
        rid, prompt, max_tokens = payload
        live = self._live[rid]
        inst = self.instances[live.instance]
        error = self._validate(inst, prompt, max_tokens)
        if error is None:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            try:
                inst.core.add(rid, prompt, params, arrival_time=t)
            except QueueFullError as exc:
                error = f"429: {exc}"
        if error is not None:
            live.record.status = int(error[:3])
            self._end(t, rid, error)
            return
        live.record.prompt_tokens = len(prompt)
        self._wake(inst, t)

    @staticmethod
    def _validate(inst: SimInstance, prompt: list[int], max_tokens: int) -> str | None:
        """The server's 400s that depend on lengths (the input processor's own rules)."""
        if not prompt:
            return "400: prompt is empty"
        try:
            check_lengths(len(prompt), max_tokens, inst.max_model_len)
        except ValueError as exc:
            return f"400: {exc}"
        return None

    def _wake(self, inst: SimInstance, t: float) -> None:
        if not inst.is_stepping:
            inst.is_stepping = True
            inst.next_step_s = max(t, inst.clock.now())
            self._push(inst.next_step_s, STEP, inst.index)

    # steps -----------------------------------------------------------------------------

    def _step(self, t: float, index: int) -> None:
        inst = self.instances[index]
        inst.clock.advance_to(t)
        if self.decode_runs and self._decode_run(inst):
            return
        updates = inst.core.step(inst.executor)
        if not updates and inst.clock.now() == t and inst.core.has_unfinished():
            inst.clock.sleep(IDLE_WAIT_S)  # nothing ran (waiting on a fetch): poll again
        done = inst.clock.now()
        emit = done + self.cost.tiers.token_overhead_s
        for u in updates:
            self._token(emit, u)
        inst.is_stepping = False
        if inst.core.has_unfinished():
            self._wake(inst, done)

    def _run_until(self, inst: SimInstance) -> float:
        """When a run must stop: the next send or enqueue (it may go to this instance),
        and, when a finished request can start another one (multi-turn sessions, a
        concurrency limit), the next step of any other instance (it may finish one)."""
        until = self._external[0] if self._external else float("inf")
        if self._chains:
            for other in self.instances:
                if other is not inst and other.is_stepping:
                    until = min(until, other.next_step_s)
        return until

    def _decode_run(self, inst: SimInstance) -> bool:
        """Plain decode steps up to the next event that could change them, at once (the
        same state and token times as stepping one by one: `EngineCore.step_decode_run`)."""
        run = inst.core.step_decode_run(inst.executor, MAX_RUN_STEPS, self._run_until(inst))
        if run is None:
            return False
        overhead = self.cost.tiers.token_overhead_s
        times = [end + overhead for end in inst.executor.run_ends]
        for u in run.last:
            self._run_tokens(u, run.tokens[u.seq_id][:-1], times[:-1])
            self._token(times[-1], u)
        inst.is_stepping = False
        if inst.core.has_unfinished():
            self._wake(inst, inst.clock.now())
        return True

    def _run_tokens(self, last: SeqUpdate, tokens: list[int], times: list[float]) -> None:
        """Tokens of a decode run before its last step (none finishes; the first may be
        the sequence's first: its prompt's last token was left over by a chunk)."""
        live = self._live.get(last.seq_id)
        if live is None or not tokens:
            return
        live.output.extend(tokens)
        prev = live.last_token_s
        if prev is None:
            live.record.ttft_s = times[0] - live.sent_s
            live.record.cached_tokens = last.num_cached_tokens
            prev = times[0]
            times = times[1:]
        live.record.itl_s.extend(t - p for p, t in zip([prev, *times[:-1]], times,
                                                         strict=True))
        live.last_token_s = times[-1] if times else prev

    def _token(self, t: float, u: SeqUpdate) -> None:
        live = self._live.get(u.seq_id)
        if live is None:
            return
        rec = live.record
        if u.token_id is not None:
            live.output.append(u.token_id)
            if live.last_token_s is None:
                rec.ttft_s = t - live.sent_s
                rec.cached_tokens = u.num_cached_tokens
            else:
                rec.itl_s.append(t - live.last_token_s)
            live.last_token_s = t
        if u.finish_reason is not None:
            self._end(t, u.seq_id, u.error if u.finish_reason == "error" else None)

    def _end(self, t: float, rid: str, error: str | None) -> None:
        live = self._live.pop(rid)
        self._last_end = max(self._last_end, t)
        rec = live.record
        rec.output_tokens = len(live.output)
        rec.e2e_s = t - live.sent_s
        rec.ok = error is None and rec.ttft_s is not None
        rec.error = error
        if self.on_progress is not None:
            self.on_progress(1)
        session = self._sessions[live.session]
        next_turn = live.turn + 1
        if rec.ok and next_turn < session.num_turns:
            self._replies.setdefault(live.session, []).append(live.output)
            self._push(t + session.think_s, SEND, (live.session, next_turn))
            return
        self._replies.pop(live.session, None)
        if self._pending:  # a concurrency slot frees up
            nxt = self._pending.pop(0)
            self._push(max(t, self._starts[nxt]), SEND, (nxt, 0))
