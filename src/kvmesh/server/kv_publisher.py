"""Publishes the engine's block events on a ZeroMQ PUB socket (`--kv-events-port`).

The schema is `kvmesh.engine.kv_events`. The outbox hands events to `on_events` on the
engine thread, which numbers the batch and queues its bytes; a sender thread owns the
socket (ZeroMQ sockets are not thread-safe). PUB never blocks the engine: a subscriber
that falls behind loses batches, sees the gap in `seq`, and resyncs from a snapshot.
pyzmq was chosen over a hand-rolled socket protocol for exactly this fan-out with
slow-subscriber dropping, reconnects and framing, which it does well.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence

import msgspec
import zmq

from kvmesh.engine.core import EngineCore
from kvmesh.engine.events import BlockEvent
from kvmesh.engine.kv_events import KVEventBatch, KVSnapshot, to_wire
from kvmesh.kvstore.index import TierIndex

log = logging.getLogger(__name__)
SEND_HWM = 10_000  # batches buffered per subscriber before ZeroMQ drops (then: resync)


class KVEventPublisher:
    def __init__(self, host: str, port: int):
        self.instance_id = uuid.uuid4().hex
        self.seq = 0  # engine thread only
        self.port = port
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._encoder = msgspec.msgpack.Encoder()
        bound: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send_loop, args=(host, port, bound),
                                        name="kvmesh-kv-events", daemon=True)
        self._thread.start()
        error = bound.get()
        if error is not None:
            raise ValueError(f"cannot publish KV events on {host}:{port}: {error}")

    def on_events(self, events: Sequence[BlockEvent]) -> None:
        """The outbox's subscriber (engine thread): number and queue one batch."""
        wire = to_wire(events)
        if not wire:
            return
        self.seq += 1
        batch = KVEventBatch(self.instance_id, self.seq, time.time(), wire)
        self._queue.put(self._encoder.encode(batch))

    def snapshot(self, core: EngineCore) -> KVSnapshot:
        """What every medium holds now, as of `seq` (engine thread)."""
        return KVSnapshot(self.instance_id, self.seq, snapshot_media(core))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _send_loop(self, host: str, port: int,
                   bound: queue.SimpleQueue[BaseException | None]) -> None:
        ctx: zmq.Context = zmq.Context.instance()
        sock = ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            sock.close()
            bound.put(exc)
            return
        bound.put(None)
        try:
            while (data := self._queue.get()) is not None:
                sock.send(data, copy=False)
        except zmq.ZMQError:
            log.exception("KV event publisher stopped")
        finally:
            sock.close()


def snapshot_media(core: EngineCore) -> dict[str, list[bytes]]:
    """Every block key each medium holds now (engine thread)."""
    media = {"device": [bytes(k) for _, k in core.pool.cached_blocks()]}
    if core.store is not None:
        for tier in (core.store.host, *core.store.sources):
            index = getattr(tier, "index", None)
            if isinstance(index, TierIndex):
                media[index.name] = [bytes(k) for k, _ in index.items()]
    return media
