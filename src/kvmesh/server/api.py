"""FastAPI app: OpenAI routes, health/readiness, metrics. The engine loads in the background.

Until the model is loaded, /health answers 200 and everything else 503.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any

import msgspec
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvmesh import __version__
from kvmesh.config import EngineConfig, ServerConfig
from kvmesh.engine.async_engine import AsyncEngine
from kvmesh.engine.engine import LLMEngine
from kvmesh.engine.warmup import freeze_startup_heap
from kvmesh.mesh.node import MeshNode
from kvmesh.mesh.setup import engine_config_for_mesh, mesh_config, start_mesh
from kvmesh.router.usage import USAGE_HEADER
from kvmesh.server.auth import KeyAuth
from kvmesh.server.errors import APIError, api_error_handler, error_body, validation_error_handler
from kvmesh.server.handlers import Job, respond
from kvmesh.server.jobs import chat_job, completion_job
from kvmesh.server.kv_publisher import KVEventPublisher
from kvmesh.server.metrics import MeshCollector, ResultCacheCollector, ServerMetrics
from kvmesh.server.protocol import ChatCompletionRequest, CompletionRequest
from kvmesh.server.result_cache import ResultCache
from kvmesh.tenants import TenantTable

log = logging.getLogger("kvmesh.server")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": desc}
    for code, desc in [
        (400, "invalid request"),
        (401, "missing or bad API key"),
        (404, "unknown model"),
        (429, "overloaded; retry after Retry-After seconds"),
        (503, "model loading"),
    ]
}


Auth = Annotated[str | None, Header(include_in_schema=False)]
STREAMING_OK: dict[int | str, dict[str, Any]] = {
    200: {"description": "a JSON body, or an SSE stream when stream=true",
          "content": {"application/json": {}, "text/event-stream": {}}},
    **ERRORS,
}


@dataclass
class AppState:
    engine_config: EngineConfig
    server_config: ServerConfig
    engine: AsyncEngine | None = None
    load_error: str | None = None
    model_name: str = ""
    publisher: KVEventPublisher | None = None
    mesh: MeshNode | None = None
    result_cache: ResultCache | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def require_engine(self) -> AsyncEngine:
        if self.engine is None:
            msg = (
                f"model failed to load: {self.load_error}"
                if self.load_error
                else ("model is loading; retry shortly")
            )
            raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, msg, headers={"Retry-After": "5"})
        return self.engine


def _load(state: AppState, metrics: ServerMetrics) -> None:
    try:  # built on the engine's own thread (see AsyncEngine)
        async_engine = AsyncEngine(lambda: LLMEngine(state.engine_config, progress=False))
    except (ValueError, FileNotFoundError) as exc:  # a setting or a path: no traceback
        log.error("model failed to load: %s", exc)
        state.load_error = f"{type(exc).__name__}: {exc}"
        return
    except Exception as exc:  # noqa: BLE001 - reported by /ready and 503s
        log.exception("model failed to load")
        state.load_error = f"{type(exc).__name__}: {exc}"
        return
    port = state.server_config.kv_events_port
    if port is not None:
        try:
            publisher = KVEventPublisher(state.server_config.host, port)
        except ValueError as exc:
            log.error("%s", exc)
            state.load_error = str(exc)
            async_engine.shutdown()
            return
        outbox = async_engine.engine.core.outbox
        async_engine.run_on_engine(lambda: outbox.subscribe(publisher.on_events)).result()
        state.publisher = publisher
        log.info("publishing KV events on port %d", port)
    if state.server_config.p2p_port is not None:
        try:
            state.mesh = start_mesh(async_engine, mesh_config(state.server_config))
        except ValueError as exc:
            log.error("%s", exc)
            state.load_error = str(exc)
            async_engine.shutdown()
            return
    state.model_name = state.server_config.served_model_name or async_engine.model_name
    metrics.model_name = state.model_name
    frozen = freeze_startup_heap()  # before /ready: its collection stalls for ~0.1 s
    state.engine = async_engine
    log.info("model %s ready (%d KV blocks; %d startup objects out of the GC's walks)",
             state.model_name, async_engine.num_blocks, frozen)


def load_tenants(config: ServerConfig) -> TenantTable:
    """The tenants file (`--tenants`) and `--api-keys`, as one table."""
    if config.tenants:
        return TenantTable.load(config.tenants, config.api_keys)
    return TenantTable.from_keys(config.api_keys)


def create_app(engine_config: EngineConfig, server_config: ServerConfig) -> FastAPI:
    engine_config = engine_config_for_mesh(engine_config, server_config)
    state = AppState(engine_config, server_config)
    metrics = ServerMetrics(server_config.served_model_name or engine_config.model.model)
    metrics.bind(lambda: state.engine.stats() if state.engine else None)
    metrics.registry.register(MeshCollector(lambda: state.mesh.view() if state.mesh else None))
    if server_config.result_cache_bytes:
        state.result_cache = ResultCache(server_config.result_cache_bytes)
        metrics.registry.register(ResultCacheCollector(state.result_cache))
    auth = KeyAuth(load_tenants(server_config))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        loader = asyncio.create_task(asyncio.to_thread(_load, state, metrics))
        yield
        await loader
        if state.mesh is not None:
            state.mesh.stop()
        if state.engine is not None:
            state.engine.shutdown()
        if state.publisher is not None:
            state.publisher.close()
        gc.unfreeze()  # an app run inside a longer process (the profile) can be collected

    app = FastAPI(title="kvmesh", version=__version__, lifespan=lifespan)
    app.state.kvmesh = state
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), 500)

    _add_routes(app, state, metrics, auth)
    _document_model_names(app, state)
    return app


def _document_model_names(app: FastAPI, state: AppState) -> None:
    """Publish the one accepted `model` value in the schema, once it is known."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        schema = base()
        if state.model_name:
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                props = schema["components"]["schemas"][name]["properties"]
                props["model"] = {"anyOf": [{"type": "string", "enum": [state.model_name]},
                                            {"type": "null"}], "title": "Model"}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _check_model(state: AppState, requested: str | None) -> None:
    if requested and requested != state.model_name:
        raise APIError(
            HTTPStatus.NOT_FOUND,
            f"model {requested!r} does not exist; this server serves {state.model_name!r}",
            err_type="model_not_found",
            param="model",
        )


