"""Run the server with uvicorn; SIGTERM drains in-flight requests, then exits 0."""

from __future__ import annotations

import signal
import sys

import uvicorn

from kvmesh.config import EngineConfig, ServerConfig
from kvmesh.server.api import create_app
from kvmesh.server.keepalive import HTTP_KEEP_ALIVE_S


def _exit_cleanly(*_: object) -> None:
    sys.exit(0)


def run_server(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    app = create_app(engine_config, server_config)
    # uvicorn drains on SIGTERM, restores this handler and re-raises the signal: exit 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=server_config.log_level,
        timeout_graceful_shutdown=int(server_config.graceful_shutdown_s),
        timeout_keep_alive=HTTP_KEEP_ALIVE_S,
        access_log=False,
    )
