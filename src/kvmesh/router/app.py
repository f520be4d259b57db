"""`kvmesh router`: an OpenAI-compatible proxy that places each request on an instance.

The two proxied endpoints run on raw ASGI (`exchange.py`) and reach the instances through
aiohttp (pooled keep-alive connections, streamed bodies), passed through chunk by chunk.
Why aiohttp rather than httpx here: on a Zen 1 core, a minimal raw-ASGI proxy added 1.9 ms
per streamed request (paired median) with httpx and 0.7 ms with aiohttp, whose HTTP parser
is compiled. The probes and `/v1/models` share its connection pool.

Failover: until the first byte of an instance's answer has reached the client, a failed
instance (connection error, 5xx, 429, or a stream that ends before its first byte) is taken
out and the request goes to the next choice, up to `max_attempts`. After that, a failure
ends the stream with an SSE error event and `[DONE]`: never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvmesh.model.tokenizer import Tokenizer
from kvmesh.router.config import RouterConfig
from kvmesh.router.exchange import ClientGone, Exchange, Receive, Scope, Send
from kvmesh.router.metrics import RouterMetrics
from kvmesh.router.policies import RouteRequest, RouterState, RouteWeights, make_route_policy
from kvmesh.router.prompt import KeyMaker, view
from kvmesh.router.upstreams import UPSTREAM_ERRORS, Instance, Upstreams
from kvmesh.router.usage import USAGE_HEADER, UsageTap
from kvmesh.server.auth import KeyAuth
from kvmesh.server.errors import APIError, api_error_handler, error_body
from kvmesh.server.keepalive import HTTP_KEEP_ALIVE_S
from kvmesh.tenants import TenantTable, cache_salt

log = logging.getLogger("kvmesh.router")
RETRYABLE = {HTTPStatus.TOO_MANY_REQUESTS, 500, 502, 503, 504}
UNAVAILABLE = {502, 503, 504}
PROXIED_PATHS = ("/v1/completions", "/v1/chat/completions")
FORWARD_HEADERS = ("authorization", "content-type", "accept")
MAX_BODY_BYTES = 64 << 20
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
    def __init__(self, config: RouterConfig, session: aiohttp.ClientSession,
                 tokenizer: Tokenizer | None):
        self.config = config
        weights = RouteWeights(config.load_cost_tokens, config.queue_weight,
                               config.chars_per_token, config.session_max_imbalance)
        self.state = RouterState(weights)
        self.policy = make_route_policy(config.policy, self.state)
        self.upstreams = Upstreams(config.instances, self.state, session,
                                   config.poll_interval_s,
                                   config.discover_interval_s if config.discover_mesh else None,
                                   config.upstream_api_key)
        self.session = session
        self.keys = KeyMaker(tokenizer if config.policy in ("kv", "session") else None)
        table = (TenantTable.load(config.tenants, config.api_keys) if config.tenants
                 else TenantTable.from_keys(config.api_keys))
        self.auth = KeyAuth(table)
        self.metrics = RouterMetrics()

    async def serve(self, ex: Exchange) -> None:
        """Answer one proxied request; every failure ends in an answer or a closed stream."""
        try:
            await self._handle(ex)
        except ClientGone:  # nobody to answer; the instance saw its request close
            pass
        except APIError as exc:
            if not ex.is_started:
                await ex.respond_error(exc)
        except Exception:
            log.exception("router failed on %s", ex.path)
            if not ex.is_started:
                await ex.respond_error(APIError(500, "the router failed on this request"))
        finally:
            ex.close()

    async def _handle(self, ex: Exchange) -> None:
        tenant = self.auth.tenant(ex.headers.get("authorization"))
        raw = await ex.read_body(MAX_BODY_BYTES)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, or too deep
            raise APIError(HTTPStatus.BAD_REQUEST,
                           f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
        v = view(body, ex.headers)
        salt = cache_salt(tenant.salt if tenant is not None else None, v.body_salt)
        scheme = self.upstreams.key_scheme()
        if self.keys.tokenizer is not None and len(raw) > INLINE_TOKENIZE_BYTES:
            route = await asyncio.to_thread(self.keys.route_request, v, salt, scheme)
        else:  # short, or nothing to tokenize: a thread hop would cost more than it saves
            route = self.keys.route_request(v, salt, scheme)
        charged = route.num_prompt_tokens + v.max_tokens * v.num_choices
        self.auth.charge(tenant, charged)
        await self._dispatch(ex, raw, route,
                             lambda used: self.auth.settle(tenant, charged, used))

    async def _dispatch(self, ex: Exchange, raw: bytes, route: RouteRequest,
                        settle: Callable[[int], None]) -> None:
        """Answer with an instance's answer, or with why none could. `settle` gets the
        tokens the request used, before the client has the answer's end: 0 if no instance
        took it or one refused it, else what the answer says (router/usage.py); it is not
        called if the answer says nothing (the estimate stands)."""
        tried: set[int] = set()
        refused: list[_Refused] = []
        headers = {k: v for k, v in ex.headers.items() if k in FORWARD_HEADERS}
        headers.setdefault("content-type", "application/json")  # the body parsed as JSON
        headers[USAGE_HEADER] = "1"  # a kvmesh stream ends with its usage (a comment line)
        for _ in range(self.config.max_attempts):
            candidates = [i for i in self.upstreams.healthy() if i.number not in tried]
            if not candidates:
                break
            inst = candidates[self.policy.choose(route, [c.load() for c in candidates])]
            tried.add(inst.number)
            if route.block_keys:
                hit = float(self.state.kv.match(inst.number, route.block_keys)
                            * route.block_size)
                self.metrics.predicted_hit_tokens.inc(hit)
            else:  # `prefix` guesses its hits: the one it chose by
                hit = float(getattr(self.policy, "last_hit_tokens", 0.0))
            lease = _Lease(inst, route.num_prompt_tokens - hit, settle)
            result = await self._open(ex, lease, raw, headers)
            if isinstance(result, int):
                self.metrics.requests.labels(inst.url, str(result)).inc()
                return
            refused.append(result)
            self.metrics.retries.inc()
        settle(0)
        await self._no_instance(ex, refused)

    async def _open(self, ex: Exchange, lease: _Lease, raw: bytes,
                    headers: dict[str, str]) -> int | _Refused:
        """Send to the lease's instance and wait for its first byte; a refusal or failure
        before it is a `_Refused` (the caller tries elsewhere), else the answer goes to the
        client and its status comes back. The lease is released exactly once, on every
        path."""
        inst = lease.inst
        try:
            resp = lease.resp = await ex.unless_gone(
                self.session.post(inst.url + ex.path, data=raw, headers=headers,
                                  allow_redirects=False))
            if resp.status != HTTPStatus.OK:  # an error body: short, read it whole
                body = await ex.unless_gone(resp.read())
                lease.release()
                return await _answer(ex, lease, resp, body)
            first = await ex.unless_gone(resp.content.readany())
            if not first:
                raise aiohttp.ClientPayloadError("the stream ended before its first byte")
            lease.prefilled()
        except UPSTREAM_ERRORS as exc:
            lease.release()
            inst.set_healthy(False, f"{type(exc).__name__}: {exc}")
            return _Refused(HTTPStatus.BAD_GATEWAY, b"", {})
        except BaseException:
            lease.release()
            raise
        try:
            await ex.start(resp.status, _pass_headers(resp))
            await self._relay(ex, lease, first)
        finally:
            lease.release()
        return resp.status

    async def _relay(self, ex: Exchange, lease: _Lease, first: bytes) -> None:
        """Pass the stream on; a client that leaves ends it at once (`ClientGone`: the
        lease closes the instance's connection, which aborts its request)."""
        assert lease.resp is not None
        resp = lease.resp
        is_sse = "text/event-stream" in resp.headers.get("content-type", "")
        tap = UsageTap(is_sse)
        try:
            with ex.watching():
                tap.feed(first)
                await ex.write(first)
                async for chunk in resp.content.iter_any():
                    tap.feed(chunk)
                    await ex.write(chunk)
            used = tap.used()
            if used is not None:
                lease.settle(used)
        except UPSTREAM_ERRORS as exc:
            lease.inst.set_healthy(False, f"failed mid-stream: {type(exc).__name__}")
            self.metrics.broken_streams.inc()
            if not is_sse:  # a cut JSON body must not look complete: end without the end
                return
            err = error_body(HTTPStatus.BAD_GATEWAY,
                             f"instance failed after the first token: {type(exc).__name__}")
            # the blank line first ends whatever event the instance had half sent
            await ex.write(f"\n\ndata: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode())
        await ex.end()

    async def _no_instance(self, ex: Exchange, refused: list[_Refused]) -> None:
        overloaded = [r for r in refused if r.status == HTTPStatus.TOO_MANY_REQUESTS]
        if overloaded and len(overloaded) == len(refused):
            waits = [_retry_after(r) for r in overloaded]
            self.metrics.requests.labels("", "429").inc()
            await ex.respond(429, overloaded[0].body, {
                "retry-after": str(min(waits)),
                "content-type": overloaded[0].headers.get("content-type", "application/json")})
            return
        self.metrics.requests.labels("", "503").inc()
        why = "every instance tried failed" if refused else "no healthy instance"
        await ex.respond_error(APIError(503, f"{why}; retry shortly",
                                        headers={"retry-after": "1"}))


class _Lease:
    """One request's claim on an instance (its in-flight count, and its predicted prefill
    until the first byte comes back), released exactly once. A response not read to its
    end is closed, not pooled: the instance sees the disconnect and stops generating."""

    def __init__(self, inst: Instance, prefill_tokens: float,
                 settle: Callable[[int], None] = lambda used: None):
        self.inst = inst
        self.resp: aiohttp.ClientResponse | None = None
        self._is_released = False
        self.settle = settle  # the tenant's charge, squared with what the request used
        self._prefill = max(0, int(prefill_tokens))
        self._epoch = inst.add_prefill(self._prefill)
        inst.num_in_flight += 1

    def prefilled(self) -> None:
        """The first byte is back (a first token, or a whole answer): no prefill left."""
        self.inst.drop_prefill(self._epoch, self._prefill)
        self._prefill = 0

    def release(self) -> None:
        if self._is_released:
            return
        self._is_released = True
        self.prefilled()
        self.inst.num_in_flight -= 1
        if self.resp is not None:
            if self.resp.content.at_eof():
                self.resp.release()
            else:
                self.resp.close()


async def _answer(ex: Exchange, lease: _Lease, resp: aiohttp.ClientResponse,
                  body: bytes) -> int | _Refused:
    """A non-200 answer: passed to the client (400, 401, 404...), or a refusal to try
    elsewhere (429, 5xx). A 502/503/504 also takes the instance out until its next probe;
    a 500 is one request's failure, not the instance's. An answer passed on used no
    tokens: the tenant's charge comes back."""
    if resp.status in RETRYABLE:
        if resp.status in UNAVAILABLE:
            lease.inst.set_healthy(False, f"HTTP {resp.status}")
        return _Refused(resp.status, body, _pass_headers(resp))
    lease.settle(0)
    await ex.respond(resp.status, body, _pass_headers(resp))
    return resp.status


def _retry_after(r: _Refused) -> int:
    try:
        return max(1, math.ceil(float(r.headers.get("retry-after", "1"))))
    except (ValueError, OverflowError):
        return 1


def _pass_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: resp.headers[k] for k in HOP_HEADERS if k in resp.headers}  # case-blind


class RouterASGI:
    """The router's ASGI entry: the proxied POSTs take the raw path (`Exchange`); the rest,
    lifespan included, goes to the FastAPI app."""

    def __init__(self, app: FastAPI, holder: dict[str, Router]):
        self.app = app
        self.holder = holder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] not in PROXIED_PATHS
                or "router" not in self.holder):
            await self.app(scope, receive, send)
        elif scope["method"] != "POST":
            await Exchange(scope, receive, send).respond_error(APIError(
                HTTPStatus.METHOD_NOT_ALLOWED, f"{scope['path']} takes POST",
                err_type="invalid_request_error", headers={"allow": "POST"}))
        else:
            router = self.holder["router"]
            await router.serve(Exchange(scope, receive, send,
                                        router.config.client_stall_timeout_s))