def _add_routes(app: FastAPI, state: AppState, metrics: ServerMetrics, auth: KeyAuth) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", responses={503: ERRORS[503]})
    async def ready() -> dict[str, str]:
        state.require_engine()
        return {"status": "ready", "model": state.model_name}

    @app.get("/metrics", include_in_schema=False)
    async def prom() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/load", include_in_schema=False)
    async def load(authorization: Auth = None) -> dict[str, Any]:
        """What a router needs to place requests: queue, running, prefill tokens queued, KV
        usage, events port. Behind the API keys when there are any, like /kv/snapshot and
        /mesh (what this instance caches is a tenant's business)."""
        auth.tenant(authorization)
        engine = state.require_engine()
        stats = engine.stats()
        pub = state.publisher
        return {"num_running": stats.num_running, "num_waiting": stats.num_waiting,
                "num_prefill_tokens": stats.num_prefill_tokens,
                "kv_usage": stats.kv_cache_usage, "model": state.model_name,
                "block_size": engine.block_size,
                "key_scheme": list(engine.engine.core.key_scheme()),
                "kv_events_port": pub.port if pub else None,
                "instance_id": pub.instance_id if pub else None}

    @app.get("/kv/snapshot", include_in_schema=False, responses={404: {}, 503: ERRORS[503]})
    async def kv_snapshot(authorization: Auth = None) -> Response:
        auth.tenant(authorization)
        engine = state.require_engine()
        pub = state.publisher
        if pub is None:
            raise APIError(HTTPStatus.NOT_FOUND, "KV events are off (no --kv-events-port)")
        core = engine.engine.core
        snap = await asyncio.wrap_future(engine.run_on_engine(lambda: pub.snapshot(core)))
        return Response(msgspec.msgpack.encode(snap), media_type="application/x-msgpack")

    @app.get("/mesh", include_in_schema=False, responses={404: {}})
    async def mesh(authorization: Auth = None) -> dict[str, Any]:
        """The mesh as this instance sees it: members, their state, what each holds."""
        auth.tenant(authorization)
        if state.mesh is None:
            raise APIError(HTTPStatus.NOT_FOUND, "the mesh is off (no --p2p-port)")
        return state.mesh.view()

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models", responses={401: ERRORS[401], 503: ERRORS[503]})
    async def models(authorization: Auth = None) -> dict[str, Any]:
        auth.tenant(authorization)
        engine = state.require_engine()
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "kvmesh",
                    "max_model_len": engine.max_model_len,
                }
            ],
        }

    async def generate(body: Any, request: Request, authorization: str | None,
                       make_job: Callable[..., Job]) -> Any:
        tenant = auth.tenant(authorization)
        engine = state.require_engine()
        _check_model(state, body.model)
        job = await asyncio.to_thread(make_job, engine.inputs, state.model_name, body, tenant)
        job.usage_comment = request.headers.get(USAGE_HEADER) == "1"
        charged = job.num_charged_tokens
        try:
            auth.charge(tenant, charged)
        except APIError as exc:
            metrics.on_refused(tenant.name if tenant else None, exc)
            raise
        return await respond(request, engine, job, metrics, engine.tokenizer,
                             state.server_config.retry_after_s, state.result_cache,
                             lambda used: auth.settle(tenant, charged, used))

    @app.post("/v1/completions", responses=STREAMING_OK)
    async def completions(body: CompletionRequest, request: Request,
                          authorization: Auth = None) -> Any:
        return await generate(body, request, authorization, completion_job)

    @app.post("/v1/chat/completions", responses=STREAMING_OK)
    async def chat(body: ChatCompletionRequest, request: Request,
                   authorization: Auth = None) -> Any:
        return await generate(body, request, authorization, chat_job)
