"""Mesh nodes in one process over real loopback sockets: fetches, checksums, stale entries,
stalls, landing buffers, graceful leave and membership. The engine side is a dict of blocks
(tests/mesh/nodes.py); hostile input is in test_wire_fuzz.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvmesh.mesh import fetcher, wire
from kvmesh.mesh.membership import Membership, State
from kvmesh.mesh.node import MeshConfig, MeshNode
from tests.mesh.nodes import (
    BLOCK,
    KEYS,
    SECRET,
    DictBlocks,
    fetch_all,
    make_node,
    port_of,
    wait_until,
)
from tests.server_process import free_port


def test_fetch_streams_verified_blocks_and_stops_at_the_first_missing(pair):
    a, la, b, _ = pair
    la.put(KEYS[:40])
    wait_until(lambda: b.holders(KEYS[39]) == [a.me.node_id])
    got = fetch_all(b, a.me.node_id, KEYS[:40])
    assert got == [la.blocks[k] for k in KEYS[:40]]
    # A stale entry: A dropped block 10 after B's directory listed it. The run stops there.
    la.blocks.pop(KEYS[10])
    got = fetch_all(b, a.me.node_id, KEYS[:20])
    assert got[:10] == [la.blocks[k] for k in KEYS[:10]] and got[10:] == [None] * 10
    assert b.stats.blocks_in == 50 and a.stats.blocks_out == 50
    # Removals reach the directory; a resync follows a gap.
    la.drop(KEYS[:5])
    wait_until(lambda: not b.holders(KEYS[0]))
    assert b.holders(KEYS[5]) == [a.me.node_id]


class CorruptingNode(MeshNode):
    """Flips a byte of every block after its digest was taken: damage in transit."""

    async def _send_block(self, link, header, data):
        await link.send(header, bytes([data[0] ^ 1]) + data[1:])


def test_blocks_that_fail_their_checksum_are_never_used():
    local = DictBlocks()
    a = CorruptingNode(MeshConfig("127.0.0.1", free_port(), SECRET, probe_interval_s=0.1),
                       local)
    local.node = a
    a.start()
    b, _ = make_node(seeds=[port_of(a)])
    try:
        local.put(KEYS[:4])
        wait_until(lambda: b.holders(KEYS[3]))
        assert fetch_all(b, a.me.node_id, KEYS[:4]) == [None] * 4
        assert b.stats.checksum_failures >= 1 and b.stats.blocks_in == 0  # one per burst
    finally:
        b.stop(handoff=False)
        a.stop(handoff=False)


def _holder_and_fetcher(cls, stall_s: float, **attrs):
    """A holder node of class `cls` (with `attrs` set on it) and a node that fetches from
    it with a stall timeout of `stall_s`."""
    local = DictBlocks()
    a = cls(MeshConfig("127.0.0.1", free_port(), SECRET, probe_interval_s=0.1), local)
    for name, value in attrs.items():
        setattr(a, name, value)
    local.node = a
    a.start()
    b, _ = make_node(seeds=[port_of(a)])
    b._fetcher._stall_s = stall_s
    return a, local, b


class SlowNode(MeshNode):
    """Sends each block `delay` seconds after the last; goes silent from block `stall_at`."""

    delay = 0.25
    stall_at = 10**9

    async def _send_block(self, link, header, data):
        await asyncio.sleep(self.delay if header.index < self.stall_at else 3600)
        await link.send(header, data)


def _timed_fetch_of_twelve(a, local, b) -> tuple[list, float]:
    """`a` holds twelve blocks; `b` fetches them once it knows: the blocks and the seconds."""
    local.put(KEYS[:12])
    wait_until(lambda: b.holders(KEYS[11]))
    start = time.monotonic()
    got = fetch_all(b, a.me.node_id, KEYS[:12])
    return got, time.monotonic() - start


@pytest.mark.parametrize("stall_at", [None, 6])
def test_a_fetch_times_out_on_a_stall_not_on_a_length_within_the_cap(stall_at):
    """Stall timeout 1 s: twelve blocks 0.25 s apart (3 s in all) arrive in full; a holder
    that goes silent after six gives six blocks and six misses, about 1 s after the last."""
    a, local, b = _holder_and_fetcher(SlowNode, stall_s=1.0, stall_at=stall_at or 10**9)
    try:
        got, took = _timed_fetch_of_twelve(a, local, b)
        n = stall_at or 12
        assert got[:n] == [local.blocks[k] for k in KEYS[:n]]
        assert got[n:] == [None] * (12 - n)
        assert b.stats.fetch_timeouts == (1 if stall_at else 0)
        assert took > 2.5 if not stall_at else 1.0 < took - 0.25 * n < 3.0
    finally:
        b.stop(handoff=False)
        a.stop(handoff=False)


def test_a_fetch_that_keeps_streaming_still_ends_at_its_age_cap(monkeypatch):
    """Blocks 0.25 s apart never stall a 1 s timeout, but a fetch older than the cap (1.6 s
    here, 35 s in service) ends: the blocks in by then are used, the rest are misses."""
    monkeypatch.setattr(fetcher, "FETCH_CAP_S", 1.6)
    a, local, b = _holder_and_fetcher(SlowNode, stall_s=1.0)
    try:
        got, took = _timed_fetch_of_twelve(a, local, b)
        n = sum(g is not None for g in got)
        assert 3 <= n <= 9 and got[n:] == [None] * (12 - n)
        assert got[:n] == [local.blocks[k] for k in KEYS[:n]]
        assert b.stats.fetch_timeouts == 1 and took < 2.8
    finally:
        b.stop(handoff=False)
        a.stop(handoff=False)


def test_fetched_blocks_are_received_into_the_buffers_given(pair):
    """A block with a buffer (a host slot, in the engine) is received into it and resolves
    to that very buffer; one without gets the link's own."""
    a, la, b, _ = pair
    la.put(KEYS[:6])
    wait_until(lambda: b.holders(KEYS[5]) == [a.me.node_id])
    intos = [memoryview(bytearray(BLOCK)) if i % 2 == 0 else None for i in range(6)]
    futs = b.request(a.me.node_id, KEYS[:6], intos=intos)
    got = [f.result(timeout=10) for f in futs]
    for i, (payload, into) in enumerate(zip(got, intos, strict=True)):
        assert bytes(payload) == la.blocks[KEYS[i]]
        assert (payload is into) == (i % 2 == 0)