def create_router_app(config: RouterConfig, tokenizer: Tokenizer | None = None) -> RouterASGI:
    holder: dict[str, Router] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout_s,
                                        sock_read=config.request_timeout_s)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=timeout) as session:
            router = Router(config, session, tokenizer)
            holder["router"] = router
            await router.upstreams.start()
            router.metrics.bind(router)
            gc.collect()
            gc.freeze()  # what startup built is never garbage: later collections skip it
            yield
            await router.upstreams.close()

    app = FastAPI(title="kvmesh router", lifespan=lifespan)
    app.add_exception_handler(APIError, api_error_handler)
    _add_routes(app, holder)
    return RouterASGI(app, holder)


def _add_routes(app: FastAPI, holder: dict[str, Router]) -> None:
    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        router = holder["router"]
        router.auth.tenant(request.headers.get("authorization"))
        auth = {k: v for k, v in request.headers.items() if k == "authorization"}
        for inst in router.upstreams.healthy():
            with contextlib.suppress(*UPSTREAM_ERRORS):
                async with router.session.get(inst.url + "/v1/models", headers=auth) as resp:
                    return Response(await resp.read(), resp.status,
                                    headers=_pass_headers(resp))
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

    tokenizer = load_tokenizer(config.model) if config.policy in ("kv", "session") else None
    app = create_router_app(config, tokenizer)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level,
                timeout_keep_alive=HTTP_KEEP_ALIVE_S,
                access_log=False, proxy_headers=False)  # no client addresses are used


__all__ = ["Router", "create_router_app", "run_router"]
