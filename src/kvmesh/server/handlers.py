"""Completion and chat handlers: submit to the engine, then stream SSE or build one body."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvmesh.engine.async_engine import AsyncEngine, RequestStream
from kvmesh.engine.scheduler import QueueFullError
from kvmesh.model.tokenizer import Tokenizer
from kvmesh.server.errors import APIError
from kvmesh.server.metrics import RequestTimer, ServerMetrics
from kvmesh.server.responses import (
    Choice,
    LogprobFormatter,
    Usage,
    chat_body,
    chat_delta,
    chunk,
    completion_body,
    finish_reason,
    sse,
    usage_comment,
)
from kvmesh.server.result_cache import CachedResult, ResultCache, make_result
from kvmesh.server.tools import ToolParser, ToolPlan
from kvmesh.types import RequestDelta, SamplingParams, TenantClass


@dataclass
class Job:
    """One API call: its prompts (token ids), sampling parameters and bookkeeping."""

    kind: str  # "completion" or "chat"
    model: str
    prompts: list[list[int]]
    params: SamplingParams
    priority: int
    cache_salt: str | None
    stream: bool
    include_usage: bool
    top_logprobs: int = 0
    tenant: TenantClass | None = None
    tools: ToolPlan | None = None
    result_cache: bool = True  # the client may opt out
    is_output_capped: bool = True  # False: the client set no max_tokens (the default fills)
    usage_comment: bool = False  # end a stream with `: usage {...}` (a router asked)

    @property
    def is_deterministic(self) -> bool:
        return self.params.is_greedy or self.params.seed is not None

    def result_key(self) -> tuple:
        """Everything that shapes the answer (not stream or include_usage: a cached
        answer replays through either path)."""
        tools = (self.tools.mode, self.tools.parallel,
                 tuple(t.function.name for t in self.tools.tools)) if self.tools else None
        return (self.kind, self.model, self.tenant.name if self.tenant else None,
                self.cache_salt, tuple(tuple(p) for p in self.prompts), self.params,
                self.top_logprobs, tools)

    @property
    def num_charged_tokens(self) -> int:
        """What a tenant's tokens_per_min is charged up front: the prompts plus the most
        output the client asked for (none when it set no max_tokens: the rest of the
        context is no estimate). The charge is settled with what the request used when it
        ends (`Collector`'s `on_end`)."""
        n = self.params.n * (self.params.max_tokens or 0) if self.is_output_capped else 0
        return sum(len(p) + n for p in self.prompts)

    @property
    def rid(self) -> str:
        return self._rid

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self._rid = f"{prefix}-{uuid.uuid4().hex}"


async def submit_all(engine: AsyncEngine, job: Job, retry_after: int) -> list[RequestStream]:
    streams: list[RequestStream] = []
    try:
        for i, ids in enumerate(job.prompts):
            streams.append(
                await engine.submit(ids, job.params, f"{job.rid}-{i}", job.priority,
                                    job.cache_salt, job.tenant)
            )
    except ValueError as exc:
        _close(streams)
        raise APIError(HTTPStatus.BAD_REQUEST, str(exc)) from exc
    except QueueFullError as exc:
        _close(streams)
        is_slo = exc.retry_after_s is not None  # admission control predicted a miss
        wait_s = exc.retry_after_s if exc.retry_after_s is not None else retry_after
        raise APIError(
            HTTPStatus.TOO_MANY_REQUESTS,
            f"server is overloaded: {exc}",
            headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            reason="slo" if is_slo else "queue_full",
        ) from exc
    except BaseException:
        _close(streams)
        raise
    return streams


def _close(streams: list[RequestStream]) -> None:
    for s in streams:
        s.close()


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestDelta]]:
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    q: asyncio.Queue[tuple[int, RequestDelta] | None] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        async for delta in s:
            await q.put((i, delta))
        await q.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        done = 0
        while done < len(streams):
            item = await q.get()
            if item is None:
                done += 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


