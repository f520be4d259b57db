"""`kvmesh router`: an OpenAI-compatible proxy that places each request on an instance.

httpx to the instances (pooled keep-alive connections, streamed bodies), passed through
chunk by chunk. Failover: until the first byte of an instance's answer has reached the
client, a failed instance (connection error, 5xx, 429, or a stream that ends before its
first byte) is taken out and the request goes to the next choice, up to `max_attempts`.
After that, a failure ends the stream with an SSE error event and `[DONE]`: never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import TypeVar

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask

from kvmesh.config import RouterConfig
from kvmesh.model.tokenizer import Tokenizer
from kvmesh.router.metrics import RouterMetrics
from kvmesh.router.policies import RouteRequest, RouterState, RouteWeights, make_route_policy
from kvmesh.router.prompt import KeyMaker, view
from kvmesh.router.upstreams import Instance, Upstreams
from kvmesh.server.auth import KeyAuth
from kvmesh.server.errors import APIError, api_error_handler, error_body
from kvmesh.tenants import TenantTable, cache_salt

log = logging.getLogger("kvmesh.router")
RETRYABLE = {HTTPStatus.TOO_MANY_REQUESTS, 500, 502, 503, 504}
UNAVAILABLE = {502, 503, 504}
DISCONNECT_POLL_S = 0.5  # how often a wait for an instance checks that the client is there
T = TypeVar("T")
HOP_HEADERS = ("content-type", "retry-after", "cache-control")
INLINE_TOKENIZE_BYTES = 8192  # bodies up to this are tokenized on the event loop


@dataclass
class _Refused:
    status: int
    body: bytes
    headers: dict[str, str]


def load_tokenizer(model: str) -> Tokenizer | None:
    from kvmesh.model.registry import resolve_model

    try:
        return Tokenizer(resolve_model(model, progress=False).path)
    except (FileNotFoundError, OSError, ValueError) as exc:
        log.warning("no tokenizer for %r (%s): the kv policy routes by load only", model, exc)
        return None


class Router:
    def __init__(self, config: RouterConfig, client: httpx.AsyncClient,
                 tokenizer: Tokenizer | None):
        self.config = config
        weights = RouteWeights(config.load_cost_tokens, config.chars_per_token,
                               config.session_max_imbalance)
        self.state = RouterState(weights)
        self.policy = make_route_policy(config.policy, self.state)
        self.upstreams = Upstreams(config.instances, self.state, client, config.poll_interval_s)
        self.client = client
        self.keys = KeyMaker(tokenizer if config.policy in ("kv", "session") else None)
        table = (TenantTable.load(config.tenants, config.api_keys) if config.tenants
                 else TenantTable.from_keys(config.api_keys))
        self.auth = KeyAuth(table)
        self.metrics = RouterMetrics()

    async def handle(self, request: Request, path: str) -> Response:
        tenant = self.auth.tenant(request.headers.get("authorization"))
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(HTTPStatus.BAD_REQUEST,
                           f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
        v = view(body, request.headers)
        salt = cache_salt(tenant.salt if tenant is not None else None, v.body_salt)
        scheme = self.upstreams.key_scheme()
        if self.keys.tokenizer is not None and len(raw) > INLINE_TOKENIZE_BYTES:
            route = await asyncio.to_thread(self.keys.route_request, v, salt, scheme)
        else:  # short, or nothing to tokenize: a thread hop would cost more than it saves
            route = self.keys.route_request(v, salt, scheme)
        self.auth.charge(tenant, route.num_prompt_tokens + v.max_tokens)
        return await self._dispatch(request, path, raw, route)

    async def _dispatch(self, request: Request, path: str, raw: bytes,
                        route: RouteRequest) -> Response:
        tried: set[int] = set()
        refused: list[_Refused] = []
        headers = {k: v for k, v in request.headers.items()
                   if k in ("authorization", "content-type", "accept")}
        for _ in range(self.config.max_attempts):
            candidates = [i for i in self.upstreams.healthy() if i.number not in tried]
            if not candidates:
                break
            inst = candidates[self.policy.choose(route, [c.load() for c in candidates])]
            tried.add(inst.number)
            if route.block_keys:
                hit = self.state.kv.match(inst.number, route.block_keys) * route.block_size
                self.metrics.predicted_hit_tokens.inc(hit)
            try:
                result = await self._open(request, inst, path, raw, headers)
            except _ClientGone:  # nobody to answer; the instance saw its request close
                return Response(status_code=499)
            if isinstance(result, Response):
                self.metrics.requests.labels(inst.url, str(result.status_code)).inc()
                return result
            refused.append(result)
            self.metrics.retries.inc()
        return self._no_instance(refused)

    async def _open(self, request: Request, inst: Instance, path: str, raw: bytes,
                    headers: dict[str, str]) -> Response | _Refused:
        """Send to `inst` and wait for its first byte; a refusal or failure before it is a
        `_Refused` (the caller tries elsewhere). The lease on `inst` is released exactly
        once: here on any early exit, else when the relay ends (or never starts)."""
        lease = _Lease(inst)
        try:
            req = self.client.build_request("POST", inst.url + path, content=raw,
                                            headers=headers)
            resp = lease.resp = await _unless_gone(request, self.client.send(req, stream=True))
            if resp.status_code != HTTPStatus.OK:  # an error body: short, read it whole
                body = await resp.aread()
                await lease.release()
                return _answer(inst, resp, body)
            chunks = resp.aiter_raw()
            first = await _unless_gone(request, anext(chunks))
        except (httpx.HTTPError, StopAsyncIteration) as exc:
            await lease.release()
            inst.set_healthy(False, f"{type(exc).__name__}: {exc}")
            return _Refused(HTTPStatus.BAD_GATEWAY, b"", {})
        except BaseException:
            await lease.release()
            raise
        is_sse = "text/event-stream" in resp.headers.get("content-type", "")
        return StreamingResponse(self._relay(lease, first, chunks, is_sse),
                                 status_code=resp.status_code, headers=_pass_headers(resp),
                                 background=BackgroundTask(lease.release))

    async def _relay(self, lease: _Lease, first: bytes, chunks: AsyncIterator[bytes],
                     is_sse: bool) -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        except httpx.HTTPError as exc:
            lease.inst.set_healthy(False, f"failed mid-stream: {type(exc).__name__}")
            self.metrics.broken_streams.inc()
            if is_sse:
                err = error_body(HTTPStatus.BAD_GATEWAY,
                                 f"instance failed after the first token: {type(exc).__name__}")
                yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
        finally:
            await lease.release()

    def _no_instance(self, refused: list[_Refused]) -> Response:
        overloaded = [r for r in refused if r.status == HTTPStatus.TOO_MANY_REQUESTS]
        if overloaded and len(overloaded) == len(refused):
            waits = [_retry_after(r) for r in overloaded]
            self.metrics.requests.labels("", "429").inc()
            return Response(overloaded[0].body, 429, headers={
                "Retry-After": str(min(waits)),
                "content-type": overloaded[0].headers.get("content-type", "application/json")})
        self.metrics.requests.labels("", "503").inc()
        why = "every instance tried failed" if refused else "no healthy instance"
        return JSONResponse(error_body(503, f"{why}; retry shortly"), 503,
                            headers={"Retry-After": "1"})


class _ClientGone(Exception):
    """The client disconnected while the router waited for an instance."""


class _Lease:
    """One request's claim on an instance (its in-flight count), released exactly once."""

    def __init__(self, inst: Instance):
        self.inst = inst
        self.resp: httpx.Response | None = None
        self._is_released = False
        inst.num_in_flight += 1

    async def release(self) -> None:
        if not self._is_released:
            self._is_released = True
            self.inst.num_in_flight -= 1
            await _close(self.resp)


