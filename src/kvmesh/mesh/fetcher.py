"""The fetching half of a node: each run of reads (one lookup's blocks from one holder)
becomes one Fetch, the answering Block frames are checked and resolve the reads in order,
and anything that fails, stalls or comes back short resolves to None (a miss: the engine
recomputes those tokens).

A fetch times out on a stall, or at a fixed cap on its age: the stall clock restarts with
every block that arrives on its link, so a long prefix over a slow or busy link (or a fetch
queued behind others at the holder) still streams, while a holder that stops sending is
given up on after `stall_timeout_s` of silence. Whatever the link does, a fetch ends at
`FETCH_CAP_S` (the store's cap on one read plus 5 s), so the host slots lent to it come
back. Runs on the node's loop only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import xxhash

from kvmesh.kvstore.store import READ_CAP_S
from kvmesh.mesh import wire
from kvmesh.mesh.link import Link, Payload
from kvmesh.mesh.stats import MeshStats


class Resolvable(Protocol):
    """A read's outcome as the fetcher sets it (a concurrent Future, or a PeerRead)."""

    def done(self) -> bool: ...
    def set_result(self, result: Any) -> None: ...


@dataclass
class Pending:
    """One Fetch in flight: its keys, the reads they resolve, the buffers they are received
    into (None: a buffer of the link's own), and the next index due."""

    keys: list[bytes]
    futures: list[Resolvable]
    into: list[Any]
    next: int = 0
    handed: int = 0  # buffers handed to the link so far (each once, in order)
    last_progress: float = 0.0
    sent_at: float = 0.0

    def fail(self) -> None:
        for fut in self.futures:
            if not fut.done():
                fut.set_result(None)


@dataclass
class Fetches:
    """The fetches in flight on one outbound link, by request id."""

    by_req: dict[int, Pending] = field(default_factory=dict)
    last_progress: float = 0.0  # any block on the link: queued fetches are not stalled
    link: Link | None = None

    def fail_all(self) -> None:
        """Every fetch is a miss (called once the link is closed: nothing more is received)."""
        for pending in self.by_req.values():
            pending.fail()
        self.by_req.clear()


# Past the store's cap on one read: a fetch the store gave up on ends here too, freeing the
# host slots lent to it, even if its holder keeps the link busy with other answers.
FETCH_CAP_S = READ_CAP_S + 5.0
Send = Callable[[str, wire.Message], bool]  # (node_id, msg) -> False when not linked


class Fetcher:
    def __init__(self, loop: asyncio.AbstractEventLoop, stats: MeshStats, block_bytes: int,
                 stall_timeout_s: float, links: Callable[[str], Fetches | None], send: Send):
        self._loop = loop
        self._stats = stats
        self._block_bytes = block_bytes
        self._stall_s = stall_timeout_s
        self._links = links
        self._send = send
        self._next_req = 0
        self._queued: dict[str, list[Pending]] = {}

    def queue(self, node_id: str, keys: list[bytes], futs: list[Resolvable],
              into: list[Any]) -> None:
        """A run of reads (one prefix): its own request, so a block the holder lacks ends
        this run only, never another's."""
        runs = self._queued.setdefault(node_id, [])
        if not runs:
            self._loop.call_soon(self._flush, node_id)
        for i in range(0, len(keys), wire.MAX_KEYS_PER_FETCH):
            j = i + wire.MAX_KEYS_PER_FETCH
            runs.append(Pending(keys[i:j], futs[i:j], into[i:j]))

    def landing(self, fetches: Fetches, msg: wire.Message, size: int) -> Any:
        """Where the link receives a payload: the reserved host slot of the block it answers,
        when it is the one due and of the right size; else None (the link's own buffer)."""
        if not isinstance(msg, wire.Block) or size != self._block_bytes:
            return None
        pending = fetches.by_req.get(msg.req)
        if pending is None:
            return None
        i = pending.handed  # the link parses ahead of on_block: not `next`
        if msg.index != i or i >= len(pending.keys) or msg.key != pending.keys[i]:
            return None  # out of order or repeated: never into a buffer handed out before
        pending.handed += 1
        into = pending.into[i]
        return into if into is not None and len(into) == size else None

    def _fail(self, fetches: Fetches, req: int) -> None:
        """Give up on a fetch in flight. The link may be receiving one of its blocks (it
        parses ahead): the rest of that payload is diverted first, so no buffer of a read
        that resolved to None is ever written again."""
        pending = fetches.by_req.pop(req, None)
        if pending is None:
            return
        if fetches.link is not None:
            fetches.link.divert(lambda msg: isinstance(msg, wire.Block) and msg.req == req)
        pending.fail()

    def fail_queued(self) -> None:
        """Queued but never sent (the node stops): misses."""
        for runs in self._queued.values():
            for pending in runs:
                pending.fail()
        self._queued.clear()

    def _flush(self, node_id: str) -> None:
        for pending in self._queued.pop(node_id, []):
            pending.last_progress = pending.sent_at = self._loop.time()
            fetches = self._links(node_id)
            if fetches is None:
                pending.fail()
                continue
            self._next_req += 1
            req = self._next_req
            fetches.by_req[req] = pending
            self._stats.fetches += 1
            if not self._send(node_id, wire.Fetch(req, pending.keys)):
                fetches.by_req.pop(req, None)
                pending.fail()
                continue
            self._loop.call_later(self._stall_s, self._check_stall, fetches, req)

    def _check_stall(self, fetches: Fetches, req: int) -> None:
        pending = fetches.by_req.get(req)
        if pending is None:
            return  # done, failed or dropped with its link
        now = self._loop.time()
        idle = now - max(pending.last_progress, fetches.last_progress)
        age = now - pending.sent_at
        if idle < self._stall_s and age < FETCH_CAP_S:  # blocks still arrive: look again
            self._loop.call_later(min(self._stall_s - idle, FETCH_CAP_S - age),
                                  self._check_stall, fetches, req)
            return
        self._stats.fetch_timeouts += 1
        self._fail(fetches, req)

    def on_block(self, fetches: Fetches, msg: wire.Block, payload: Payload) -> None:
        pending = fetches.by_req.get(msg.req)
        if pending is None:
            return  # timed out or failed already
        i = pending.next
        ok = (msg.index == i and i < len(pending.keys) and msg.key == pending.keys[i]
              and len(payload) == self._block_bytes
              and xxhash.xxh3_64_intdigest(payload) == msg.digest)
        if not ok:  # never used: the rest of the run is recomputed
            self._stats.checksum_failures += 1
            self._fail(fetches, msg.req)
            return
        if not pending.futures[i].done():
            pending.futures[i].set_result(payload)
        pending.next += 1
        pending.last_progress = fetches.last_progress = self._loop.time()
        self._stats.blocks_in += 1
        self._stats.bytes_in += len(payload)
        if pending.next == len(pending.keys):
            del fetches.by_req[msg.req]

    def on_done(self, fetches: Fetches, msg: wire.Done) -> None:
        pending = fetches.by_req.get(msg.req)
        if pending is None:
            return
        if msg.busy:
            self._stats.fetches_refused_busy += 1
        else:  # short of the run: the directory listed blocks the holder no longer has
            self._stats.false_positives += len(pending.keys) - pending.next
        self._fail(fetches, msg.req)
