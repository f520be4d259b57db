"""Run the server with uvicorn; SIGTERM drains in-flight requests, then exits."""

from __future__ import annotations

import uvicorn

from kvmesh.config import EngineConfig, ServerConfig
from kvmesh.server.api import create_app


def run_server(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    app = create_app(engine_config, server_config)
    uvicorn.run(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=server_config.log_level,
        timeout_graceful_shutdown=int(server_config.graceful_shutdown_s),
        access_log=False,
    )
