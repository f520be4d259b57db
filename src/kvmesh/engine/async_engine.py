"""Runs the engine core on its own thread behind a command queue; streams deltas to asyncio.

The event loop never runs model code, so the HTTP side stays responsive under load
(torch ops release the GIL). Commands (add, abort) are applied between steps, in order.

Given a factory, the engine is also built on that thread, so all model code runs on one
thread: OpenMP keeps a thread team per calling thread, and with two teams (one left from
loading) it counts more threads than cores and its workers sleep between parallel regions
instead of spinning. On 2 cores that made a single stream 2-3x slower than `LLM`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from kvmesh.engine.engine import LLMEngine
from kvmesh.engine.speculation import SpecCounts
from kvmesh.kvstore.tier import TierStats
from kvmesh.types import RequestDelta, SamplingParams, TenantClass

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestDelta]
    num_open: int


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    tiers: tuple[TierStats, ...] = ()
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_acceptance_rate: float = 0.0
    spec_tokens_per_step: float = 0.0
    num_prefill_tokens: int = 0  # prompt tokens queued to prefill (Scheduler)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]):
        """`engine`, or a factory run on the engine thread (its error is raised here)."""
        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(engine, ready),
                                        name="kvmesh-engine", daemon=True)
        self._stopped = threading.Event()
        # Called on the engine thread after each step with its start and end times
        # (perf_counter) and whether work is left (the next step follows at once).
        self.step_observer: Callable[[float, float, bool], None] | None = None
        self._thread.start()
        self.engine: LLMEngine = ready.result()
        # What the frontend needs, so it never reaches through the engine:
        self.inputs = self.engine.inputs  # thread-safe: tokenize + validate off the loop
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.model_name = self.engine.loaded.name
        self.num_blocks = self.engine.loaded.num_blocks
        self.block_size = self.engine.core.block_size

    # engine thread ---------------------------------------------------------------------

    def _run(self, engine: LLMEngine | Callable[[], LLMEngine], ready: Future) -> None:
        try:
            ready.set_result(engine if isinstance(engine, LLMEngine) else engine())
        except BaseException as exc:  # noqa: BLE001 - raised in the constructing thread
            ready.set_exception(exc)
            return
        self.engine = ready.result()
        self._loop()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            busy = self.engine.has_unfinished_requests()
            if not self._drain(block=not busy):
                break
            if self.engine.has_unfinished_requests():
                start = time.perf_counter()
                try:
                    deltas = self.engine.step()
                except Exception:  # noqa: BLE001 - a bug outside a batch (a tier, a source):
                    log.exception("engine step failed")  # keep serving, never go silent
                    time.sleep(0.01)  # bounded retries, bounded logs
                    continue
                self._dispatch(deltas)
                if self.step_observer is not None:
                    self.step_observer(start, time.perf_counter(),
                                       self.engine.has_unfinished_requests())

    def _drain(self, block: bool) -> bool:
        while True:
            try:
                cmd = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return True
            if cmd is None:
                return False
            cmd()
            block = False

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            if delta.finished:
                stream.num_open -= 1
                if stream.num_open == 0:
                    del self._streams[delta.request_id]
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, delta)

    def _call(self, fn: Callable[[], Any]) -> Future:
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

        self._inbox.put(run)
        return fut

    # any thread ------------------------------------------------------------------------

    def run_on_engine(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between steps; its result or error in the Future."""
        return self._call(fn)

    def stats(self) -> EngineStats:
        core = self.engine.core
        store = core.store
        tiers = tuple(copy.copy(t) for t in store.all_stats()) if store else ()
        spec = core.speculator.counts() if core.speculator is not None else SpecCounts()
        return EngineStats(core.num_running, core.num_waiting, core.pool.usage,
                           core.scheduler.num_preemptions, tiers, spec.drafted, spec.accepted,
                           spec.acceptance_rate, spec.tokens_per_step,
                           core.scheduler.num_prefill_tokens)

    async def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        tenant: TenantClass | None = None,
    ) -> RequestStream:
        """Queue a prompt that `inputs` tokenized and validated; raises ValueError or
        QueueFullError if the engine refuses it."""
        rid = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)

        def add() -> None:
            self.engine.add_tokens(rid, prompt_ids, params, priority, cache_salt,
                                   tenant=tenant)
            self._streams[rid] = stream

        await asyncio.wrap_future(self._call(add))
        return RequestStream(self, rid, stream.queue, params.n)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, **kwargs: Any
    ) -> AsyncIterator[RequestDelta]:
        stream = await self.submit(prompt_ids, params, **kwargs)
        async with stream:
            async for delta in stream:
                yield delta

    def abort(self, request_id: str) -> None:
        def run() -> None:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

        self._inbox.put(run)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread, then persist the tiers (a restart comes back warm)."""
        self._stopped.set()
        self._inbox.put(None)
        self._thread.join(timeout)
        self.engine.close()


class RequestStream:
    """Deltas of one submitted request. Closing it before the end aborts the request."""

    def __init__(
        self, engine: AsyncEngine, request_id: str, q: asyncio.Queue[RequestDelta], num_seqs: int
    ):
        self.engine = engine
        self.request_id = request_id
        self._queue = q
        self._remaining = num_seqs

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if not self._remaining:
            raise StopAsyncIteration
        delta = await self._queue.get()
        self._remaining -= delta.finished
        return delta

    def close(self) -> None:
        if self._remaining:
            self._remaining = 0
            self.engine.abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
