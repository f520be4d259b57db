"""Blocks received in place: a fetch's buffers (host slots, in the engine) are written only
by the frames they were handed to, once each and in order. A holder that repeats a block,
answers after `Done`, or sends a bad block while the next one is already arriving never
writes into a buffer whose read has resolved. Real sockets (a socket pair), the real
`Link` and `Fetcher`; the test writes the holder's frames by hand."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket

import pytest
import xxhash

from kvmesh.mesh import wire
from kvmesh.mesh.fetcher import Fetcher, Fetches
from kvmesh.mesh.link import Link
from kvmesh.mesh.stats import MeshStats

BLOCK = 64 << 10  # big enough to be received in several parts
FILL = b"\xab"


class Harness:
    """One outbound link with a fetch of `n` blocks in flight, each with its own buffer."""

    def __init__(self, n: int = 3):
        self.loop = asyncio.new_event_loop()
        self.stats = MeshStats()
        self.fetches = Fetches()
        self.fetcher = Fetcher(self.loop, self.stats, BLOCK, 5.0, lambda _: self.fetches,
                               lambda _node, _msg: True)
        self.ours, self.holder = socket.socketpair()
        self.link = Link()
        self.link.authenticated = True
        self.loop.run_until_complete(
            self.loop.create_connection(lambda: self.link, sock=self.ours))
        self.fetches.link = self.link
        self.link.landing = lambda msg, size: self.fetcher.landing(self.fetches, msg, size)
        self.keys = [os.urandom(16) for _ in range(n)]
        self.blocks = [os.urandom(BLOCK) for _ in range(n)]
        self.into = [memoryview(bytearray(FILL * BLOCK)) for _ in range(n)]
        self.futs = [concurrent.futures.Future() for _ in range(n)]
        self.fetcher.queue("holder", self.keys, list(self.futs), self.into)
        self.run_until(lambda: bool(self.fetches.by_req))
        self.req = next(iter(self.fetches.by_req))

    def frame(self, i: int, payload: bytes | None = None, digest: int | None = None) -> bytes:
        data = self.blocks[i] if payload is None else payload
        msg = wire.Block(self.req, i, self.keys[i],
                         xxhash.xxh3_64_intdigest(data) if digest is None else digest)
        return wire.encode(msg, len(data)) + data

    def run_until(self, pred, timeout: float = 5.0) -> None:
        async def wait():
            while not pred():
                await asyncio.sleep(0.002)
        self.loop.run_until_complete(asyncio.wait_for(wait(), timeout))

    def handle_one(self) -> wire.Message:
        """Read the next frame and give it to the fetcher, as the node's reader does."""
        msg, payload = self.loop.run_until_complete(asyncio.wait_for(self.link.recv(), 5))
        if isinstance(msg, wire.Block):
            self.fetcher.on_block(self.fetches, msg, payload)
        elif isinstance(msg, wire.Done):
            self.fetcher.on_done(self.fetches, msg)
        return msg

    def close(self) -> None:
        self.link.close()
        self.holder.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


def test_blocks_land_in_their_buffers_and_resolve_to_them(h):
    h.holder.sendall(b"".join(h.frame(i) for i in range(3)))
    for _ in range(3):
        h.handle_one()
    assert [f.result(0) is into for f, into in zip(h.futs, h.into, strict=True)] == [True] * 3
    assert [bytes(b) for b in h.into] == h.blocks


def test_a_repeated_block_never_overwrites_the_one_that_landed(h):
    h.holder.sendall(h.frame(0))
    h.handle_one()
    assert h.futs[0].result(0) is h.into[0]
    h.holder.sendall(h.frame(0, payload=os.urandom(BLOCK)))  # block 0 again, other bytes
    h.handle_one()
    assert bytes(h.into[0]) == h.blocks[0]  # the landed block is untouched
    assert [f.result(0) for f in h.futs[1:]] == [None, None]  # the fetch is given up
    assert bytes(h.into[1]) == FILL * BLOCK


def test_a_bad_block_diverts_the_next_one_already_arriving(h):
    """Block 0 fails its checksum while block 1 is half received into its buffer: block 1's
    read resolves to None at once, and the rest of its payload goes elsewhere."""
    half = BLOCK // 2
    h.holder.sendall(h.frame(0, digest=1) + h.frame(1)[:-half])
    h.run_until(lambda: h.link._target is not None and h.link._got > 0)
    assert h.link._target is h.into[1]  # the link parsed ahead, into block 1's buffer
    h.handle_one()  # block 0: bad checksum
    assert [f.result(0) for f in h.futs] == [None] * 3 and h.stats.checksum_failures == 1
    at_miss = bytes(h.into[1])
    h.holder.sendall(h.frame(1)[-half:])
    h.handle_one()  # block 1 arrives whole, into scratch, and is dropped
    assert bytes(h.into[1]) == at_miss and at_miss[-half:] == FILL * half


def test_blocks_after_done_are_dropped_unwritten(h):
    h.holder.sendall(wire.encode(wire.Done(h.req, 0)))
    assert isinstance(h.handle_one(), wire.Done)
    assert [f.result(0) for f in h.futs] == [None] * 3
    h.holder.sendall(h.frame(0))
    h.handle_one()
    assert bytes(h.into[0]) == FILL * BLOCK and h.stats.blocks_in == 0


def test_out_of_order_blocks_never_land(h):
    h.holder.sendall(h.frame(1))
    h.handle_one()
    assert bytes(h.into[1]) == FILL * BLOCK and bytes(h.into[0]) == FILL * BLOCK
    assert [f.result(0) for f in h.futs] == [None] * 3
