"""Joining the mesh from a serving instance: config defaults, start, attach, stop."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from kvmesh.config import EngineConfig, ServerConfig
from kvmesh.mesh.handshake import load_secret
from kvmesh.mesh.node import MeshConfig, MeshNode
from kvmesh.mesh.source import EngineBlocks, PeerSource

if TYPE_CHECKING:
    from kvmesh.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)
DEFAULT_HOST_BYTES = 1 << 30  # fetched blocks land in host memory: the mesh needs some


def engine_config_for_mesh(engine: EngineConfig, server: ServerConfig) -> EngineConfig:
    """With the mesh on and no host tier configured, give it a default host tier."""
    if server.p2p_port is None or engine.tiers.is_enabled:
        return engine
    log.info("mesh on: host tier set to %d MiB (fetched blocks land there; --host-bytes)",
             DEFAULT_HOST_BYTES >> 20)
    tiers = dataclasses.replace(engine.tiers, host_bytes=DEFAULT_HOST_BYTES)
    return dataclasses.replace(engine, tiers=tiers)


def mesh_config(server: ServerConfig) -> MeshConfig:
    assert server.p2p_port is not None and server.cluster_secret_file
    host = server.p2p_advertise_host or server.host
    if host in ("0.0.0.0", "::"):
        raise ValueError("listening on all addresses: set --p2p-advertise-host to the address "
                         "peers should dial")
    return MeshConfig(host=host, port=server.p2p_port,
                      secret=load_secret(server.cluster_secret_file), seeds=server.peers,
                      http_url=f"http://{host}:{server.port}",
                      socket_buffer_bytes=server.p2p_socket_buffer_bytes)


def start_mesh(engine: AsyncEngine, config: MeshConfig) -> MeshNode:
    """Start a node for this engine and put its peers under the tiered store."""
    store = engine.engine.store
    if store is None:
        raise ValueError("the mesh needs the host tier and prefix caching")
    local = EngineBlocks(engine, "")
    node = MeshNode(config, local)
    local.instance_id, local.node = node.me.node_id, node
    node.start()
    source = PeerSource(node)
    outbox = engine.engine.core.outbox

    def attach() -> None:
        store.add_source(source)
        outbox.subscribe(local.on_events)

    engine.run_on_engine(attach).result()
    return node