async def _unless_gone(request: Request, aw: Awaitable[T]) -> T:
    """Await `aw`, but give up (and cancel it) if the client disconnects meanwhile."""
    task = asyncio.ensure_future(aw)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise _ClientGone


def _answer(inst: Instance, resp: httpx.Response, body: bytes) -> Response | _Refused:
    """A non-200 answer: passed to the client (400, 401, 404...), or a refusal to try
    elsewhere (429, 5xx). A 502/503/504 also takes the instance out until its next probe;
    a 500 is one request's failure, not the instance's."""
    if resp.status_code in RETRYABLE:
        if resp.status_code in UNAVAILABLE:
            inst.set_healthy(False, f"HTTP {resp.status_code}")
        return _Refused(resp.status_code, body, _pass_headers(resp))
    return Response(body, resp.status_code, headers=_pass_headers(resp))


def _retry_after(r: _Refused) -> int:
    try:
        return max(1, math.ceil(float(r.headers.get("retry-after", "1"))))
    except ValueError:
        return 1


def _pass_headers(resp: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower() in HOP_HEADERS}


async def _close(resp: httpx.Response | None) -> None:
    if resp is not None:
        with contextlib.suppress(Exception):
            await resp.aclose()


def create_router_app(config: RouterConfig, tokenizer: Tokenizer | None = None) -> FastAPI:
    holder: dict[str, Router] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
        timeout = httpx.Timeout(config.request_timeout_s, connect=config.connect_timeout_s)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            router = Router(config, client, tokenizer)
            holder["router"] = router
            await router.upstreams.start()
            router.metrics.bind(router)
            yield
            await router.upstreams.close()

    app = FastAPI(title="kvmesh router", lifespan=lifespan)
    app.add_exception_handler(APIError, api_error_handler)
    _add_routes(app, holder)
    return app


def _add_routes(app: FastAPI, holder: dict[str, Router]) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await holder["router"].handle(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await holder["router"].handle(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        router = holder["router"]
        router.auth.tenant(request.headers.get("authorization"))
        for inst in router.upstreams.healthy():
            with contextlib.suppress(httpx.HTTPError):
                resp = await router.client.get(inst.url + "/v1/models", headers={
                    k: v for k, v in request.headers.items() if k == "authorization"})
                return Response(resp.content, resp.status_code, headers=_pass_headers(resp))
        raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, "no healthy instance",
                       headers={"Retry-After": "1"})

    @app.get("/health")
    async def health() -> JSONResponse:
        router = holder["router"]
        healthy = [i.url for i in router.upstreams.healthy()]
        return JSONResponse({"status": "ok" if healthy else "no healthy instance",
                             "healthy": healthy,
                             "instances": [i.url for i in router.upstreams.instances]},
                            200 if healthy else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prom() -> Response:
        return Response(generate_latest(holder["router"].metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)


def run_router(config: RouterConfig) -> None:
    import uvicorn

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request
    tokenizer = load_tokenizer(config.model) if config.policy in ("kv", "session") else None
    app = create_router_app(config, tokenizer)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level,
                access_log=False)


__all__ = ["Router", "create_router_app", "run_router"]