class ReplayStream:
    """A cached answer's deltas for one prompt, streamed again."""

    def __init__(self, deltas: tuple[RequestDelta, ...]):
        self._deltas = iter(deltas)

    def __aiter__(self) -> ReplayStream:
        return self

    async def __anext__(self) -> RequestDelta:
        try:
            return next(self._deltas)
        except StopIteration:
            raise StopAsyncIteration from None

    def close(self) -> None:
        pass


class _NoTimer:
    def on_prompt(self, *_: Any) -> None:
        pass

    def on_tokens(self, *_: Any, **__: Any) -> None:
        pass

    def on_finish(self, *_: Any) -> None:
        pass


class Collector:
    """Folds deltas into choices, usage and metrics. With `on_complete`, it also records
    the deltas and hands them over once every choice has ended normally."""

    def __init__(self, job: Job, metrics: ServerMetrics | None, start: float,
                 on_complete: Callable[[CachedResult], object] | None = None,
                 on_end: Callable[[int], object] | None = None):
        """`metrics` None: a replayed answer, kept out of the latency and token metrics.
        `on_end` is told, once, the tokens the request used: its prompts and the output
        generated, however it ended (the tenant's token budget is settled with it)."""
        self.job = job
        self.usage = Usage()
        self._on_complete = on_complete
        self._on_end = on_end
        self._recorded: list[list[RequestDelta]] = [[] for _ in job.prompts]
        self.timer: RequestTimer | _NoTimer = (
            RequestTimer(metrics, start, job.tenant, len(job.prompts) * job.params.n)
            if metrics is not None else _NoTimer())
        n = job.params.n
        self.choices = [Choice(i, parser=ToolParser(job.tools) if job.tools else None)
                        for i in range(len(job.prompts) * n)]
        self._ended = False

    def end(self, reason: str) -> None:
        """Count the request as finished with `reason` in the metrics, once: a request that
        fails, or whose client leaves, is counted (`abort`, `error`) as well as one that
        ends normally."""
        if not self._ended:
            self._finish(time.monotonic(), reason)

    def _finish(self, now: float, reason: str) -> None:
        self._ended = True
        self.timer.on_finish(now, reason)
        if self._on_end is not None:
            self._on_end(sum(len(p) for p in self.job.prompts) + self.usage.completion_tokens)

    def add(self, prompt_index: int, delta: RequestDelta) -> Choice:
        if delta.error:
            self.end("error")
            raise APIError(HTTPStatus.INTERNAL_SERVER_ERROR, delta.error)
        index = prompt_index * self.job.params.n + delta.index
        choice = self.choices[index]
        if self._on_complete is not None:
            self._recorded[prompt_index].append(delta)
        now = time.monotonic()
        if self.usage.add(prompt_index, delta):
            self.timer.on_prompt(
                delta.num_prompt_tokens, delta.num_cached_tokens, delta.queue_time_s
            )
        self.timer.on_tokens(now, len(delta.new_token_ids), first_of_request=not choice.token_ids)
        choice.add_text(delta.new_text)
        choice.token_ids.extend(delta.new_token_ids)
        if delta.logprobs:
            choice.logprobs.extend(delta.logprobs)
        if delta.finished:
            choice.finish(finish_reason(delta))
            if all(c.finish_reason for c in self.choices):
                self._finish(now, choice.finish_reason or "stop")
                self._complete()
        return choice


    def _complete(self) -> None:
        ended = all(c.finish_reason in ("stop", "length", "tool_calls") for c in self.choices)
        if self._on_complete is not None and ended:
            self._on_complete(make_result(self._recorded))


async def _watch_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


