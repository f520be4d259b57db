"""A mesh node: the P2P listener, a link to every member, gossip, directory and fetches.

The node runs its own asyncio loop on its own thread, so P2P traffic never waits on the
HTTP server's loop; the engine thread only hands it work (`request`) or events (`publish`).
A node dials every member it knows; on that outbound link it sends probes, its directory
(a snapshot, then batches) and fetches (kvmesh.mesh.fetcher), and reads the answers. On
inbound links (kvmesh.mesh.inbound) it answers probes, applies the dialer's directory and
serves fetches. Stopping hands the hottest blocks to the others first (kvmesh.mesh.handoff).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvmesh.engine.kv_events import KVEventBatch, KVSnapshot, split_snapshot
from kvmesh.mesh import greet, wire
from kvmesh.mesh.directory import Directory
from kvmesh.mesh.fetcher import Fetcher, Fetches, Resolvable
from kvmesh.mesh.handoff import hand_off
from kvmesh.mesh.inbound import HANDSHAKE_TIMEOUT_S, InboundLinks
from kvmesh.mesh.link import Link, TcpTransport
from kvmesh.mesh.membership import Membership, State
from kvmesh.mesh.serving import LocalBlocks
from kvmesh.mesh.stats import MeshStats

log = logging.getLogger(__name__)
MAX_BACKLOG = 1024  # event batches held for a link whose snapshot is not sent yet


@dataclass
class MeshConfig:
    host: str
    port: int
    secret: bytes
    seeds: tuple[str, ...] = ()
    http_url: str = ""
    probe_interval_s: float = 0.5
    suspect_after_s: float = 1.5
    dead_after_s: float = 4.0
    fetch_stall_timeout_s: float = 5.0  # a fetch with no block for this long is a miss
    handoff_bytes: int = 1 << 30  # on leave, the hottest blocks up to this go to the others
    handoff_timeout_s: float = 10.0
    socket_buffer_bytes: int = 4 << 20  # SO_SNDBUF/SO_RCVBUF of each link


@dataclass
class _OutLink:
    member: wire.Member
    link: Link
    fetches: Fetches = field(default_factory=Fetches)
    ready: bool = False  # its directory snapshot is sent: batches flow
    snapshotting: bool = False
    backlog: list[KVEventBatch] = field(default_factory=list)


class MeshNode(InboundLinks):
    def __init__(self, config: MeshConfig, local: LocalBlocks):
        self.config = config
        self.local = local
        self.stats = MeshStats()
        self.me = wire.Member(uuid.uuid4().hex, f"{config.host}:{config.port}", config.http_url)
        self.membership = Membership(self.me, suspect_after_s=config.suspect_after_s,
                                     dead_after_s=config.dead_after_s)
        self.directory = Directory()
        self.lock = threading.Lock()  # the directory and membership, read by the engine
        self._out: dict[str, _OutLink] = {}
        self._inbound: set[Link] = set()
        self._dialing: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._fetcher = Fetcher(self._loop, self.stats, local.block_bytes,
                                config.fetch_stall_timeout_s, self._fetches_of, self._send_to)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._handoff = True
        self._thread = threading.Thread(target=self._run, name="kvmesh-mesh", daemon=True)

    # any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise ValueError(f"cannot listen for peers on {self.me.addr}: {self._error}")
        log.info("mesh node %s listening on %s (seeds: %s)", self.me.node_id[:8],
                 self.me.addr, ", ".join(self.config.seeds) or "none")

    def stop(self, handoff: bool = True) -> None:
        """Leave the mesh: hand the hottest blocks over (within the budget), then go."""
        if self._thread.is_alive() and self._stop is not None:
            self._handoff = handoff
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(self.config.handoff_timeout_s * handoff + 5.0)
        if not self._thread.is_alive():  # else the loop still owns the queue
            self._fetcher.fail_queued()

    def holders(self, key: bytes) -> list[str]:
        """Alive, linked members whose directory lists `key` (engine thread; no round trip).
        A suspect is not asked: its link may be the broken part."""
        with self.lock:
            return [n for n in self.directory.holders(key)
                    if n in self._out and self.membership.state(n) is State.ALIVE]

    def request(self, node_id: str, keys: Sequence[bytes],
                futs: list[Resolvable] | None = None,
                intos: Sequence[Any] | None = None) -> list[Resolvable]:
        """Fetch a run of blocks from `node_id`, in order; each future (made here unless
        given) resolves to the bytes, or None on a miss. One run is one Fetch. A block with
        a buffer in `intos` is received into it (and resolves to it)."""
        if futs is None:
            futs = list[Resolvable]([concurrent.futures.Future() for _ in keys])
        into = list(intos) if intos is not None else [None] * len(keys)
        try:
            self._loop.call_soon_threadsafe(self._fetcher.queue, node_id, list(keys), futs,
                                            into)
        except RuntimeError:  # the node has stopped: misses, recomputed
            for fut in futs:
                fut.set_result(None)
        return futs

    def publish(self, batch: KVEventBatch) -> None:
        """The local engine's KV-event batch, for every member's directory."""
        with contextlib.suppress(RuntimeError):  # stopped: nobody to tell
            self._loop.call_soon_threadsafe(self._forward, batch)

    def view(self) -> dict:
        """The mesh as this node sees it (for `/mesh` and `kvmesh peers`)."""
        with self.lock:
            members = [{"node_id": e.member.node_id, "addr": e.member.addr,
                        "http_url": e.member.http_url, "state": e.state.value,
                        "linked": e.member.node_id in self._out,
                        "blocks": self.directory.num_blocks(e.member.node_id)}
                       for e in self.membership.entries.values()]
        me = {"node_id": self.me.node_id, "addr": self.me.addr, "http_url": self.me.http_url}
        return {"me": me, "members": members,
                "stats": msgspec.to_builtins(self.stats)}

    # the node's loop -------------------------------------------------------------------

    def _run(self) -> None:
        try:  # the runner cancels what is still pending (links, fetches) and closes the loop
            with asyncio.Runner(loop_factory=lambda: self._loop) as runner:
                runner.run(self._main())
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            server = await TcpTransport.listen(self.config.host, self.config.port, self._accept,
                                               self.config.socket_buffer_bytes)
        except OSError as exc:
            self._error = exc
            return
        self._started.set()
        probes = asyncio.create_task(self._probe_loop())
        try:
            await self._stop.wait()
        finally:
            probes.cancel()
            await self._leave()
            server.close()
            for link in list(self._inbound):
                link.close()

    async def _leave(self) -> None:
        if self._handoff:
            links = {n: out.link for n, out in self._out.items()}
            await hand_off(self.local, links, self.config.handoff_bytes,
                           self.config.handoff_timeout_s, self.stats, self._send_block)
        outs = list(self._out.values())
        await asyncio.gather(*(self._say_leave(out) for out in outs))
        for out in outs:
            self._drop(out.member.node_id)

    async def _say_leave(self, out: _OutLink) -> None:
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(out.link.send(wire.Leave(self.me.node_id)), 1.0)

    # membership ------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        seq = 0
        while True:
            seq += 1
            with self.lock:
                died = self.membership.tick()
                members = self.membership.members()
                stale = [n for n in self._out
                         if self.membership.silent_for(n) >= self.config.dead_after_s]
            for node_id in died:
                log.warning("peer %s is dead", node_id[:8])
                self.stats.deaths += 1
                self._drop(node_id)
            for node_id in stale:  # alive by others' word, silent on our link: redial it
                if node_id in self._out:
                    self._out[node_id].link.close()
            for out in list(self._out.values()):
                asyncio.create_task(self._send(out, wire.Ping(seq, members)))
            self._dial_missing()
            await asyncio.sleep(self.config.probe_interval_s * random.uniform(0.8, 1.2))

    def _dial_missing(self) -> None:
        with self.lock:
            targets = [e.member.addr for e in self.membership.entries.values()
                       if e.member.node_id not in self._out]  # suspects too: a new link
            if not self.membership.entries:
                targets += list(self.config.seeds)  # alone: keep trying the seeds
        for addr in set(targets) - self._dialing - {self.me.addr}:
            self._dialing.add(addr)
            asyncio.create_task(self._dial(addr))

    def _learn(self, members: Sequence[wire.Member]) -> None:
        with self.lock:
            _, replaced = self.membership.learn(members)
        for node_id in replaced:
            self._drop(node_id)

    def _revive(self, member: wire.Member) -> None:
        with self.lock:
            replaced = self.membership.revive(member)
        for node_id in replaced:
            self._drop(node_id)

    def _drop(self, node_id: str) -> None:
        """Forget a dead, restarted or departed member: links, directory, pending fetches."""
        with self.lock:
            self.membership.leave(node_id)
            self.directory.forget(node_id)
            out = self._out.pop(node_id, None)
        if out is not None:
            out.link.close()
            out.fetches.fail_all()

    # dialing ---------------------------------------------------------------------------

    async def _dial(self, addr: str) -> None:
        try:
            host, port = addr.rsplit(":", 1)
            link = await asyncio.wait_for(
                TcpTransport.dial(host, int(port), self.config.socket_buffer_bytes),
                HANDSHAKE_TIMEOUT_S)
        except (TimeoutError, OSError, ValueError):
            self._dialing.discard(addr)
            return
        try:
            welcome = await asyncio.wait_for(
                greet.dial_side(link, self.config.secret, self.me), HANDSHAKE_TIMEOUT_S)
        except (TimeoutError, OSError, wire.FrameError) as exc:
            log.warning("handshake with %s failed: %s", addr, exc or type(exc).__name__)
            self.stats.handshakes_refused += isinstance(exc, PermissionError)
            link.close()
            self._dialing.discard(addr)
            return
        self._dialing.discard(addr)
        peer = welcome.member
        self._revive(peer)
        self._learn(welcome.members)
        with self.lock:
            if peer.node_id in self._out or peer.node_id not in self.membership.entries:
                link.close()  # already linked, or a dead life of that address
                return
            self.membership.heard(peer.node_id)
            out = _OutLink(peer, link)
            out.fetches.link = link
            link.landing = lambda msg, size, f=out.fetches: self._fetcher.landing(f, msg, size)
            self._out[peer.node_id] = out
        log.info("linked to peer %s at %s", peer.node_id[:8], addr)
        asyncio.create_task(self._read_out(out))
        await self._send_snapshot(out)

    async def _read_out(self, out: _OutLink) -> None:
        """Answers on an outbound link: acks, resync requests, fetched blocks."""
        node_id = out.member.node_id
        try:
            while True:
                msg, payload = await out.link.recv()
                if isinstance(msg, wire.Ack):
                    self._on_ack(node_id, msg)
                elif isinstance(msg, wire.Resync):  # not awaited: the reader keeps reading
                    asyncio.create_task(self._send_snapshot(out))
                elif isinstance(msg, wire.Block):
                    self._fetcher.on_block(out.fetches, msg, payload)
                elif isinstance(msg, wire.Done):
                    self._fetcher.on_done(out.fetches, msg)
                else:
                    raise wire.FrameError(f"unexpected {type(msg).__name__}")
        except (OSError, wire.FrameError) as exc:
            log.info("link to %s closed: %s", node_id[:8], exc or type(exc).__name__)
        finally:
            if self._out.get(node_id) is out:
                self._out.pop(node_id, None)
            out.link.close()
            out.fetches.fail_all()

    def _on_ack(self, node_id: str, ack: wire.Ack) -> None:
        with self.lock:
            self.membership.heard(node_id)
            self.membership.vouch(ack.alive)
        self._learn(ack.members)
        for dead in ack.dead:
            with self.lock:
                believed = self.membership.rumor_dead(dead)
            if believed:
                self._drop(dead)

    async def _send(self, out: _OutLink, msg: wire.Message) -> None:
        try:
            await out.link.send(msg)
        except (OSError, ConnectionError):
            out.link.close()

    # directory -------------------------------------------------------------------------

    async def _send_snapshot(self, out: _OutLink) -> None:
        if out.snapshotting:
            return  # the one on its way covers what this one would
        out.snapshotting, out.ready = True, False
        try:
            try:
                snap: KVSnapshot = await asyncio.wrap_future(self.local.snapshot())
            except Exception:  # noqa: BLE001 - the engine is gone: nothing to announce
                log.exception("directory snapshot failed")
                return
            whole = msgspec.msgpack.encode(snap)
            if len(whole) <= wire.SNAPSHOT_FRAME_BYTES:  # one frame, as every node reads it
                await self._send(out, wire.Directory(True, whole))
            else:  # too big for a header: in parts (a node older than parts cannot join)
                for i, part in enumerate(split_snapshot(snap, wire.SNAPSHOT_PART_KEYS)):
                    await self._send(out, wire.Directory(True, msgspec.msgpack.encode(part), i))
            while out.backlog:  # batches that come meanwhile join the backlog, in order
                backlog, out.backlog = out.backlog, []
                for batch in backlog:
                    if batch.seq > snap.seq:
                        await self._send(out, wire.Directory(False,
                                                             msgspec.msgpack.encode(batch)))
            out.ready = True  # no await since the backlog emptied: live batches follow it
        finally:
            out.snapshotting = False

    def _forward(self, batch: KVEventBatch) -> None:
        data = msgspec.msgpack.encode(batch)
        for out in self._out.values():
            if out.ready:
                asyncio.create_task(self._send(out, wire.Directory(False, data)))
            elif len(out.backlog) < MAX_BACKLOG:
                out.backlog.append(batch)
            else:  # the snapshot is late: a fresh one will cover these
                out.backlog.clear()
                asyncio.create_task(self._send_snapshot(out))

    # fetching (the client half is kvmesh.mesh.fetcher) -------------------------------

    def _fetches_of(self, node_id: str) -> Fetches | None:
        out = self._out.get(node_id)
        return out.fetches if out is not None else None

    def _send_to(self, node_id: str, msg: wire.Message) -> bool:
        out = self._out.get(node_id)
        if out is None:
            return False
        asyncio.create_task(self._send(out, msg))
        return True