class SplitNode(MeshNode):
    """Sends block `stall_at` in two halves, `pause` seconds apart; the rest whole."""

    stall_at = 1
    pause = 2.0

    async def _send_block(self, link, header, data):
        if header.index != self.stall_at:
            await link.send(header, data)
            return
        half = len(data) // 2
        held: list = []
        link.post = held.append  # control frames posted meanwhile follow the whole block
        link._transport.write(wire.encode(header, len(data)) + data[:half])
        await asyncio.sleep(self.pause)
        link._transport.write(data[half:])
        del link.post
        for msg in held:
            link.post(msg)


def test_a_block_stalled_mid_payload_never_writes_into_its_buffer_after_the_miss():
    """The fetch times out while block 1 is half received into its buffer (a reserved host
    slot that is reused once the read fails). The rest of that payload, arriving later, must
    go elsewhere; the link stays in step and serves the next fetch."""
    a, local, b = _holder_and_fetcher(SplitNode, stall_s=0.5)
    try:
        local.put(KEYS[:3])
        wait_until(lambda: b.holders(KEYS[2]))
        intos = [memoryview(bytearray(b"\xab" * BLOCK)) for _ in range(3)]
        futs = b.request(a.me.node_id, KEYS[:3], intos=intos)
        got = [f.result(timeout=10) for f in futs]
        assert got[0] is intos[0] and bytes(got[0]) == local.blocks[KEYS[0]]
        assert got[1:] == [None, None] and b.stats.fetch_timeouts == 1
        at_miss = bytes(intos[1])
        assert at_miss[BLOCK // 2:] == b"\xab" * (BLOCK // 2)  # the second half never came
        time.sleep(a.pause)  # the second half arrives now
        a.stall_at = -1
        again = b.request(a.me.node_id, KEYS[:3])
        assert [bytes(f.result(timeout=10)) for f in again] == [local.blocks[k] for k in KEYS[:3]]
        assert bytes(intos[1]) == at_miss and bytes(intos[2]) == b"\xab" * BLOCK
    finally:
        b.stop(handoff=False)
        a.stop(handoff=False)


def test_graceful_leave_hands_blocks_to_the_members_that_stay():
    # patient failure detection: a member that looks slow under a loaded CPU must not be
    # dropped (and its link with it) just before the hand-off this test checks
    slow = dict(suspect_after_s=3.0, dead_after_s=8.0)
    a, la = make_node(**slow)
    b, lb = make_node(seeds=[port_of(a)], **slow)
    c, lc = make_node(seeds=[port_of(b)], **slow)
    try:
        # every member alive in every view and linked: the handoff spreads over both
        wait_until(lambda: all(len(n.membership.live()) == 2 and len(n._out) == 2
                          for n in (a, b, c)))
        la.put(KEYS[:24])
        wait_until(lambda: c.holders(KEYS[23]) == [a.me.node_id])
        wait_until(lambda: len(a._out) == 2)
        a.stop()  # hands its 24 blocks over, then leaves
        assert a.stats.blocks_given == 24
        # adoption is counted on receipt and stored in batches: wait for the stored blocks
        wait_until(lambda: len(lb.blocks) + len(lc.blocks) == 24)
        assert b.stats.blocks_adopted + c.stats.blocks_adopted == 24
        assert lb.blocks.keys().isdisjoint(lc.blocks)  # each block to one member
        assert len(lb.blocks) > 0 and len(lc.blocks) > 0  # spread by rendezvous hashing
        for k in KEYS[:24]:
            assert (lb.blocks.get(k) or lc.blocks.get(k)) == la.blocks[k]
        # What B adopted is in C's directory now: still a peer hit, from B.
        given_b = [k for k in KEYS[:24] if k in lb.blocks]
        wait_until(lambda: all(c.holders(k) == [b.me.node_id] for k in given_b))
        assert fetch_all(c, b.me.node_id, given_b) == [la.blocks[k] for k in given_b]
    finally:
        for n in (a, b, c):
            n.stop(handoff=False)


def test_gossip_spreads_membership_and_a_death_is_noticed():
    a, _ = make_node()
    b, _ = make_node(seeds=[port_of(a)])
    c, _ = make_node(seeds=[port_of(b)])
    nodes = [a, b, c]
    try:
        wait_until(lambda: all(len(n.membership.live()) == 2 and len(n._out) == 2 for n in nodes))
        c.stop()
        start = time.monotonic()
        wait_until(lambda: c.me.node_id not in a.membership.entries, timeout=10)
        assert time.monotonic() - start < 5  # dead_after_s 1.5 s plus a probe
        for n in (a, b):
            n.membership.check_integrity()
            n.directory.check_integrity()
    finally:
        for n in nodes:
            n.stop(handoff=False)


def test_membership_suspects_before_it_buries_and_restarts_replace():
    now = [0.0]
    me = wire.Member("me", "h:1")
    m = Membership(me, clock=lambda: now[0], suspect_after_s=1.0, dead_after_s=3.0)
    new, replaced = m.learn([wire.Member("p1", "h:2"), wire.Member("p2", "h:3"), me])
    assert [x.node_id for x in new] == ["p1", "p2"] and replaced == []
    now[0] = 1.5
    m.heard("p2")
    assert m.tick() == [] and m.state("p1") is State.SUSPECT and m.state("p2") is State.ALIVE
    assert not m.rumor_dead("p2")  # heard lately: a rumor does not kill it
    now[0] = 3.2
    assert m.tick() == ["p1"] and m.state("p1") is State.DEAD
    assert m.learn([wire.Member("p1", "h:2")]) == ([], [])  # no resurrection
    _, replaced = m.learn([wire.Member("p2-new", "h:3")])  # p2 restarted
    assert replaced == ["p2"] and m.state("p2-new") is State.ALIVE
    m.check_integrity()


def test_membership_vouching_tombstone_expiry_and_revival():
    """SWIM's indirect evidence: a member another member heard lately stays suspect, not
    dead; tombstones expire; its own link revives a member buried by mistake."""
    now = [0.0]
    me = wire.Member("me", "h:1")
    m = Membership(me, clock=lambda: now[0], suspect_after_s=1.0, dead_after_s=3.0,
                   tombstone_ttl_s=10.0)
    m.learn([wire.Member("p1", "h:2"), wire.Member("p2", "h:3")])
    now[0] = 2.5
    m.heard("p2")
    m.vouch(["p1", "unknown"])  # p2's answer: it heard p1 lately (our link to p1 is bad)
    now[0] = 3.2
    assert m.tick() == [] and m.state("p1") is State.SUSPECT  # vouched: not dead yet
    assert m.fresh() == ["p2"]
    now[0] = 3.6  # the vouch is older than suspect_after_s now
    assert m.tick() == ["p1"] and "p1" in m.tombstones
    assert m.learn([wire.Member("p1", "h:2")]) == ([], [])  # gossip does not resurrect
    assert m.revive(wire.Member("p1", "h:2")) == []  # its own link does
    assert m.state("p1") is State.ALIVE and "p1" not in m.tombstones
    now[0] = 10.0
    assert sorted(m.tick()) == ["p1", "p2"]  # both silent since 3.6 and 2.5
    now[0] = 19.9
    m.tick()
    assert set(m.tombstones) == {"p1", "p2"}  # buried at 10.0, kept for 10 s
    now[0] = 20.1
    m.tick()
    assert not m.tombstones  # expired: gossip may introduce them again
    m.check_integrity()


def test_a_directory_snapshot_too_big_for_one_frame_goes_in_parts(monkeypatch):
    from kvmesh.mesh.directory import Directory

    monkeypatch.setattr(wire, "SNAPSHOT_FRAME_BYTES", 200)  # 40 keys of 16 bytes: too big
    monkeypatch.setattr(wire, "SNAPSHOT_PART_KEYS", 7)  # 6 parts
    extended: list[int] = []
    extend = Directory.extend
    monkeypatch.setattr(Directory, "extend", lambda self, node, part: (
        extended.append(sum(map(len, part.media.values()))), extend(self, node, part))[1])
    a, la = make_node()
    b = None
    try:
        la.put(KEYS[:40])  # before b links: b learns them from a's snapshot
        b, _ = make_node(seeds=[port_of(a)])
        wait_until(lambda: all(b.holders(k) == [a.me.node_id] for k in KEYS[:40]))
        assert extended[:5] == [7, 7, 7, 7, 5]  # parts 1-5 added to part 0 (7 keys)
        la.drop(KEYS[:3])  # batches after the parts apply in order
        wait_until(lambda: not b.holders(KEYS[0]))
        assert b.holders(KEYS[3]) == [a.me.node_id] and not b.holders(KEYS[40])
    finally:
        if b is not None:
            b.stop(handoff=False)
        a.stop(handoff=False)
