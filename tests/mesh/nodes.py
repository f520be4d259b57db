"""Mesh nodes in one process for the tests: a dict of blocks stands in for the engine."""

from __future__ import annotations

import concurrent.futures
import os
import time

from kvmesh.engine.kv_events import BlocksRemoved, BlocksStored, KVEventBatch, KVSnapshot
from kvmesh.mesh.node import MeshConfig, MeshNode
from tests.server_process import free_port

BLOCK = 4096
SECRET = b"0123456789abcdef-test"


class DictBlocks:
    """LocalBlocks over a dict: what an engine would export, numbered like KV events."""

    def __init__(self):
        self.block_bytes = BLOCK
        self.blocks: dict[bytes, bytes] = {}
        self.seq = 0
        self.node: MeshNode | None = None

    def put(self, keys: list[bytes]) -> None:
        for k in keys:
            self.blocks[k] = (k * (BLOCK // len(k) + 1))[:BLOCK]
        self._publish(BlocksStored("host", keys))

    def drop(self, keys: list[bytes]) -> None:
        for k in keys:
            self.blocks.pop(k, None)
        self._publish(BlocksRemoved("host", keys))

    def _publish(self, event) -> None:
        self.seq += 1
        assert self.node is not None
        self.node.publish(KVEventBatch(self.node.me.node_id, self.seq, time.time(), [event]))

    def snapshot(self) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(KVSnapshot("x", self.seq, {"host": list(self.blocks)}))
        return fut

    def hottest(self, limit: int) -> concurrent.futures.Future:
        return done(list(reversed(self.blocks))[:limit])

    def adopt(self, blocks) -> concurrent.futures.Future:
        for key, payload in blocks:
            self.blocks[key] = bytes(payload)
        self._publish(BlocksStored("host", [key for key, _ in blocks]))
        return done(len(blocks))

    def export(self, keys) -> concurrent.futures.Future:
        out = []
        for k in keys:
            if k not in self.blocks:
                break
            data = self.blocks[k]
            out.append(data)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(out)
        return fut


def done(value) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_result(value)
    return fut


def make_node(seeds=(), secret=SECRET, **kw) -> tuple[MeshNode, DictBlocks]:
    local = DictBlocks()
    port = free_port()
    timing = dict(probe_interval_s=0.1, suspect_after_s=0.5, dead_after_s=1.5,
                  fetch_stall_timeout_s=2.0)
    cfg = MeshConfig("127.0.0.1", port, secret, tuple(f"127.0.0.1:{p}" for p in seeds),
                     **{**timing, **kw})
    node = MeshNode(cfg, local)
    local.node = node
    node.start()
    return node, local


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out")


def port_of(node: MeshNode) -> int:
    return node.config.port


KEYS = [os.urandom(16) for _ in range(64)]


def make_pair():
    a, la = make_node()
    b, lb = make_node(seeds=[port_of(a)])
    return a, la, b, lb


def fetch_all(node: MeshNode, holder: str, keys) -> list[bytes | None]:
    futs = node.request(holder, keys)
    return [f.result(timeout=10) for f in futs]
