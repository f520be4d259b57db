"""The mesh as the tiered store sees it: one more `Source` below host memory, and the
engine-side half that snapshots and exports this instance's own blocks for its peers.

`PeerSource` answers `key in source` from the local directory (no round trip) and turns
`read(key)` into a fetch from a live holder, preferring the peer that served the previous
block so a prefix streams as one run. A fetched block is received straight into the host
slot the store reserved for it (`read_into`) and indexed there once verified; a failed,
stalled or corrupt fetch resolves to None (its slot is freed) and the rest of that prefix
is recomputed.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from kvmesh.engine.kv_events import KVEventBatch, KVSnapshot, to_wire
from kvmesh.hashing import BlockKey
from kvmesh.kvstore.tier import TierStats
from kvmesh.mesh.fetcher import Resolvable

if TYPE_CHECKING:
    from kvmesh.engine.async_engine import AsyncEngine
    from kvmesh.engine.events import BlockEvent
    from kvmesh.mesh.node import MeshNode

PEER = "peer"


class PeerRead:
    """One peer read's outcome, set once on the node's loop and polled on the engine
    thread. Plain attributes: the store checks every read in flight at each poll (hundreds
    per step), and a Future's lock costs more than the check. This relies on the GIL
    ordering the two writes (and the block's bytes, written before) for the reader; a
    free-threaded build would need a lock or an event here."""

    __slots__ = ("_done", "_value")

    def __init__(self) -> None:
        self._done = False
        self._value: Any = None

    def set_result(self, value: Any) -> None:
        self._value = value
        self._done = True  # after the value: a reader that sees done sees the value

    def done(self) -> bool:
        return self._done

    def result(self, timeout: float | None = None) -> Any:
        """The outcome; only once `done()` (the store never waits on a read)."""
        if not self._done:
            raise RuntimeError("a peer read's result was asked before it was done")
        return self._value


class PeerSource:
    name = PEER
    writable = False
    lands_in_place = True  # a block is received straight into its reserved host slot

    def __init__(self, node: MeshNode):
        self.node = node
        self.stats = TierStats(PEER)
        self._last: str | None = None
        self._reads: list[PeerRead] = []
        self._unsent: dict[str, tuple[list[bytes], list[Resolvable],
                                      list[Any]]] = {}

    @property
    def is_enabled(self) -> bool:
        return True

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and bool(self.node.holders(key))

    def read(self, key: BlockKey) -> PeerRead:
        return self.read_into(key, None)

    def read_into(self, key: BlockKey, into: Any) -> PeerRead:
        """With `into` (a host slot's bytes), the block is received straight into it."""
        fut = PeerRead()
        holders = self.node.holders(key)
        if not holders:
            fut.set_result(None)
            return fut
        node_id = self._last if self._last in holders else holders[0]
        self._last = node_id
        keys, futs, intos = self._unsent.setdefault(node_id, ([], [], []))
        keys.append(key)
        futs.append(fut)
        intos.append(into)
        self._reads.append(fut)
        return fut

    def submit(self) -> None:
        """One request per holder for the reads of this lookup: a prefix streams as a run."""
        unsent, self._unsent = self._unsent, {}
        for node_id, (keys, futs, intos) in unsent.items():
            self.node.request(node_id, keys, futs, intos)

    def write(self, key: BlockKey, payload: bytes) -> None:
        raise NotImplementedError("peers are read-only")

    def poll(self) -> None:
        self.submit()  # none should be left; never strand a read
        pending = []
        for fut in self._reads:
            if not fut.done():
                pending.append(fut)
            elif (data := fut.result()) is not None:
                self.stats.bytes_in += len(data)
        self._reads = pending
        self.stats.checksum_failures = self.node.stats.checksum_failures

    def drain(self, timeout: float = 30.0) -> None:
        pass

    def close(self) -> None:
        pass

    def check_integrity(self) -> None:
        with self.node.lock:
            self.node.directory.check_integrity()
            self.node.membership.check_integrity()


class EngineBlocks:
    """This instance's blocks for its peers: its KV events numbered into batches, snapshots,
    and copies of held blocks (device, host or disk), each taken on the engine thread."""

    def __init__(self, engine: AsyncEngine, instance_id: str):
        self.engine = engine
        self.instance_id = instance_id
        self.block_bytes = engine.engine.runner.block_bytes
        self.seq = 0  # engine thread only
        self.node: MeshNode | None = None

    def on_events(self, events: Sequence[BlockEvent]) -> None:
        wire = to_wire(events)
        if wire and self.node is not None:
            self.seq += 1
            self.node.publish(KVEventBatch(self.instance_id, self.seq, time.time(), wire))

    def snapshot(self) -> concurrent.futures.Future:
        from kvmesh.server.kv_publisher import snapshot_media

        core = self.engine.engine.core
        return self.engine.run_on_engine(
            lambda: KVSnapshot(self.instance_id, self.seq, snapshot_media(core)))

    def export(self, keys: Sequence[bytes]) -> concurrent.futures.Future:
        return self.engine.run_on_engine(lambda: self._export(keys))

    def hottest(self, limit: int) -> concurrent.futures.Future:
        return self.engine.run_on_engine(lambda: self._hottest(limit))

    def _hottest(self, limit: int) -> list[bytes]:
        """Device blocks newest first, then host blocks newest first (their LRU order)."""
        core = self.engine.engine.core
        keys = [bytes(k) for _, k in reversed(core.pool.cached_blocks())]
        if core.store is not None:
            keys += [bytes(k) for k in reversed(core.store.host.list_keys())]
        return list(dict.fromkeys(keys))[:limit]

    def adopt(self, blocks: Sequence[tuple[bytes, bytes | bytearray | memoryview]]
              ) -> concurrent.futures.Future:
        return self.engine.run_on_engine(lambda: self._adopt(blocks))

    def _adopt(self, blocks: Sequence[tuple[bytes, bytes | bytearray | memoryview]]) -> int:
        core = self.engine.engine.core
        if core.store is None:
            return 0
        stored = sum(core.store.host.put(BlockKey(key), payload) for key, payload in blocks
                     if core.pool.lookup(BlockKey(key)) is None)
        core.outbox.drain()  # tell the mesh now, not at the engine's next step
        return stored

    def _export(self, keys: Sequence[bytes]) -> list[Any]:
        engine = self.engine.engine
        store, pool = engine.store, engine.core.pool
        out: list[Any] = []
        for key in keys:
            block_id = pool.lookup(BlockKey(key))
            if block_id is not None:  # immutable once cached: a copy between steps is exact
                block = engine.runner.block(block_id).reshape(-1).view(torch.uint8)
                out.append(block.cpu().numpy().tobytes())  # bytes: any dtype (bf16 too)
                continue
            data = store.host.payload(BlockKey(key)) if store is not None else None
            if data is None and store is not None and store.disk is not None \
                    and key in store.disk:
                out.append(store.disk.read(BlockKey(key)))
                continue
            if data is None:
                break
            out.append(data)
        return out
