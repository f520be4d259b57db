"""The listening half of a node: admitting a dialer (the handshake, then a Welcome with the
members it should know), then serving its link: probes, its directory, fetches, the blocks
it hands over when it leaves, and its Leave. A mixin of `MeshNode`, which owns the state."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvmesh.engine.kv_events import KVSnapshot
from kvmesh.mesh import greet, wire
from kvmesh.mesh.directory import Directory
from kvmesh.mesh.handoff import Gifts
from kvmesh.mesh.link import Link
from kvmesh.mesh.membership import Membership
from kvmesh.mesh.serving import MAX_FETCHES_PER_LINK, MAX_QUEUED_FETCHES, LocalBlocks, serve_fetches
from kvmesh.mesh.stats import MeshStats

if TYPE_CHECKING:
    from kvmesh.mesh.node import MeshConfig

log = logging.getLogger("kvmesh.mesh.node")
HANDSHAKE_TIMEOUT_S = 5.0
MAX_INBOUND = 256  # authenticated links
MAX_UNAUTHENTICATED = 32  # in their handshake: silent sockets cannot crowd members out


class InboundLinks:
    config: MeshConfig
    me: wire.Member
    local: LocalBlocks
    stats: MeshStats
    lock: threading.Lock
    membership: Membership
    directory: Directory
    _inbound: set[Link]

    def _learn(self, members: Sequence[wire.Member]) -> None:
        raise NotImplementedError

    def _drop(self, node_id: str) -> None:
        raise NotImplementedError

    def _revive(self, member: wire.Member) -> None:
        raise NotImplementedError

    def _accept(self, link: Link) -> None:
        pending = sum(not other.authenticated for other in self._inbound)
        if pending >= MAX_UNAUTHENTICATED or len(self._inbound) - pending >= MAX_INBOUND:
            link.close()
            return
        self._inbound.add(link)
        asyncio.create_task(self._serve(link))

    async def _serve(self, link: Link) -> None:
        try:
            peer = await asyncio.wait_for(self._admit(link), HANDSHAKE_TIMEOUT_S)
            await self._serve_member(link, peer)
        except PermissionError as exc:
            self.stats.handshakes_refused += 1
            log.warning("refused peer %s: %s", link.peer_addr, exc)
        except (TimeoutError, OSError, wire.FrameError) as exc:
            self.stats.bad_frames += isinstance(exc, wire.FrameError)
            log.info("inbound link %s closed: %s", link.peer_addr, exc or type(exc).__name__)
        finally:
            self._inbound.discard(link)
            link.close()

    async def _admit(self, link: Link) -> wire.Member:
        member = await greet.listen_side(link, self.config.secret)
        with self.lock:
            members = self.membership.members()
        await link.send(wire.Welcome(self.me, members))
        return member

    async def _serve_member(self, link: Link, peer: wire.Member) -> None:
        self._revive(peer)  # it proved the secret on its own link: alive, even if buried
        fetches: asyncio.Queue[wire.Fetch] = asyncio.Queue(MAX_QUEUED_FETCHES)
        gifts = Gifts(self.local, self.stats)
        tasks = [asyncio.create_task(serve_fetches(link, fetches, self.local, self.stats,
                                                   self._send_block))
                 for _ in range(MAX_FETCHES_PER_LINK)]
        try:
            while True:
                msg, payload = await link.recv()
                with self.lock:
                    known = self.membership.heard(peer.node_id)
                if not known:  # buried by mistake, yet it talks to us on its own link
                    self._revive(peer)
                if isinstance(msg, wire.Ping):
                    self._learn(msg.members)
                    with self.lock:
                        members = self.membership.members()
                        dead = self.membership.recent_dead()
                        alive = self.membership.fresh()
                    link.post(wire.Ack(msg.seq, members, dead, alive))
                elif isinstance(msg, wire.Directory):
                    await self._on_directory(link, peer.node_id, msg)
                elif isinstance(msg, wire.Fetch):
                    try:
                        fetches.put_nowait(msg)
                    except asyncio.QueueFull:  # busy: a miss now, never a stalled reader
                        link.post(wire.Done(msg.req, 0, busy=True))
                elif isinstance(msg, wire.Give):
                    gifts.accept(msg, payload)
                elif isinstance(msg, wire.Leave):
                    log.info("peer %s left the mesh", peer.node_id[:8])
                    self._drop(peer.node_id)
                    return
                else:
                    raise wire.FrameError(f"unexpected {type(msg).__name__}")
        finally:
            gifts.flush()  # what it gave before its Leave (or before the link broke)
            for task in tasks:
                task.cancel()

    async def _on_directory(self, link: Link, node_id: str, msg: wire.Directory) -> None:
        data = wire.decode_directory(msg)
        with self.lock:
            if isinstance(data, KVSnapshot):
                if msg.part == 0:
                    self.directory.reset(node_id, data)
                    return
                in_order = self.directory.extend(node_id, data)  # False: not its snapshot
            else:
                in_order = self.directory.apply(node_id, data)
        if not in_order:
            link.post(wire.Resync(data.seq))

    async def _send_block(self, link: Link, header: wire.Block | wire.Give, data: bytes) -> None:
        await link.send(header, data)