async def respond(
    request: Request,
    engine: AsyncEngine,
    job: Job,
    metrics: ServerMetrics,
    tokenizer: Tokenizer,
    retry_after: int,
    cache: ResultCache | None = None,
    on_end: Callable[[int], object] | None = None,
) -> Any:
    """Serve `job`. `on_end` (see `Collector`) hears 0 when the engine refuses it."""
    start = time.monotonic()
    use_cache = cache is not None and job.result_cache and job.is_deterministic
    key = job.result_key() if use_cache else None
    hit = cache.get(key) if cache is not None and key is not None else None
    streams: list[Any]
    if hit is not None:
        streams = [ReplayStream(deltas) for deltas in hit.deltas]
        collector = Collector(job, None, start, on_end=on_end)
        collector.usage.result_cache_hit = True
    else:
        try:
            streams = await submit_all(engine, job, retry_after)
        except BaseException as exc:
            if on_end is not None:
                on_end(0)  # refused: nothing used
            if isinstance(exc, APIError):
                metrics.on_refused(job.tenant.name if job.tenant else None, exc)
            raise
        store = ((lambda result: cache.put(key, result))
                 if cache is not None and key is not None else None)
        collector = Collector(job, metrics, start, store, on_end)
    fmt = LogprobFormatter(tokenizer) if job.params.logprobs is not None else None
    if job.stream:
        def settle() -> None:
            _close(streams)
            collector.end("abort")  # a no-op once the request has ended

        return _Settled(
            settle,
            _sse(job, streams, collector, fmt),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    return await _whole(request, job, streams, collector, fmt)


class _Settled(StreamingResponse):
    """A stream whose request is ended (its engine streams closed, its metrics and token
    budget settled) however the response ends: also when the client left before the
    body began, so the body's own `finally` never ran."""

    def __init__(self, on_close: Callable[[], object], content: Any, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _whole(request: Request, job: Job, streams, collector: Collector, fmt) -> JSONResponse:
    async def collect() -> None:
        async for i, delta in merged(streams):
            collector.add(i, delta)

    work = asyncio.create_task(collect())
    watch = asyncio.create_task(_watch_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
        _close(streams)
        collector.end("abort")  # a no-op once every choice has finished
    if not work.done() or work.cancelled():
        return JSONResponse({"error": "client disconnected"}, status_code=499)
    work.result()
    if job.kind == "chat":
        body = chat_body(
            job.rid, job.model, collector.choices, collector.usage, fmt, job.top_logprobs
        )
    else:
        body = completion_body(job.rid, job.model, collector.choices, collector.usage, fmt)
    return JSONResponse(body)


def _choice_chunk(job: Job, choice: Choice, delta: RequestDelta, fmt, first: bool) -> dict:
    reason = choice.finish_reason if delta.finished else None
    lps = None
    if fmt is not None and delta.logprobs:
        ids, entries = list(delta.new_token_ids), list(delta.logprobs)
        offset = len(choice.text) - len(delta.new_text)
        lps = (
            fmt.chat(ids, entries, job.top_logprobs)
            if job.kind == "chat"
            else fmt.completion(ids, entries, offset)
        )
    if job.kind == "chat":
        return {"index": choice.index, "delta": chat_delta(choice, first), "logprobs": lps,
                "finish_reason": reason}
    return {"index": choice.index, "text": delta.new_text, "logprobs": lps, "finish_reason": reason}


async def _sse(job: Job, streams, collector: Collector, fmt) -> AsyncIterator[str]:
    """The SSE body. `_Settled` ends the request however the body stops."""
    kind = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    async for i, delta in merged(streams):
        try:
            choice = collector.add(i, delta)
        except APIError as exc:
            yield sse(
                {
                    "error": {
                        "message": exc.message,
                        "type": "server_error",
                        "code": int(exc.status),
                    }
                }
            )
            break
        first = len(choice.token_ids) == len(delta.new_token_ids)
        body = _choice_chunk(job, choice, delta, fmt, first)
        yield sse(chunk(job.rid, job.model, kind, [body], with_usage_field=job.include_usage))
    if job.include_usage:
        yield sse(chunk(job.rid, job.model, kind, [], usage=collector.usage.body()))
    elif job.usage_comment:  # a comment line, which clients skip: for a router's budgets
        yield usage_comment(collector.usage.body())
    yield sse("[DONE]")
